// Vector building blocks of the CPU row kernels: loads and stores of a step of elements in the
// accumulation type, a fast exponential for shifted logits, and the step loop. Like row_kernels.h
// this is compiled once per CPU capability: the including file defines KL_FUSED_CPU_NAMESPACE
// (and, for AVX2, the CPU_CAPABILITY macros) first.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE {
namespace {

using at::vec::Vectorized;

// Loads and stores of kStep = 2 * Vec::size() elements as two accumulation-type vectors; a short
// tail is padded with `pad` (lanes past the row never reach a sum or a store). Always inlined: an
// out-of-line load returns its vectors through memory.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kStep = 2 * kVec;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  C10_ALWAYS_INLINE static void load(const scalar_t* p, int64_t n, acc_t pad, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      static_assert(Vectorized<scalar_t>::size() == kStep);
      auto raw = n == kStep ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(raw);
    } else {
      lo = n >= kVec ? Vec::loadu(p) : Vec::loadu(p, n);
      hi = n == kStep ? Vec::loadu(p + kVec) : (n > kVec ? Vec::loadu(p + kVec, n - kVec) : Vec(pad));
    }
    if (n < kStep) {
      lo = Vec::set(Vec(pad), lo, std::min<int64_t>(n, kVec));
      hi = Vec::set(Vec(pad), hi, std::max<int64_t>(n - kVec, 0));
    }
  }

  C10_ALWAYS_INLINE static void store(scalar_t* p, int64_t n, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      auto packed = at::vec::convert_from_float<scalar_t>(lo, hi);
      if (n == kStep) packed.store(p); else packed.store(p, n);
    } else if (n == kStep) {
      lo.store(p);
      hi.store(p + kVec);
    } else {
      lo.store(p, std::min<int64_t>(n, kVec));
      if (n > kVec) hi.store(p + kVec, n - kVec);
    }
  }

  // A full step stored past the caches (non-temporal): for a gradient row that the kernel writes
  // once and never reads back, this saves each cache line's read-for-ownership, a third of the
  // memory traffic of writing it. p must be 32-byte aligned (streaming_ok); call stream_fence()
  // before the row is handed to another thread. Off AVX2 it is store().
  C10_ALWAYS_INLINE static void store_streaming(scalar_t* p, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, lo);
      _mm256_stream_ps(p + kVec, hi);
      return;
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm256_stream_pd(p, lo);
      _mm256_stream_pd(p + kVec, hi);
      return;
    } else {
      const __m256i packed = at::vec::convert_from_float<scalar_t>(lo, hi);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
      return;
    }
#endif
    store(p, kStep, lo, hi);
  }

  // store(), with a full step streamed when `streaming` (the row passed streaming_ok).
  C10_ALWAYS_INLINE static void store_step(scalar_t* p, int64_t n, const Vec& lo, const Vec& hi, bool streaming) {
    if (streaming && n == kStep) store_streaming(p, lo, hi);
    else store(p, n, lo, hi);
  }

  // Whether a row starting at p can take store_streaming for its full steps (each is 32 or 64 bytes).
  static bool streaming_ok(const scalar_t* p) { return p != nullptr && reinterpret_cast<uintptr_t>(p) % 32 == 0; }
};

// Orders the streaming stores before whatever follows (the row's hand-over to another thread).
C10_ALWAYS_INLINE void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// exp(x) for the shifted logits x = logit - row max, which lie in [-inf, 0] (plus a rounding
// residue above 0) once the row's maxima are known to be finite. Returns exp(x) and sets `live` to
// the lanes where exp(x) may be nonzero; lanes below kExpFloor (e^-87 ~ 1.6e-38, below every
// normal float's share of a sum that is >= 1) are exactly 0, -inf included.
// float on AVX2: x = n ln2 + r with n = round(x log2 e) taken from the low mantissa bits of
// x log2 e + 1.5 * 2^23, |r| <= ln2 / 2, e^r by at::vec's exp_u20 polynomial (same accuracy as
// exp_u20), 2^n added to the exponent bits. 12 instructions instead of exp_u20's 18, because the
// range is known: no clamping, no overflow path.
template <typename acc_t>
struct NonPositiveExp {
  using Vec = Vectorized<acc_t>;
  static constexpr acc_t kExpFloor = acc_t(-87);

