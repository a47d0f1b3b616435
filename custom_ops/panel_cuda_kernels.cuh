// The CUDA kernels of the fused alternative-loss panel (forward and gradient, float and double), device code
// only: custom_ops/panel_cuda.cu launches them (nvcc, --expt-relaxed-constexpr), and
// tests/cuda_emulation/ runs them on the CPU, one thread per lane (tests/test_cuda_kernels.py), where no GPU is.
// They use CUDA's built-ins only (threadIdx, blockIdx, blockDim, __shfl_xor_sync, __any_sync, __syncwarp,
// __syncthreads, atomicMin, shared memory), all of which the emulation provides. The formulas are
// panel_math.h's per-element terms (GcdfTerm, TemperedTerm, HingeTerm, BeatsLabel, GaussianDensity, ...) and
// its row rules (TemperedShift, SoftplusOfLogValue, the NaN and infinity rules), as on the CPU; only the loop
// differs.
//
// Layout: one row per tile of G lanes (G = 8, 16 or 32 consecutive threads of a warp, from the class count):
// lane l takes classes l, l + G, l + 2G, ..., and the tile sums with butterfly shuffles (__shfl_xor_sync over
// the tile's own lanes), so every lane holds the row's sum and the order of the additions is fixed (the
// results are deterministic; they differ from the CPU's sequential sums by rounding only). Every decision that
// a tile takes depends on tile-wide values, so its lanes never diverge around a shuffle. Margins are
// recomputed from the logits (d_j = s_j - s_y, cached in L1) instead of being stored: no [batch, classes]
// buffer and no B x K x classes one. The gradient accumulates d logits_j over the panel's columns in a
// register per class, reading the per-temperature constants of its row from shared memory.
#ifndef KERAS_IMPLICIT_PANEL_CUDA_KERNELS_CUH_
#define KERAS_IMPLICIT_PANEL_CUDA_KERNELS_CUH_

#include <cstdint>
#include <limits>

#include "panel_cuda.h"

// Dynamic shared memory is declared through this macro, which the emulation defines as a plain extern array.
#ifndef KERAS_IMPLICIT_EXTERN_SHARED
#define KERAS_IMPLICIT_EXTERN_SHARED extern __shared__
#endif

namespace keras_implicit {
namespace cuda {

// Lanes per row: the smallest of 8, 16, 32 that covers the classes (32 beyond).
inline int LanesPerRow(Index classes) { return classes <= 8 ? 8 : (classes <= 16 ? 16 : 32); }

// ---------------------------------------------------------------------------------------------------- //
// Tiles.
// ---------------------------------------------------------------------------------------------------- //

template <int G>
__device__ __forceinline__ unsigned TileMask() {
  const unsigned lanes = G == 32 ? 0xffffffffu : (1u << (G % 32)) - 1u;  // (G % 32: no shift by 32 when G is 32)
  return lanes << ((threadIdx.x % 32) / G * G);
}

template <int G, typename T>
__device__ __forceinline__ T TileSum(T value, unsigned mask) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(mask, value, offset, G);
  return value;
}

// The max of RowMax (panel_math.h): `candidate > m ? candidate : m`, so a NaN never enters.
template <int G, typename T>
__device__ __forceinline__ T TileMax(T value, unsigned mask) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(mask, value, offset, G);
    value = other > value ? other : value;
  }
  return value;
}

template <int G>
__device__ __forceinline__ bool TileAny(bool value, unsigned mask) {
  return __any_sync(mask, value);
}

// What every kernel does first for its row: the tile's row index (false: past the batch, or a bad label or
// norm, recorded in `bad`), the label, the norm, and the row's NaN / infinity flags (panel_math.h's RowKind).
template <int G, typename T>
struct Row {
  Index b;
  int lane;
  unsigned mask;
  const T* x;
  int y;
  T norm;
  T true_score;
  RowKind kind;

  __device__ bool Start(const DeviceProblem<T>& problem, BadInput* bad) {
    const Index thread = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
    b = thread / G;
    lane = static_cast<int>(threadIdx.x % G);
    if (b >= problem.batch) return false;  // a whole tile: kThreadsPerBlock is a multiple of G
    mask = TileMask<G>();
    const std::int32_t label = problem.labels[b];
    norm = problem.norm_per_sample ? problem.norms[b] : problem.norms[0];
    bool usable = true;
    if (!ValidFeatureNorm(norm)) {
      if (lane == 0) atomicMin(&bad->norm_row, problem.norm_per_sample ? static_cast<unsigned long long>(b) : 0ull);
      usable = false;
    }
    if (!ValidLabel(label, problem.classes)) {
      if (lane == 0) atomicMin(&bad->label_row, static_cast<unsigned long long>(b));
      usable = false;
    }
    if (!usable) return false;
    y = label;
    x = problem.logits + b * problem.classes;
    true_score = x[y];
    bool has_nan = false, has_infinity = false;
    for (Index j = lane; j < problem.classes; j += G) {
      has_nan |= std::isnan(x[j]);
      has_infinity |= std::isinf(x[j]);
    }
    kind.has_nan = TileAny<G>(has_nan, mask);
    kind.nonfinite_margin = false;
    if (TileAny<G>(has_infinity, mask) && !kind.has_nan) {
      bool nonfinite = false;
      for (Index j = lane; j < problem.classes; j += G) nonfinite |= j != y && std::isnan(x[j] - true_score);
      kind.nonfinite_margin = TileAny<G>(nonfinite, mask);
    }
    return true;
  }

