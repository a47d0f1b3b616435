// The CUDA kernels of custom_ops/panel_cuda_kernels.cuh run on the CPU (cuda_runtime_api.h here emulates the
// built-ins), with a C interface for ctypes (tests/test_cuda_kernels.py), next to panel_math.h's CPU row functions
// (the TF op's and the CPU FFI handlers' code) on the same inputs. Built by the test with
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -Wno-unknown-pragmas -Itests/cuda_emulation -Icustom_ops
//       tests/cuda_emulation/emulate.cc -o emulate.so
// Each function returns 0, or 1 with the message of the problem in `message` (the parameters' or the panel's
// size on the host, as the CUDA handlers check them), and writes the first bad label and norm rows that the
// kernels recorded (-1: none) to bad_rows[0..1].

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "panel_cuda_kernels.cuh"
#include "panel_math.h"

namespace keras_implicit {
namespace cuda {
alignas(16) unsigned char shared_bytes[1 << 16];  // the dynamic shared memory of the block being run
}  // namespace cuda
}  // namespace keras_implicit

namespace {

using keras_implicit::Index;
using keras_implicit::Panel;
using keras_implicit::cuda::BadInput;
using keras_implicit::cuda::DevicePanel;
using keras_implicit::cuda::DeviceProblem;

int Fail(const std::string& problem, char* message, int message_size) {
  std::snprintf(message, static_cast<size_t>(message_size), "%s", problem.c_str());
  return 1;
}

std::string ReadPanel(const double* sigmas, int sigma_count, const double* temperatures, int temperature_count,
                      const double* margins, int margin_count, int error, Panel* panel, DevicePanel* device) {
  std::string problem = keras_implicit::ReadPanel(sigmas, sigma_count, temperatures, temperature_count, margins,
                                                  margin_count, error != 0, panel);
  if (problem.empty()) problem = keras_implicit::cuda::ToDevicePanel(*panel, device);
  return problem;
}

void WriteBadRows(const BadInput& bad, std::int64_t* bad_rows) {
  bad_rows[0] = bad.label_row == keras_implicit::cuda::kNone ? -1 : static_cast<std::int64_t>(bad.label_row);
  bad_rows[1] = bad.norm_row == keras_implicit::cuda::kNone ? -1 : static_cast<std::int64_t>(bad.norm_row);
}

// One tile (LanesPerRow lanes) per block, one block per row.
template <typename T>
int Forward(const T* logits, const std::int32_t* labels, const T* norms, Index batch, Index classes, int per_sample,
            const double* sigmas, int sigma_count, const double* temperatures, int temperature_count,
            const double* margins, int margin_count, int error, T* out, std::int64_t* bad_rows, char* message,
            int message_size) {
  Panel panel;
  DevicePanel device;
  const std::string problem = ReadPanel(sigmas, sigma_count, temperatures, temperature_count, margins, margin_count,
                                        error, &panel, &device);
  if (!problem.empty()) return Fail(problem, message, message_size);
  const DeviceProblem<T> rows{logits, labels, norms, batch, classes, per_sample != 0};
  BadInput bad{keras_implicit::cuda::kNone, keras_implicit::cuda::kNone};
  const int lanes = keras_implicit::cuda::LanesPerRow(classes);
  emulation::Launch(static_cast<unsigned>(batch), static_cast<unsigned>(lanes), [&] {
    if (lanes == 8) keras_implicit::cuda::PanelForwardKernel<8, T>(rows, device, out, &bad);
    if (lanes == 16) keras_implicit::cuda::PanelForwardKernel<16, T>(rows, device, out, &bad);
    if (lanes == 32) keras_implicit::cuda::PanelForwardKernel<32, T>(rows, device, out, &bad);
  });
  WriteBadRows(bad, bad_rows);
  return 0;
}

template <typename T>
int Gradient(const T* g, int reduce, const T* logits, const std::int32_t* labels, const T* norms, Index batch,
             Index classes, int per_sample, const double* sigmas, int sigma_count, const double* temperatures,
             int temperature_count, const double* margins, int margin_count, int error, T* dx, T* row_dnorm,
             std::int64_t* bad_rows, char* message, int message_size) {
  Panel panel;
  DevicePanel device;
  const std::string problem = ReadPanel(sigmas, sigma_count, temperatures, temperature_count, margins, margin_count,
                                        error, &panel, &device);
  if (!problem.empty()) return Fail(problem, message, message_size);
  const DeviceProblem<T> rows{logits, labels, norms, batch, classes, per_sample != 0};
  BadInput bad{keras_implicit::cuda::kNone, keras_implicit::cuda::kNone};
  const int lanes = keras_implicit::cuda::LanesPerRow(classes);
  emulation::Launch(static_cast<unsigned>(batch), static_cast<unsigned>(lanes), [&] {
    if (lanes == 8) keras_implicit::cuda::PanelGradKernel<8, T>(rows, device, g, reduce != 0, dx, row_dnorm, &bad);
    if (lanes == 16) keras_implicit::cuda::PanelGradKernel<16, T>(rows, device, g, reduce != 0, dx, row_dnorm, &bad);
    if (lanes == 32) keras_implicit::cuda::PanelGradKernel<32, T>(rows, device, g, reduce != 0, dx, row_dnorm, &bad);
  });
  WriteBadRows(bad, bad_rows);
  return 0;
}

// As the launch: one block of kThreadsPerBlock threads per column.
template <typename T>
void ColumnSums(const T* values, Index rows, Index columns, T* sums) {
  emulation::Launch(static_cast<unsigned>(columns), keras_implicit::cuda::kThreadsPerBlock,
                    [&] { keras_implicit::cuda::ColumnSumKernel<T>(values, rows, columns, sums); });
}

// panel_math.h's CPU rows (ScalarMath), the code of the CPU bindings.
template <typename T>
int CpuForward(const T* logits, const std::int32_t* labels, const T* norms, Index batch, Index classes,
               int per_sample, const double* sigmas, int sigma_count, const double* temperatures,
               int temperature_count, const double* margins, int margin_count, int error, T* out, char* message,
               int message_size) {
  Panel panel;
  const std::string problem = keras_implicit::ReadPanel(sigmas, sigma_count, temperatures, temperature_count, margins,
                                                        margin_count, error != 0, &panel);
  if (!problem.empty()) return Fail(problem, message, message_size);
  const keras_implicit::Problem<T> rows{logits, labels, norms, batch, classes, per_sample != 0, &panel};
  keras_implicit::PanelRows<keras_implicit::ScalarMath, T>(rows, 0, batch, out);
  return 0;
}

template <typename T>
int CpuGradient(const T* g, int reduce, const T* logits, const std::int32_t* labels, const T* norms, Index batch,
                Index classes, int per_sample, const double* sigmas, int sigma_count, const double* temperatures,
                int temperature_count, const double* margins, int margin_count, int error, T* dx, T* row_dnorm,
                char* message, int message_size) {
  Panel panel;
  const std::string problem = keras_implicit::ReadPanel(sigmas, sigma_count, temperatures, temperature_count, margins,
                                                        margin_count, error != 0, &panel);
  if (!problem.empty()) return Fail(problem, message, message_size);
  const keras_implicit::Problem<T> rows{logits, labels, norms, batch, classes, per_sample != 0, &panel};
  keras_implicit::PanelGradRows<keras_implicit::ScalarMath, T>(rows, g, reduce != 0, 0, batch, dx, row_dnorm);
  return 0;
}

}  // namespace

