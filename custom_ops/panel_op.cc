// The fused alternative-loss panel: every loss of a panel in one pass over each row of logits.
//
// KerasImplicitPanel(logits [B, C], labels [B], feature_norm [] or [B], sigmas [K1], temperatures [K2],
//                    margins [K3]; error, reduce) -> values [B, K] (or [K] with reduce = true)
// KerasImplicitPanelGrad(grad [B, K] (or [K]), same inputs) -> (d logits [B, C], d feature_norm)
//
// Columns: K1 Gcdf (eq. 6), K2 tempered cross-entropy (eq. 7), K3 multi-class hinge (eq. 8), then the
// zero-one error if `error`. The formulas are those of keras_implicit/losses.py (_panel_pure_tf), written
// on the margins d_j = s_j - s_y with the same steps, except that where TF divides by sqrt2 sigma norm,
// sqrt2 or T, the kernel multiplies by a reciprocal computed in double, so both paths agree to rounding:
//   Gcdf(sigma > 0) = sum_{j != y} 0.5 * erfc(-d_j / (2 sigma norm))
//   Gcdf(sigma = 0) = #{j != y : d_j > 0} + 0.5 * #{j != y : d_j = 0}
//   tce(T)          = softplus(logsumexp_{j != y} d_j / T)      (TF's softplus thresholds, log1p)
//   hinge(gamma)    = sum_{j != y} max(0, gamma + d_j)
//   error           = [exists j < y : d_j >= 0, or j > y : d_j > 0]   (argmax's tie rule)
// A row holding a NaN logit gives NaN in every column. Both kernels reject (InvalidArgument, naming the
// argument) fewer than 2 classes, labels outside [0, classes), a feature_norm that is not finite and > 0,
// and parameters that are not finite or out of range (sigmas, margins >= 0; temperatures > 0).
//
// The row's own class is excluded by setting d_y = -inf: every family then sums over all j, and the
// excluded term is exactly 0 (erfc(+inf) = 0, exp(-inf) = 0, max(0, -inf) = 0, comparisons false).
// Work per row is O(K * C); the only buffers are, per thread, up to three rows of C values (or C x 8 values
// for the 8-row blocks used up to 32 classes): nothing of size B x K x C. Rows are split over TensorFlow's
// CPU thread pool (Shard).

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/util/work_sharder.h"
#include "unsupported/Eigen/SpecialFunctions"

