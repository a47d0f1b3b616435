// The fused alternative-loss panel as a TensorFlow op (CPU): every loss of a panel in one pass over each row.
//
// KerasImplicitPanel(logits [B, C], labels [B], feature_norm [] or [B], sigmas [K1], temperatures [K2],
//                    margins [K3]; error, reduce) -> values [B, K] (or [K] with reduce = true)
// KerasImplicitPanelGrad(grad [B, K] (or [K]), same inputs) -> (d logits [B, C], d feature_norm)
//
// The mathematics of a row (forward and gradient, the NaN and infinity rules, the validation messages) is in
// custom_ops/panel_math.h, shared with the JAX binding (custom_ops/panel_ffi.cc). This file holds the
// TensorFlow registration, the Eigen math policy (Eigen's vectorized erfc and exp, which TensorFlow's own
// kernels use) and the lanes of panel_math.h's 8-row blocks, used forward and backward up to kBlockMaxClasses
// classes (one vector lane per row, Eigen fixed-size arrays).
// Both kernels reject (InvalidArgument, naming the argument) fewer than 2 classes, labels outside
// [0, classes), a feature_norm that is not finite and > 0, and parameters that are not finite or out of
// range (sigmas, margins >= 0; temperatures > 0).
//
// Work per row is O(K * C); the only buffers are, per thread, up to three rows of C values (or C x 8 values
// for the 8-row blocks): nothing of size B x K x C. Rows are split over TensorFlow's CPU thread pool (Shard).

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "panel_math.h"
#include "panel_op_inputs.h"
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

// Inputs shared by the forward and the gradient kernels: validated views of the tensors.
struct Inputs {
  const Tensor* logits;
  const Tensor* labels;
  const Tensor* feature_norm;
  int64 batch = 0;
  int64 classes = 0;
  bool norm_per_sample = false;
  Panel panel;

  template <typename T>
  Problem<T> problem() const {
    Problem<T> p;
    p.logits = logits->flat<T>().data();
    p.labels = labels->flat<int32_t>().data();
    p.norms = feature_norm->flat<T>().data();
    p.batch = batch;
    p.classes = classes;
    p.norm_per_sample = norm_per_sample;
    p.panel = &panel;
    return p;
  }
};

// Reads inputs 0..5 starting at `first` (logits, labels, feature_norm, sigmas, temperatures, margins) and
// validates them (shapes here; values with panel_math.h's checks): at least 2 classes, labels in
// [0, classes), every feature_norm finite and > 0, sigmas and margins finite and >= 0, temperatures finite
// and > 0. The Python wrapper checks some of these too; the op checks them all itself, also where a shape is
// only known when it runs.
template <typename T>
static Status ReadInputs(OpKernelContext* context, int first, bool error, Inputs* in) {
  in->logits = &context->input(first);
  in->labels = &context->input(first + 1);
  in->feature_norm = &context->input(first + 2);
  InputShapes shapes;
  TF_RETURN_IF_ERROR(ReadShapes(context, first, &shapes));
  in->batch = shapes.batch;
  in->classes = shapes.classes;
  in->norm_per_sample = shapes.norm_per_sample;
  const auto norms = in->feature_norm->flat<T>();
  TF_RETURN_IF_ERROR(AsStatus(CheckFeatureNorms(norms.data(), norms.size(), in->norm_per_sample)));
  TF_RETURN_IF_ERROR(ReadHostPanel(context, first, error, &in->panel));
  return AsStatus(CheckLabels(in->labels->flat<int32_t>().data(), in->batch, in->classes));
}

template <typename T>
using RowArray = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using ConstRowArray = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

// TF's softplus (tensorflow/core/kernels/softplus_op.h), vectorized the same way: x above -threshold,
// exp(x) below threshold, log1p(exp(x)) between, threshold = log(eps) + 2.
template <typename Array>
static void Softplus(Array&& x) {
  using T = typename std::decay_t<Array>::Scalar;
  static const T threshold = SoftplusThreshold<T>();
  x = (x > -threshold).select(x, (x < threshold).select(x.exp(), x.exp().log1p()));
}

