// The fused alternative-loss panel as XLA FFI handlers (CPU), for JAX: keras_implicit/_ffi.py registers them
// with jax.ffi.register_ffi_target and calls them with jax.ffi.ffi_call.
//
// The mathematics (forward and gradient, per row and per block of rows) is custom_ops/panel_math.h's, shared with
// the TensorFlow op (custom_ops/panel_op.cc). Built with -mavx2 -mfma (keras_implicit/_panel_ffi_avx2.so): the
// AVX2 erfc, exp, log and log1p of glibc's libmvec (glibc >= 2.35), 8 floats or 4 doubles at a time, as the
// lanes of panel_math.h's blocks (Avx2Lanes: one lane per row, up to 4096 classes) and as the math policy of its
// row functions (Avx2Math: wider rows, vectorized along the row). Otherwise (the portable
// keras_implicit/_panel_ffi.so) panel_math.h's ScalarMath (std::erfc, std::exp), one row at a time. This file
// needs the XLA FFI headers (jax.ffi.include_dir()) and nothing of TensorFlow or Eigen.
//
// Handlers (one per dtype, T = float or double):
//   KerasImplicitPanelF32 / F64:     logits [B, C], labels int32 [B], feature_norm [] or [B]
//                                    -> values [B, K] (or [K] with reduce)
//   KerasImplicitPanelGradF32 / F64: grad [B, K] (or [K] with reduce), logits, labels, feature_norm
//                                    -> (d logits [B, C], d feature_norm [] or [B])
// Attributes of both: sigmas, temperatures, margins (float64 arrays, possibly empty), error, reduce (bool).
// Bad inputs are refused with ffi::Error (InvalidArgument) whose message names the argument, as the TF op:
// fewer than 2 classes, labels outside [0, classes), a feature_norm that is not finite and > 0, parameters
// that are not finite or out of range, an empty panel (forward), shapes that do not fit.
//
// Threads: the rows are split into chunks of a multiple of 8 rows, run on the calling thread and on XLA's CPU
// thread pool (the handlers' ffi::ThreadPool context; the calling thread alone where it has at most one thread).
// Every row's values depend only on its own 8-row block, never on the chunks or the threads, and the sums over
// rows (reduce, a scalar feature norm's gradient) are taken afterwards in a fixed order: the results are the same
// bits whatever the threads. Like TensorFlow's CPU kernels, the rows run with denormals flushed to zero (FTZ and
// DAZ on x86-64, restored afterwards): a value below the smallest normal number (1.2e-38 in float32) is 0.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "panel_ffi_shapes.h"
#include "panel_math.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>  // _mm_getcsr, _mm_setcsr
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// glibc's vector math library (libmvec, glibc >= 2.35 for erfc and log1p): the AVX2 variants, with the x86-64
// vector function ABI (the same registers as a plain call taking and returning __m256 / __m256d).
extern "C" {
__m256 _ZGVdN8v_erfcf(__m256);
__m256 _ZGVdN8v_expf(__m256);
__m256 _ZGVdN8v_logf(__m256);
__m256 _ZGVdN8v_log1pf(__m256);
__m256d _ZGVdN4v_erfc(__m256d);
__m256d _ZGVdN4v_exp(__m256d);
__m256d _ZGVdN4v_log(__m256d);
__m256d _ZGVdN4v_log1p(__m256d);
}
#endif

namespace ffi = xla::ffi;

namespace keras_implicit {
namespace {

// Denormals flushed to zero on this thread while it lives (x86-64: MXCSR's FTZ and DAZ bits), as TensorFlow's
// CPU threads run. libmvec's functions (and the scalar ones) take a slow path for denormal results.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

#if defined(__AVX2__) && defined(__FMA__)
// One AVX2 register of T: 8 floats or 4 doubles, with libmvec's erfc, exp, log and log1p. panel_math.h's lanes
// type (Avx2Lanes<T>, one lane per row of a block) and the registers of the row policy (Avx2Math). libmvec
// takes a slow scalar path for each register holding an argument outside the range where its fast formula
// holds (infinities: the excluded class's d_y = -inf and the row padding; underflowing results): Erfc clamps its
// argument to where erfc is 2 or underflows (+-10 in float, +-27 in double), and Exp gives 0 below the
// smallest argument whose exp is a normal number (-87.3, -708.3) without calling libmvec there. NaN propagates.
template <typename T>
struct Avx2Lanes;

template <>
struct Avx2Lanes<float> {
  using Scalar = float;
  using V = __m256;
  static constexpr Index kCount = 8;
  static constexpr Index kRows = kCount;
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V Set(float x) { return _mm256_set1_ps(x); }
  static V Zero() { return _mm256_setzero_ps(); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm256_div_ps(a, b); }
  // a NaN in `a` is kept (the second operand of maxps/minps is returned when either is NaN)
  static V Min(V a, V b) { return _mm256_min_ps(b, a); }
  static V Max(V a, V b) { return _mm256_max_ps(b, a); }
  static V Greater(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static V Equal(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static V Select(V mask, V a, V b) { return _mm256_blendv_ps(b, a, mask); }
  static V Erfc(V v) { return _ZGVdN8v_erfcf(Min(Max(v, Set(-10.0f)), Set(10.0f))); }
  static V Exp(V v) {
    const V low = Set(-87.3f);
    return _mm256_andnot_ps(_mm256_cmp_ps(v, low, _CMP_LT_OQ), _ZGVdN8v_expf(Max(v, low)));
  }
  static V Log(V v) { return _ZGVdN8v_logf(v); }
  static V Log1p(V v) { return _ZGVdN8v_log1pf(v); }
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
struct Avx2Lanes<double> {
  using Scalar = double;
  using V = __m256d;
  static constexpr Index kCount = 4;
  static constexpr Index kRows = kCount;
  static V Load(const double* p) { return _mm256_loadu_pd(p); }
  static void Store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V Set(double x) { return _mm256_set1_pd(x); }
  static V Zero() { return _mm256_setzero_pd(); }
  static V Add(V a, V b) { return _mm256_add_pd(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V Div(V a, V b) { return _mm256_div_pd(a, b); }
  static V Min(V a, V b) { return _mm256_min_pd(b, a); }
  static V Max(V a, V b) { return _mm256_max_pd(b, a); }
  static V Greater(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  static V Equal(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
  static V Select(V mask, V a, V b) { return _mm256_blendv_pd(b, a, mask); }
  static V Erfc(V v) { return _ZGVdN4v_erfc(Min(Max(v, Set(-27.0)), Set(27.0))); }
  static V Exp(V v) {
    const V low = Set(-708.3);
    return _mm256_andnot_pd(_mm256_cmp_pd(v, low, _CMP_LT_OQ), _ZGVdN4v_exp(Max(v, low)));
  }
  static V Log(V v) { return _ZGVdN4v_log(v); }
  static V Log1p(V v) { return _ZGVdN4v_log1p(v); }
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
// 8 values, so a whole number of registers), and the hinge's sums; the other cheap loops are ScalarMath's.
struct Avx2Math : ScalarMath {
  template <typename T>
  static T SumErfc(const T* d, Index width, T factor) {
    using L = Avx2Lanes<T>;
    typename L::V total = L::Zero();
    const typename L::V scale = L::Set(factor);
    for (Index j = 0; j < width; j += L::kCount) total = L::Add(total, L::Erfc(L::Mul(L::Load(d + j), scale)));
    return L::Sum(total);
  }
  template <typename T>
  static T SumExp(const T* d, Index width, T scale, T shift) {
    using L = Avx2Lanes<T>;
    typename L::V total = L::Zero();
    const typename L::V s = L::Set(scale), m = L::Set(shift);
    for (Index j = 0; j < width; j += L::kCount) total = L::Add(total, L::Exp(L::Sub(L::Mul(L::Load(d + j), s), m)));
    return L::Sum(total);
  }
  template <typename T>
  static T SumHinge(const T* d, Index width, T gamma) {
    using L = Avx2Lanes<T>;
    typename L::V total = L::Zero();
    const typename L::V g = L::Set(gamma), zero = L::Zero();
    for (Index j = 0; j < width; j += L::kCount) total = L::Add(total, L::Max(L::Add(L::Load(d + j), g), zero));
    return L::Sum(total);
  }
  template <typename T>
  static T AddGaussian(const T* d, Index width, T scale, T coefficient, T* scratch, T* acc) {
    using L = Avx2Lanes<T>;
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
    using L = Avx2Lanes<T>;
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

// Rows [start, end) of the forward panel and of its gradient.
template <typename T>
void ForwardRows(const Problem<T>& problem, Index start, Index end, T* out) {
  PanelBlockRows<Avx2Lanes<T>, Avx2Math, T>(problem, start, end, out);
}
template <typename T>
void GradientRows(const Problem<T>& problem, const T* g, bool reduce, Index start, Index end, T* dx, T* row_dnorm) {
  PanelGradBlockRows<Avx2Lanes<T>, Avx2Math, T>(problem, g, reduce, start, end, dx, row_dnorm);
}
#else
template <typename T>
void ForwardRows(const Problem<T>& problem, Index start, Index end, T* out) {
  PanelRows<ScalarMath, T>(problem, start, end, out);
}
template <typename T>
void GradientRows(const Problem<T>& problem, const T* g, bool reduce, Index start, Index end, T* dx, T* row_dnorm) {
  PanelGradRows<ScalarMath, T>(problem, g, reduce, start, end, dx, row_dnorm);
}
#endif

// ------------------------------------------------------------------------------------------------------ //
// Threads.
// ------------------------------------------------------------------------------------------------------ //

// Chunks start at multiples of this many rows (a block, of 8 floats or 4 doubles: a row's block never depends
// on the chunks).
constexpr Index kChunkAlignment = 8;
// The least work (panel_math.h's RowCost units, about cycles) of a chunk worth handing to another thread, and
// how many chunks per thread (the shared cores of a CPU rarely run every thread at the same speed).
constexpr Index kMinChunkCost = 200000;
constexpr Index kChunksPerThread = 4;

// What the threads of one call share: the chunks are claimed in turn, and the calling thread waits for every
// claimed chunk to be done. A pool task that starts after every chunk is claimed finds nothing to do and only
// touches this state, which it co-owns: it never reaches `work`, whose frame the caller may have left.
struct Chunks {
  Index count = 0, rows = 0, batch = 0;
  const std::function<void(Index, Index)>* work = nullptr;
  std::atomic<Index> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Run() {
    FlushDenormals flush;
    Index completed = 0;
    for (Index chunk = next.fetch_add(1); chunk < count; chunk = next.fetch_add(1)) {
      (*work)(chunk * rows, std::min(batch, (chunk + 1) * rows));
      ++completed;
    }
    if (completed > 0 && done.fetch_add(completed) + completed == count) {
      std::lock_guard<std::mutex> lock(mutex);
      finished.notify_all();
    }
  }
};

// work(start, end) over rows [0, batch), each `row_cost` units, on the calling thread and the pool's.
void ParallelRows(ffi::ThreadPool& pool, Index batch, Index row_cost, const std::function<void(Index, Index)>& work) {
  const Index threads = pool.num_threads();
  Index rows = batch;
  if (threads > 1) {
    const Index least = (kMinChunkCost + row_cost - 1) / std::max<Index>(row_cost, 1);
    rows = std::max((batch + threads * kChunksPerThread - 1) / (threads * kChunksPerThread), least);
    rows = (rows + kChunkAlignment - 1) / kChunkAlignment * kChunkAlignment;
  }
  if (rows >= batch) {
    FlushDenormals flush;
    work(0, batch);
    return;
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->count = (batch + rows - 1) / rows;
  chunks->rows = rows;
  chunks->batch = batch;
  chunks->work = &work;
  const Index helpers = std::min(threads, chunks->count) - 1;
  for (Index i = 0; i < helpers; ++i) pool.Schedule([chunks] { chunks->Run(); });
  chunks->Run();
  std::unique_lock<std::mutex> lock(chunks->mutex);
  chunks->finished.wait(lock, [&] { return chunks->done.load() == chunks->count; });
}

// Checks the shapes and values of (logits, labels, feature_norm) and the parameters; fills `panel` and
// `problem`. Returns the message of the first problem, or the empty string.
template <ffi::DataType dtype, typename T = ffi::NativeType<dtype>>
std::string ReadProblem(const ffi::Buffer<dtype>& logits, const ffi::Buffer<ffi::S32>& labels,
                        const ffi::Buffer<dtype>& feature_norm, ffi::Span<const double> sigmas,
                        ffi::Span<const double> temperatures, ffi::Span<const double> margins, bool error,
                        Panel* panel, Problem<T>* problem) {
  ffi_shapes::Shapes shapes;
  std::string message = ffi_shapes::ReadShapes(logits, labels, feature_norm, &shapes);
  if (!message.empty()) return message;
  const Index batch = shapes.batch, classes = shapes.classes;
  const bool per_sample = shapes.norm_per_sample;
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
ffi::Error PanelForward(ffi::ThreadPool pool, ffi::Buffer<dtype> logits, ffi::Buffer<ffi::S32> labels, ffi::Buffer<dtype> feature_norm,
                        ffi::Span<const double> sigmas, ffi::Span<const double> temperatures,
                        ffi::Span<const double> margins, bool error, bool reduce, ffi::ResultBuffer<dtype> values) {
  using T = ffi::NativeType<dtype>;
  Panel panel;
  Problem<T> problem;
  const std::string message =
      ReadProblem(logits, labels, feature_norm, sigmas, temperatures, margins, error, &panel, &problem);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  const Index columns = panel.columns();
  const std::string shape_message = ffi_shapes::CheckValues(values, problem.batch, columns, reduce);
  if (!shape_message.empty()) return ffi::Error::InvalidArgument(shape_message);
  std::vector<T> per_sample(reduce ? static_cast<size_t>(problem.batch * columns) : 0);
  T* out = reduce ? per_sample.data() : values->typed_data();
  ParallelRows(pool, problem.batch, RowCost(panel, problem.classes, false),
               [&](Index start, Index end) { ForwardRows<T>(problem, start, end, out); });
  // Summed in a fixed order (the same whatever the threads), accumulated in double.
  if (reduce) SumColumns(per_sample.data(), problem.batch, columns, values->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType dtype>
ffi::Error PanelGradient(ffi::ThreadPool pool, ffi::Buffer<dtype> grad, ffi::Buffer<dtype> logits, ffi::Buffer<ffi::S32> labels,
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
  const std::string shape_message = ffi_shapes::CheckUpstream(grad, problem.batch, columns, reduce);
  if (!shape_message.empty()) return ffi::Error::InvalidArgument(shape_message);
  std::vector<T> row_dnorm(static_cast<size_t>(problem.batch));
  const T* g = grad.typed_data();
  T* dx = grad_logits->typed_data();
  ParallelRows(pool, problem.batch, RowCost(panel, problem.classes, true),
               [&](Index start, Index end) { GradientRows<T>(problem, g, reduce, start, end, dx, row_dnorm.data()); });
  NormGradient(row_dnorm.data(), problem.batch, problem.norm_per_sample, grad_norm->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace keras_implicit

#define KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(suffix, dtype)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasImplicitPanel##suffix, keras_implicit::PanelForward<dtype>,              \
                                KERAS_IMPLICIT_PANEL_ATTRIBUTES(ffi::Ffi::Bind()                              \
                                                                    .Ctx<ffi::ThreadPool>()                    \
                                                                    .Arg<ffi::Buffer<dtype>>()                 \
                                                                    .Arg<ffi::Buffer<ffi::S32>>()              \
                                                                    .Arg<ffi::Buffer<dtype>>())                \
                                    .Ret<ffi::Buffer<dtype>>());                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasImplicitPanelGrad##suffix, keras_implicit::PanelGradient<dtype>,         \
                                KERAS_IMPLICIT_PANEL_ATTRIBUTES(ffi::Ffi::Bind()                              \
                                                                    .Ctx<ffi::ThreadPool>()                    \
                                                                    .Arg<ffi::Buffer<dtype>>()                 \
                                                                    .Arg<ffi::Buffer<dtype>>()                 \
                                                                    .Arg<ffi::Buffer<ffi::S32>>()              \
                                                                    .Arg<ffi::Buffer<dtype>>())                \
                                    .Ret<ffi::Buffer<dtype>>()                                                 \
                                    .Ret<ffi::Buffer<dtype>>());

KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(F32, ffi::F32)
KERAS_IMPLICIT_DEFINE_PANEL_HANDLERS(F64, ffi::F64)