namespace keras_implicit {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;
using ::tensorflow::int64;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

// The panel's parameters, validated once per call.
struct Panel {
  std::vector<double> sigmas, temperatures, margins;
  bool error = false;
  int64 columns() const {
    return static_cast<int64>(sigmas.size() + temperatures.size() + margins.size()) + (error ? 1 : 0);
  }
};

// Inputs shared by the forward and the gradient kernels: validated views of the tensors.
struct Inputs {
  const Tensor* logits;
  const Tensor* labels;
  const Tensor* feature_norm;
  int64 batch = 0;
  int64 classes = 0;
  bool norm_per_sample = false;
  Panel panel;
};

// A parameter vector: finite values, each >= 0 (sigmas, margins) or > 0 (temperatures, `positive`).
static Status ReadParameters(const Tensor& tensor, const char* name, bool positive, std::vector<double>* out) {
  if (!TensorShapeUtils::IsVector(tensor.shape())) {
    return ::tensorflow::errors::InvalidArgument(name, " must be a vector, got shape ", tensor.shape().DebugString());
  }
  auto values = tensor.flat<double>();
  out->assign(values.data(), values.data() + values.size());
  for (size_t i = 0; i < out->size(); ++i) {
    const double value = (*out)[i];
    if (!std::isfinite(value) || (positive ? !(value > 0) : !(value >= 0))) {
      return ::tensorflow::errors::InvalidArgument(name, "[", i, "] must be finite and ", positive ? "> 0" : ">= 0",
                                                   ", got ", value);
    }
  }
  return ::tensorflow::OkStatus();
}

// Reads inputs 0..5 starting at `first` (logits, labels, feature_norm, sigmas, temperatures, margins) and
// validates them: at least 2 classes, labels in [0, classes), every feature_norm finite and > 0, sigmas and
// margins finite and >= 0, temperatures finite and > 0. The Python wrapper checks some of these too; the op
// checks them all itself, also where a shape is only known when it runs.
template <typename T>
static Status ReadInputs(OpKernelContext* context, int first, bool error, Inputs* in) {
  in->logits = &context->input(first);
  in->labels = &context->input(first + 1);
  in->feature_norm = &context->input(first + 2);
  const TensorShape& logits_shape = in->logits->shape();
  if (!TensorShapeUtils::IsMatrix(logits_shape)) {
    return ::tensorflow::errors::InvalidArgument("logits must be [batch, classes], got shape ",
                                                 logits_shape.DebugString());
  }
  in->batch = logits_shape.dim_size(0);
  in->classes = logits_shape.dim_size(1);
  if (in->classes < 2) {
    return ::tensorflow::errors::InvalidArgument("logits must have at least 2 classes, got shape ",
                                                 logits_shape.DebugString());
  }
  if (!TensorShapeUtils::IsVector(in->labels->shape()) || in->labels->dim_size(0) != in->batch) {
    return ::tensorflow::errors::InvalidArgument("labels must be [batch] = [", in->batch, "], got shape ",
                                                 in->labels->shape().DebugString());
  }
  const TensorShape& norm_shape = in->feature_norm->shape();
  if (TensorShapeUtils::IsScalar(norm_shape)) {
    in->norm_per_sample = false;
  } else if (TensorShapeUtils::IsVector(norm_shape) && norm_shape.dim_size(0) == in->batch) {
    in->norm_per_sample = true;
  } else {
    return ::tensorflow::errors::InvalidArgument("feature_norm must be a scalar or [batch] = [", in->batch,
                                                 "], got shape ", norm_shape.DebugString());
  }
  const auto norms = in->feature_norm->flat<T>();
  for (int64 i = 0; i < norms.size(); ++i) {
    if (!(std::isfinite(norms(i)) && norms(i) > T(0))) {
      const std::string name = in->norm_per_sample ? ::tensorflow::strings::StrCat("feature_norm[", i, "]")
                                                   : std::string("feature_norm");
      return ::tensorflow::errors::InvalidArgument(name, " must be finite and > 0, got ",
                                                   static_cast<double>(norms(i)));
    }
  }
  TF_RETURN_IF_ERROR(ReadParameters(context->input(first + 3), "sigmas", false, &in->panel.sigmas));
  TF_RETURN_IF_ERROR(ReadParameters(context->input(first + 4), "temperatures", true, &in->panel.temperatures));
  TF_RETURN_IF_ERROR(ReadParameters(context->input(first + 5), "margins", false, &in->panel.margins));
  in->panel.error = error;
  auto labels = in->labels->flat<int32_t>();
  for (int64 b = 0; b < in->batch; ++b) {
    if (labels(b) < 0 || labels(b) >= in->classes) {
      return ::tensorflow::errors::InvalidArgument("labels[", b, "] = ", labels(b), " is outside [0, ",
                                                   in->classes, ")");
    }
  }
  return ::tensorflow::OkStatus();
}

// Cost of one row in the units Shard expects (roughly cycles): erfc and exp dominate.
static int64 RowCost(const Panel& panel, int64 classes, bool gradient) {
  const int64 per_class = 40 * static_cast<int64>(panel.sigmas.size()) +
                          25 * static_cast<int64>(panel.temperatures.size()) +
                          2 * static_cast<int64>(panel.margins.size()) + 4;
  return (gradient ? 2 : 1) * per_class * std::max<int64>(classes, 1);
}

// Rows are padded to a multiple of this many values (a packet of 8 floats or 4 doubles, or two), so that
// Eigen's vectorized loops run without scalar remainders. The padding holds -inf, like d_y, and so adds
// exactly 0 to every family.
constexpr int64 kRowPadding = 8;

static int64 PaddedWidth(int64 classes) { return (classes + kRowPadding - 1) / kRowPadding * kRowPadding; }

// What RowMargins learned about a row.
struct RowKind {
  bool has_nan = false;           // a NaN logit: every column is NaN
  bool nonfinite_margin = false;  // a NaN margin from infinite logits (inf - inf): the careful scalar paths
};

// Margins of one row: d_j = s_j - s_y for j < classes, d_y = -inf, and -inf padding up to `width`.
template <typename T>
static RowKind RowMargins(const T* x, int64 classes, int64 width, int y, T* d) {
  const T true_score = x[y];
  RowKind kind;
  bool has_infinity = false;
  for (int64 j = 0; j < classes; ++j) {
    kind.has_nan |= std::isnan(x[j]);
    has_infinity |= std::isinf(x[j]);
    d[j] = x[j] - true_score;
  }
  d[y] = -std::numeric_limits<T>::infinity();
  std::fill(d + classes, d + width, -std::numeric_limits<T>::infinity());
  if (has_infinity && !kind.has_nan) {
    for (int64 j = 0; j < classes; ++j) kind.nonfinite_margin |= std::isnan(d[j]);
  }
  return kind;
}

// TF's softplus (tensorflow/core/kernels/softplus_op.h), vectorized the same way: x above -threshold,
// exp(x) below threshold, log1p(exp(x)) between, threshold = log(eps) + 2.
template <typename Array>
static void Softplus(Array&& x) {
  using T = typename std::decay_t<Array>::Scalar;
  static const T threshold = std::log(std::numeric_limits<T>::epsilon()) + T(2);
  x = (x > -threshold).select(x, (x < threshold).select(x.exp(), x.exp().log1p()));
}

// Max over j of d_j, NaN if any d_j is NaN.
template <typename T>
static T RowMax(const T* d, int64 width, bool nonfinite_margin) {
  if (nonfinite_margin) return std::numeric_limits<T>::quiet_NaN();
  T m = -std::numeric_limits<T>::infinity();
  for (int64 j = 0; j < width; ++j) m = d[j] > m ? d[j] : m;
  return m;
}

template <typename T>
using RowArray = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;

// One row of the panel: out[0..K). `d` holds `width` values, `shifts` one per temperature.
template <typename T>
static void PanelRow(const T* x, int64 classes, int64 width, int y, T norm, const Panel& panel, T* d, T* shifts,
                     T* out) {
  const RowKind kind = RowMargins(x, classes, width, y, d);
  if (kind.has_nan) {
    std::fill(out, out + panel.columns(), std::numeric_limits<T>::quiet_NaN());
    return;
  }
  RowArray<T> margins(d, width);
  int64 k = 0;
  for (double sigma : panel.sigmas) {
    if (sigma == 0.0) {
      T count = 0;
      for (int64 j = 0; j < classes; ++j) count += d[j] > 0 ? T(1) : (d[j] == 0 ? T(0.5) : T(0));
      out[k++] = count;
    } else {
      // Phi(d / (sqrt2 sigma norm)) = erfc(u) / 2 with u = -d / (2 sigma norm): one multiplication by a
      // factor computed in double (TF divides twice; the arguments differ by at most ~2 ulp).
      const T factor = static_cast<T>(-0.5 / (sigma * static_cast<double>(norm)));
      out[k++] = T(0.5) * (margins * factor).erfc().sum();
    }
  }
  if (!panel.temperatures.empty()) {
    // tf.reduce_logsumexp of d / t, shifted by its max when that is finite, by 0 otherwise (max_j d_j / t
    // = (max_j d_j) / t: division by t > 0 is monotone); then the logs and softplus, vectorized over t.
    const T max_margin = RowMax(d, width, kind.nonfinite_margin);
    const int64 count = static_cast<int64>(panel.temperatures.size());
    RowArray<T> sums(out + k, count);
    for (int64 i = 0; i < count; ++i) {
      const T inverse = static_cast<T>(1.0 / panel.temperatures[i]);  // exact for powers of two
      const T raw_max = max_margin * inverse;
      shifts[i] = std::isfinite(raw_max) || std::isnan(raw_max) ? raw_max : T(0);
      sums(i) = std::isnan(raw_max) ? raw_max : (margins * inverse - shifts[i]).exp().sum();
    }
    sums = sums.log() + RowArray<T>(shifts, count);
    Softplus(sums);
    k += count;
  }
  for (double margin : panel.margins) {
    const T gamma = static_cast<T>(margin);
    if (kind.nonfinite_margin) {
      T total = 0;
      for (int64 j = 0; j < classes; ++j) {
        const T value = gamma + d[j];
        total += (value > 0 || std::isnan(value)) ? value : T(0);
      }
      out[k++] = total;
    } else {
      out[k++] = (margins + gamma).max(T(0)).sum();
    }
  }
  if (panel.error) {
    bool loses = false;
    for (int64 j = 0; j < y && !loses; ++j) loses = d[j] >= 0;
    for (int64 j = y + 1; j < classes && !loses; ++j) loses = d[j] > 0;
    out[k++] = loses ? T(1) : T(0);
  }
}

// Few classes: eight rows at a time, one vector lane per row (one vector per class), which needs neither the
// row padding nor a horizontal sum per column. Same formulas and steps as PanelRow; only the order of the
// sums over classes differs. `margins` holds classes x kBlockRows values, `out` is the first row's output.
// Returns false, computing nothing, when a row holds a NaN or an infinite logit (PanelRow handles those).
constexpr int64 kBlockRows = 8;
constexpr int64 kBlockMaxClasses = 32;

template <typename T>
static bool PanelBlock(const T* x, int64 classes, const int32_t* y, const T* norm, const Panel& panel, T* margins,
                       T* out, int64 columns) {
  using Lanes = Eigen::Array<T, kBlockRows, 1>;
  using LaneMap = Eigen::Map<const Lanes>;
  for (int64 r = 0; r < kBlockRows; ++r) {
    const T* row = x + r * classes;
    const T true_score = row[y[r]];
    bool finite = true;
    for (int64 j = 0; j < classes; ++j) {
      finite &= std::isfinite(row[j]);
      margins[j * kBlockRows + r] = row[j] - true_score;
    }
    if (!finite) return false;
    margins[y[r] * kBlockRows + r] = -std::numeric_limits<T>::infinity();
  }
  auto margin = [&](int64 j) { return LaneMap(margins + j * kBlockRows); };
  auto store = [&](int64 k, const Lanes& values) {
    for (int64 r = 0; r < kBlockRows; ++r) out[r * columns + k] = values(r);
  };
  Lanes norms;
  for (int64 r = 0; r < kBlockRows; ++r) norms(r) = norm[r];
  int64 k = 0;
  for (double sigma : panel.sigmas) {
    Lanes total = Lanes::Zero();
    if (sigma == 0.0) {
      for (int64 j = 0; j < classes; ++j) {
        total += (margin(j) > T(0)).select(Lanes::Constant(T(1)), (margin(j) == T(0)).select(Lanes::Constant(T(0.5)),
                                                                                              Lanes::Zero()));
      }
      store(k++, total);
    } else {
      Lanes factor;
      for (int64 r = 0; r < kBlockRows; ++r) factor(r) = static_cast<T>(-0.5 / (sigma * static_cast<double>(norms(r))));
      for (int64 j = 0; j < classes; ++j) total += (margin(j) * factor).erfc();
      store(k++, T(0.5) * total);
    }
  }
  if (!panel.temperatures.empty()) {
    Lanes max_margin = margin(0);
    for (int64 j = 1; j < classes; ++j) max_margin = max_margin.max(margin(j));
    for (double temperature : panel.temperatures) {
      const T inverse = static_cast<T>(1.0 / temperature);
      const Lanes shift = max_margin * inverse;  // finite: every logit is
      Lanes sums = Lanes::Zero();
      for (int64 j = 0; j < classes; ++j) sums += (margin(j) * inverse - shift).exp();
      Lanes values = sums.log() + shift;
      Softplus(values);
      store(k++, values);
    }
  }
  for (double margin_value : panel.margins) {
    const T gamma = static_cast<T>(margin_value);
    Lanes total = Lanes::Zero();
    for (int64 j = 0; j < classes; ++j) total += (margin(j) + gamma).max(T(0));
    store(k++, total);
  }
  if (panel.error) {
    for (int64 r = 0; r < kBlockRows; ++r) {
      bool loses = false;
      for (int64 j = 0; j < y[r] && !loses; ++j) loses = margins[j * kBlockRows + r] >= 0;
      for (int64 j = y[r] + 1; j < classes && !loses; ++j) loses = margins[j * kBlockRows + r] > 0;
      out[r * columns + k] = loses ? T(1) : T(0);
    }
    ++k;
  }
  return true;
}

// One row of the gradient: given the upstream g[0..K), writes dx[0..C) = dLoss/dlogits and returns the
// derivative with respect to this row's feature norm. sigma = 0 and the error have zero gradient.
// `d`, `acc` and `scratch` hold `width` values.
template <typename T>
static T PanelGradRow(const T* x, int64 classes, int64 width, int y, T norm, const Panel& panel, const T* g, T* d,
                      T* acc, T* scratch, T* dx) {
  const RowKind kind = RowMargins(x, classes, width, y, d);  // NaN logits propagate through the arithmetic
  RowArray<T> margins(d, width);
  RowArray<T> total(acc, width);
  RowArray<T> work(scratch, width);
  total.setZero();
  T dnorm = 0;
  int64 k = 0;
  for (double sigma : panel.sigmas) {
    const T upstream = g[k++];
    if (sigma == 0.0 || upstream == T(0)) continue;
    // d/dd_j Phi(d_j / a) = phi(d_j / a) / a, a = sqrt2 sigma norm; d/dnorm = -phi(z) z / norm.
    const T scale = static_cast<T>(kSqrt2 * sigma) * norm;
    const T coefficient = upstream * static_cast<T>(kInvSqrt2Pi) / scale;
    work = margins / scale;  // z; -inf at y and in the padding, where the density is 0
    const T weighted = work.isFinite().select(work * (T(-0.5) * work.square()).exp(), T(0)).sum();
    total += coefficient * (T(-0.5) * work.square()).exp();
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
      work = (margins / t - shift).exp();
      const T denominator = std::exp(-shift) + work.sum();
      total += (upstream / (t * denominator)) * work;
    }
  }
  for (double margin : panel.margins) {
    const T upstream = g[k++];
    if (upstream == T(0)) continue;
    const T gamma = static_cast<T>(margin);
    if (kind.nonfinite_margin) {
      for (int64 j = 0; j < classes; ++j) {
        const T value = gamma + d[j];
        acc[j] += value > 0 ? upstream : (std::isnan(value) ? value : T(0));
      }
    } else {
      total += ((margins + gamma) > T(0)).template cast<T>() * upstream;
    }
  }
  // s_y enters every margin with a minus sign.
  T sum_others = 0;
  for (int64 j = 0; j < classes; ++j) {
    if (j != y) sum_others += acc[j];
    dx[j] = acc[j];
  }
  dx[y] = -sum_others;
  return dnorm;
}

