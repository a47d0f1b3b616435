// The CUDA kernels of the fused alternative-loss panel, as seen from host code: the kernels' arguments and their
// launch functions (defined in custom_ops/panel_cuda.cu, compiled by nvcc, for float and double). Included by the
// XLA FFI CUDA handlers (custom_ops/panel_ffi_cuda.cc) and by the TensorFlow op's GPU kernels
// (custom_ops/panel_op.cc with GOOGLE_CUDA); plain C++ with the CUDA runtime's API header, no kernel syntax.
//
// Bad values (labels outside [0, classes), feature norms not finite and > 0) are found inside the kernels:
// the first bad row's index goes to a BadInput word (atomicMin) that the host reads after the launch and
// turns into panel_math.h's message. Parameters are checked on the host (attributes or host tensors).
#ifndef KERAS_IMPLICIT_PANEL_CUDA_H_
#define KERAS_IMPLICIT_PANEL_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "panel_math.h"

namespace keras_implicit {
namespace cuda {

// The panel's parameters travel by value as a kernel argument (3 KB of the 4 KB CUDA allows), so a call takes
// at most this many in all, and at most kMaxTemperatures temperatures (their row constants sit in shared
// memory); keras_implicit/_ffi.py splits a larger panel into several calls.
constexpr int kMaxParameters = 384;
constexpr int kMaxTemperatures = 64;
constexpr int kThreadsPerBlock = 256;

struct DevicePanel {
  double parameters[kMaxParameters];  // sigmas, then temperatures, then margins
  int sigma_count = 0;
  int temperature_count = 0;
  int margin_count = 0;
  bool error = false;
  KERAS_IMPLICIT_HD int columns() const { return sigma_count + temperature_count + margin_count + (error ? 1 : 0); }
  KERAS_IMPLICIT_HD double sigma(int i) const { return parameters[i]; }
  KERAS_IMPLICIT_HD double temperature(int i) const { return parameters[sigma_count + i]; }
  KERAS_IMPLICIT_HD double margin(int i) const { return parameters[sigma_count + temperature_count + i]; }
};

// `panel` as a kernel argument, or the message saying why it does not fit.
inline std::string ToDevicePanel(const Panel& panel, DevicePanel* device) {
  const size_t total = panel.sigmas.size() + panel.temperatures.size() + panel.margins.size();
  if (total > static_cast<size_t>(kMaxParameters) || panel.temperatures.size() > static_cast<size_t>(kMaxTemperatures)) {
    return detail::Concat("the CUDA kernel takes at most ", kMaxParameters, " parameters and ", kMaxTemperatures,
                          " temperatures per call, got ", total, " and ", panel.temperatures.size());
  }
  int i = 0;
  for (double value : panel.sigmas) device->parameters[i++] = value;
  for (double value : panel.temperatures) device->parameters[i++] = value;
  for (double value : panel.margins) device->parameters[i++] = value;
  device->sigma_count = static_cast<int>(panel.sigmas.size());
  device->temperature_count = static_cast<int>(panel.temperatures.size());
  device->margin_count = static_cast<int>(panel.margins.size());
  device->error = panel.error;
  return std::string();
}

// The first bad row of each kind (kNone: none), written by the kernels with atomicMin.
struct BadInput {
  unsigned long long label_row;
  unsigned long long norm_row;
};
constexpr unsigned long long kNone = ~0ull;

template <typename T>
struct DeviceProblem {
  const T* logits;             // [batch, classes]
  const std::int32_t* labels;  // [batch]
  const T* norms;              // [batch] if norm_per_sample, else [1]
  Index batch;
  Index classes;
  bool norm_per_sample;
};

// The launches, on `stream`; each returns the launch's error (cudaGetLastError). T is float or double.
// values [batch, K] (panel_math.h's PanelRow per row).
template <typename T>
cudaError_t LaunchForward(const DeviceProblem<T>& problem, const DevicePanel& panel, T* out, BadInput* bad,
                          cudaStream_t stream);
// d logits [batch, classes] and the rows' d norm [batch] (PanelGradRow); `g` is [batch, K], or [K] (`reduce`).
template <typename T>
cudaError_t LaunchGradient(const DeviceProblem<T>& problem, const DevicePanel& panel, const T* g, bool reduce, T* dx,
                           T* row_dnorm, BadInput* bad, cudaStream_t stream);
// sums[k] = sum_b values[b * columns + k], in double and in a fixed order (deterministic).
template <typename T>
cudaError_t LaunchColumnSums(const T* values, Index rows, Index columns, T* sums, cudaStream_t stream);

// Waits for `stream` and reads what the kernels recorded in `bad`: the message of the first bad feature norm,
// else of the first bad label (panel_math.h's, as the CPU bindings give them; norms first, as there), or the
// empty string. A CUDA failure sets `*status` (else cudaSuccess) and returns the empty string.
template <typename T>
std::string ReadBadInput(const DeviceProblem<T>& problem, const BadInput* bad, cudaStream_t stream,
                         cudaError_t* status);

}  // namespace cuda
}  // namespace keras_implicit

#endif  // KERAS_IMPLICIT_PANEL_CUDA_H_
