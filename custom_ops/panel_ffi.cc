// The fused alternative-loss panel as XLA FFI handlers (CPU), for JAX: keras_implicit/_ffi.py registers them
// with jax.ffi.register_ffi_target and calls them with jax.ffi.ffi_call.
//
// The mathematics of a row (forward and gradient) is custom_ops/panel_math.h's, shared with the TensorFlow op
// (custom_ops/panel_op.cc). The math policy: built with -mavx2 -mfma (keras_implicit/_panel_ffi_avx2.so), the
// AVX2 erfc and exp of glibc's libmvec (glibc >= 2.35), 8 floats or 4 doubles at a time; otherwise (the portable
// keras_implicit/_panel_ffi.so) panel_math.h's ScalarMath (std::erfc, std::exp). This file needs the XLA FFI
// headers (jax.ffi.include_dir()) and nothing of TensorFlow or Eigen.
//
// Handlers (one per dtype, T = float or double):
//   KerasImplicitPanelF32 / F64:     logits [B, C], labels int32 [B], feature_norm [] or [B]
//                                    -> values [B, K] (or [K] with reduce)
//   KerasImplicitPanelGradF32 / F64: grad [B, K] (or [K] with reduce), logits, labels, feature_norm
//                                    -> (d logits [B, C], d feature_norm [] or [B])
// Attributes of both: sigmas, temperatures, margins (float64 arrays, possibly empty), error, reduce (bool).
// Bad inputs are refused with ffi::Error (InvalidArgument) whose message names the argument, as the TF op:
// fewer than 2 classes, labels outside [0, classes), a feature_norm that is not finite and > 0, parameters
// that are not finite or out of range, an empty panel (forward), shapes that do not fit. The rows run on the
// calling thread (XLA's CPU runtime calls a custom call on one of its threads).

#include <cstdint>
#include <string>
#include <vector>

#include "panel_math.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// glibc's vector math library (libmvec, glibc >= 2.35 for erfc): the AVX2 variants of erfc and exp, with the
// x86-64 vector function ABI (the same registers as a plain call taking and returning __m256 / __m256d).
extern "C" {
__m256 _ZGVdN8v_erfcf(__m256);
__m256 _ZGVdN8v_expf(__m256);
__m256d _ZGVdN4v_erfc(__m256d);
__m256d _ZGVdN4v_exp(__m256d);
}
#endif

namespace ffi = xla::ffi;

namespace keras_implicit {
namespace {

#if defined(__AVX2__) && defined(__FMA__)
// One AVX2 register of T: 8 floats or 4 doubles, with libmvec's erfc and exp.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  using V = __m256;
  static constexpr Index kCount = 8;
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V Set(float x) { return _mm256_set1_ps(x); }
  static V Zero() { return _mm256_setzero_ps(); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm256_div_ps(a, b); }
  static V Erfc(V v) { return _ZGVdN8v_erfcf(v); }
  static V Exp(V v) { return _ZGVdN8v_expf(v); }
  // v where |z| < inf (z finite and not NaN), else 0.
  static V WhereFinite(V z, V v) {
    const V magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
    return _mm256_and_ps(_mm256_cmp_ps(magnitude, _mm256_set1_ps(INFINITY), _CMP_LT_OQ), v);
  }
  static float Sum(V v) {
    alignas(32) float values[kCount];
    _mm256_store_ps(values, v);
    float total = 0;
    for (float value : values) total += value;
    return total;
  }
};

template <>
struct Lanes<double> {
  using V = __m256d;
  static constexpr Index kCount = 4;
  static V Load(const double* p) { return _mm256_loadu_pd(p); }
  static void Store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V Set(double x) { return _mm256_set1_pd(x); }
  static V Zero() { return _mm256_setzero_pd(); }
  static V Add(V a, V b) { return _mm256_add_pd(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V Div(V a, V b) { return _mm256_div_pd(a, b); }
  static V Erfc(V v) { return _ZGVdN4v_erfc(v); }
  static V Exp(V v) { return _ZGVdN4v_exp(v); }
  static V WhereFinite(V z, V v) {
    const V magnitude = _mm256_andnot_pd(_mm256_set1_pd(-0.0), z);
    return _mm256_and_pd(_mm256_cmp_pd(magnitude, _mm256_set1_pd(INFINITY), _CMP_LT_OQ), v);
  }
  static double Sum(V v) {
    alignas(32) double values[kCount];
    _mm256_store_pd(values, v);
    return (values[0] + values[1]) + (values[2] + values[3]);
  }
};

// panel_math.h's math policy with libmvec's AVX2 erfc and exp over the padded row (`width` is a multiple of
// 8 values, so a whole number of registers); the cheap families keep ScalarMath's loops.
struct Avx2Math : ScalarMath {
  template <typename T>
  static T SumErfc(const T* d, Index width, T factor) {
    using L = Lanes<T>;
    typename L::V total = L::Zero();
    const typename L::V scale = L::Set(factor);
    for (Index j = 0; j < width; j += L::kCount) total = L::Add(total, L::Erfc(L::Mul(L::Load(d + j), scale)));
    return L::Sum(total);
  }
  template <typename T>
  static T SumExp(const T* d, Index width, T scale, T shift) {
    using L = Lanes<T>;
    typename L::V total = L::Zero();
    const typename L::V s = L::Set(scale), m = L::Set(shift);
    for (Index j = 0; j < width; j += L::kCount) total = L::Add(total, L::Exp(L::Sub(L::Mul(L::Load(d + j), s), m)));
    return L::Sum(total);
  }
  template <typename T>
  static T AddGaussian(const T* d, Index width, T scale, T coefficient, T* scratch, T* acc) {
    using L = Lanes<T>;
    typename L::V weighted = L::Zero();
    const typename L::V s = L::Set(scale), c = L::Set(coefficient), half = L::Set(T(-0.5));
    for (Index j = 0; j < width; j += L::kCount) {
      const typename L::V z = L::Div(L::Load(d + j), s);
      L::Store(scratch + j, z);
      const typename L::V density = L::Exp(L::Mul(half, L::Mul(z, z)));
      weighted = L::Add(weighted, L::WhereFinite(z, L::Mul(z, density)));
      L::Store(acc + j, L::Add(L::Load(acc + j), L::Mul(c, density)));
    }
    return L::Sum(weighted);
  }
  template <typename T>
  static T ExpShifted(const T* d, Index width, T t, T shift, T* work) {
    using L = Lanes<T>;
    typename L::V total = L::Zero();
    const typename L::V divisor = L::Set(t), m = L::Set(shift);
    for (Index j = 0; j < width; j += L::kCount) {
      const typename L::V values = L::Exp(L::Sub(L::Div(L::Load(d + j), divisor), m));
      L::Store(work + j, values);
      total = L::Add(total, values);
    }
    return L::Sum(total);
  }
};
using RowMath = Avx2Math;
#else
using RowMath = ScalarMath;
#endif

std::string Shape(const ffi::AnyBuffer::Dimensions& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? "," : "") + std::to_string(dims[i]);
  return text + "]";
}

template <ffi::DataType dtype>
std::string ShapeOf(const ffi::Buffer<dtype>& buffer) {
  return Shape(buffer.dimensions());
}

// Checks the shapes and values of (logits, labels, feature_norm) and the parameters; fills `panel` and
// `problem`. Returns the message of the first problem, or the empty string.
template <ffi::DataType dtype, typename T = ffi::NativeType<dtype>>
std::string ReadProblem(const ffi::Buffer<dtype>& logits, const ffi::Buffer<ffi::S32>& labels,
                        const ffi::Buffer<dtype>& feature_norm, ffi::Span<const double> sigmas,
                        ffi::Span<const double> temperatures, ffi::Span<const double> margins, bool error,
                        Panel* panel, Problem<T>* problem) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return "logits must be [batch, classes], got shape " + ShapeOf(logits);
  const Index batch = dims[0], classes = dims[1];
  std::string message = CheckClasses(batch, classes);
  if (!message.empty()) return message;
  if (labels.dimensions().size() != 1 || labels.dimensions()[0] != batch) {
    return "labels must be [batch] = [" + std::to_string(batch) + "], got shape " + ShapeOf(labels);
  }
  const auto norm_dims = feature_norm.dimensions();
  bool per_sample = false;
  if (norm_dims.size() == 0) {
    per_sample = false;
  } else if (norm_dims.size() == 1 && norm_dims[0] == batch) {
    per_sample = true;
  } else {
    return "feature_norm must be a scalar or [batch] = [" + std::to_string(batch) + "], got shape " +
           ShapeOf(feature_norm);
  }
  const T* norms = feature_norm.typed_data();
  message = CheckFeatureNorms(norms, per_sample ? batch : 1, per_sample);
  if (!message.empty()) return message;
  message = ReadPanel(sigmas.begin(), static_cast<Index>(sigmas.size()), temperatures.begin(),
                      static_cast<Index>(temperatures.size()), margins.begin(), static_cast<Index>(margins.size()),
                      error, panel);
  if (!message.empty()) return message;
  message = CheckLabels(labels.typed_data(), batch, classes);
  if (!message.empty()) return message;
  problem->logits = logits.typed_data();
  problem->labels = labels.typed_data();
  problem->norms = norms;
  problem->batch = batch;
  problem->classes = classes;
  problem->norm_per_sample = per_sample;
  problem->panel = panel;
  return std::string();
}

template <ffi::DataType dtype>
ffi::Error PanelForward(ffi::Buffer<dtype> logits, ffi::Buffer<ffi::S32> labels, ffi::Buffer<dtype> feature_norm,
                        ffi::Span<const double> sigmas, ffi::Span<const double> temperatures,
                        ffi::Span<const double> margins, bool error, bool reduce, ffi::ResultBuffer<dtype> values) {
  using T = ffi::NativeType<dtype>;
  Panel panel;
  Problem<T> problem;
  const std::string message =
      ReadProblem(logits, labels, feature_norm, sigmas, temperatures, margins, error, &panel, &problem);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  const Index columns = panel.columns();
  if (columns == 0) return ffi::Error::InvalidArgument("the panel is empty");
  const Index expected = reduce ? columns : problem.batch * columns;
  if (static_cast<Index>(values->element_count()) != expected) {
    return ffi::Error::InvalidArgument("values must hold " + std::to_string(expected) + " elements, got shape " +
                                       Shape(values->dimensions()));
  }
  if (!reduce) {
    PanelRows<RowMath, T>(problem, 0, problem.batch, values->typed_data());
    return ffi::Error::Success();
  }
  std::vector<T> per_sample(static_cast<size_t>(problem.batch * columns));
  PanelRows<RowMath, T>(problem, 0, problem.batch, per_sample.data());
  SumColumns(per_sample.data(), problem.batch, columns, values->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType dtype>
ffi::Error PanelGradient(ffi::Buffer<dtype> grad, ffi::Buffer<dtype> logits, ffi::Buffer<ffi::S32> labels,
                         ffi::Buffer<dtype> feature_norm, ffi::Span<const double> sigmas,
                         ffi::Span<const double> temperatures, ffi::Span<const double> margins, bool error,
                         bool reduce, ffi::ResultBuffer<dtype> grad_logits, ffi::ResultBuffer<dtype> grad_norm) {
  using T = ffi::NativeType<dtype>;
  Panel panel;
  Problem<T> problem;
  const std::string message =
      ReadProblem(logits, labels, feature_norm, sigmas, temperatures, margins, error, &panel, &problem);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  const Index columns = panel.columns();
  const Index expected = reduce ? columns : problem.batch * columns;
  const auto grad_dims = grad.dimensions();
  const bool grad_fits = reduce ? (grad_dims.size() == 1 && grad_dims[0] == columns)
                                : (grad_dims.size() == 2 && grad_dims[0] == problem.batch && grad_dims[1] == columns);
  if (!grad_fits || static_cast<Index>(grad.element_count()) != expected) {
    return ffi::Error::InvalidArgument("grad must have shape " +
                                       (reduce ? "[" + std::to_string(columns) + "]"
                                               : "[" + std::to_string(problem.batch) + "," +
                                                     std::to_string(columns) + "]") +
                                       ", got " + ShapeOf(grad));
  }
  std::vector<T> row_dnorm(static_cast<size_t>(problem.batch));
  PanelGradRows<RowMath, T>(problem, grad.typed_data(), reduce, 0, problem.batch, grad_logits->typed_data(),
                               row_dnorm.data());
  NormGradient(row_dnorm.data(), problem.batch, problem.norm_per_sample, grad_norm->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace keras_implicit

#define KERAS_IMPLICIT_PANEL_ATTRIBUTES(binding)           \
  binding.Attr<ffi::Span<const double>>("sigmas")         \
      .Attr<ffi::Span<const double>>("temperatures")      \
      .Attr<ffi::Span<const double>>("margins")           \
      .Attr<bool>("error")                                \
      .Attr<bool>("reduce")

#define KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(suffix, dtype)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasImplicitPanel##suffix, keras_implicit::PanelForward<dtype>,              \
                                KERAS_IMPLICIT_PANEL_ATTRIBUTES(ffi::Ffi::Bind()                              \
                                                                    .Arg<ffi::Buffer<dtype>>()                 \
                                                                    .Arg<ffi::Buffer<ffi::S32>>()              \
                                                                    .Arg<ffi::Buffer<dtype>>())                \
                                    .Ret<ffi::Buffer<dtype>>());                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasImplicitPanelGrad##suffix, keras_implicit::PanelGradient<dtype>,         \
                                KERAS_IMPLICIT_PANEL_ATTRIBUTES(ffi::Ffi::Bind()                              \
                                                                    .Arg<ffi::Buffer<dtype>>()                 \
                                                                    .Arg<ffi::Buffer<dtype>>()                 \
                                                                    .Arg<ffi::Buffer<ffi::S32>>()              \
                                                                    .Arg<ffi::Buffer<dtype>>())                \
                                    .Ret<ffi::Buffer<dtype>>()                                                 \
                                    .Ret<ffi::Buffer<dtype>>());

KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(F32, ffi::F32)
KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(F64, ffi::F64)
