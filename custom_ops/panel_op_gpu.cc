// The TensorFlow op's GPU kernels: KerasImplicitPanel and KerasImplicitPanelGrad (registered in panel_op.cc) on
// DEVICE_GPU, launching the CUDA kernels of custom_ops/panel_cuda.cu (the ones the XLA FFI CUDA handlers launch).
// Compiled only with GOOGLE_CUDA, into keras_implicit/_panel_op_cuda.so beside panel_op.cc and panel_cuda.cu
// (`make -C custom_ops tf-gpu`: nvcc and a CUDA-enabled TensorFlow); keras_implicit/_op.py loads that library
// instead of the CPU one where TensorFlow sees a GPU. The parameter vectors stay in host memory (HostMemory);
// shapes and parameters are checked on the host, labels and feature norms inside the kernels (the call waits
// for them to read the first bad row back), with the CPU kernel's messages.
#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "panel_cuda.h"
#include "panel_math.h"
#include "panel_op_inputs.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace keras_implicit {
namespace {

using ::tensorflow::DEVICE_GPU;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::int64;

Status CudaStatus(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return ::tensorflow::OkStatus();
  return ::tensorflow::errors::Internal("keras_implicit panel (CUDA): ", what, ": ", cudaGetErrorString(status));
}

// Inputs first..first + 5 (logits, labels, feature_norm, sigmas, temperatures, margins): shapes, and the host
// parameters into `panel`; `problem` points into device memory.
template <typename T>
Status ReadDeviceInputs(OpKernelContext* context, int first, bool error, cuda::DevicePanel* panel,
                        cuda::DeviceProblem<T>* problem) {
  InputShapes shapes;
  TF_RETURN_IF_ERROR(ReadShapes(context, first, &shapes));
  Panel host_panel;
  TF_RETURN_IF_ERROR(ReadHostPanel(context, first, error, &host_panel));
  TF_RETURN_IF_ERROR(AsStatus(cuda::ToDevicePanel(host_panel, panel)));
  *problem = cuda::DeviceProblem<T>{context->input(first).flat<T>().data(),
                                    context->input(first + 1).flat<std::int32_t>().data(),
                                    context->input(first + 2).flat<T>().data(), shapes.batch, shapes.classes,
                                    shapes.norm_per_sample};
  return ::tensorflow::OkStatus();
}

// The bad-row words, set to "none".
Status NewBadInput(OpKernelContext* context, cudaStream_t stream, Tensor* buffer, cuda::BadInput** bad) {
  TF_RETURN_IF_ERROR(context->allocate_temp(::tensorflow::DT_UINT64, TensorShape({2}), buffer));
  *bad = reinterpret_cast<cuda::BadInput*>(buffer->flat<::tensorflow::uint64>().data());
  return CudaStatus(cudaMemsetAsync(*bad, 0xff, sizeof(cuda::BadInput), stream), "cudaMemsetAsync");
}

template <typename T>
Status CheckBadInput(const cuda::DeviceProblem<T>& problem, const cuda::BadInput* bad, cudaStream_t stream) {
  cudaError_t status;
  const std::string message = cuda::ReadBadInput(problem, bad, stream, &status);
  TF_RETURN_IF_ERROR(CudaStatus(status, "reading the input checks"));
  if (!message.empty()) return ::tensorflow::errors::InvalidArgument(message);
  return ::tensorflow::OkStatus();
}

template <typename T>
class PanelGpuOp : public PanelKernelBase {
 public:
  explicit PanelGpuOp(OpKernelConstruction* context) : PanelKernelBase(context) {}