#define KERAS_IMPLICIT_EMULATION_EXPORTS(suffix, T)                                                                \
  extern "C" int emulated_forward_##suffix(const T* logits, const std::int32_t* labels, const T* norms,            \
                                           std::int64_t batch, std::int64_t classes, int per_sample,              \
                                           const double* sigmas, int sigma_count, const double* temperatures,     \
                                           int temperature_count, const double* margins, int margin_count,        \
                                           int error, T* out, std::int64_t* bad_rows, char* message,              \
                                           int message_size) {                                                    \
    return Forward<T>(logits, labels, norms, batch, classes, per_sample, sigmas, sigma_count, temperatures,        \
                      temperature_count, margins, margin_count, error, out, bad_rows, message, message_size);     \
  }                                                                                                                \
  extern "C" int emulated_gradient_##suffix(const T* g, int reduce, const T* logits, const std::int32_t* labels,   \
                                            const T* norms, std::int64_t batch, std::int64_t classes,             \
                                            int per_sample, const double* sigmas, int sigma_count,                \
                                            const double* temperatures, int temperature_count,                    \
                                            const double* margins, int margin_count, int error, T* dx,            \
                                            T* row_dnorm, std::int64_t* bad_rows, char* message,                  \
                                            int message_size) {                                                   \
    return Gradient<T>(g, reduce, logits, labels, norms, batch, classes, per_sample, sigmas, sigma_count,          \
                       temperatures, temperature_count, margins, margin_count, error, dx, row_dnorm, bad_rows,    \
                       message, message_size);                                                                     \
  }                                                                                                                \
  extern "C" void emulated_column_sums_##suffix(const T* values, std::int64_t rows, std::int64_t columns,         \
                                                T* sums) {                                                         \
    ColumnSums<T>(values, rows, columns, sums);                                                                    \
  }                                                                                                                \
  extern "C" int cpu_forward_##suffix(const T* logits, const std::int32_t* labels, const T* norms,                 \
                                      std::int64_t batch, std::int64_t classes, int per_sample,                   \
                                      const double* sigmas, int sigma_count, const double* temperatures,          \
                                      int temperature_count, const double* margins, int margin_count, int error,  \
                                      T* out, char* message, int message_size) {                                  \
    return CpuForward<T>(logits, labels, norms, batch, classes, per_sample, sigmas, sigma_count, temperatures,     \
                         temperature_count, margins, margin_count, error, out, message, message_size);            \
  }                                                                                                                \
  extern "C" int cpu_gradient_##suffix(const T* g, int reduce, const T* logits, const std::int32_t* labels,        \
                                       const T* norms, std::int64_t batch, std::int64_t classes, int per_sample,  \
                                       const double* sigmas, int sigma_count, const double* temperatures,         \
                                       int temperature_count, const double* margins, int margin_count, int error, \
                                       T* dx, T* row_dnorm, char* message, int message_size) {                    \
    return CpuGradient<T>(g, reduce, logits, labels, norms, batch, classes, per_sample, sigmas, sigma_count,       \
                          temperatures, temperature_count, margins, margin_count, error, dx, row_dnorm, message,  \
                          message_size);                                                                           \
  }

KERAS_IMPLICIT_EMULATION_EXPORTS(f32, float)
KERAS_IMPLICIT_EMULATION_EXPORTS(f64, double)