// The attributes both kernels share.
class PanelKernelBase : public OpKernel {
 public:
  explicit PanelKernelBase(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("error", &error_));
    OP_REQUIRES_OK(context, context->GetAttr("reduce", &reduce_));
  }

 protected:
  bool error_ = false;
  bool reduce_ = false;
};

template <typename T>
class PanelOp : public PanelKernelBase {
 public:
  explicit PanelOp(OpKernelConstruction* context) : PanelKernelBase(context) {}

  void Compute(OpKernelContext* context) override {
    Inputs in;
    OP_REQUIRES_OK(context, ReadInputs<T>(context, 0, error_, &in));
    const int64 batch = in.batch, classes = in.classes, columns = in.panel.columns();
    OP_REQUIRES(context, columns > 0, ::tensorflow::errors::InvalidArgument("the panel is empty"));

    Tensor* output = nullptr;
    TensorShape output_shape = reduce_ ? TensorShape({columns}) : TensorShape({batch, columns});
    OP_REQUIRES_OK(context, context->allocate_output(0, output_shape, &output));
    Tensor per_sample_buffer;
    T* per_sample;
    if (reduce_) {
      OP_REQUIRES_OK(context, context->allocate_temp(::tensorflow::DataTypeToEnum<T>::value,
                                                     TensorShape({batch, columns}), &per_sample_buffer));
      per_sample = per_sample_buffer.flat<T>().data();
    } else {
      per_sample = output->flat<T>().data();
    }

    const T* logits = in.logits->flat<T>().data();
    const int32_t* labels = in.labels->flat<int32_t>().data();
    const T* norms = in.feature_norm->flat<T>().data();
    const bool per_sample_norm = in.norm_per_sample;
    const Panel& panel = in.panel;
    const int64 width = PaddedWidth(classes);
    const bool blocks = classes <= kBlockMaxClasses;
    auto work = [&](int64 start, int64 end) {
      std::vector<T> margins(std::max(width, blocks ? classes * kBlockRows : 0)), shifts(panel.temperatures.size() + 1);
      auto row = [&](int64 b) {
        PanelRow<T>(logits + b * classes, classes, width, labels[b], per_sample_norm ? norms[b] : norms[0], panel,
                    margins.data(), shifts.data(), per_sample + b * columns);
      };
      int64 b = start;
      if (blocks) {
        T block_norms[kBlockRows];
        for (; b + kBlockRows <= end; b += kBlockRows) {
          for (int64 r = 0; r < kBlockRows; ++r) block_norms[r] = per_sample_norm ? norms[b + r] : norms[0];
          if (!PanelBlock<T>(logits + b * classes, classes, labels + b, block_norms, panel, margins.data(),
                             per_sample + b * columns, columns)) {
            for (int64 r = 0; r < kBlockRows; ++r) row(b + r);
          }
        }
      }
      for (; b < end; ++b) row(b);
    };
    auto* threads = context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(threads->num_threads, threads->workers, batch, RowCost(panel, classes, false), work);

    if (reduce_) {
      // Summed in a fixed order (deterministic whatever the sharding), accumulated in double.
      auto sums = output->flat<T>();
      for (int64 k = 0; k < columns; ++k) {
        double total = 0;
        for (int64 b = 0; b < batch; ++b) total += static_cast<double>(per_sample[b * columns + k]);
        sums(k) = static_cast<T>(total);
      }
    }
  }
};