// The math policy of panel_math.h with Eigen's vectorized erfc, exp, log1p over a padded row (`width` is a
// multiple of 8 values: no scalar remainders).
struct EigenMath {
  template <typename T>
  static T SumErfc(const T* d, Index width, T factor) {
    return (ConstRowArray<T>(d, width) * factor).erfc().sum();
  }
  template <typename T>
  static T SumExp(const T* d, Index width, T scale, T shift) {
    return (ConstRowArray<T>(d, width) * scale - shift).exp().sum();
  }
  template <typename T>
  static T SumHinge(const T* d, Index width, T gamma) {
    return (ConstRowArray<T>(d, width) + gamma).max(T(0)).sum();
  }
  template <typename T>
  static void SoftplusOfLog(T* x, const T* shifts, Index count) {
    RowArray<T> values(x, count);
    values = values.log() + ConstRowArray<T>(shifts, count);
    keras_implicit::Softplus(values);
  }
  template <typename T>
  static T AddGaussian(const T* d, Index width, T scale, T coefficient, T* scratch, T* acc) {
    RowArray<T> z(scratch, width);
    z = ConstRowArray<T>(d, width) / scale;
    const T weighted = z.isFinite().select(z * (T(-0.5) * z.square()).exp(), T(0)).sum();
    RowArray<T>(acc, width) += coefficient * (T(-0.5) * z.square()).exp();
    return weighted;
  }
  template <typename T>
  static T ExpShifted(const T* d, Index width, T t, T shift, T* work) {
    RowArray<T> values(work, width);
    values = (ConstRowArray<T>(d, width) / t - shift).exp();
    return values.sum();
  }
  template <typename T>
  static void AddScaled(const T* work, Index width, T coefficient, T* acc) {
    RowArray<T>(acc, width) += coefficient * ConstRowArray<T>(work, width);
  }
  template <typename T>
  static void AddStep(const T* d, Index width, T gamma, T upstream, T* acc) {
    RowArray<T>(acc, width) += ((ConstRowArray<T>(d, width) + gamma) > T(0)).template cast<T>() * upstream;
  }
  template <typename T>
  static void Zero(T* values, Index width) {
    RowArray<T>(values, width).setZero();
  }
};

// panel_math.h's lanes type for its blocks of rows (up to kBlockMaxClasses classes): one lane per row of one
// native Eigen packet of T (8 floats or 4 doubles with AVX), with Eigen's vectorized erfc, exp, log and log1p.
template <typename T>
struct EigenLanes {
  using Scalar = T;
  using V = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index kRows = Eigen::internal::unpacket_traits<V>::size;
  static V Load(const T* p) { return Eigen::internal::ploadu<V>(p); }
  static void Store(T* p, const V& v) { Eigen::internal::pstoreu(p, v); }
  static V Set(T x) { return Eigen::internal::pset1<V>(x); }
  static V Zero() { return Eigen::internal::pset1<V>(T(0)); }
  static V Add(const V& a, const V& b) { return Eigen::internal::padd(a, b); }
  static V Sub(const V& a, const V& b) { return Eigen::internal::psub(a, b); }
  static V Mul(const V& a, const V& b) { return Eigen::internal::pmul(a, b); }
  static V Div(const V& a, const V& b) { return Eigen::internal::pdiv(a, b); }
  static V Min(const V& a, const V& b) { return Eigen::internal::pmin(a, b); }
  static V Max(const V& a, const V& b) { return Eigen::internal::pmax(a, b); }
  static V Erfc(const V& v) { return Eigen::internal::perfc(v); }
  static V Exp(const V& v) { return Eigen::internal::pexp(v); }
  static V Log(const V& v) { return Eigen::internal::plog(v); }
  static V Log1p(const V& v) { return Eigen::internal::plog1p(v); }
  static V Greater(const V& a, const V& b) { return Eigen::internal::pcmp_lt(b, a); }
  static V Equal(const V& a, const V& b) { return Eigen::internal::pcmp_eq(a, b); }
  static V Select(const V& mask, const V& a, const V& b) { return Eigen::internal::pselect(mask, a, b); }
  static V WhereFinite(const V& z, const V& v) {
    const V infinity = Set(std::numeric_limits<T>::infinity());
    return Eigen::internal::pand(Eigen::internal::pcmp_lt(Eigen::internal::pabs(z), infinity), v);
  }
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

    const Problem<T> problem = in.problem<T>();
    auto work = [&](int64 start, int64 end) {
      PanelBlockRows<EigenLanes<T>, EigenMath, T>(problem, start, end, per_sample);
    };
    auto* threads = context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(threads->num_threads, threads->workers, batch, RowCost(in.panel, classes, false), work);
    // Summed in a fixed order (deterministic whatever the sharding), accumulated in double.
    if (reduce_) SumColumns(per_sample, batch, columns, output->flat<T>().data());
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
    OP_REQUIRES_OK(context, CheckUpstream(upstream, batch, columns, reduce_));

    Tensor* grad_logits = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, in.logits->shape(), &grad_logits));
    Tensor* grad_norm = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(1, in.feature_norm->shape(), &grad_norm));
    // Per-row derivatives with respect to the feature norm; summed below when the norm is a scalar.
    Tensor row_norm_buffer;
    OP_REQUIRES_OK(context, context->allocate_temp(::tensorflow::DataTypeToEnum<T>::value,
                                                   TensorShape({batch}), &row_norm_buffer));
    T* row_dnorm = row_norm_buffer.flat<T>().data();

    const Problem<T> problem = in.problem<T>();
    const T* g = upstream.flat<T>().data();
    T* dx = grad_logits->flat<T>().data();
    const bool reduce = reduce_;
    auto work = [&](int64 start, int64 end) {
      PanelGradBlockRows<EigenLanes<T>, EigenMath, T>(problem, g, reduce, start, end, dx, row_dnorm);
    };
    auto* threads = context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(threads->num_threads, threads->workers, batch, RowCost(in.panel, classes, true), work);
    NormGradient(row_dnorm, batch, in.norm_per_sample, grad_norm->flat<T>().data());
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