  void Compute(OpKernelContext* context) override {
    cuda::DevicePanel panel;
    cuda::DeviceProblem<T> problem;
    OP_REQUIRES_OK(context, ReadDeviceInputs<T>(context, 0, error_, &panel, &problem));
    const int64 columns = panel.columns();
    OP_REQUIRES(context, columns > 0, ::tensorflow::errors::InvalidArgument("the panel is empty"));
    const cudaStream_t stream = context->eigen_gpu_device().stream();
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, reduce_ ? TensorShape({columns})
                                                                : TensorShape({problem.batch, columns}),
                                                     &output));
    Tensor per_sample_buffer, bad_buffer;
    T* per_sample = output->flat<T>().data();
    if (reduce_) {
      OP_REQUIRES_OK(context, context->allocate_temp(::tensorflow::DataTypeToEnum<T>::value,
                                                     TensorShape({problem.batch, columns}), &per_sample_buffer));
      per_sample = per_sample_buffer.flat<T>().data();
    }
    cuda::BadInput* bad = nullptr;
    OP_REQUIRES_OK(context, NewBadInput(context, stream, &bad_buffer, &bad));
    OP_REQUIRES_OK(context, CudaStatus(cuda::LaunchForward(problem, panel, per_sample, bad, stream),
                                       "launching the panel kernel"));
    if (reduce_) {
      OP_REQUIRES_OK(context, CudaStatus(cuda::LaunchColumnSums(per_sample, problem.batch, columns,
                                                                output->flat<T>().data(), stream),
                                         "launching the column sums"));
    }
    OP_REQUIRES_OK(context, CheckBadInput(problem, bad, stream));
  }
};

template <typename T>
class PanelGradGpuOp : public PanelKernelBase {
 public:
  explicit PanelGradGpuOp(OpKernelConstruction* context) : PanelKernelBase(context) {}

  void Compute(OpKernelContext* context) override {
    cuda::DevicePanel panel;
    cuda::DeviceProblem<T> problem;
    OP_REQUIRES_OK(context, ReadDeviceInputs<T>(context, 1, error_, &panel, &problem));
    const int64 columns = panel.columns();
    const Tensor& upstream = context->input(0);
    OP_REQUIRES_OK(context, CheckUpstream(upstream, problem.batch, columns, reduce_));
    const cudaStream_t stream = context->eigen_gpu_device().stream();
    Tensor* grad_logits = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(1).shape(), &grad_logits));
    Tensor* grad_norm = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(3).shape(), &grad_norm));
    Tensor row_norm_buffer, bad_buffer;
    T* row_dnorm = grad_norm->flat<T>().data();
    if (!problem.norm_per_sample) {
      OP_REQUIRES_OK(context, context->allocate_temp(::tensorflow::DataTypeToEnum<T>::value,
                                                     TensorShape({problem.batch}), &row_norm_buffer));
      row_dnorm = row_norm_buffer.flat<T>().data();
    }
    cuda::BadInput* bad = nullptr;
    OP_REQUIRES_OK(context, NewBadInput(context, stream, &bad_buffer, &bad));
    OP_REQUIRES_OK(context, CudaStatus(cuda::LaunchGradient(problem, panel, upstream.flat<T>().data(), reduce_,
                                                            grad_logits->flat<T>().data(), row_dnorm, bad, stream),
                                       "launching the panel's gradient kernel"));
    if (!problem.norm_per_sample) {
      const cudaError_t status =
          problem.batch == 0
              ? cudaMemsetAsync(grad_norm->flat<T>().data(), 0, sizeof(T), stream)
              : cuda::LaunchColumnSums(row_dnorm, problem.batch, int64{1}, grad_norm->flat<T>().data(), stream);
      OP_REQUIRES_OK(context, CudaStatus(status, "summing the norm's gradient"));
    }
    OP_REQUIRES_OK(context, CheckBadInput(problem, bad, stream));
  }
};

}  // namespace

#define REGISTER_PANEL_GPU_KERNELS(type)                                                               \
  REGISTER_KERNEL_BUILDER(Name("KerasImplicitPanel")                                                   \
                              .Device(DEVICE_GPU)                                                      \
                              .TypeConstraint<type>("T")                                               \
                              .HostMemory("sigmas")                                                    \
                              .HostMemory("temperatures")                                              \
                              .HostMemory("margins"),                                                  \
                          PanelGpuOp<type>);                                                           \
  REGISTER_KERNEL_BUILDER(Name("KerasImplicitPanelGrad")                                               \
                              .Device(DEVICE_GPU)                                                      \
                              .TypeConstraint<type>("T")                                               \
                              .HostMemory("sigmas")                                                    \
                              .HostMemory("temperatures")                                              \
                              .HostMemory("margins"),                                                  \
                          PanelGradGpuOp<type>);

REGISTER_PANEL_GPU_KERNELS(float);
REGISTER_PANEL_GPU_KERNELS(double);

#undef REGISTER_PANEL_GPU_KERNELS

}  // namespace keras_implicit

#endif  // GOOGLE_CUDA