template <typename T>
class PanelGradOp : public PanelKernelBase {
 public:
  explicit PanelGradOp(OpKernelConstruction* context) : PanelKernelBase(context) {}

  void Compute(OpKernelContext* context) override {
    Inputs in;
    OP_REQUIRES_OK(context, ReadInputs<T>(context, 1, error_, &in));
    const int64 batch = in.batch, classes = in.classes, columns = in.panel.columns();
    const Tensor& upstream = context->input(0);
    const TensorShape expected = reduce_ ? TensorShape({columns}) : TensorShape({batch, columns});
    OP_REQUIRES(context, upstream.shape() == expected,
                ::tensorflow::errors::InvalidArgument("grad must have shape ", expected.DebugString(), ", got ",
                                                      upstream.shape().DebugString()));

    Tensor* grad_logits = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, in.logits->shape(), &grad_logits));
    Tensor* grad_norm = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(1, in.feature_norm->shape(), &grad_norm));
    // Per-row derivatives with respect to the feature norm; summed below when the norm is a scalar.
    Tensor row_norm_buffer;
    OP_REQUIRES_OK(context, context->allocate_temp(::tensorflow::DataTypeToEnum<T>::value,
                                                   TensorShape({batch}), &row_norm_buffer));
    T* row_dnorm = row_norm_buffer.flat<T>().data();

    const T* logits = in.logits->flat<T>().data();
    const int32_t* labels = in.labels->flat<int32_t>().data();
    const T* norms = in.feature_norm->flat<T>().data();
    const T* g = upstream.flat<T>().data();
    T* dx = grad_logits->flat<T>().data();
    const bool per_sample_norm = in.norm_per_sample;
    const bool reduce = reduce_;
    const Panel& panel = in.panel;
    const int64 width = PaddedWidth(classes);
    auto work = [&](int64 start, int64 end) {
      std::vector<T> margins(width), accumulated(width), scratch(width);
      for (int64 b = start; b < end; ++b) {
        row_dnorm[b] = PanelGradRow<T>(logits + b * classes, classes, width, labels[b],
                                       per_sample_norm ? norms[b] : norms[0], panel,
                                       reduce ? g : g + b * columns, margins.data(), accumulated.data(),
                                       scratch.data(), dx + b * classes);
      }
    };
    auto* threads = context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(threads->num_threads, threads->workers, batch, RowCost(panel, classes, true), work);

    auto dnorm = grad_norm->flat<T>();
    if (per_sample_norm) {
      for (int64 b = 0; b < batch; ++b) dnorm(b) = row_dnorm[b];
    } else {
      double total = 0;
      for (int64 b = 0; b < batch; ++b) total += static_cast<double>(row_dnorm[b]);
      dnorm(0) = static_cast<T>(total);
    }
  }

};

static Status PanelShape(InferenceContext* c, int first) {
  ShapeHandle logits, labels, norm, sigmas, temperatures, margins;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first), 2, &logits));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 1), 1, &labels));
  TF_RETURN_IF_ERROR(c->WithRankAtMost(c->input(first + 2), 1, &norm));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 3), 1, &sigmas));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 4), 1, &temperatures));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 5), 1, &margins));
  DimensionHandle batch = c->Dim(logits, 0);
  TF_RETURN_IF_ERROR(c->Merge(batch, c->Dim(labels, 0), &batch));
  return ::tensorflow::OkStatus();
}

static Status PanelColumns(InferenceContext* c, DimensionHandle* columns) {
  bool error;
  TF_RETURN_IF_ERROR(c->GetAttr("error", &error));
  DimensionHandle k;
  TF_RETURN_IF_ERROR(c->Add(c->Dim(c->input(3), 0), c->Dim(c->input(4), 0), &k));
  TF_RETURN_IF_ERROR(c->Add(k, c->Dim(c->input(5), 0), &k));
  TF_RETURN_IF_ERROR(c->Add(k, error ? 1 : 0, columns));
  return ::tensorflow::OkStatus();
}

REGISTER_OP("KerasImplicitPanel")
    .Input("logits: T")
    .Input("labels: int32")
    .Input("feature_norm: T")
    .Input("sigmas: float64")
    .Input("temperatures: float64")
    .Input("margins: float64")
    .Output("values: T")
    .Attr("T: {float, double}")
    .Attr("error: bool = false")
    .Attr("reduce: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(PanelShape(c, 0));
      DimensionHandle columns;
      TF_RETURN_IF_ERROR(PanelColumns(c, &columns));
      bool reduce;
      TF_RETURN_IF_ERROR(c->GetAttr("reduce", &reduce));
      c->set_output(0, reduce ? c->Vector(columns) : c->Matrix(c->Dim(c->input(0), 0), columns));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
Every loss of an alternative-loss panel (Gcdf, tempered cross-entropy, multi-class hinge, zero-one error)
in one pass over each row of logits; see keras_implicit/losses.py for the formulas.
)doc");

