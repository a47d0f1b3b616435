// The per-row mathematics of the fused alternative-loss panel, shared by every binding:
//   custom_ops/panel_op.cc     the TensorFlow op (CPU), with an Eigen math policy (vectorized erfc and exp);
//   custom_ops/panel_ffi.cc    the XLA FFI handlers for JAX (CPU), with the scalar or an AVX2 policy;
//   custom_ops/panel_cuda.cu   the CUDA kernels (for the XLA FFI CUDA handlers, panel_ffi_cuda.cc, and the TF
//                              op's GPU kernels), which call the per-element terms below (KERAS_IMPLICIT_HD:
//                              host and device functions) from lanes that split a row's classes.
// Plain C++17 and the standard library only: no TensorFlow, XLA, Eigen or CUDA header.
//
// Columns of one row: K1 Gcdf (eq. 6), K2 tempered cross-entropy (eq. 7), K3 multi-class hinge (eq. 8), then
// the zero-one error if `error`. The formulas are those of keras_implicit/losses.py (_panel_keras), written
// on the margins d_j = s_j - s_y with the same steps, except that where the keras.ops path divides by
// sqrt2 sigma norm, sqrt2 or T, the kernel multiplies by a reciprocal computed in double:
//   Gcdf(sigma > 0) = sum_{j != y} 0.5 * erfc(-d_j / (2 sigma norm))
//   Gcdf(sigma = 0) = #{j != y : d_j > 0} + 0.5 * #{j != y : d_j = 0}
//   tce(T)          = softplus(logsumexp_{j != y} d_j / T)      (TF's softplus thresholds, log1p)
//   hinge(gamma)    = sum_{j != y} max(0, gamma + d_j)
//   error           = [exists j < y : d_j >= 0, or j > y : d_j > 0]   (argmax's tie rule)
// A row holding a NaN logit gives NaN in every column. The Check* functions give the messages with which both
// bindings refuse fewer than 2 classes, labels outside [0, classes), a feature_norm that is not finite and
// > 0, and parameters that are not finite or out of range (sigmas, margins >= 0; temperatures > 0).
//
// The row's own class is excluded by setting d_y = -inf: every family then sums over all j, and the
// excluded term is exactly 0 (erfc(+inf) = 0, exp(-inf) = 0, max(0, -inf) = 0, comparisons false).
//
// A math policy `Math` supplies the reductions over one row of `width` margins (padded with -inf), as static
// template functions; ScalarMath (below) is the plain-loop one. Everything else (the NaN and infinity rules,
// the shifts, softplus, sigma = 0, the error, the gradients' assembly) is written once, here.
#ifndef KERAS_IMPLICIT_PANEL_MATH_H_
#define KERAS_IMPLICIT_PANEL_MATH_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

// Functions that CUDA kernels call too (nvcc defines __CUDACC__; it needs --expt-relaxed-constexpr for
// std::numeric_limits in device code).
#if defined(__CUDACC__)
#define KERAS_IMPLICIT_HD __host__ __device__
#else
#define KERAS_IMPLICIT_HD
#endif

