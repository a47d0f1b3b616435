// The fused alternative-loss panel as XLA FFI handlers for CUDA, for JAX on an NVIDIA GPU:
// keras_implicit/_ffi.py registers them for the "CUDA" platform under the same target names as the CPU
// handlers (custom_ops/panel_ffi.cc), so one jax.ffi.ffi_call runs on whichever device holds the arrays.
// The kernels are custom_ops/panel_cuda.cu's (panel_math.h's terms, launched through panel_cuda.h). Build:
// `make -C custom_ops cuda` (nvcc for both files, jaxlib's FFI headers from jax.ffi.include_dir()).
//
// Handlers and attributes are those of the CPU binding (KerasImplicitPanel{F32,F64},
// KerasImplicitPanelGrad{F32,F64}; sigmas, temperatures, margins, error, reduce). Bad inputs are refused with
// ffi::Error (InvalidArgument) and the CPU binding's messages: shapes and parameters on the host, labels and
// feature norms inside the kernels, which is why every call waits for its kernels (cudaStreamSynchronize) to
// read the first bad row back. Scratch memory (the bad-row words, the per-sample values of reduce=True, the
// rows' d norm for a scalar norm) comes from XLA's allocator (ffi::ScratchAllocator).

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "panel_cuda.h"
#include "panel_ffi_shapes.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace keras_implicit {
namespace {

using cuda::BadInput;
using cuda::DevicePanel;
using cuda::DeviceProblem;

ffi::Error CudaError(cudaError_t status, const char* what) {
  return ffi::Error::Internal(std::string("keras_implicit panel (CUDA): ") + what + ": " + cudaGetErrorString(status));
}

// Shapes and parameters (on the host): fills `problem` (pointers into device memory) and `device_panel`.
template <ffi::DataType dtype, typename T = ffi::NativeType<dtype>>
std::string ReadProblem(const ffi::Buffer<dtype>& logits, const ffi::Buffer<ffi::S32>& labels,
                        const ffi::Buffer<dtype>& feature_norm, ffi::Span<const double> sigmas,
                        ffi::Span<const double> temperatures, ffi::Span<const double> margins, bool error,
                        DevicePanel* device_panel, DeviceProblem<T>* problem) {
  ffi_shapes::Shapes shapes;
  std::string message = ffi_shapes::ReadShapes(logits, labels, feature_norm, &shapes);
  if (!message.empty()) return message;
  Panel panel;
  message = ReadPanel(sigmas.begin(), static_cast<Index>(sigmas.size()), temperatures.begin(),
                      static_cast<Index>(temperatures.size()), margins.begin(), static_cast<Index>(margins.size()),
                      error, &panel);
  if (!message.empty()) return message;
  message = cuda::ToDevicePanel(panel, device_panel);
  if (!message.empty()) return message;
  *problem = DeviceProblem<T>{logits.typed_data(), labels.typed_data(), feature_norm.typed_data(), shapes.batch,
                              shapes.classes, shapes.norm_per_sample};
  return std::string();
}

// Scratch (device memory from XLA's allocator, for the call) for `count` values of type V.
template <typename V>
ffi::ErrorOr<V*> ScratchArray(ffi::ScratchAllocator& scratch, Index count) {
  auto memory = scratch.Allocate(sizeof(V) * static_cast<size_t>(count), alignof(V));
  if (!memory.has_value()) return ffi::Unexpected(ffi::Error::Internal("could not allocate scratch memory"));
  return static_cast<V*>(*memory);
}

// Scratch for the bad-row words, set to kNone.
ffi::ErrorOr<BadInput*> NewBadInput(ffi::ScratchAllocator& scratch, cudaStream_t stream) {
  auto bad = ScratchArray<BadInput>(scratch, 1);
  if (bad.has_error()) return bad;
  const cudaError_t status = cudaMemsetAsync(*bad, 0xff, sizeof(BadInput), stream);
  if (status != cudaSuccess) return ffi::Unexpected(CudaError(status, "cudaMemsetAsync"));
  return bad;
}

// Waits for the kernels; the first bad norm or label as the CPU binding's error.
template <typename T>
ffi::Error CheckBadInput(const DeviceProblem<T>& problem, const BadInput* bad, cudaStream_t stream) {
  cudaError_t status;
  const std::string message = cuda::ReadBadInput(problem, bad, stream, &status);
  if (status != cudaSuccess) return CudaError(status, "reading the input checks");
  return message.empty() ? ffi::Error::Success() : ffi::Error::InvalidArgument(message);
}

template <ffi::DataType dtype>
ffi::Error PanelForward(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::Buffer<dtype> logits,
                        ffi::Buffer<ffi::S32> labels, ffi::Buffer<dtype> feature_norm, ffi::Span<const double> sigmas,
                        ffi::Span<const double> temperatures, ffi::Span<const double> margins, bool error, bool reduce,
                        ffi::ResultBuffer<dtype> values) {
  using T = ffi::NativeType<dtype>;
  DevicePanel panel;
  DeviceProblem<T> problem;
  const std::string message =
      ReadProblem(logits, labels, feature_norm, sigmas, temperatures, margins, error, &panel, &problem);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  const Index columns = panel.columns();
  const std::string shape_message = ffi_shapes::CheckValues(values, problem.batch, columns, reduce);
  if (!shape_message.empty()) return ffi::Error::InvalidArgument(shape_message);
  auto bad = NewBadInput(scratch, stream);
  if (bad.has_error()) return bad.error();
  T* per_sample = values->typed_data();
  if (reduce) {
    auto memory = ScratchArray<T>(scratch, problem.batch * columns);
    if (memory.has_error()) return memory.error();
    per_sample = *memory;
  }
  cudaError_t status = cuda::LaunchForward(problem, panel, per_sample, *bad, stream);
  if (status != cudaSuccess) return CudaError(status, "launching the panel kernel");
  if (reduce) {
    status = cuda::LaunchColumnSums(per_sample, problem.batch, columns, values->typed_data(), stream);
    if (status != cudaSuccess) return CudaError(status, "launching the column sums");
  }
  return CheckBadInput(problem, *bad, stream);
}

template <ffi::DataType dtype>
ffi::Error PanelGradient(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::Buffer<dtype> grad,
                         ffi::Buffer<dtype> logits, ffi::Buffer<ffi::S32> labels, ffi::Buffer<dtype> feature_norm,
                         ffi::Span<const double> sigmas, ffi::Span<const double> temperatures,
                         ffi::Span<const double> margins, bool error, bool reduce,
                         ffi::ResultBuffer<dtype> grad_logits, ffi::ResultBuffer<dtype> grad_norm) {
  using T = ffi::NativeType<dtype>;
  DevicePanel panel;
  DeviceProblem<T> problem;
  const std::string message =
      ReadProblem(logits, labels, feature_norm, sigmas, temperatures, margins, error, &panel, &problem);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  const Index columns = panel.columns();
  const std::string shape_message = ffi_shapes::CheckUpstream(grad, problem.batch, columns, reduce);
  if (!shape_message.empty()) return ffi::Error::InvalidArgument(shape_message);
  auto bad = NewBadInput(scratch, stream);
  if (bad.has_error()) return bad.error();
  T* row_dnorm = grad_norm->typed_data();
  if (!problem.norm_per_sample) {
    auto memory = ScratchArray<T>(scratch, problem.batch);
    if (memory.has_error()) return memory.error();
    row_dnorm = *memory;
  }
  cudaError_t status = cuda::LaunchGradient(problem, panel, grad.typed_data(), reduce, grad_logits->typed_data(),
                                            row_dnorm, *bad, stream);
  if (status != cudaSuccess) return CudaError(status, "launching the panel's gradient kernel");
  if (!problem.norm_per_sample) {
    // A scalar norm: the rows' sum (a one-column sum over [batch, 1]).
    if (problem.batch == 0) {
      status = cudaMemsetAsync(grad_norm->typed_data(), 0, sizeof(T), stream);
    } else {
      status = cuda::LaunchColumnSums(row_dnorm, problem.batch, Index(1), grad_norm->typed_data(), stream);
    }
    if (status != cudaSuccess) return CudaError(status, "summing the norm's gradient");
  }
  return CheckBadInput(problem, *bad, stream);
}

}  // namespace
}  // namespace keras_implicit

#define KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(suffix, dtype)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                                               \
      KerasImplicitPanel##suffix, keras_implicit::PanelForward<dtype>,                                         \
      KERAS_IMPLICIT_PANEL_ATTRIBUTES(ffi::Ffi::Bind()                                                         \
                                          .Ctx<ffi::PlatformStream<cudaStream_t>>()                            \
                                          .Ctx<ffi::ScratchAllocator>()                                        \
                                          .Arg<ffi::Buffer<dtype>>()                                           \
                                          .Arg<ffi::Buffer<ffi::S32>>()                                        \
                                          .Arg<ffi::Buffer<dtype>>())                                          \
          .Ret<ffi::Buffer<dtype>>());                                                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                                               \
      KerasImplicitPanelGrad##suffix, keras_implicit::PanelGradient<dtype>,                                    \
      KERAS_IMPLICIT_PANEL_ATTRIBUTES(ffi::Ffi::Bind()                                                         \
                                          .Ctx<ffi::PlatformStream<cudaStream_t>>()                            \
                                          .Ctx<ffi::ScratchAllocator>()                                        \
                                          .Arg<ffi::Buffer<dtype>>()                                           \
                                          .Arg<ffi::Buffer<dtype>>()                                           \
                                          .Arg<ffi::Buffer<ffi::S32>>()                                        \
                                          .Arg<ffi::Buffer<dtype>>())                                          \
          .Ret<ffi::Buffer<dtype>>()                                                                           \
          .Ret<ffi::Buffer<dtype>>());

KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(F32, ffi::F32)
KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(F64, ffi::F64)
