// The per-row mathematics of the fused alternative-loss panel, shared by every binding:
//   custom_ops/panel_op.cc   the TensorFlow op (CPU), with an Eigen math policy (vectorized erfc and exp);
//   custom_ops/panel_ffi.cc  the XLA FFI handlers for JAX (CPU), with the scalar policy below.
// Plain C++17 and the standard library only: no TensorFlow, XLA or Eigen header.
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

// Every feature norm finite and > 0 (`per_sample`: one per row, named feature_norm[i]).
template <typename T>
std::string CheckFeatureNorms(const T* norms, Index count, bool per_sample) {
  for (Index i = 0; i < count; ++i) {
    if (!(std::isfinite(norms[i]) && norms[i] > T(0))) {
      const std::string name = per_sample ? detail::Concat("feature_norm[", i, "]") : std::string("feature_norm");
      return detail::Concat(name, " must be finite and > 0, got ", static_cast<double>(norms[i]));
    }
  }
  return std::string();
}

// Every label in [0, classes).
inline std::string CheckLabels(const std::int32_t* labels, Index batch, Index classes) {
  for (Index b = 0; b < batch; ++b) {
    if (labels[b] < 0 || labels[b] >= classes) {
      return detail::Concat("labels[", b, "] = ", labels[b], " is outside [0, ", classes, ")");
    }
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
T SoftplusThreshold() {
  return std::log(std::numeric_limits<T>::epsilon()) + T(2);
}

// The scalar math policy: plain loops over std::erfc and std::exp.
struct ScalarMath {
  // sum_j erfc(d_j * factor)
  template <typename T>
  static T SumErfc(const T* d, Index width, T factor) {
    T total = 0;
    for (Index j = 0; j < width; ++j) total += std::erfc(d[j] * factor);
    return total;
  }
  // sum_j exp(d_j * scale - shift)
  template <typename T>
  static T SumExp(const T* d, Index width, T scale, T shift) {
    T total = 0;
    for (Index j = 0; j < width; ++j) total += std::exp(d[j] * scale - shift);
    return total;
  }
  // sum_j max(0, d_j + gamma)
  template <typename T>
  static T SumHinge(const T* d, Index width, T gamma) {
    T total = 0;
    for (Index j = 0; j < width; ++j) total += std::max(d[j] + gamma, T(0));
    return total;
  }
  // x_i <- softplus(log(x_i) + shift_i) with TF's softplus thresholds: v above -threshold, exp(v) below
  // threshold, log1p(exp(v)) between.
  template <typename T>
  static void SoftplusOfLog(T* x, const T* shifts, Index count) {
    static const T threshold = SoftplusThreshold<T>();
    for (Index i = 0; i < count; ++i) {
      const T v = std::log(x[i]) + shifts[i];
      x[i] = v > -threshold ? v : (v < threshold ? std::exp(v) : std::log1p(std::exp(v)));
    }
  }
  // With z_j = d_j / scale (stored in `scratch`): acc_j += coefficient * exp(-z_j^2 / 2); returns the sum over
  // finite z_j of z_j exp(-z_j^2 / 2).
  template <typename T>
  static T AddGaussian(const T* d, Index width, T scale, T coefficient, T* scratch, T* acc) {
    T weighted = 0;
    for (Index j = 0; j < width; ++j) {
      const T z = scratch[j] = d[j] / scale;
      const T density = std::exp(T(-0.5) * z * z);
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
      work[j] = std::exp(d[j] / t - shift);
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
    for (Index j = 0; j < width; ++j) acc[j] += d[j] + gamma > T(0) ? upstream : T(0);
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
      for (Index j = 0; j < classes; ++j) count += d[j] > 0 ? T(1) : (d[j] == 0 ? T(0.5) : T(0));
      out[k++] = count;
    } else {
      // Phi(d / (sqrt2 sigma norm)) = erfc(u) / 2 with u = -d / (2 sigma norm): one multiplication by a
      // factor computed in double (the keras.ops path divides twice; the arguments differ by at most ~2 ulp).
      const T factor = static_cast<T>(-0.5 / (sigma * static_cast<double>(norm)));
      out[k++] = T(0.5) * Math::SumErfc(d, width, factor);
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
      shifts[i] = std::isfinite(raw_max) || std::isnan(raw_max) ? raw_max : T(0);
      sums[i] = std::isnan(raw_max) ? raw_max : Math::SumExp(d, width, inverse, shifts[i]);
    }
    Math::SoftplusOfLog(sums, shifts, count);
    k += count;
  }
  for (double margin : panel.margins) {
    const T gamma = static_cast<T>(margin);
    if (kind.nonfinite_margin) {
      T total = 0;
      for (Index j = 0; j < classes; ++j) {
        const T value = gamma + d[j];
        total += (value > 0 || std::isnan(value)) ? value : T(0);
      }
      out[k++] = total;
    } else {
      out[k++] = Math::SumHinge(d, width, gamma);
    }
  }
  if (panel.error) {
    bool loses = false;
    for (Index j = 0; j < y && !loses; ++j) loses = d[j] >= 0;
    for (Index j = y + 1; j < classes && !loses; ++j) loses = d[j] > 0;
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
    // d/dd_j Phi(d_j / a) = phi(d_j / a) / a, a = sqrt2 sigma norm; d/dnorm = -phi(z) z / norm.
    const T scale = static_cast<T>(kSqrt2 * sigma) * norm;
    const T coefficient = upstream * static_cast<T>(kInvSqrt2Pi) / scale;
    // z = d / scale is -inf at y and in the padding, where the density is 0.
    const T weighted = Math::AddGaussian(d, width, scale, coefficient, scratch, acc);
    dnorm -= coefficient * weighted * scale / norm;
  }
  if (!panel.temperatures.empty()) {
    const T max_margin = RowMax(d, width, kind.nonfinite_margin);
    for (double temperature : panel.temperatures) {
      const T upstream = g[k++];
      if (upstream == T(0)) continue;
      // d tce / d d_j = p_j / T with p_j = exp(d_j / T) / (1 + sum_i exp(d_i / T)), shifted by
      // M = max(0, max_j d_j / T) so nothing overflows.
      const T t = static_cast<T>(temperature);
      T shift = max_margin / t;
      if (!(shift > T(0)) || std::isinf(shift)) shift = T(0);
      const T denominator = std::exp(-shift) + Math::ExpShifted(d, width, t, shift, scratch);
      Math::AddScaled(scratch, width, upstream / (t * denominator), acc);
    }
  }
  for (double margin : panel.margins) {
    const T upstream = g[k++];
    if (upstream == T(0)) continue;
    const T gamma = static_cast<T>(margin);
    if (kind.nonfinite_margin) {
      for (Index j = 0; j < classes; ++j) {
        const T value = gamma + d[j];
        acc[j] += value > 0 ? upstream : (std::isnan(value) ? value : T(0));
      }
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

}  // namespace keras_implicit

#endif  // KERAS_IMPLICIT_PANEL_MATH_H_
