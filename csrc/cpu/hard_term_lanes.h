// The hard term's share of a student gradient row, as every CPU row kernel adds it (row_kernels.h,
// jsd_row_kernels.h, sparse_row_kernels.h): per element j, with q_1 = softmax(s) at temperature 1,
//   f_h (q_1_j - eps / V) - f_h (1 - eps) [j = y]
// added to the soft term's gradient before the one store. q_1 comes from an exponential the kernel
// already kept (T = 1: it is the student's softmax of the soft term; an integer T = n in [2, 8]: the
// n-th power of it, IntegerPower) or, at any other T, from the logits again (one exponential per
// element). Like vec_lanes.h this is compiled once per CPU capability.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec_lanes.h"

namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE {
namespace {

// The temperature n when T = 1 / inv_temperature is an integer in [2, kMaxIntegerTemperature], else 0.
// At such a T the hard term's exp(s - c) is the soft term's own exp((s - c) / T) to the n-th power:
// n - 1 multiplications instead of an exponential per element (the common distillation temperatures
// 2 and 4 included). The argument (s - c) / T is exact for n = 2, 4, 8; for n = 3, 5, 6, 7 its
// rounding becomes a relative error of |s - c| 2^-24 in e^(s - c), under 1e-5 wherever that term
// is above the exponential's floor.
constexpr int kMaxIntegerTemperature = 8;

inline int integer_temperature(double inv_temperature) {
  const double t = 1.0 / inv_temperature;
  const double n = std::nearbyint(t);
  const bool integer = n >= 2 && n <= kMaxIntegerTemperature && std::abs(t - n) <= 1e-12 * n;
  return integer ? static_cast<int>(n) : 0;
}

// x -> x^n for the kept exponentials x = exp((s - c) / n) of an integer temperature n: exp(s - c).
// No floor of its own: x >= e^-87 (NonPositiveExp's floor), so x^n is a float, subnormal only where
// s - c < -87 within one chunk of a row (IEEE arithmetic keeps it exact; some CPUs take longer on
// such rows). A floor like the exponential's (a compare and a mask per lane) cost 5% of the top-k
// kernel's forward + backward at T = 2, 64 x 128256 bf16, on the 2-core AMD EPYC of
// bench/results/cpu-2core-distill.md.
template <typename acc_t>
struct IntegerPower {
  using Vec = at::vec::Vectorized<acc_t>;
  int n;

  // sum + x^n (pass 2's Z_1): one fused multiply-add at n = 2.
  C10_ALWAYS_INLINE Vec accumulate(const Vec& x, const Vec& sum) const {
    Vec r = x;
    for (int k = 2; k < n; ++k) r = r * x;
    return at::vec::fmadd(r, x, sum);
  }

  // x^(n - 1) factor: what turns the kept x into f_h q_1 in the gradient pass (hard_gradient_step's
  // per-lane factor).
  C10_ALWAYS_INLINE Vec times_power(const Vec& x, const Vec& factor) const {
    Vec r = x * factor;
    for (int k = 2; k < n; ++k) r = r * x;
    return r;
  }
};

// What a gradient pass needs of a row's hard term.
template <typename acc_t>
struct HardGradient {
  acc_t q1_scale;         // T != 1: f_h q_1 = exp(s - m_s) q1_scale, i.e. f_h / Z_1
  acc_t m_s;              // T != 1: the raw student logits' maximum
  acc_t uniform;          // f_h eps / V
  acc_t label_pull;       // f_h (1 - eps)
  int64_t label;          // y
  bool from_kept;         // q_1 from the kept exponentials (times the caller's per-chunk factor)
};

// The hard term over the step of n lanes at row element i: `kept` lo/hi are the exponentials the
// kernel kept there and factor lo/hi (per lane) turn them into f_h q_1 (used when h.from_kept);
// otherwise q_1 is recomputed from the student logits s. The label's lane also gets -f_h (1 - eps).
template <typename scalar_t, typename Vec, typename acc_t>
C10_ALWAYS_INLINE void hard_gradient_step(const HardGradient<acc_t>& h, const scalar_t* s, int64_t i, int64_t n,
                                          const Vec& kept_lo, const Vec& kept_hi, const Vec& factor_lo,
                                          const Vec& factor_hi, Vec& lo, Vec& hi) {
  using L = Lanes<scalar_t>;
  const Vec uniform(h.uniform);
  if (h.from_kept) {
    lo = at::vec::fmsub(kept_lo, factor_lo, uniform);
    hi = at::vec::fmsub(kept_hi, factor_hi, uniform);
  } else {
    Vec s_lo, s_hi, live_lo, live_hi;
    L::load(s + i, n, -std::numeric_limits<acc_t>::infinity(), s_lo, s_hi);
    const Vec neg_m(-h.m_s), scale(h.q1_scale);
    lo = at::vec::fmsub(NonPositiveExp<acc_t>::exp(s_lo + neg_m, live_lo), scale, uniform);
    hi = at::vec::fmsub(NonPositiveExp<acc_t>::exp(s_hi + neg_m, live_hi), scale, uniform);
  }
  if (h.label >= i && h.label < i + n) {  // once per row
    alignas(64) acc_t pull[L::kStep] = {};
    pull[h.label - i] = h.label_pull;
    lo -= Vec::loadu(pull);
    hi -= Vec::loadu(pull + L::kVec);
  }
}

}  // namespace
}  // namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE
