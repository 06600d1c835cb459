// Shared helpers for the fusedce CPU kernels.
//
// Every kernel sees its N×C operands in the canonical form (outer, C, inner): row r = (o, i) has
// its classes at data + o*s0 + c*s1 + i*s2. Two execution paths cover every layout:
//
// * The row path, when every N×C operand has class stride 1 (plain 2-D inputs, and channels-last
//   inputs for the ops whose only N×C operand is the input): one row at a time, vectorized along
//   C, read straight from the tensor.
// * The tile path, for everything else (the contiguous K-dimensional case, where the class stride
//   is `inner`, and arbitrary strides): a tile of consecutive rows is gathered into a small
//   accumulation-dtype scratch laid out [class][row], so that the vector lanes run ACROSS rows and
//   every per-row reduction is a plain lane-wise loop over classes. When the rows of a tile share
//   their outer index and the inner stride is 1, the gather reads whole contiguous runs.
//
// Numerics: half types accumulate in float32, float32 in float32, float64 in float64. A row's max
// and log Σ exp(x - max) are kept apart (reference.row_stats), and the sums that results are made
// of use Sleef's 1-ulp exp (see FastExp). The gradients use ATen's exp_u20 where the argument is
// known to be finite or -inf; exp_u20 does not propagate NaN or +inf, so rows whose reference
// values (max, log-sum) are not finite take the precise path, which is std::exp per element.
// On AVX512 the row path replaces both with an inline exp of its own, as precise and cheaper
// (SumExp, RowGradExp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "output_pool.h"

namespace fusedce {

using at::Tensor;
using at::vec::Vectorized;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Work per parallel_for grain, in elements: small rows are batched so that a task is not
// dominated by the scheduling overhead.
constexpr int64_t kGrainElements = 32768;
// Tile path: scratch bytes per tensor, and the most rows a tile holds.
constexpr int64_t kTileBytes = 192 * 1024;
constexpr int64_t kMaxTileRows = 1024;

// The largest class index an accumulation dtype holds exactly (2^24 in float32, 2^53 in float64):
// up to there the tile path compares targets with classes as floating-point lanes.
template <typename T>
constexpr int64_t kExactIndices = int64_t(1) << std::numeric_limits<T>::digits;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();
template <typename T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Strided views
// ---------------------------------------------------------------------------------------------

// An (outer, C, inner) tensor: pointer plus strides in elements.
template <typename T>
struct View3 {
  T* data;
  int64_t s0, s1, s2;

  T* row(int64_t o, int64_t i) const { return data + o * s0 + i * s2; }
};

template <typename T>
inline View3<T> view3(const Tensor& t) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1), t.stride(2)};
}

// An (outer, inner) per-row tensor (target, grad_loss, one half of the row stats): any strides,
// zero included.
template <typename T>
struct View2 {
  const T* data;
  int64_t s0, s1;

  T operator()(int64_t o, int64_t i) const { return data[o * s0 + i * s1]; }
};

template <typename T>
inline View2<T> view2(const Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

// ---------------------------------------------------------------------------------------------
// Compile-time switches: `dispatch_bool(flag, [&](auto kFlag) { if constexpr (kFlag) ... })`
// instantiates a loop once per value of the flag, so that the flag is not tested per element.
// ---------------------------------------------------------------------------------------------

template <typename F>
inline auto dispatch_bool(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// exp_u20 is several times cheaper than Sleef's exp, but its error (about 16 ulp measured) shows
// in every result that is a sum of exponentials: the log-sum of a row, hence its losses and
// log-probabilities, and softmax's outputs, where torch (Sleef's 1-ulp exp) is exact to an ulp or
// two. Those use Vectorized::exp; exp_u20 serves the gradients, whose elements it moves by a
// fraction of the gradient's scale. It maps NaN and +inf to finite values: use it only where the
// argument is finite or -inf (it gives 0 there).
struct FastExp {
  template <typename V>
  V operator()(const V& v) const {
    return v.exp_u20();
  }
};

// For rows whose max or log-sum is not finite: std::exp propagates NaN and +inf as torch does.
struct PreciseExp {
  template <typename V>
  V shifted(const V& d, const V& ls) const {
    return (*this)(d - ls);
  }

  template <typename V>
  V operator()(const V& v) const {
    using T = typename V::value_type;
    __at_align__ T lanes[V::size()];
    v.store(lanes);
    for (int64_t k = 0; k < V::size(); ++k) {
      lanes[k] = std::exp(lanes[k]);
    }
    return V::loadu(lanes);
  }
};

template <typename F>
inline auto dispatch_exp(bool fast, F&& f) {
  return fast ? f(FastExp{}) : f(PreciseExp{});
}

// ---------------------------------------------------------------------------------------------
// The row path's exp. Sleef's exp is an out-of-line call per vector, and exp_u20 spends about 20
// instructions on its range reduction and its scaling; on AVX512 the row path computes float exp
// inline, in one of two forms.
//
// Degree 6, for float32 results (about 12 instructions): exp(x) = 2^n · e^r with
// n = round(x / ln 2) and r = x - n·ln 2 (ln 2 split Cody-Waite style into a head of 16
// significant bits, whose product with n is exact, and a tail), e^r = 1 + r·q(r) by Horner on
// |r| <= ln(2)/2, and 2^n applied by vscalefps, which rounds once, underflows gradually and
// overflows to inf. The argument is clamped into [-104, 89] first (exp is 0, or inf, in float
// beyond), so ±inf need no special case; a NaN passes both clamps.
//
// Degree 4, for results rounded to 16 bits (8 instructions): exp(x) = 2^y with y = x·log2(e)
// rounded to float, n = round(y) and f = y - n (vreduceps, exact), 2^f = 1 + f·q(f) on
// |f| <= 1/2, and 2^n by vscalefps. No clamp: vreduceps gives f = 0 for y = ±inf (so 2^n is 0 or
// inf) and passes a NaN. The rounding of y adds |y|·2^-24·ln 2 of relative error (4e-6 at
// x = -87, where a term's exp reaches float's smallest normal), to the fit's 2^-18.4.
//
// q's coefficients were fitted here (least squares on Chebyshev nodes, reweighted towards
// minimax, relative error; then rounded to float). Measured against float64 exp on every 61st
// float of [-104, 89] (tests/test_inline_exp.py): degree 6 within 1.05 ulp (Sleef's 1-ulp exp:
// 0.98); degree 4 within 2^-18.4 relative plus the rounding of y above, at most 2^-16.9 where the
// result is a normal float: a 250th of a bfloat16 ulp, and a 30th of a float16 one (whose
// results are 2^-24 at least, where |y| <= 24 and the error is within 2^-18).
// ---------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512)
constexpr float kLog2e = 1.44269504088896341f;

// 2^y by the degree-4 form (exp_avx512<4> of y·ln 2), for callers that fold work into y.
inline __m512 exp2_avx512_deg4(__m512 y) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 f = _mm512_reduce_ps(y, kNearest);
  __m512 q = _mm512_set1_ps(0.009582851082086563f);
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.05590642988681793f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.24024099111557007f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.6931241750717163f));
  return _mm512_scalef_ps(_mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0f)), _mm512_roundscale_ps(y, kNearest));
}

// kNonPositive (degree 6): the caller guarantees x <= 0 or NaN (x - max of a row with a finite
// max), so the upper clamp, one instruction of about thirteen, is left out.
template <int kDegree, bool kNonPositive = false>
inline __m512 exp_avx512(__m512 x) {
  static_assert(kDegree == 4 || kDegree == 6, "exp_avx512: fitted for degree 4 or 6");
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  if constexpr (kDegree == 4) {
    return exp2_avx512_deg4(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)));
  } else {
    // min/max return their second operand when either is NaN: x goes second.
    if constexpr (!kNonPositive) {
      x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
    }
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), kNearest);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 q = _mm512_set1_ps(0.0013843653723597527f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.00837415549904108f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.04166800156235695f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.16666431725025177f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.4999999403953552f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(_mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f)), n);
  }
}
#endif

// The exp of the row path's log-sum, whose precision the loss needs (see FastExp): Sleef's, or
// on AVX512 float lanes the inline exp (degree 6 as precise at about half the cost; degree 4 for
// results rounded to 16 bits, see kSumExpDegree). Any argument: ±inf and NaN come out as exp's.
template <int kDegree = 6>
struct SumExp {
  template <typename V>
  V operator()(const V& v) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<V, Vectorized<float>>) {
      return V(exp_avx512<kDegree>(v));
    }
#endif
    return v.exp();
  }
};

// The degree of the row path's inline exp in a row's Σ exp(x - max) for inputs of scalar_t. A
// 16-bit row's results (its loss, its log-probabilities, the gradient from its log-sum) are
// rounded to 16 bits, and the degree-4 exp's relative error (at most 2^-16.9 on each term and so
// on the sum; on log Σ at most that, absolutely) is a 250th of a bfloat16 ulp and a 30th of a
// float16 one: it rarely moves a result across a rounding boundary, by an ulp when it does. Float32 rows keep the degree-6 exp, within an ulp as Sleef's. The sum
// is the exp pass's work, which bounds the forward (the logits come from memory faster): with
// degree 4 two fused multiply-adds of about fifteen vector instructions per vector go.
template <typename scalar_t>
inline constexpr int kSumExpDegree = c10::is_reduced_floating_point_v<scalar_t> ? 4 : 6;

// The exp of the row path's gradients, which are rounded to scalar_t. On AVX512 float lanes: the
// degree-4 exp where the gradient is c·exp(...) alone and 16-bit, so that its error (at most
// 2^-16.9) vanishes in the rounding; the degree-6 exp for float32, and where the gradient is a difference
// that can cancel (label smoothing's c·p - s·w, near p = the smoothed target), which would
// magnify that error (more precise than exp_u20 there, and cheaper). exp_u20 elsewhere, as
// FastExp. Like FastExp, it is for rows whose reference values are finite.
template <int kDegree>
struct RowGradExp {
  template <typename V>
  V operator()(const V& v) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<V, Vectorized<float>>) {
      return V(exp_avx512<kDegree>(v));
    }
#endif
    return v.exp_u20();
  }

  // exp(d - ls), d = x - max and ls the row's log-sum (finite, in [0, log C]). Degree 4 folds the
  // subtraction into the base-2 scaling: y = d·log2(e) - ls·log2(e) in one FMA, whose roundings
  // (of ls·log2(e) and of y) add (|ls| + |y|)·2^-24·ln 2 of relative error, as the subtraction's
  // and the scaling's did.
  template <typename V>
  V shifted(const V& d, const V& ls) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kDegree == 4 && std::is_same_v<V, Vectorized<float>>) {
      const __m512 log2e = _mm512_set1_ps(kLog2e);
      return V(exp2_avx512_deg4(_mm512_fmsub_ps(d, log2e, _mm512_mul_ps(ls, log2e))));
    }
#endif
    return (*this)(d - ls);
  }
};

template <typename scalar_t, bool kCancels, typename F>
inline auto dispatch_row_grad_exp(bool fast, F&& f) {
  constexpr int kDegree = c10::is_reduced_floating_point_v<scalar_t> && !kCancels ? 4 : 6;
  return fast ? f(RowGradExp<kDegree>{}) : f(PreciseExp{});
}

// ---------------------------------------------------------------------------------------------
// Loads and stores that convert between the storage dtype and the accumulation dtype.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct VecIO {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  static constexpr int64_t kLanes = AVec::size();
  // One full load covers a whole Vectorized<scalar_t>: one accumulation vector for float and
  // double, two for the half types (16-bit values widen into two float vectors).
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();
  static constexpr int64_t kPer = kStep / kLanes;
  static constexpr bool kSame = std::is_same_v<scalar_t, acc>;

  static void load(const scalar_t* p, AVec (&v)[kPer]) {
    if constexpr (kSame) {
      v[0] = AVec::loadu(p);
    } else {
      at::vec::load_to_float<scalar_t>(p, v[0], v[1]);
    }
  }

  // kStream: with a non-temporal store, past the caches, which p must be aligned for (64 bytes
  // on AVX512). For an output larger than the caches: a plain store first reads each line it
  // writes into the cache (a third of a backward's memory traffic), to write it back later.
  template <bool kStream = false>
  static void store(scalar_t* p, const AVec (&v)[kPer]) {
    if constexpr (kSame) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kStream) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          _mm512_stream_ps(reinterpret_cast<float*>(p), v[0]);
        } else {
          _mm512_stream_pd(reinterpret_cast<double*>(p), v[0]);
        }
        return;
      }
#endif
      v[0].store(p);
    } else {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
      // vcvtne2ps2bf16 rounds to nearest even in one instruction, where ATen's conversion
      // emulates it in about a dozen (most of a bfloat16 backward's cost besides the exp). It
      // flushes subnormal inputs to zero, though: a vector holding one (class 0x20) takes ATen's.
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        const __m512 lo = v[0], hi = v[1];
        if ((_mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20)) == 0) {
          const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
          if constexpr (kStream) {
            _mm512_stream_si512(reinterpret_cast<__m512i*>(p), packed);
          } else {
            _mm512_storeu_si512(p, packed);
          }
          return;
        }
      }
#endif
      const Vectorized<scalar_t> packed = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kStream) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(p), static_cast<__m512i>(packed));
        return;
      }
#endif
      packed.store(p);
    }
  }

  // The first n (< kLanes) elements; the other lanes hold `fill`.
  static AVec load_partial(const scalar_t* p, int64_t n, acc fill) {
    __at_align__ acc lanes[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) {
      lanes[k] = k < n ? static_cast<acc>(p[k]) : fill;
    }
    return AVec::loadu(lanes);
  }

  static void store_partial(scalar_t* p, const AVec& v, int64_t n) {
    __at_align__ acc lanes[kLanes];
    v.store(lanes);
    for (int64_t k = 0; k < n; ++k) {
      p[k] = static_cast<scalar_t>(lanes[k]);
    }
  }
};

// An accumulation-dtype vector of up to n lanes from a small contiguous buffer (the weights).
template <typename acc>
inline Vectorized<acc> load_acc(const acc* p, int64_t n) {
  return n == Vectorized<acc>::size() ? Vectorized<acc>::loadu(p) : Vectorized<acc>::loadu(p, n);
}

// Zero the lanes at and beyond n, so that a padded tail does not pollute a sum.
template <typename acc>
inline Vectorized<acc> mask_tail(const Vectorized<acc>& v, int64_t n) {
  return n == Vectorized<acc>::size() ? v : Vectorized<acc>::set(Vectorized<acc>(0), v, n);
}

// ---------------------------------------------------------------------------------------------
// Row loops (row path): f sees accumulation vectors of the row, with the index j of their first
// class and the number n of real lanes; lanes beyond n hold a padding value.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename F>
inline void for_each_vec(const scalar_t* p, int64_t count, acc_t<scalar_t> fill, F&& f) {
  using IO = VecIO<scalar_t>;
  int64_t j = 0;
  for (; j + IO::kStep <= count; j += IO::kStep) {
    typename IO::AVec v[IO::kPer];
    IO::load(p + j, v);
    for (int64_t k = 0; k < IO::kPer; ++k) {
      f(v[k], j + k * IO::kLanes, IO::kLanes);
    }
  }
  for (; j < count; j += IO::kLanes) {
    const int64_t n = std::min(IO::kLanes, count - j);
    f(IO::load_partial(p + j, n, fill), j, n);
  }
}

// Outputs this large (an LM's gradient) are written with non-temporal stores where the row path
// allows: larger than the last-level cache (32 MiB on the development machine) by a margin, so
// that no consumer could have found them in the cache anyway. lm-32k bfloat16 backward
// (`python -m fusedce bench`): see benchmarks/RESULTS.md.
constexpr int64_t kStreamMinBytes = int64_t{64} << 20;

// Whether a row-path output of `bytes` takes non-temporal stores: large, and every row (at
// data + o*s0 + i*s2, i < inner) aligned to a vector (AVX512 only).
template <typename scalar_t>
inline bool streamable_rows(const View3<scalar_t>& out, int64_t inner, int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t kAlign = 64, kSize = sizeof(scalar_t);
  static_assert(VecIO<scalar_t>::kStep * kSize == kAlign);
  return bytes >= kStreamMinBytes && reinterpret_cast<uintptr_t>(out.data) % kAlign == 0 &&
         (out.s0 * kSize) % kAlign == 0 && (inner == 1 || (out.s2 * kSize) % kAlign == 0);
#else
  (void)out, (void)inner, (void)bytes;
  return false;
#endif
}

// Orders a task's non-temporal stores before whatever reads the output after the task's join.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Two rows of the same length side by side (x and target, out and grad); padding is 0.
template <typename scalar_t, typename F>
inline void for_each_vec2(const scalar_t* p, const scalar_t* q, int64_t count, F&& f) {
  using IO = VecIO<scalar_t>;
  int64_t j = 0;
  for (; j + IO::kStep <= count; j += IO::kStep) {
    typename IO::AVec u[IO::kPer], v[IO::kPer];
    IO::load(p + j, u);
    IO::load(q + j, v);
    for (int64_t k = 0; k < IO::kPer; ++k) {
      f(u[k], v[k], j + k * IO::kLanes, IO::kLanes);
    }
  }
  for (; j < count; j += IO::kLanes) {
    const int64_t n = std::min(IO::kLanes, count - j);
    f(IO::load_partial(p + j, n, 0), IO::load_partial(q + j, n, 0), j, n);
  }
}

// dst[j] = f(src[j]...) over a row; dst may be src (each step loads before it stores).
// kStream: the whole steps with non-temporal stores, for which dst must be vector-aligned
// (streamable_rows); the caller fences when its task is done (stream_fence).
template <bool kStream = false, typename scalar_t, typename F>
inline void map_row(const scalar_t* src, scalar_t* dst, int64_t count, F&& f) {
  using IO = VecIO<scalar_t>;
  int64_t j = 0;
  for (; j + IO::kStep <= count; j += IO::kStep) {
    typename IO::AVec v[IO::kPer];
    IO::load(src + j, v);
    for (int64_t k = 0; k < IO::kPer; ++k) {
      v[k] = f(v[k], j + k * IO::kLanes, IO::kLanes);
    }
    IO::template store<kStream>(dst + j, v);
  }
  for (; j < count; j += IO::kLanes) {
    const int64_t n = std::min(IO::kLanes, count - j);
    IO::store_partial(dst + j, f(IO::load_partial(src + j, n, 0), j, n), n);
  }
}

// kStream: as map_row's.
template <bool kStream = false, typename scalar_t, typename F>
inline void map_row2(const scalar_t* src, const scalar_t* src2, scalar_t* dst, int64_t count, F&& f) {
  using IO = VecIO<scalar_t>;
  int64_t j = 0;
  for (; j + IO::kStep <= count; j += IO::kStep) {
    typename IO::AVec u[IO::kPer], v[IO::kPer];
    IO::load(src + j, u);
    IO::load(src2 + j, v);
    for (int64_t k = 0; k < IO::kPer; ++k) {
      u[k] = f(u[k], v[k], j + k * IO::kLanes, IO::kLanes);
    }
    IO::template store<kStream>(dst + j, u);
  }
  for (; j < count; j += IO::kLanes) {
    const int64_t n = std::min(IO::kLanes, count - j);
    IO::store_partial(
        dst + j, f(IO::load_partial(src + j, n, 0), IO::load_partial(src2 + j, n, 0), j, n), n);
  }
}

// Horizontal reductions. The max propagates NaN, so that a NaN anywhere in a row makes its max
// (and from it the row's log-sum) NaN, as in torch.
template <typename acc>
inline acc hsum(const Vectorized<acc>& v) {
  __at_align__ acc lanes[Vectorized<acc>::size()];
  v.store(lanes);
  acc s = 0;
  for (int64_t k = 0; k < Vectorized<acc>::size(); ++k) {
    s += lanes[k];
  }
  return s;
}

template <typename acc>
inline acc nan_max(acc a, acc b) {
  if (std::isnan(a) || std::isnan(b)) {
    return kNaN<acc>;
  }
  return a > b ? a : b;
}

template <typename acc>
inline acc hmax(const Vectorized<acc>& v) {
  __at_align__ acc lanes[Vectorized<acc>::size()];
  v.store(lanes);
  acc m = lanes[0];
  for (int64_t k = 1; k < Vectorized<acc>::size(); ++k) {
    m = nan_max(m, lanes[k]);
  }
  return m;
}

// The larger of a running max m and x; where x is NaN the result may be either (block_stats
// finds such lanes afterwards, from their NaN rest, and takes the NaN-propagating max there).
template <typename acc>
inline Vectorized<acc> max_unordered(const Vectorized<acc>& m, const Vectorized<acc>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc, float>) {
    return _mm512_max_ps(m, x);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc, float>) {
    return _mm256_max_ps(m, x);
  }
#endif
  return at::vec::maximum(m, x);
}

// The max of a row, a piece at a time: the row path's forward has two passes over each row, a
// max pass that reads it from memory and an exp pass that works on it from the cache (a row of
// up to a few hundred KB stays in L2). Each pass has the core to itself, so they add: the max
// pass waits on memory, and the exp pass leaves the memory bus idle. Computing the next row's
// max inside the current row's exp pass overlaps the two: the loads from memory issue among the
// arithmetic, a piece per vector of the exp pass. (The forward used to prefetch the next row
// there instead, at the exp pass's own position, and still paid most of the max pass.)
//
// advance_to(j) takes in the whole pieces of the row below class j; finish() the rest, and
// returns the max. Of a row that holds a NaN, the max may be NaN or the max of the other values
// (max_unordered, one instruction where the NaN-propagating max takes four): the exp pass that
// follows every use meets the NaN, and the row's log-sum is NaN all the same. A null row (no
// next row) makes advance_to a no-op.
//
// bfloat16 on AVX512: the max from the bits, 32 values an instruction with no widening. Read as
// int16, bfloat16s of the same sign order as their bits do (the positive ones upwards, the
// negative ones downwards, below every positive one), so the row's max is its largest int16 when
// that is >= 0 and its smallest one otherwise (a NaN with the sign bit clear, the one arithmetic
// makes, is the largest of all). Padding is -inf, which neither extreme picks over a finite
// value.
template <typename scalar_t>
class RowMaxAhead {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  using IO = VecIO<scalar_t>;
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kBits = std::is_same_v<scalar_t, at::BFloat16>;
#else
  static constexpr bool kBits = false;
#endif
  static constexpr int64_t kPiece = kBits ? 32 : IO::kStep;

 public:
  RowMaxAhead(const scalar_t* row, int64_t count) : row_(row), count_(count) {
    for (auto& m : m_) {
      m = AVec(-kInf<acc>);
    }
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBits) {
      hi_ = _mm512_set1_epi16(std::numeric_limits<int16_t>::min());
      lo_ = _mm512_set1_epi16(kNegInfBits);
    }
#endif
  }

  void advance_to(int64_t j) {
    if (row_ != nullptr) {
      for (; done_ + kPiece <= std::min(j, count_); done_ += kPiece) {
        piece(row_ + done_);
      }
    }
  }

  acc finish() {
    if (row_ == nullptr) {
      return -kInf<acc>;
    }
    advance_to(count_);
    const int64_t n = count_ - done_;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBits) {
      if (n > 0) {
        const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << n) - 1);
        take(_mm512_mask_loadu_epi16(_mm512_set1_epi16(kNegInfBits), tail, row_ + done_));
      }
      __at_align__ int16_t his[32], los[32];
      _mm512_store_si512(his, hi_);
      _mm512_store_si512(los, lo_);
      int16_t top = his[0], bottom = los[0];
      for (int k = 1; k < 32; ++k) {
        top = std::max(top, his[k]);
        bottom = std::min(bottom, los[k]);
      }
      const uint32_t bits = static_cast<uint16_t>(top >= 0 ? top : bottom);
      return c10::bit_cast<float>(bits << 16);
    }
#endif
    for (int64_t j = done_; j < count_; j += IO::kLanes) {
      const int64_t k = std::min(IO::kLanes, count_ - j);
      m_[0] = max_unordered(m_[0], IO::load_partial(row_ + j, k, -kInf<acc>));
    }
    for (int64_t k = 1; k < IO::kPer; ++k) {
      m_[0] = max_unordered(m_[0], m_[k]);
    }
    return hmax(m_[0]);
  }

 private:
  static constexpr int16_t kNegInfBits = static_cast<int16_t>(0xFF80);

  void piece(const scalar_t* p) {
    // 8 KiB ahead as well: more lines in flight than the demand loads and the hardware's stream
    // prefetch keep (`python scripts/cpu_floors.py`, lm-32k bf16 forward over 4096 rows from
    // memory: 9.01 ms without, 7.31 with, built and run back to back).
    __builtin_prefetch(reinterpret_cast<const char*>(p) + 8192);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBits) {
      take(_mm512_loadu_si512(p));
      return;
    }
#endif
    typename IO::AVec v[IO::kPer];
    IO::load(p, v);
    for (int64_t k = 0; k < IO::kPer; ++k) {
      m_[k] = max_unordered(m_[k], v[k]);
    }
  }

#if defined(CPU_CAPABILITY_AVX512)
  void take(const __m512i& v) {
    hi_ = _mm512_max_epi16(hi_, v);
    lo_ = _mm512_min_epi16(lo_, v);
  }
  __m512i hi_, lo_;
#endif
  const scalar_t* row_;
  int64_t count_;
  int64_t done_ = 0;
  AVec m_[IO::kPer];  // lane-wise maxima of the generic path, one chain per loaded vector
};

template <typename scalar_t>
inline acc_t<scalar_t> row_max(const scalar_t* p, int64_t count) {
  return RowMaxAhead<scalar_t>(p, count).finish();
}

// The row after row r in a task [.., end), or null for its last.
template <typename scalar_t>
inline const scalar_t* next_row(const View3<const scalar_t>& x, int64_t r, int64_t end, int64_t inner) {
  if (r + 1 >= end) {
    return nullptr;
  }
  const int64_t o = (r + 1) / inner;
  return x.row(o, r + 1 - o * inner);
}

// Runs f(r, o, i, row, m, ahead) over the rows [begin, end) of a row-path task in order: m is
// the row's max, and ahead the next row's max, which f's exp pass advances as it goes (and need
// not: what it leaves is done after f).
template <typename scalar_t, typename F>
inline void for_each_row_max_ahead(const View3<const scalar_t>& x, int64_t begin, int64_t end,
                                   int64_t inner, int64_t classes, F&& f) {
  if (begin >= end) {
    return;
  }
  acc_t<scalar_t> m = row_max(x.row(begin / inner, begin % inner), classes);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t o = r / inner, i = r - o * inner;
    RowMaxAhead<scalar_t> ahead(next_row(x, r, end, inner), classes);
    f(r, o, i, x.row(o, i), m, ahead);
    m = ahead.finish();
  }
}

// Below this many classes a row fills less than two vectors, and the row path spends its time
// on partial loads and per-row scalar work (about 80 ns a row at C = 10); the tile path, with its
// lanes across rows, does the same rows several times faster.
constexpr int64_t kRowPathMinClasses = 32;

// A row is walked with vector loads when its classes are adjacent and there are enough of them.
inline bool row_contiguous(int64_t class_stride, int64_t classes) {
  return class_stride == 1 && classes >= kRowPathMinClasses;
}

inline int64_t row_grain(int64_t classes) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(classes, 1));
}

// Large CPU allocations are fresh mmaps, and faulting them in 4 KiB page by page costs several
// times the kernel's own pass over memory (docs/benchmarks.md: 90-570 ms for 524 MB). Asking for
// transparent huge pages before the first touch cuts the faults 512-fold. It is a hint: a no-op
// where THP is off, and on buffers too small to hold an aligned 2 MiB page.
inline void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  constexpr size_t kWorthIt = size_t(32) << 20;
  if (t.nbytes() < kWorthIt) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (start + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// A contiguous (outer, C, inner) output: what gradients and softmax outputs are written to. Mid-sized
// ones are reused once their last user lets them go (output_pool.h).
inline Tensor empty_canonical(int64_t outer, int64_t classes, int64_t inner, const at::TensorOptions& options) {
  Tensor out = pooled_empty({outer, classes, inner}, options);
  advise_huge_pages(out);
  return out;
}

inline Tensor empty_like_canonical(const Tensor& x) {
  return empty_canonical(x.size(0), x.size(1), x.size(2), x.options());
}

// ---------------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------------

// Index targets as int64 (uint8 targets are widened: O(rows)).
inline Tensor long_targets(const Tensor& target) {
  return target.scalar_type() == at::kLong ? target : target.to(at::kLong);
}

// torch's IndexError for the first target outside [0, C) that is not ignore_index, in row order.
// A separate pass over the targets (O(rows)) keeps the error deterministic under parallel_for,
// and guards the kernels' target-indexed loads.
inline void check_targets(const View2<int64_t>& t, int64_t outer, int64_t inner, int64_t classes,
                          int64_t ignore_index) {
  // First a branch-free pass that the compiler vectorises (contiguous rows, the usual case):
  // nothing to report is the common outcome, and the ordered search below only runs when it has.
  auto any_bad = [&](const int64_t* p, int64_t count) {
    bool bad = false;
    for (int64_t k = 0; k < count; ++k) {
      bad |= (p[k] != ignore_index) & (static_cast<uint64_t>(p[k]) >= static_cast<uint64_t>(classes));
    }
    return bad;
  };
  if (inner == 1 && t.s0 == 1) {  // (N, C) inputs: the targets are one run
    if (!any_bad(t.data, outer)) {
      return;
    }
  } else if (t.s1 == 1) {
    bool bad = false;
    for (int64_t o = 0; o < outer; ++o) {
      bad |= any_bad(t.data + o * t.s0, inner);
    }
    if (!bad) {
      return;
    }
  }
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < inner; ++i) {
      const int64_t v = t(o, i);
      TORCH_CHECK_INDEX(v == ignore_index || (v >= 0 && v < classes), "Target ", v,
                        " is out of bounds.");
    }
  }
}

// The weight in the accumulation dtype (null when there is none), and its sum W (C without one).
template <typename acc>
struct AccWeight {
  std::vector<acc> values;
  acc total;

  const acc* data() const { return values.empty() ? nullptr : values.data(); }
};

template <typename scalar_t>
inline AccWeight<acc_t<scalar_t>> acc_weight(const std::optional<Tensor>& weight, int64_t classes) {
  using acc = acc_t<scalar_t>;
  AccWeight<acc> w{{}, static_cast<acc>(classes)};
  if (weight.has_value()) {
    const Tensor wc = weight->to(c10::CppTypeToScalarType<scalar_t>::value).contiguous();
    const scalar_t* p = wc.data_ptr<scalar_t>();
    w.values.resize(classes);
    double sum = 0;
    for (int64_t c = 0; c < classes; ++c) {
      w.values[c] = static_cast<acc>(p[c]);
      sum += static_cast<double>(w.values[c]);
    }
    w.total = static_cast<acc>(sum);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// Tile path
// ---------------------------------------------------------------------------------------------

// How the rows are cut into tiles: `rows` consecutive rows per tile (row order r = o*inner + i),
// lanes padded to `ld`, a multiple of the vector width.
struct TilePlan {
  int64_t rows, ld, count;
};

inline TilePlan plan_tiles(int64_t total_rows, int64_t classes, int64_t lanes, int64_t acc_bytes) {
  int64_t rows = kTileBytes / std::max<int64_t>(classes * acc_bytes, 1);
  rows = std::clamp<int64_t>(rows / lanes * lanes, lanes, kMaxTileRows);
  rows = std::min(rows, (total_rows + lanes - 1) / lanes * lanes);
  const int64_t count = total_rows == 0 ? 0 : (total_rows + rows - 1) / rows;
  return {rows, rows, count};
}

// The rows of one tile, with each lane's (o, i).
struct TileRows {
  int64_t r0 = 0, n = 0;
  bool one_outer = false;  // all rows share o(0), so they are i(0), i(0)+1, ...

  void set(int64_t first, int64_t count, int64_t inner) {
    r0 = first;
    n = count;
    // One division per tile, then a counter: a division per row was a large share of a
    // small-C tile's time. A tile within one outer index (the usual K-dimensional tile) needs
    // no table at all: filling one was several percent of seg's forward.
    o0_ = inner > 0 ? first / inner : 0;
    i0_ = first - o0_ * inner;
    one_outer = n > 0 && i0_ + n <= inner;
    if (one_outer) {
      return;
    }
    int64_t oo = o0_, ii = i0_;
    for (int64_t b = 0; b < n; ++b) {
      o_[b] = oo;
      i_[b] = ii;
      if (++ii == inner) {
        ii = 0;
        ++oo;
      }
    }
  }

  int64_t o(int64_t b) const { return one_outer ? o0_ : o_[b]; }
  int64_t i(int64_t b) const { return one_outer ? i0_ + b : i_[b]; }

 private:
  int64_t o0_ = 0, i0_ = 0;
  int64_t o_[kMaxTileRows];
  int64_t i_[kMaxTileRows];
};

// Convert a contiguous run into accumulation dtype.
template <typename scalar_t>
inline void load_run(const scalar_t* src, acc_t<scalar_t>* dst, int64_t count) {
  using IO = VecIO<scalar_t>;
  for_each_vec(src, count, 0, [&](const typename IO::AVec& v, int64_t j, int64_t n) {
    if (n == IO::kLanes) {
      v.store(dst + j);
    } else {
      v.store(dst + j, n);
    }
  });
}

template <typename scalar_t>
inline void store_run(const acc_t<scalar_t>* src, scalar_t* dst, int64_t count) {
  using IO = VecIO<scalar_t>;
  int64_t j = 0;
  for (; j + IO::kStep <= count; j += IO::kStep) {
    typename IO::AVec v[IO::kPer];
    for (int64_t k = 0; k < IO::kPer; ++k) {
      v[k] = IO::AVec::loadu(src + j + k * IO::kLanes);
    }
    IO::store(dst + j, v);
  }
  for (; j < count; ++j) {
    dst[j] = static_cast<scalar_t>(src[j]);
  }
}

// tile[c*ld + b] = x[row b, class c]; padding lanes are set to 0 (finite, never stored).
template <typename scalar_t>
inline void gather_tile(const View3<const scalar_t>& x, int64_t classes, const TileRows& rows,
                        acc_t<scalar_t>* tile, int64_t ld) {
  using acc = acc_t<scalar_t>;
  if (rows.one_outer && x.s2 == 1) {
    // The K-dimensional contiguous case: each class of the tile is one contiguous run.
    const scalar_t* base = x.row(rows.o(0), rows.i(0));
    for (int64_t c = 0; c < classes; ++c) {
      load_run(base + c * x.s1, tile + c * ld, rows.n);
    }
  } else if (x.s1 <= x.s2) {
    // Classes closer together than rows (channels-last): read each row in order.
    for (int64_t b = 0; b < rows.n; ++b) {
      const scalar_t* p = x.row(rows.o(b), rows.i(b));
      for (int64_t c = 0; c < classes; ++c) {
        tile[c * ld + b] = static_cast<acc>(p[c * x.s1]);
      }
    }
  } else {
    for (int64_t c = 0; c < classes; ++c) {
      for (int64_t b = 0; b < rows.n; ++b) {
        tile[c * ld + b] = static_cast<acc>(x.row(rows.o(b), rows.i(b))[c * x.s1]);
      }
    }
  }
  if (rows.n < ld) {
    for (int64_t c = 0; c < classes; ++c) {
      std::fill(tile + c * ld + rows.n, tile + (c + 1) * ld, acc(0));
    }
  }
}

template <typename scalar_t>
inline void scatter_tile(const acc_t<scalar_t>* tile, int64_t ld, int64_t classes,
                         const TileRows& rows, const View3<scalar_t>& y) {
  if (rows.one_outer && y.s2 == 1) {
    scalar_t* base = y.row(rows.o(0), rows.i(0));
    for (int64_t c = 0; c < classes; ++c) {
      store_run(tile + c * ld, base + c * y.s1, rows.n);
    }
  } else {
    for (int64_t b = 0; b < rows.n; ++b) {
      scalar_t* p = y.row(rows.o(b), rows.i(b));
      for (int64_t c = 0; c < classes; ++c) {
        p[c * y.s1] = static_cast<scalar_t>(tile[c * ld + b]);
      }
    }
  }
}

// A full tile of a float32/float64 tensor whose classes are each one contiguous run (the
// K-dimensional contiguous case) needs no gather: the kernel can read it where it lies, with the
// class stride as its leading dimension. Returns that tile, or null when it must be gathered
// (half types, other strides, or a partial tile, whose padding lanes would read past the rows).
template <typename acc, typename scalar_t>
inline acc* direct_tile(const View3<scalar_t>& x, const TileRows& rows, int64_t ld) {
  if constexpr (std::is_same_v<std::remove_const_t<scalar_t>, acc>) {
    if (rows.one_outer && x.s2 == 1 && rows.n == ld) {
      return const_cast<acc*>(x.row(rows.o(0), rows.i(0)));
    }
  }
  return nullptr;
}

// One tile that is read from x and written to out. Full float32/float64 tiles are used where
// they lie (every element is read before it is written, so out may be x); the others are
// gathered into the scratch tile here, and finish() scatters the scratch back to out.
template <typename acc, typename scalar_t>
struct InOutTile {
  const acc* src;
  acc* dst;
  int64_t sld, dld;  // leading dimensions: the class strides, or the scratch's ld

  InOutTile(const View3<const scalar_t>& x, const View3<scalar_t>& out, int64_t classes,
            const TileRows& rows, acc* scratch, int64_t ld)
      : src(direct_tile<acc>(x, rows, ld)), dst(direct_tile<acc>(out, rows, ld)), sld(x.s1),
        dld(out.s1), out_(out), rows_(rows), scratch_(scratch), classes_(classes), ld_(ld) {
    direct_ = src != nullptr && dst != nullptr;
    if (!direct_) {
      gather_tile(x, classes, rows, scratch, ld);
      src = dst = scratch;
      sld = dld = ld;
    }
  }

  void finish() const {
    if (!direct_) {
      scatter_tile(scratch_, ld_, classes_, rows_, out_);
    }
  }

 private:
  const View3<scalar_t>& out_;
  const TileRows& rows_;
  acc* scratch_;
  int64_t classes_, ld_;
  bool direct_ = false;
};

// Runs f(rows, scratch...) over every tile in parallel. Each task owns `buffers` scratch tiles
// of classes*ld accumulation values.
template <typename acc, typename F>
inline void for_each_tile(int64_t outer, int64_t inner, int64_t classes, int buffers, F&& f) {
  const TilePlan plan =
      plan_tiles(outer * inner, classes, Vectorized<acc>::size(), sizeof(acc) * buffers);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(classes * plan.rows, 1));
  at::parallel_for(0, plan.count, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> scratch(static_cast<size_t>(classes * plan.ld * buffers));
    TileRows rows;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t first = k * plan.rows;
      rows.set(first, std::min(plan.rows, outer * inner - first), inner);
      f(rows, scratch.data(), plan.ld);
    }
  });
}

// A compensated (Kahan) lane-wise sum, for the tile path, which adds a row's classes one after
// another in one lane: plain, its rounding error grows with C (7 ulp at C = 300), where torch's
// vectorised reductions stay within an ulp or two. A carry that is not a number (an infinite
// term, which the sum keeps) is dropped, so that it cannot turn the sum into NaN.
template <typename acc>
struct KahanSum {
  Vectorized<acc> sum{acc(0)}, carry{acc(0)};

  void add(const Vectorized<acc>& v) {
    const Vectorized<acc> y = v - carry;
    const Vectorized<acc> t = sum + y;
    carry = (t - sum) - y;
    carry = carry & (carry == carry);
    sum = t;
  }

  // For terms in [0, 1] (exponentials of x - max): the carry stays finite and needs no mask.
  // A lane that meets a NaN or a non-finite max comes out NaN, which its caller wants anyway.
  void add_unit(const Vectorized<acc>& v) {
    const Vectorized<acc> y = v - carry;
    const Vectorized<acc> t = sum + y;
    carry = (t - sum) - y;
    sum = t;
  }
};

// Σ_c exp(x_c - m) of a row, kept as 1 + rest: `rest` sums the terms of every class but one
// maximal one, whose term is exactly 1, so that log Σ = log1p(rest) keeps the digits of a small
// rest (a confident row: one logit far above the others, whose loss is all in those digits;
// log(1 + rest) would round 1 + rest first). See reference.row_stats. add() takes d = x - m
// (padding -inf): a lane at the max (d == 0) adds 1 to `ties` instead of its term to `rest`,
// and the row's rest is Σ rest + (ties - 1), the ties being exact small integers. Each lane
// sums kBlock terms plainly, then folds them into a compensated (Kahan) total: plain all along,
// a lane adds C/16 terms one after another, and at C = 65535 in float32 a softmax came out 3.6e-6
// off, 14 times torch's error (found by the fuzz); Kahan on every term cost the lm-32k forward
// 18% (its dependency chain), the fold every kBlock vectors costs nothing measurable. kDegree:
// the inline exp's on AVX512 float lanes (kSumExpDegree of the input's dtype).
template <typename acc, int kDegree = 6>
struct ExpSumRest {
  static constexpr int kBlock = 16;
  // add2 takes the two vectors one step of row_rest loads (a bfloat16 load widens into two),
  // each into its own block, so that neither waits on the other's add.
  Vectorized<acc> block{acc(0)}, block2{acc(0)}, ties{acc(0)};
  int64_t tie_count = 0;  // ties counted from a mask register (the AVX512 float add)
  KahanSum<acc> folded;
  int pending = 0;

  // d = x - m for a row whose max m is finite: d <= 0, or NaN.
  void add(const Vectorized<acc>& d) {
    accumulate(block, d);
    fold_if_full(1);
  }

  // Two vectors of d at once, summed in separate chains.
  void add2(const Vectorized<acc>& d, const Vectorized<acc>& d2) {
    accumulate(block, d);
    accumulate(block2, d2);
    fold_if_full(2);
  }

  void accumulate(Vectorized<acc>& into, const Vectorized<acc>& d) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc, float>) {
      // The same sum in three vector instructions besides the exp, where the generic form takes
      // seven (its compare builds a vector mask, its tie count and its blend then consume it):
      // the compare's mask register counts the ties with a popcount on the integer ports, and
      // masks the add (`python -m fusedce bench`, lm-32k bf16 forward: 15.81 ms before, 12.99
      // after, in benchmarks/RESULTS.md).
      const __mmask16 top = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_EQ_OQ);
      tie_count += __builtin_popcount(static_cast<unsigned>(top));
      into = Vectorized<acc>(_mm512_mask_add_ps(into, static_cast<__mmask16>(~top), into,
                                                exp_avx512<kDegree, true>(d)));
      return;
    }
#endif
    into += term(d, ties);
  }

  void fold_if_full(int added) {
    pending += added;
    if (pending >= kBlock) {
      // finite or NaN: add() keeps a NaN sum NaN and its carry finite
      folded.add(block + block2);
      block = block2 = Vectorized<acc>(acc(0));
      pending = 0;
    }
  }

  // exp(d) for `rest`, 0 where d == 0 (a lane at the max), which counts in `ties` instead. Shared
  // with block_stats, whose rest is compensated. Not exp_u20: see FastExp.
  static Vectorized<acc> term(const Vectorized<acc>& d, Vectorized<acc>& ties) {
    const Vectorized<acc> zero(0);
    const Vectorized<acc> top = d == zero;
    ties = ties + (Vectorized<acc>(1) & top);
    return Vectorized<acc>::blendv(SumExp<>{}(d), zero, top);
  }

  // The row's rest; its max must be finite (so that some lane had d == 0).
  acc total() const {
    return hsum((folded.sum - folded.carry) + (block + block2)) + ((hsum(ties) + static_cast<acc>(tie_count)) - acc(1));
  }
};

// The exp pass of the row path's forwards: a row's rest (ExpSumRest: Σ_c exp(x_c - m) - 1, m its
// max, which must be finite), the classes in any order, two vectors at a time (ExpSumRest::add2),
// advancing the next row's max as it goes (RowMaxAhead). A bfloat16 row widens its even
// and odd values with one shift and one mask, where the ordered widening splits and zero-extends
// the halves (six instructions for the two vectors).
template <typename scalar_t>
inline acc_t<scalar_t> row_rest(const scalar_t* row, int64_t count, acc_t<scalar_t> m,
                                RowMaxAhead<scalar_t>& ahead) {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  using IO = VecIO<scalar_t>;
  constexpr int64_t kPair = 2 * IO::kLanes;
  const AVec vm(m);
  ExpSumRest<acc, kSumExpDegree<scalar_t>> sum;
  // A copy, which the compiler keeps in registers (the caller's lives in memory).
  RowMaxAhead<scalar_t> next = ahead;
  int64_t j = 0;
  for (; j + kPair <= count; j += kPair) {
    next.advance_to(j + kPair);
    AVec v[2];
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      const __m512i raw = _mm512_loadu_si512(row + j);
      v[0] = AVec(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)));
      v[1] = AVec(_mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)))));
    } else
#endif
    if constexpr (IO::kPer == 2) {
      typename IO::AVec w[2];
      IO::load(row + j, w);
      v[0] = w[0];
      v[1] = w[1];
    } else {
      v[0] = AVec::loadu(row + j);
      v[1] = AVec::loadu(row + j + IO::kLanes);
    }
    sum.add2(v[0] - vm, v[1] - vm);
  }
  for (; j < count; j += IO::kLanes) {
    const int64_t n = std::min(IO::kLanes, count - j);
    next.advance_to(j + n);
    sum.add(IO::load_partial(row + j, n, -kInf<acc>) - vm);  // padding -inf: its exp is 0
  }
  ahead = next;
  return sum.total();
}

// Σ a·b to about twice the working precision (the Dot2 of Ogita, Rump and Oishi): each product's
// rounding error (recovered exactly with an FMA) and each addition's (TwoSum) go into a second
// accumulator. softmax's float32 backward uses it for Σ_c grad·out: where one class holds almost
// all the probability, out·(grad - Σ) is a difference of nearly equal numbers, and a plainly
// rounded Σ (off by an ulp of the row's largest grad·out) would be most of the result.
template <typename acc>
struct CompensatedDot {
  Vectorized<acc> sum{acc(0)}, err{acc(0)};

  void add(const Vectorized<acc>& a, const Vectorized<acc>& b) {
    const Vectorized<acc> p = a * b;
    const Vectorized<acc> product_err = at::vec::fmsub(a, b, p);
    const Vectorized<acc> s = sum + p;
    const Vectorized<acc> z = s - sum;
    err = err + (product_err + ((sum - (s - z)) + (p - z)));
    sum = s;
  }

  // The total as hi + lo (hi = the rounded total). The lanes are combined with TwoSum too. A
  // total that is not finite (an infinite product) is the plain sum, with lo = 0, so that the
  // error terms (inf - inf) cannot turn it into NaN.
  void total(acc& hi, acc& lo) const {
    __at_align__ acc s[Vectorized<acc>::size()], e[Vectorized<acc>::size()];
    sum.store(s);
    err.store(e);
    hi = 0;
    lo = 0;
    for (int64_t k = 0; k < Vectorized<acc>::size(); ++k) {
      const acc t = hi + s[k], z = t - hi;
      lo += ((hi - (t - z)) + (s[k] - z)) + e[k];
      hi = t;
    }
    const acc t = hi + lo;
    lo = std::isfinite(t) ? lo - (t - hi) : acc(0);
    hi = std::isfinite(t) ? t : hsum(sum);
  }
};
// Lane operations for the tile loops, which run once per logit: on AVX-512 float each is one
// instruction, where the generic Vectorized forms take three or four (a vector mask built from
// a mask register, then turned back; a NaN-propagating max).

// Where u == w, b; elsewhere a.
template <typename acc>
inline Vectorized<acc> select_eq(const Vectorized<acc>& u, const Vectorized<acc>& w,
                                 const Vectorized<acc>& b, const Vectorized<acc>& a) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc, float>) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, w, _CMP_EQ_OQ), a, b);
  }
#endif
  return Vectorized<acc>::blendv(a, b, u == w);
}

// Lane-wise row stats of a block of NV vectors of lanes (src points at the block's first lane of
// class 0; class c is at src + c*sld): the max into m, and Σ exp(x - m) - 1, compensated, into
// rest, as in ExpSumRest: a lane at its max counts a tie instead of adding its term, so that the
// log-sum is log1p(rest) and a confident row keeps the digits of its small terms.
// The block is walked class by class twice, the max pass and then the exp pass, with every
// running value in registers: a block's classes (NV cache lines each) stay in L1 between the two
// passes, and nothing but the logits is loaded or stored. `per_class(c, v, x)` runs in the exp
// pass for each class c and vector v of the block, with the loaded x and d = x - m (the loss's
// target pick, the smoothing sum).
// Lanes whose max is not finite come out with a meaningless sum: callers add (m - m).
template <int NV, typename acc, typename F>
inline void block_stats(const acc* src, int64_t sld, int64_t classes, Vectorized<acc> (&m)[NV],
                        Vectorized<acc> (&rest)[NV], F&& per_class) {
  using AVec = Vectorized<acc>;
  constexpr int64_t L = AVec::size();
  // Running values in locals, not in the caller's arrays: those may alias the loads, and would
  // be stored and reloaded every class.
  AVec mx[NV];
  for (int v = 0; v < NV; ++v) {
    mx[v] = AVec(-kInf<acc>);
  }
  for (int64_t c = 0; c < classes; ++c) {
    const acc* run = src + c * sld;
    for (int v = 0; v < NV; ++v) {
      mx[v] = max_unordered(mx[v], AVec::loadu(run + v * L));
    }
  }
  KahanSum<acc> s[NV];
  AVec ties[NV];
  for (int v = 0; v < NV; ++v) {
    ties[v] = AVec(0);
  }
  const AVec one(1);
  for (int64_t c = 0; c < classes; ++c) {
    const acc* run = src + c * sld;
    for (int v = 0; v < NV; ++v) {
      // The block after next, spread over the compute-bound exp pass, where the max pass's
      // loads would issue them in a burst (the hardware prefetcher stops at page boundaries,
      // and a block spans `classes` pages).
      __builtin_prefetch(run + (v + 4 * NV) * L);
      const AVec x = AVec::loadu(run + v * L);
      const AVec d = x - mx[v];
      s[v].add_unit(ExpSumRest<acc>::term(d, ties[v]));
      per_class(c, v, x, d);
    }
  }
  // The rest is NaN exactly where the row holds a NaN, a +inf (inf - inf) or nothing but -inf:
  // there the max is taken again, propagating NaN, as in reference.row_stats.
  AVec finite(0);
  for (int v = 0; v < NV; ++v) {
    m[v] = mx[v];
    rest[v] = s[v].sum + (ties[v] - one);  // the ties are exact small integers
    finite = finite + (rest[v] - rest[v]);
  }
  if (finite.zero_mask() != (1 << L) - 1) {
    for (int v = 0; v < NV; ++v) {
      m[v] = AVec(-kInf<acc>);
      for (int64_t c = 0; c < classes; ++c) {
        m[v] = at::vec::maximum(m[v], AVec::loadu(src + c * sld + v * L));
      }
    }
  }
}

// Vectors per block of the tile loops: enough independent chains to hide the latencies, few
// enough that a block's running values stay in registers.
constexpr int kBlockVecs = 4;

// Runs f(lb, integral_constant<NV>) over the lanes [0, n) rounded up to whole vectors, in blocks
// of kBlockVecs vectors and then single vectors.
template <typename acc, typename F>
inline void for_each_block(int64_t n, F&& f) {
  using AVec = Vectorized<acc>;
  const int64_t lanes = (n + AVec::size() - 1) / AVec::size() * AVec::size();
  int64_t lb = 0;
  for (; lb + kBlockVecs * AVec::size() <= lanes; lb += kBlockVecs * AVec::size()) {
    f(lb, std::integral_constant<int, kBlockVecs>{});
  }
  for (; lb < lanes; lb += AVec::size()) {
    f(lb, std::integral_constant<int, 1>{});
  }
}

// The stats of a block, stored: the max into max_out, log Σ exp(x - max) = log1p(rest) into
// logsum, and, when inv_sum is given, 1 / Σ exp(x - max). max - max is 0 for a finite max and NaN otherwise, so a
// row that is all -inf, or holds +inf or NaN, gets a NaN log-sum (and 1/Σ), as in
// reference.row_stats. The log a vector at a time: a scalar log per row was most of a small-C
// tile's time.
template <int NV, typename acc>
inline void store_block_stats(const Vectorized<acc> (&m)[NV], const Vectorized<acc> (&rest)[NV],
                              acc* max_out, acc* logsum, acc* inv_sum) {
  constexpr int64_t L = Vectorized<acc>::size();
  for (int v = 0; v < NV; ++v) {
    m[v].store(max_out + v * L);
    (rest[v].log1p() + (m[v] - m[v])).store(logsum + v * L);
    if (inv_sum != nullptr) {
      ((rest[v] + Vectorized<acc>(1)).reciprocal() + (m[v] - m[v])).store(inv_sum + v * L);
    }
  }
}

// Lane-wise row stats of a tile: the max into `max_out`, and log Σ exp(x - max) into `logsum`.
// The two are kept apart (see reference.row_stats): a rounded max + log Σ loses digits when the
// logits share a large offset. `inv_sum`, when given, receives 1 / Σ exp(x - max) (NaN where
// the log-sum is), for softmax. Block by block (block_stats).
template <typename acc>
inline void tile_stats(const acc* tile, int64_t ld, int64_t classes, int64_t n, acc* max_out,
                       acc* logsum, acc* inv_sum = nullptr) {
  for_each_block<acc>(n, [&](int64_t lb, auto kNV) {
    constexpr int NV = decltype(kNV)::value;
    Vectorized<acc> m[NV], rest[NV];
    block_stats<NV>(tile + lb, ld, classes, m, rest,
                    [](int64_t, int, const Vectorized<acc>&, const Vectorized<acc>&) {});
    store_block_stats<NV>(m, rest, max_out + lb, logsum + lb, inv_sum ? inv_sum + lb : nullptr);
  });
}

// True when every lane's value is finite: the tile may use FastExp.
template <typename acc>
inline bool all_finite(const acc* values, int64_t n) {
  for (int64_t b = 0; b < n; ++b) {
    if (!std::isfinite(values[b])) {
      return false;
    }
  }
  return true;
}

}  // namespace fusedce