  __device__ T Margin(Index j) const { return x[j] - true_score; }

  // max_{j != y} d_j (NaN with a NaN margin), as panel_math.h's RowMax.
  __device__ T MaxMargin(Index classes) const {
    if (kind.nonfinite_margin) return std::numeric_limits<T>::quiet_NaN();
    T m = -std::numeric_limits<T>::infinity();
    for (Index j = lane; j < classes; j += G) {
      const T d = j == y ? -std::numeric_limits<T>::infinity() : Margin(j);
      m = d > m ? d : m;
    }
    return TileMax<G>(m, mask);
  }
};

// ---------------------------------------------------------------------------------------------------- //
// Forward: values [batch, K], as panel_math.h's PanelRow.
// ---------------------------------------------------------------------------------------------------- //

template <int G, typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) PanelForwardKernel(DeviceProblem<T> problem, DevicePanel panel,
                                                                       T* out, BadInput* bad) {
  Row<G, T> row;
  if (!row.Start(problem, bad)) return;
  const Index classes = problem.classes;
  const int columns = panel.columns();
  T* values = out + row.b * columns;
  if (row.kind.has_nan) {
    for (int k = row.lane; k < columns; k += G) values[k] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  int k = 0;
  for (int i = 0; i < panel.sigma_count; ++i, ++k) {
    const double sigma = panel.sigma(i);
    T total = 0;
    if (sigma == 0.0) {
      for (Index j = row.lane; j < classes; j += G) total += j == row.y ? T(0) : ZeroSigmaTerm(row.Margin(j));
      total = TileSum<G>(total, row.mask);
    } else {
      const T factor = GcdfFactor(sigma, row.norm);
      for (Index j = row.lane; j < classes; j += G) total += j == row.y ? T(0) : GcdfTerm(row.Margin(j), factor);
      total = T(0.5) * TileSum<G>(total, row.mask);
    }
    if (row.lane == 0) values[k] = total;
  }
  if (panel.temperature_count > 0) {
    const T max_margin = row.MaxMargin(classes);
    const T threshold = SoftplusThreshold<T>();
    for (int i = 0; i < panel.temperature_count; ++i, ++k) {
      const T inverse = static_cast<T>(1.0 / panel.temperature(i));
      const T raw_max = max_margin * inverse;
      const T shift = TemperedShift(raw_max);
      T sum = raw_max;  // NaN stays NaN
      if (!std::isnan(raw_max)) {
        T total = 0;
        for (Index j = row.lane; j < classes; j += G) {
          total += j == row.y ? T(0) : TemperedTerm(row.Margin(j), inverse, shift);
        }
        sum = TileSum<G>(total, row.mask);
      }
      if (row.lane == 0) values[k] = SoftplusOfLogValue(sum, shift, threshold);
    }
  }
  for (int i = 0; i < panel.margin_count; ++i, ++k) {
    const T gamma = static_cast<T>(panel.margin(i));
    T total = 0;
    for (Index j = row.lane; j < classes; j += G) {
      if (j == row.y) continue;
      const T d = row.Margin(j);
      total += row.kind.nonfinite_margin ? HingeTermNonfinite(d, gamma) : HingeTerm(d, gamma);
    }
    total = TileSum<G>(total, row.mask);
    if (row.lane == 0) values[k] = total;
  }
  if (panel.error) {
    bool loses = false;
    for (Index j = row.lane; j < classes && !loses; j += G) loses = BeatsLabel(row.Margin(j), j, Index(row.y));
    loses = TileAny<G>(loses, row.mask);
    if (row.lane == 0) values[k] = loses ? T(1) : T(0);
  }
}

// ---------------------------------------------------------------------------------------------------- //
// Gradient: d logits [batch, classes] and the rows' d norm [batch], as panel_math.h's PanelGradRow; `g` is
// [batch, K], or [K] (`reduce`: the same upstream for every row). Shared memory: per tile, the shift and the
// coefficient of each temperature.
// ---------------------------------------------------------------------------------------------------- //

template <int G, typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) PanelGradKernel(DeviceProblem<T> problem, DevicePanel panel,
                                                                    const T* g, bool reduce, T* dx, T* row_dnorm,
                                                                    BadInput* bad) {
  KERAS_IMPLICIT_EXTERN_SHARED unsigned char shared_bytes[];
  Row<G, T> row;
  if (!row.Start(problem, bad)) return;
  const Index classes = problem.classes;
  const int columns = panel.columns();
  const T* upstream = reduce ? g : g + row.b * columns;
  T* tempered = reinterpret_cast<T*>(shared_bytes) + (threadIdx.x / G) * 2 * kMaxTemperatures;  // shift, coefficient
  if (panel.temperature_count > 0) {
    // NaN logits propagate through the arithmetic (RowMax ignores them, as on the CPU).
    const T max_margin = row.MaxMargin(classes);
    for (int i = 0; i < panel.temperature_count; ++i) {
      const T up = upstream[panel.sigma_count + i];
      if (up == T(0)) continue;
      const T t = static_cast<T>(panel.temperature(i));
      const T shift = TemperedGradientShift(max_margin, t);
      T total = 0;
      for (Index j = row.lane; j < classes; j += G) {
        total += j == row.y ? T(0) : TemperedGradientTerm(row.Margin(j), t, shift);
      }
      const T denominator = std::exp(-shift) + TileSum<G>(total, row.mask);
      if (row.lane == 0) {
        tempered[2 * i] = shift;
        tempered[2 * i + 1] = up / (t * denominator);
      }
    }
    __syncwarp(row.mask);
  }
  T sum_others = 0, dnorm = 0;
  for (Index j = row.lane; j < classes; j += G) {
    if (j == row.y) continue;
    const T d = row.Margin(j);
    T acc = 0;
    int k = 0;
    for (int i = 0; i < panel.sigma_count; ++i, ++k) {
      const double sigma = panel.sigma(i);
      const T up = upstream[k];
      if (sigma == 0.0 || up == T(0)) continue;
      const T scale = GaussianScale(sigma, row.norm);
      const T coefficient = GaussianCoefficient(up, scale);
      const T z = d / scale;
      const T density = GaussianDensity(z);
      acc += coefficient * density;
      if (std::isfinite(z)) dnorm -= coefficient * z * density * scale / row.norm;
    }
    for (int i = 0; i < panel.temperature_count; ++i, ++k) {
      if (upstream[k] == T(0)) continue;
      const T t = static_cast<T>(panel.temperature(i));
      acc += tempered[2 * i + 1] * TemperedGradientTerm(d, t, tempered[2 * i]);
    }
    for (int i = 0; i < panel.margin_count; ++i, ++k) {
      const T up = upstream[k];
      if (up == T(0)) continue;
      const T gamma = static_cast<T>(panel.margin(i));
      acc += row.kind.nonfinite_margin ? HingeStepNonfinite(d, gamma, up) : HingeStep(d, gamma, up);
    }
    dx[row.b * classes + j] = acc;
    sum_others += acc;
  }
  // s_y enters every margin with a minus sign.
  sum_others = TileSum<G>(sum_others, row.mask);
  dnorm = TileSum<G>(dnorm, row.mask);
  if (row.lane == 0) {
    dx[row.b * classes + row.y] = -sum_others;
    row_dnorm[row.b] = dnorm;
  }
}

// Shared memory of PanelGradKernel per block.
template <typename T>
constexpr size_t GradSharedBytes(int lanes_per_row) {
  return static_cast<size_t>(kThreadsPerBlock / lanes_per_row) * 2 * kMaxTemperatures * sizeof(T);
}

// ---------------------------------------------------------------------------------------------------- //
// Sums over rows, in double and in a fixed order (deterministic): sums[k] = sum_b values[b * columns + k].
// One block per column.
// ---------------------------------------------------------------------------------------------------- //

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) ColumnSumKernel(const T* values, Index rows, Index columns,
                                                                    T* sums) {
  __shared__ double partial[kThreadsPerBlock];
  const Index k = blockIdx.x;
  double total = 0;
  for (Index b = threadIdx.x; b < rows; b += kThreadsPerBlock) total += static_cast<double>(values[b * columns + k]);
  partial[threadIdx.x] = total;
  __syncthreads();
  for (unsigned stride = kThreadsPerBlock / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[k] = static_cast<T>(partial[0]);
}

}  // namespace cuda
}  // namespace keras_implicit

#endif  // KERAS_IMPLICIT_PANEL_CUDA_KERNELS_CUH_