REGISTER_OP("KerasImplicitPanelGrad")
    .Input("grad: T")
    .Input("logits: T")
    .Input("labels: int32")
    .Input("feature_norm: T")
    .Input("sigmas: float64")
    .Input("temperatures: float64")
    .Input("margins: float64")
    .Output("grad_logits: T")
    .Output("grad_feature_norm: T")
    .Attr("T: {float, double}")
    .Attr("error: bool = false")
    .Attr("reduce: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(PanelShape(c, 1));
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(3));
      return ::tensorflow::OkStatus();
    })
    .Doc("The gradient of KerasImplicitPanel with respect to logits and feature_norm.");

#define REGISTER_PANEL_KERNELS(type)                                                                   \
  REGISTER_KERNEL_BUILDER(Name("KerasImplicitPanel").Device(DEVICE_CPU).TypeConstraint<type>("T"),     \
                          PanelOp<type>);                                                              \
  REGISTER_KERNEL_BUILDER(Name("KerasImplicitPanelGrad").Device(DEVICE_CPU).TypeConstraint<type>("T"), \
                          PanelGradOp<type>);

REGISTER_PANEL_KERNELS(float);
REGISTER_PANEL_KERNELS(double);

#undef REGISTER_PANEL_KERNELS

}  // namespace keras_implicit