  C10_ALWAYS_INLINE static Vec exp(const Vec& x, Vec& live) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      const __m256 v = x;
      const __m256 shifted = _mm256_fmadd_ps(v, _mm256_set1_ps(1.44269504f), _mm256_set1_ps(12582912.f));
      const __m256 n = _mm256_sub_ps(shifted, _mm256_set1_ps(12582912.f));
      const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147182f), v);
      __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(0.00828929059f), r, _mm256_set1_ps(0.0418978221f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166676521f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.499991506f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.999999701f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
      const __m256i two_to_n = _mm256_slli_epi32(_mm256_castps_si256(shifted), 23);
      const __m256 e = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), two_to_n));
      const __m256 keep = _mm256_cmp_ps(v, _mm256_set1_ps(kExpFloor), _CMP_GE_OQ);
      live = Vec(keep);
      return Vec(_mm256_and_ps(e, keep));
    }
#endif
    live = x >= Vec(kExpFloor);
    // float: at::vec's inline polynomial (a few ulp); double: Sleef's 1-ulp exp.
    if constexpr (std::is_same_v<acc_t, float>) return x.exp_u20() & live;
    else return x.exp() & live;
  }
};

// log(x) for probabilities and their mixtures, x in (0, 1] (plus rounding above 1). Lanes where x
// is 0 or subnormal give some finite value instead of -inf: callers mask the lanes whose
// probability is 0, and a subnormal one's term is below fp32 resolution of the row's sum.
// float on AVX2: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log x = e ln2 + log(1 + f), f = m - 1,
// log(1 + f) = f - f^2 / 2 + f^3 P(f) with Cephes' degree-8 polynomial (about 1 ulp, as at::vec's
// Sleef log_u10), in 20 instructions instead of Sleef's general-range routine.
template <typename acc_t>
struct PositiveLog {
  using Vec = Vectorized<acc_t>;

  C10_ALWAYS_INLINE static Vec log(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      const __m256i bits = _mm256_castps_si256(x);
      // m in [1, 2) from the mantissa bits; halved (and e raised) above sqrt(2).
      __m256 m = _mm256_castsi256_ps(
          _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
      __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
      const __m256 above = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
      m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), above);
      e = _mm256_add_ps(e, _mm256_and_ps(above, _mm256_set1_ps(1.f)));
      const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.f));
      const __m256 f2 = _mm256_mul_ps(f, f);
      __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(7.0376836292e-2f), f, _mm256_set1_ps(-1.1514610310e-1f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
      // f + (f^3 P(f) - f^2 / 2) + e ln2, with ln2 split so that e ln2 adds no rounding error.
      __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), f2);
      y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
      y = _mm256_fnmadd_ps(f2, _mm256_set1_ps(0.5f), y);
      return Vec(_mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y)));
    }
#endif
    return x.log();
  }
};

// max(acc, x) where a NaN x may be dropped (one instruction on AVX2 instead of three): the caller
// finds NaN another way. A NaN kept (the portable path) is found the same way.
template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> running_max(const Vectorized<acc_t>& acc, const Vectorized<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return Vectorized<acc_t>(_mm256_max_ps(x, acc));  // NaN x -> acc
#endif
  return at::vec::maximum(acc, x);
}

// Calls body(i, n) over [0, V) in steps of kStep elements: the full steps with n a compile-time
// kStep, so that their loads and stores carry no tail logic, then the tail.
template <int64_t kStep, typename Body>
C10_ALWAYS_INLINE void for_each_lane_step(int64_t V, const Body& body) {
  int64_t i = 0;
  for (; i + kStep <= V; i += kStep) body(i, std::integral_constant<int64_t, kStep>{});
  if (i < V) body(i, V - i);
}

}  // namespace
}  // namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE
