// The launches of the CUDA kernels of custom_ops/panel_cuda_kernels.cuh (declared in panel_cuda.h), for float and
// double: the XLA FFI CUDA handlers (panel_ffi_cuda.cc) and the TensorFlow op's GPU kernels call these. Compiled
// by nvcc with --expt-relaxed-constexpr.
#include <cuda_runtime.h>

#include "panel_cuda.h"
#include "panel_cuda_kernels.cuh"

namespace keras_implicit {
namespace cuda {

// ---------------------------------------------------------------------------------------------------- //
// Launches.
// ---------------------------------------------------------------------------------------------------- //

inline unsigned Blocks(Index rows, int lanes_per_row) {
  return static_cast<unsigned>((rows * lanes_per_row + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

template <typename T>
cudaError_t LaunchForward(const DeviceProblem<T>& problem, const DevicePanel& panel, T* out, BadInput* bad,
                          cudaStream_t stream) {
  if (problem.batch == 0) return cudaSuccess;
  const int lanes = LanesPerRow(problem.classes);
  const unsigned blocks = Blocks(problem.batch, lanes);
  if (lanes == 8) {
    PanelForwardKernel<8, T><<<blocks, kThreadsPerBlock, 0, stream>>>(problem, panel, out, bad);
  } else if (lanes == 16) {
    PanelForwardKernel<16, T><<<blocks, kThreadsPerBlock, 0, stream>>>(problem, panel, out, bad);
  } else {
    PanelForwardKernel<32, T><<<blocks, kThreadsPerBlock, 0, stream>>>(problem, panel, out, bad);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchGradient(const DeviceProblem<T>& problem, const DevicePanel& panel, const T* g, bool reduce, T* dx,
                           T* row_dnorm, BadInput* bad, cudaStream_t stream) {
  if (problem.batch == 0) return cudaSuccess;
  const int lanes = LanesPerRow(problem.classes);
  const unsigned blocks = Blocks(problem.batch, lanes);
  const size_t shared = panel.temperature_count > 0 ? GradSharedBytes<T>(lanes) : 0;
  if (lanes == 8) {
    PanelGradKernel<8, T><<<blocks, kThreadsPerBlock, shared, stream>>>(problem, panel, g, reduce, dx, row_dnorm, bad);
  } else if (lanes == 16) {
    PanelGradKernel<16, T><<<blocks, kThreadsPerBlock, shared, stream>>>(problem, panel, g, reduce, dx, row_dnorm, bad);
  } else {
    PanelGradKernel<32, T><<<blocks, kThreadsPerBlock, shared, stream>>>(problem, panel, g, reduce, dx, row_dnorm, bad);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchColumnSums(const T* values, Index rows, Index columns, T* sums, cudaStream_t stream) {
  if (columns == 0) return cudaSuccess;
  ColumnSumKernel<T><<<static_cast<unsigned>(columns), kThreadsPerBlock, 0, stream>>>(values, rows, columns, sums);
  return cudaGetLastError();
}

template <typename T>
std::string ReadBadInput(const DeviceProblem<T>& problem, const BadInput* bad, cudaStream_t stream,
                         cudaError_t* status) {
  BadInput found;
  *status = cudaMemcpyAsync(&found, bad, sizeof(BadInput), cudaMemcpyDeviceToHost, stream);
  if (*status == cudaSuccess) *status = cudaStreamSynchronize(stream);
  if (*status != cudaSuccess) return std::string();
  if (found.norm_row != kNone) {
    T norm;
    *status = cudaMemcpy(&norm, problem.norms + found.norm_row, sizeof(T), cudaMemcpyDeviceToHost);
    if (*status != cudaSuccess) return std::string();
    return FeatureNormMessage(static_cast<Index>(found.norm_row), static_cast<double>(norm), problem.norm_per_sample);
  }
  if (found.label_row != kNone) {
    std::int32_t label;
    *status = cudaMemcpy(&label, problem.labels + found.label_row, sizeof(label), cudaMemcpyDeviceToHost);
    if (*status != cudaSuccess) return std::string();
    return LabelMessage(static_cast<Index>(found.label_row), label, problem.classes);
  }
  return std::string();
}

template cudaError_t LaunchForward<float>(const DeviceProblem<float>&, const DevicePanel&, float*, BadInput*,
                                         cudaStream_t);
template cudaError_t LaunchForward<double>(const DeviceProblem<double>&, const DevicePanel&, double*, BadInput*,
                                          cudaStream_t);
template cudaError_t LaunchGradient<float>(const DeviceProblem<float>&, const DevicePanel&, const float*, bool, float*,
                                          float*, BadInput*, cudaStream_t);
template cudaError_t LaunchGradient<double>(const DeviceProblem<double>&, const DevicePanel&, const double*, bool,
                                           double*, double*, BadInput*, cudaStream_t);
template cudaError_t LaunchColumnSums<float>(const float*, Index, Index, float*, cudaStream_t);
template cudaError_t LaunchColumnSums<double>(const double*, Index, Index, double*, cudaStream_t);
template std::string ReadBadInput<float>(const DeviceProblem<float>&, const BadInput*, cudaStream_t, cudaError_t*);
template std::string ReadBadInput<double>(const DeviceProblem<double>&, const BadInput*, cudaStream_t, cudaError_t*);

}  // namespace cuda
}  // namespace keras_implicit