namespace keras_implicit {

using Index = std::int64_t;

constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

// The panel's parameters, validated once per call.
struct Panel {
  std::vector<double> sigmas, temperatures, margins;
  bool error = false;
  Index columns() const {
    return static_cast<Index>(sigmas.size() + temperatures.size() + margins.size()) + (error ? 1 : 0);
  }
};

// ------------------------------------------------------------------------------------------------------ //
// Validation: each returns the empty string when the values are valid, else the message (naming the argument).
// ------------------------------------------------------------------------------------------------------ //
namespace detail {
template <typename... Parts>
std::string Concat(const Parts&... parts) {
  std::ostringstream stream;
  (stream << ... << parts);
  return stream.str();
}
}  // namespace detail

// logits [batch, classes] need at least 2 classes.
inline std::string CheckClasses(Index batch, Index classes) {
  if (classes >= 2) return std::string();
  return detail::Concat("logits must have at least 2 classes, got shape [", batch, ",", classes, "]");
}

// A parameter vector: finite values, each >= 0 (sigmas, margins) or > 0 (temperatures, `positive`).
inline std::string CheckParameters(const double* values, Index count, const char* name, bool positive) {
  for (Index i = 0; i < count; ++i) {
    const double value = values[i];
    if (!std::isfinite(value) || (positive ? !(value > 0) : !(value >= 0))) {
      return detail::Concat(name, "[", i, "] must be finite and ", positive ? "> 0" : ">= 0", ", got ", value);
    }
  }
  return std::string();
}

// A feature norm must be finite and > 0 (`valid`), else the message (`per_sample`: named feature_norm[i]).
template <typename T>
KERAS_IMPLICIT_HD bool ValidFeatureNorm(T norm) {
  return std::isfinite(norm) && norm > T(0);
}
inline std::string FeatureNormMessage(Index i, double value, bool per_sample) {
  const std::string name = per_sample ? detail::Concat("feature_norm[", i, "]") : std::string("feature_norm");
  return detail::Concat(name, " must be finite and > 0, got ", value);
}

// Every feature norm finite and > 0 (`per_sample`: one per row, named feature_norm[i]).
template <typename T>
std::string CheckFeatureNorms(const T* norms, Index count, bool per_sample) {
  for (Index i = 0; i < count; ++i) {
    if (!ValidFeatureNorm(norms[i])) return FeatureNormMessage(i, static_cast<double>(norms[i]), per_sample);
  }
  return std::string();
}

// A label must lie in [0, classes), else the message.
KERAS_IMPLICIT_HD inline bool ValidLabel(std::int32_t label, Index classes) { return label >= 0 && label < classes; }
inline std::string LabelMessage(Index b, std::int32_t label, Index classes) {
  return detail::Concat("labels[", b, "] = ", label, " is outside [0, ", classes, ")");
}

// Every label in [0, classes).
inline std::string CheckLabels(const std::int32_t* labels, Index batch, Index classes) {
  for (Index b = 0; b < batch; ++b) {
    if (!ValidLabel(labels[b], classes)) return LabelMessage(b, labels[b], classes);
  }
  return std::string();
}

// The three parameter vectors, checked and stored into `panel` (which may then have no column: the forward
// kernels refuse an empty panel, the gradients of one are empty).
inline std::string ReadPanel(const double* sigmas, Index sigma_count, const double* temperatures,
                             Index temperature_count, const double* margins, Index margin_count, bool error,
                             Panel* panel) {
  std::string problem = CheckParameters(sigmas, sigma_count, "sigmas", false);
  if (problem.empty()) problem = CheckParameters(temperatures, temperature_count, "temperatures", true);
  if (problem.empty()) problem = CheckParameters(margins, margin_count, "margins", false);
  if (!problem.empty()) return problem;
  panel->sigmas.assign(sigmas, sigmas + sigma_count);
  panel->temperatures.assign(temperatures, temperatures + temperature_count);
  panel->margins.assign(margins, margins + margin_count);
  panel->error = error;
  return std::string();
}

// ------------------------------------------------------------------------------------------------------ //
// Rows.
// ------------------------------------------------------------------------------------------------------ //

// Cost of one row in the units TensorFlow's Shard expects (roughly cycles): erfc and exp dominate.
inline Index RowCost(const Panel& panel, Index classes, bool gradient) {
  const Index per_class = 40 * static_cast<Index>(panel.sigmas.size()) +
                          25 * static_cast<Index>(panel.temperatures.size()) +
                          2 * static_cast<Index>(panel.margins.size()) + 4;
  return (gradient ? 2 : 1) * per_class * std::max<Index>(classes, 1);
}

// Rows are padded to a multiple of this many values (a packet of 8 floats or 4 doubles, or two), so that
// vectorized loops run without scalar remainders. The padding holds -inf, like d_y, and so adds exactly 0 to
// every family.
constexpr Index kRowPadding = 8;

inline Index PaddedWidth(Index classes) { return (classes + kRowPadding - 1) / kRowPadding * kRowPadding; }

// What RowMargins learned about a row.
struct RowKind {
  bool has_nan = false;           // a NaN logit: every column is NaN
  bool nonfinite_margin = false;  // a NaN margin from infinite logits (inf - inf): the careful scalar paths
};

// Margins of one row: d_j = s_j - s_y for j < classes, d_y = -inf, and -inf padding up to `width`.
template <typename T>
RowKind RowMargins(const T* x, Index classes, Index width, int y, T* d) {
  const T true_score = x[y];
  RowKind kind;
  bool has_infinity = false;
  for (Index j = 0; j < classes; ++j) {
    kind.has_nan |= std::isnan(x[j]);
    has_infinity |= std::isinf(x[j]);
    d[j] = x[j] - true_score;
  }
  d[y] = -std::numeric_limits<T>::infinity();
  std::fill(d + classes, d + width, -std::numeric_limits<T>::infinity());
  if (has_infinity && !kind.has_nan) {
    for (Index j = 0; j < classes; ++j) kind.nonfinite_margin |= std::isnan(d[j]);
  }
  return kind;
}

// Max over j of d_j, NaN if any d_j is NaN.
template <typename T>
T RowMax(const T* d, Index width, bool nonfinite_margin) {
  if (nonfinite_margin) return std::numeric_limits<T>::quiet_NaN();
  T m = -std::numeric_limits<T>::infinity();
  for (Index j = 0; j < width; ++j) m = d[j] > m ? d[j] : m;
  return m;
}

// TF's softplus threshold (tensorflow/core/kernels/softplus_op.h): log(eps) + 2.
template <typename T>
KERAS_IMPLICIT_HD T SoftplusThreshold() {
  return std::log(std::numeric_limits<T>::epsilon()) + T(2);
}

// ------------------------------------------------------------------------------------------------------ //
// Terms: the formulas of one margin d_j = s_j - s_y (or of one row's reduced sums), written once for every
// binding. The row loops below and the CUDA kernels sum them; the vectorized policies (Eigen, AVX2) write the
// same expressions over packets.
// ------------------------------------------------------------------------------------------------------ //

// Gcdf (sigma > 0): Phi(d / (sqrt2 sigma norm)) = erfc(d * factor) / 2 with factor = -1 / (2 sigma norm),
// computed in double (the keras.ops path divides twice; the arguments differ by at most ~2 ulp).
template <typename T>
KERAS_IMPLICIT_HD T GcdfFactor(double sigma, T norm) {
  return static_cast<T>(-0.5 / (sigma * static_cast<double>(norm)));
}
template <typename T>
KERAS_IMPLICIT_HD T GcdfTerm(T d, T factor) {
  return std::erfc(d * factor);  // the row's sum is halved once
}

// Gcdf (sigma = 0): the class beats y (1) or ties with it (1/2).
template <typename T>
KERAS_IMPLICIT_HD T ZeroSigmaTerm(T d) {
  return d > T(0) ? T(1) : (d == T(0) ? T(0.5) : T(0));
}

// Tempered CE: the shift of tf.reduce_logsumexp for the row's max_j d_j / T (its value when finite or NaN,
// else 0), the term exp(d_j / T - shift), and the row's value softplus(log(sum) + shift) with TF's softplus
// thresholds (v above -threshold, exp(v) below threshold, log1p(exp(v)) between).
template <typename T>
KERAS_IMPLICIT_HD T TemperedShift(T raw_max) {
  return std::isfinite(raw_max) || std::isnan(raw_max) ? raw_max : T(0);
}
template <typename T>
KERAS_IMPLICIT_HD T TemperedTerm(T d, T inverse_temperature, T shift) {
  return std::exp(d * inverse_temperature - shift);
}
template <typename T>
KERAS_IMPLICIT_HD T SoftplusOfLogValue(T sum, T shift, T threshold) {
  const T v = std::log(sum) + shift;
  return v > -threshold ? v : (v < threshold ? std::exp(v) : std::log1p(std::exp(v)));
}

// Hinge: max(0, gamma + d) (std::max's order: a NaN is kept); in a row with a NaN margin (infinite logits),
// HingeTermNonfinite.
template <typename T>
KERAS_IMPLICIT_HD T HingeTerm(T d, T gamma) {
  const T value = d + gamma;
  return value < T(0) ? T(0) : value;
}
template <typename T>
KERAS_IMPLICIT_HD T HingeTermNonfinite(T d, T gamma) {
  const T value = gamma + d;
  return (value > T(0) || std::isnan(value)) ? value : T(0);
}

// Zero-one error, argmax's tie rule: class j < y wins ties, class j > y must be strictly larger.
template <typename T>
KERAS_IMPLICIT_HD bool BeatsLabel(T d, Index j, Index y) {
  return j < y ? d >= T(0) : (j > y && d > T(0));
}

// Gradients. Gcdf: d/dd_j Phi(d_j / a) = phi(d_j / a) / a with a = sqrt2 sigma norm; the row's coefficient
// upstream / (sqrt(2 pi) a) multiplies exp(-z^2 / 2), z = d / a; d/dnorm = -coefficient * a / norm * sum of
// z exp(-z^2 / 2) over finite z.
template <typename T>
KERAS_IMPLICIT_HD T GaussianScale(double sigma, T norm) {
  return static_cast<T>(kSqrt2 * sigma) * norm;
}
template <typename T>
KERAS_IMPLICIT_HD T GaussianCoefficient(T upstream, T scale) {
  return upstream * static_cast<T>(kInvSqrt2Pi) / scale;
}
template <typename T>
KERAS_IMPLICIT_HD T GaussianDensity(T z) {
  return std::exp(T(-0.5) * z * z);
}
// Tempered CE: d tce / d d_j = p_j / T with p_j = exp(d_j / T) / (1 + sum_i exp(d_i / T)), shifted by
// M = max(0, max_j d_j / T) so nothing overflows; the denominator is exp(-M) + sum_i exp(d_i / T - M).
template <typename T>
KERAS_IMPLICIT_HD T TemperedGradientShift(T max_margin, T temperature) {
  const T shift = max_margin / temperature;
  return (!(shift > T(0)) || std::isinf(shift)) ? T(0) : shift;
}
template <typename T>
KERAS_IMPLICIT_HD T TemperedGradientTerm(T d, T temperature, T shift) {
  return std::exp(d / temperature - shift);
}
// Hinge: the upstream where gamma + d > 0 (and the NaN of a NaN margin in a row with infinite logits).
template <typename T>
KERAS_IMPLICIT_HD T HingeStep(T d, T gamma, T upstream) {
  return d + gamma > T(0) ? upstream : T(0);
}
template <typename T>
KERAS_IMPLICIT_HD T HingeStepNonfinite(T d, T gamma, T upstream) {
  const T value = gamma + d;
  return value > T(0) ? upstream : (std::isnan(value) ? value : T(0));
}

// The scalar math policy: plain loops over std::erfc and std::exp.
struct ScalarMath {
  // sum_j erfc(d_j * factor)
  template <typename T>
  static T SumErfc(const T* d, Index width, T factor) {
    T total = 0;
    for (Index j = 0; j < width; ++j) total += GcdfTerm(d[j], factor);
    return total;
  }
  // sum_j exp(d_j * scale - shift)
  template <typename T>
  static T SumExp(const T* d, Index width, T scale, T shift) {
    T total = 0;
    for (Index j = 0; j < width; ++j) total += TemperedTerm(d[j], scale, shift);
    return total;
  }
  // sum_j max(0, d_j + gamma)
  template <typename T>
  static T SumHinge(const T* d, Index width, T gamma) {
    T total = 0;
    for (Index j = 0; j < width; ++j) total += HingeTerm(d[j], gamma);
    return total;
  }
  // x_i <- softplus(log(x_i) + shift_i) with TF's softplus thresholds: v above -threshold, exp(v) below
  // threshold, log1p(exp(v)) between.
  template <typename T>
  static void SoftplusOfLog(T* x, const T* shifts, Index count) {
    static const T threshold = SoftplusThreshold<T>();
    for (Index i = 0; i < count; ++i) x[i] = SoftplusOfLogValue(x[i], shifts[i], threshold);
  }
  // With z_j = d_j / scale (stored in `scratch`): acc_j += coefficient * exp(-z_j^2 / 2); returns the sum over
  // finite z_j of z_j exp(-z_j^2 / 2).
  template <typename T>
  static T AddGaussian(const T* d, Index width, T scale, T coefficient, T* scratch, T* acc) {
    T weighted = 0;
    for (Index j = 0; j < width; ++j) {
      const T z = scratch[j] = d[j] / scale;
      const T density = GaussianDensity(z);
      if (std::isfinite(z)) weighted += z * density;
      acc[j] += coefficient * density;
    }
    return weighted;
  }
  // work_j = exp(d_j / t - shift); returns sum_j work_j.
  template <typename T>
  static T ExpShifted(const T* d, Index width, T t, T shift, T* work) {
    T total = 0;
    for (Index j = 0; j < width; ++j) {
      work[j] = TemperedGradientTerm(d[j], t, shift);
      total += work[j];
    }
    return total;
  }
  // acc_j += coefficient * work_j
  template <typename T>
  static void AddScaled(const T* work, Index width, T coefficient, T* acc) {
    for (Index j = 0; j < width; ++j) acc[j] += coefficient * work[j];
  }
  // acc_j += upstream where d_j + gamma > 0
  template <typename T>
  static void AddStep(const T* d, Index width, T gamma, T upstream, T* acc) {
    for (Index j = 0; j < width; ++j) acc[j] += HingeStep(d[j], gamma, upstream);
  }
  static void Zero(float* values, Index width) { std::fill(values, values + width, 0.0f); }
  static void Zero(double* values, Index width) { std::fill(values, values + width, 0.0); }
};

// One row of the panel: out[0..K). `d` holds `width` values, `shifts` one per temperature.
template <class Math, typename T>
void PanelRow(const T* x, Index classes, Index width, int y, T norm, const Panel& panel, T* d, T* shifts, T* out) {
  const RowKind kind = RowMargins(x, classes, width, y, d);
  if (kind.has_nan) {
    std::fill(out, out + panel.columns(), std::numeric_limits<T>::quiet_NaN());
    return;
  }
  Index k = 0;
  for (double sigma : panel.sigmas) {
    if (sigma == 0.0) {
      T count = 0;
      for (Index j = 0; j < classes; ++j) count += ZeroSigmaTerm(d[j]);
      out[k++] = count;
    } else {
      out[k++] = T(0.5) * Math::SumErfc(d, width, GcdfFactor(sigma, norm));
    }
  }
  if (!panel.temperatures.empty()) {
    // tf.reduce_logsumexp of d / t, shifted by its max when that is finite, by 0 otherwise (max_j d_j / t
    // = (max_j d_j) / t: division by t > 0 is monotone); then the logs and softplus.
    const T max_margin = RowMax(d, width, kind.nonfinite_margin);
    const Index count = static_cast<Index>(panel.temperatures.size());
    T* sums = out + k;
    for (Index i = 0; i < count; ++i) {
      const T inverse = static_cast<T>(1.0 / panel.temperatures[i]);  // exact for powers of two
      const T raw_max = max_margin * inverse;
      shifts[i] = TemperedShift(raw_max);
      sums[i] = std::isnan(raw_max) ? raw_max : Math::SumExp(d, width, inverse, shifts[i]);
    }
    Math::SoftplusOfLog(sums, shifts, count);
    k += count;
  }
  for (double margin : panel.margins) {
    const T gamma = static_cast<T>(margin);
    if (kind.nonfinite_margin) {
      T total = 0;
      for (Index j = 0; j < classes; ++j) total += HingeTermNonfinite(d[j], gamma);
      out[k++] = total;
    } else {
      out[k++] = Math::SumHinge(d, width, gamma);
    }
  }
  if (panel.error) {
    bool loses = false;
    for (Index j = 0; j < classes && !loses; ++j) loses = BeatsLabel(d[j], j, y);
    out[k++] = loses ? T(1) : T(0);
  }
}

// One row of the gradient: given the upstream g[0..K), writes dx[0..C) = dLoss/dlogits and returns the
// derivative with respect to this row's feature norm. sigma = 0 and the error have zero gradient.
// `d`, `acc` and `scratch` hold `width` values.
template <class Math, typename T>
T PanelGradRow(const T* x, Index classes, Index width, int y, T norm, const Panel& panel, const T* g, T* d, T* acc,
               T* scratch, T* dx) {
  const RowKind kind = RowMargins(x, classes, width, y, d);  // NaN logits propagate through the arithmetic
  Math::Zero(acc, width);
  T dnorm = 0;
  Index k = 0;
  for (double sigma : panel.sigmas) {
    const T upstream = g[k++];
    if (sigma == 0.0 || upstream == T(0)) continue;
    const T scale = GaussianScale(sigma, norm);
    const T coefficient = GaussianCoefficient(upstream, scale);
    // z = d / scale is -inf at y and in the padding, where the density is 0.
    const T weighted = Math::AddGaussian(d, width, scale, coefficient, scratch, acc);
    dnorm -= coefficient * weighted * scale / norm;
  }
  if (!panel.temperatures.empty()) {
    const T max_margin = RowMax(d, width, kind.nonfinite_margin);
    for (double temperature : panel.temperatures) {
      const T upstream = g[k++];
      if (upstream == T(0)) continue;
      const T t = static_cast<T>(temperature);
      const T shift = TemperedGradientShift(max_margin, t);
      const T denominator = std::exp(-shift) + Math::ExpShifted(d, width, t, shift, scratch);
      Math::AddScaled(scratch, width, upstream / (t * denominator), acc);
    }
  }
  for (double margin : panel.margins) {
    const T upstream = g[k++];
    if (upstream == T(0)) continue;
    const T gamma = static_cast<T>(margin);
    if (kind.nonfinite_margin) {
      for (Index j = 0; j < classes; ++j) acc[j] += HingeStepNonfinite(d[j], gamma, upstream);
    } else {
      Math::AddStep(d, width, gamma, upstream, acc);
    }
  }
  // s_y enters every margin with a minus sign.
  T sum_others = 0;
  for (Index j = 0; j < classes; ++j) {
    if (j != y) sum_others += acc[j];
    dx[j] = acc[j];
  }
  dx[y] = -sum_others;
  return dnorm;
}

// ------------------------------------------------------------------------------------------------------ //
// Batches: rows [start, end) of a [batch, classes] problem (a binding splits the rows over its threads).
// ------------------------------------------------------------------------------------------------------ //

// A validated problem: pointers into the caller's buffers.
template <typename T>
struct Problem {
  const T* logits = nullptr;         // [batch, classes]
  const std::int32_t* labels = nullptr;  // [batch]
  const T* norms = nullptr;          // [batch] if norm_per_sample, else [1]
  Index batch = 0;
  Index classes = 0;
  bool norm_per_sample = false;
  const Panel* panel = nullptr;
  T norm(Index b) const { return norm_per_sample ? norms[b] : norms[0]; }
};

// out[b * K + k] for b in [start, end), one row at a time.
template <class Math, typename T>
void PanelRows(const Problem<T>& problem, Index start, Index end, T* out) {
  const Index width = PaddedWidth(problem.classes), columns = problem.panel->columns();
  std::vector<T> margins(width), shifts(problem.panel->temperatures.size() + 1);
  for (Index b = start; b < end; ++b) {
    PanelRow<Math, T>(problem.logits + b * problem.classes, problem.classes, width, problem.labels[b],
                      problem.norm(b), *problem.panel, margins.data(), shifts.data(), out + b * columns);
  }
}

// dx [batch, classes] and row_dnorm [batch] for rows [start, end); `g` is [batch, K], or [K] (`reduce`:
// the same upstream for every row).
template <class Math, typename T>
void PanelGradRows(const Problem<T>& problem, const T* g, bool reduce, Index start, Index end, T* dx,
                   T* row_dnorm) {
  const Index width = PaddedWidth(problem.classes), columns = problem.panel->columns();
  std::vector<T> margins(width), accumulated(width), scratch(width);
  for (Index b = start; b < end; ++b) {
    row_dnorm[b] = PanelGradRow<Math, T>(problem.logits + b * problem.classes, problem.classes, width,
                                         problem.labels[b], problem.norm(b), *problem.panel,
                                         reduce ? g : g + b * columns, margins.data(), accumulated.data(),
                                         scratch.data(), dx + b * problem.classes);
  }
}

// sums[k] = sum_b per_sample[b * K + k], in a fixed order (deterministic whatever the threads), in double.
template <typename T>
void SumColumns(const T* per_sample, Index batch, Index columns, T* sums) {
  for (Index k = 0; k < columns; ++k) {
    double total = 0;
    for (Index b = 0; b < batch; ++b) total += static_cast<double>(per_sample[b * columns + k]);
    sums[k] = static_cast<T>(total);
  }
}

// dnorm [batch] (per-sample norms) or [1] (a scalar norm: the rows' sum, in double).
template <typename T>
void NormGradient(const T* row_dnorm, Index batch, bool norm_per_sample, T* dnorm) {
  if (norm_per_sample) {
    std::copy(row_dnorm, row_dnorm + batch, dnorm);
    return;
  }
  double total = 0;
  for (Index b = 0; b < batch; ++b) total += static_cast<double>(row_dnorm[b]);
  dnorm[0] = static_cast<T>(total);
}

// ====================================================================================================== //
// Blocks of rows, for the CPU bindings: panel_op.cc (Eigen lanes) and panel_ffi.cc (AVX2 lanes).
// ====================================================================================================== //
//
// L::kRows rows at a time, one vector lane per row and one vector per class: a 10-class row is not padded to
// 16 values and no column needs a horizontal sum. Same formulas and steps as PanelRow and PanelGradRow (the
// terms above); only the order of the sums over classes differs. A block runs only when all its logits are
// finite: otherwise PanelBlock and PanelGradBlock compute nothing and return false, and its rows take the
// row functions' careful paths (NaN rows, infinite logits). Used up to kBlockMaxClasses classes (faster than
// the rows at every width measured, 10 to 5000 classes, with Eigen and AVX2 lanes: BUILD_NOTES.md), beyond
// which a block's buffers (classes x kRows values each) would outgrow the L2 cache; wider rows run one at a
// time, vectorized along the row by the math policy.
//
// A lanes type L (for T = L::Scalar) supplies, as static functions of its vector type L::V (kRows values of T,
// one per row of the block) and of the masks its comparisons return:
//   kRows, Load(const T*), Store(T*, V), Set(T), Zero(), Add, Sub, Mul, Div, Min, Max (V, V), Erfc, Exp, Log,
//   Log1p (V), Greater, Equal (V, V) -> mask, Select(mask, a, b) (a where the mask holds, else b), and
//   WhereFinite(z, v) (v where z is finite, else 0).

constexpr Index kBlockMaxClasses = 4096;

// Margins of a block of L::kRows rows: margins[j * kRows + r] = x[r][j] - x[r][y_r], -inf at j = y_r. False
// (the margins then are incomplete) when a logit is not finite.
template <class L, typename T>
bool BlockMargins(const T* x, Index classes, const std::int32_t* y, T* margins) {
  constexpr Index rows = L::kRows;
  for (Index r = 0; r < rows; ++r) {
    const T* row = x + r * classes;
    const T true_score = row[y[r]];
    bool finite = true;
    for (Index j = 0; j < classes; ++j) {
      finite &= std::isfinite(row[j]);
      margins[j * rows + r] = row[j] - true_score;
    }
    if (!finite) return false;
    margins[y[r] * rows + r] = -std::numeric_limits<T>::infinity();
  }
  return true;
}

// SoftplusOfLogValue on lanes (TF's thresholds); exp is taken of min(v, -threshold), the only values whose
// exp is selected, so that it cannot overflow.
template <class L, typename T>
typename L::V BlockSoftplusOfLog(typename L::V sum, typename L::V shift, T threshold) {
  const typename L::V v = L::Add(L::Log(sum), shift), upper = L::Set(-threshold);
  const typename L::V e = L::Exp(L::Min(v, upper));
  return L::Select(L::Greater(v, upper), v, L::Select(L::Greater(L::Set(threshold), v), e, L::Log1p(e)));
}

// The forward panel of a block: out[r * columns + k] for its rows r. `norms` holds the rows' feature norms,
// `margins` classes x kRows values.
template <class L, typename T>
bool PanelBlock(const T* x, Index classes, const std::int32_t* y, const T* norms, const Panel& panel, T* margins,
                T* out, Index columns) {
  using V = typename L::V;
  constexpr Index rows = L::kRows;
  if (!BlockMargins<L, T>(x, classes, y, margins)) return false;
  auto margin = [&](Index j) { return L::Load(margins + j * rows); };
  auto store = [&](Index k, V values) {
    T lanes[rows];
    L::Store(lanes, values);
    for (Index r = 0; r < rows; ++r) out[r * columns + k] = lanes[r];
  };
  const V zero = L::Zero();
  Index k = 0;
  for (double sigma : panel.sigmas) {
    V total = zero;
    if (sigma == 0.0) {  // ZeroSigmaTerm
      const V one = L::Set(T(1)), half = L::Set(T(0.5));
      for (Index j = 0; j < classes; ++j) {
        const V d = margin(j);
        total = L::Add(total, L::Select(L::Greater(d, zero), one, L::Select(L::Equal(d, zero), half, zero)));
      }
      store(k++, total);
    } else {  // GcdfTerm
      T factors[rows];
      for (Index r = 0; r < rows; ++r) factors[r] = GcdfFactor(sigma, norms[r]);
      const V factor = L::Load(factors);
      for (Index j = 0; j < classes; ++j) total = L::Add(total, L::Erfc(L::Mul(margin(j), factor)));
      store(k++, L::Mul(L::Set(T(0.5)), total));
    }
  }
  if (!panel.temperatures.empty()) {  // TemperedTerm, shifted by the (finite) max_j d_j / T
    static const T threshold = SoftplusThreshold<T>();
    V max_margin = margin(0);
    for (Index j = 1; j < classes; ++j) max_margin = L::Max(max_margin, margin(j));
    for (double temperature : panel.temperatures) {
      const V inverse = L::Set(static_cast<T>(1.0 / temperature));
      const V shift = L::Mul(max_margin, inverse);
      V sums = zero;
      for (Index j = 0; j < classes; ++j) sums = L::Add(sums, L::Exp(L::Sub(L::Mul(margin(j), inverse), shift)));
      store(k++, BlockSoftplusOfLog<L, T>(sums, shift, threshold));
    }
  }
  for (double margin_value : panel.margins) {  // HingeTerm
    const V gamma = L::Set(static_cast<T>(margin_value));
    V total = zero;
    for (Index j = 0; j < classes; ++j) total = L::Add(total, L::Max(L::Add(margin(j), gamma), zero));
    store(k++, total);
  }
  if (panel.error) {
    for (Index r = 0; r < rows; ++r) {
      bool loses = false;
      for (Index j = 0; j < classes && !loses; ++j) loses = BeatsLabel(margins[j * rows + r], j, Index(y[r]));
      out[r * columns + k] = loses ? T(1) : T(0);
    }
    ++k;
  }
  return true;
}

// The gradient of a block: dx[r * classes + j] and dnorm[r] for its rows r, given the upstream of row r at
// g + r * g_stride (g_stride = 0: the same upstream for every row). `margins`, `acc` and `work` hold
// classes x kRows values. A column whose upstream is 0 in every row is skipped (PanelGradRow skips it per row;
// here a row with upstream 0 adds exact zeros).
template <class L, typename T>
bool PanelGradBlock(const T* x, Index classes, const std::int32_t* y, const T* norms, const Panel& panel, const T* g,
                    Index g_stride, T* margins, T* acc, T* work, T* dx, T* dnorm) {
  using V = typename L::V;
  constexpr Index rows = L::kRows;
  if (!BlockMargins<L, T>(x, classes, y, margins)) return false;
  auto margin = [&](Index j) { return L::Load(margins + j * rows); };
  const V zero = L::Zero();
  for (Index j = 0; j < classes; ++j) L::Store(acc + j * rows, zero);
  T upstream[rows];
  // The upstream of column k in each row; false when it is 0 in every row.
  auto read_upstream = [&](Index k) {
    bool any = false;
    for (Index r = 0; r < rows; ++r) {
      upstream[r] = g[r * g_stride + k];
      any |= upstream[r] != T(0);
    }
    return any;
  };
  V norm = L::Load(norms), dnorm_lanes = zero;
  Index k = 0;
  for (double sigma : panel.sigmas) {
    if (!read_upstream(k++) || sigma == 0.0) continue;
    T scales[rows], coefficients[rows];
    for (Index r = 0; r < rows; ++r) {
      scales[r] = GaussianScale(sigma, norms[r]);
      coefficients[r] = GaussianCoefficient(upstream[r], scales[r]);
    }
    const V scale = L::Load(scales), coefficient = L::Load(coefficients), minus_half = L::Set(T(-0.5));
    V weighted = zero;
    for (Index j = 0; j < classes; ++j) {  // GaussianDensity of z = d / scale (-inf at y: density 0)
      const V z = L::Div(margin(j), scale);
      const V density = L::Exp(L::Mul(minus_half, L::Mul(z, z)));
      weighted = L::Add(weighted, L::WhereFinite(z, L::Mul(z, density)));
      L::Store(acc + j * rows, L::Add(L::Load(acc + j * rows), L::Mul(coefficient, density)));
    }
    dnorm_lanes = L::Sub(dnorm_lanes, L::Div(L::Mul(L::Mul(coefficient, weighted), scale), norm));
  }
  if (!panel.temperatures.empty()) {
    V max_margin = margin(0);
    for (Index j = 1; j < classes; ++j) max_margin = L::Max(max_margin, margin(j));
    T max_margins[rows];
    L::Store(max_margins, max_margin);
    for (double temperature : panel.temperatures) {
      if (!read_upstream(k++)) continue;
      const T t = static_cast<T>(temperature);
      T shifts[rows];
      for (Index r = 0; r < rows; ++r) shifts[r] = TemperedGradientShift(max_margins[r], t);
      const V shift = L::Load(shifts), divisor = L::Set(t);
      V sum = zero;
      for (Index j = 0; j < classes; ++j) {  // TemperedGradientTerm
        const V term = L::Exp(L::Sub(L::Div(margin(j), divisor), shift));
        L::Store(work + j * rows, term);
        sum = L::Add(sum, term);
      }
      const V denominator = L::Add(L::Exp(L::Sub(zero, shift)), sum);
      const V coefficient = L::Div(L::Load(upstream), L::Mul(divisor, denominator));
      for (Index j = 0; j < classes; ++j) {
        L::Store(acc + j * rows, L::Add(L::Load(acc + j * rows), L::Mul(coefficient, L::Load(work + j * rows))));
      }
    }
  }
  for (double margin_value : panel.margins) {  // HingeStep
    if (!read_upstream(k++)) continue;
    const V gamma = L::Set(static_cast<T>(margin_value)), step = L::Load(upstream);
    for (Index j = 0; j < classes; ++j) {
      const V taken = L::Select(L::Greater(L::Add(margin(j), gamma), zero), step, zero);
      L::Store(acc + j * rows, L::Add(L::Load(acc + j * rows), taken));
    }
  }
  // s_y enters every margin with a minus sign. acc is exactly 0 at j = y (d_y = -inf), so the sum over every
  // j adds the same values in the same order as PanelGradRow's sum over j != y.
  V sum_others = zero;
  for (Index j = 0; j < classes; ++j) sum_others = L::Add(sum_others, L::Load(acc + j * rows));
  T sums[rows];
  L::Store(sums, sum_others);
  L::Store(dnorm, dnorm_lanes);
  for (Index r = 0; r < rows; ++r) {
    T* row = dx + r * classes;
    for (Index j = 0; j < classes; ++j) row[j] = acc[j * rows + r];
    row[y[r]] = -sums[r];
  }
  return true;
}

// PanelRows with blocks: rows [start, end), L::kRows at a time from `start` while classes <= kBlockMaxClasses
// (a block with a logit that is not finite, and the rows left over, take PanelRow with the math policy Math);
// otherwise PanelRows itself. Each row's value depends only on the block it falls in: a caller that splits the
// rows at multiples of kRows gets the same values whatever the split.
template <class L, class Math, typename T>
void PanelBlockRows(const Problem<T>& problem, Index start, Index end, T* out) {
  constexpr Index rows = L::kRows;
  const Index classes = problem.classes, columns = problem.panel->columns();
  Index b = start;
  if (classes <= kBlockMaxClasses) {
    std::vector<T> margins(static_cast<size_t>(classes * rows));
    T norms[rows];
    for (; b + rows <= end; b += rows) {
      for (Index r = 0; r < rows; ++r) norms[r] = problem.norm(b + r);
      if (!PanelBlock<L, T>(problem.logits + b * classes, classes, problem.labels + b, norms, *problem.panel,
                            margins.data(), out + b * columns, columns)) {
        PanelRows<Math, T>(problem, b, b + rows, out);
      }
    }
  }
  PanelRows<Math, T>(problem, b, end, out);
}

// PanelGradRows with blocks, as PanelBlockRows.
template <class L, class Math, typename T>
void PanelGradBlockRows(const Problem<T>& problem, const T* g, bool reduce, Index start, Index end, T* dx,
                        T* row_dnorm) {
  constexpr Index rows = L::kRows;
  const Index classes = problem.classes, columns = problem.panel->columns();
  Index b = start;
  if (classes <= kBlockMaxClasses) {
    const size_t size = static_cast<size_t>(classes * rows);
    std::vector<T> margins(size), accumulated(size), work(size);
    T norms[rows];
    for (; b + rows <= end; b += rows) {
      for (Index r = 0; r < rows; ++r) norms[r] = problem.norm(b + r);
      if (!PanelGradBlock<L, T>(problem.logits + b * classes, classes, problem.labels + b, norms, *problem.panel,
                                reduce ? g : g + b * columns, reduce ? 0 : columns, margins.data(),
                                accumulated.data(), work.data(), dx + b * classes, row_dnorm + b)) {
        PanelGradRows<Math, T>(problem, g, reduce, b, b + rows, dx, row_dnorm);
      }
    }
  }
  PanelGradRows<Math, T>(problem, g, reduce, b, end, dx, row_dnorm);
}

// ====================================================================================================== //
// End of the blocks.
// ====================================================================================================== //

}  // namespace keras_implicit

#endif  // KERAS_IMPLICIT_PANEL_MATH_H_
