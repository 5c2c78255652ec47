// CPU row kernels of kl_fused, vectorised with at::vec. Not a normal header: each file that
// includes it (kernels_generic.cpp, kernels_avx2.cpp) first defines KL_FUSED_CPU_NAMESPACE and,
// for AVX2, the CPU_CAPABILITY macros, so that at::vec compiles for that instruction set.
//
// One row (math in kl_div_common.h), V elements of e bytes each, acc = float (double for float64):
//   pass 1  maxima:  m_s, m_t                        reads s, t          (2e per element, from memory)
//   pass 2  sums:    Z_a, Z_b, W; keeps exp(a'), exp(b') in a per-thread scratch row when a
//                    gradient is wanted             reads s, t          (from cache)
//   pass 3  gradient, forward direction, student:  ds = (q - p) * f     reads scratch, writes ds (e)
//                    teacher: dt = p (log p - log q - KL) * f          reads s, t again, writes dt
//                    reverse direction swaps the roles: ds = q (log q - log p - KL) f, dt = (p - q) f
// with f = d(loss)/d(row loss) / T. Two exponentials per element in all (the floor on a CPU);
// memory traffic is the 2e of the inputs plus e per gradient written. Rows run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "cpu_kernels.h"

namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE {
namespace {

using at::vec::Vectorized;

// Loads and stores of kStep = 2 * Vec::size() elements as two accumulation-type vectors; a short
// tail is padded with `pad` (lanes past the row never reach a sum or a store).
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kStep = 2 * kVec;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  static void load(const scalar_t* p, int64_t n, acc_t pad, Vec& lo, Vec& hi) {
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

  static void store(scalar_t* p, int64_t n, const Vec& lo, const Vec& hi) {
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
};

template <typename scalar_t>
struct RowSolver {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  static constexpr int64_t kVec = L::kVec;
  static constexpr int64_t kStep = L::kStep;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const KLRowsProblem& pr;
  acc_t* scratch_a;  // exp(a') of the current row, padded to a multiple of kStep
  acc_t* scratch_b;  // exp(b')

  static Vec max_reduce(Vec x, Vec y) { return at::vec::maximum(x, y); }

  // exp of x <= 0 (or -inf, or NaN). float: at::vec's inline polynomial (exp_u20, a few ulp,
  // exact 0 for -inf, NaN kept) instead of Sleef's out-of-line call; double: Sleef's 1-ulp exp.
  static Vec vexp(const Vec& x) {
    if constexpr (std::is_same_v<acc_t, float>) return x.exp_u20();
    else return x.exp();
  }

  // Zeroes the gradient rows of a row that does not count.
  void zero_gradients(int64_t row) const {
    const int64_t V = pr.vocab;
    if (pr.grad_student) std::fill_n(static_cast<scalar_t*>(pr.grad_student) + row * V, V, scalar_t(0));
    if (pr.grad_teacher) std::fill_n(static_cast<scalar_t*>(pr.grad_teacher) + row * V, V, scalar_t(0));
  }

  void solve(int64_t row) const {
    const int64_t V = pr.vocab;
    const scalar_t* s = static_cast<const scalar_t*>(pr.student) + pr.student_rows.offset(row);
    const scalar_t* t = static_cast<const scalar_t*>(pr.teacher) + pr.teacher_rows.offset(row);
    const bool keep = pr.grad_student != nullptr || pr.grad_teacher != nullptr;
    const acc_t inv_t = static_cast<acc_t>(pr.inv_temperature);

    // Pass 1: maxima of the raw logits (multiplying by 1/T > 0 keeps the order). NaN propagates.
    Vec ms_lo(kNegInf), ms_hi(kNegInf), mt_lo(kNegInf), mt_hi(kNegInf);
    for (int64_t i = 0; i < V; i += kStep) {
      const int64_t n = std::min(kStep, V - i);
      Vec lo, hi;
      L::load(s + i, n, kNegInf, lo, hi);
      ms_lo = at::vec::maximum(ms_lo, lo);
      ms_hi = at::vec::maximum(ms_hi, hi);
      L::load(t + i, n, kNegInf, lo, hi);
      mt_lo = at::vec::maximum(mt_lo, lo);
      mt_hi = at::vec::maximum(mt_hi, hi);
    }
    const acc_t m_b = at::vec::vec_reduce_all<acc_t>(max_reduce, at::vec::maximum(ms_lo, ms_hi)) * inv_t;
    const acc_t m_a = at::vec::vec_reduce_all<acc_t>(max_reduce, at::vec::maximum(mt_lo, mt_hi)) * inv_t;

    // Pass 2: Z_a, Z_b and W over shifted logits a' = a - m_a <= 0, b' = b - m_b <= 0.
    // W weighs (x' - y') by exp(x') where x is the distribution the expectation is over; a zero
    // weight contributes 0, not 0 * inf (a teacher logit of -inf has probability 0).
    const Vec vinv_t(inv_t), vneg_ma(-m_a), vneg_mb(-m_b), zero(acc_t(0));
    Vec za(0), zb(0), w(0);
    for (int64_t i = 0; i < V; i += kStep) {
      const int64_t n = std::min(kStep, V - i);
      Vec s_lo, s_hi, t_lo, t_hi;
      L::load(s + i, n, kNegInf, s_lo, s_hi);
      L::load(t + i, n, kNegInf, t_lo, t_hi);
      const Vec a_lo = at::vec::fmadd(t_lo, vinv_t, vneg_ma), a_hi = at::vec::fmadd(t_hi, vinv_t, vneg_ma);
      const Vec b_lo = at::vec::fmadd(s_lo, vinv_t, vneg_mb), b_hi = at::vec::fmadd(s_hi, vinv_t, vneg_mb);
      const Vec ea_lo = vexp(a_lo), ea_hi = vexp(a_hi);
      const Vec eb_lo = vexp(b_lo), eb_hi = vexp(b_hi);
      za += ea_lo + ea_hi;
      zb += eb_lo + eb_hi;
      if (pr.reverse) {
        w += Vec::blendv(zero, eb_lo * (b_lo - a_lo), eb_lo > zero) +
             Vec::blendv(zero, eb_hi * (b_hi - a_hi), eb_hi > zero);
      } else {
        w += Vec::blendv(zero, ea_lo * (a_lo - b_lo), ea_lo > zero) +
             Vec::blendv(zero, ea_hi * (a_hi - b_hi), ea_hi > zero);
      }
      if (keep) {
        ea_lo.store(scratch_a + i);
        ea_hi.store(scratch_a + i + kVec);
        eb_lo.store(scratch_b + i);
        eb_hi.store(scratch_b + i + kVec);
      }
    }
    const acc_t Z_a = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), za);
    const acc_t Z_b = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), zb);
    const acc_t W = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), w);
    const acc_t log_za = std::log(Z_a), log_zb = std::log(Z_b);
    // KL >= 0 (Gibbs); what rounding leaves below 0 (1e-16 when a row is its own maximum,
    // V = 1 with T != 1) is clamped. std::max keeps NaN: NaN < 0 is false.
    const acc_t kl = std::max(pr.reverse ? W / Z_b - log_zb + log_za : W / Z_a - log_za + log_zb, acc_t(0));
    static_cast<acc_t*>(pr.row_loss)[row] = kl;
    if (!keep) return;

    // Pass 3: gradients. p = exp(a') / Z_a, q = exp(b') / Z_b; log p - log q = a' - b' + c.
    const acc_t f = static_cast<acc_t>(pr.grad_factor);
    const Vec fp(f / Z_a), fq(f / Z_b);
    const Vec c(pr.reverse ? log_za - log_zb - kl : log_zb - log_za - kl);
    scalar_t* ds = pr.grad_student ? static_cast<scalar_t*>(pr.grad_student) + row * V : nullptr;
    scalar_t* dt = pr.grad_teacher ? static_cast<scalar_t*>(pr.grad_teacher) + row * V : nullptr;
    // The "difference of probabilities" gradient only needs the scratch row; the other one needs
    // log p - log q and so the logits again (still in cache).
    scalar_t* diff_grad = pr.reverse ? dt : ds;       // forward: ds = (q - p) f; reverse: dt = (p - q) f
    scalar_t* weighted_grad = pr.reverse ? ds : dt;   // forward: dt = p (log p/q - KL) f; reverse: ds = q (log q/p - KL) f
    for (int64_t i = 0; i < V; i += kStep) {
      const int64_t n = std::min(kStep, V - i);
      const Vec ea_lo = Vec::loadu(scratch_a + i), ea_hi = Vec::loadu(scratch_a + i + kVec);
      const Vec eb_lo = Vec::loadu(scratch_b + i), eb_hi = Vec::loadu(scratch_b + i + kVec);
      const Vec p_lo = ea_lo * fp, p_hi = ea_hi * fp;   // p * f
      const Vec q_lo = eb_lo * fq, q_hi = eb_hi * fq;   // q * f
      if (diff_grad) {
        if (pr.reverse) L::store(diff_grad + i, n, p_lo - q_lo, p_hi - q_hi);
        else L::store(diff_grad + i, n, q_lo - p_lo, q_hi - p_hi);
      }
      if (weighted_grad) {
        Vec s_lo, s_hi, t_lo, t_hi;
        L::load(s + i, n, acc_t(0), s_lo, s_hi);
        L::load(t + i, n, acc_t(0), t_lo, t_hi);
        const Vec a_lo = at::vec::fmadd(t_lo, vinv_t, vneg_ma), a_hi = at::vec::fmadd(t_hi, vinv_t, vneg_ma);
        const Vec b_lo = at::vec::fmadd(s_lo, vinv_t, vneg_mb), b_hi = at::vec::fmadd(s_hi, vinv_t, vneg_mb);
        Vec g_lo, g_hi;
        if (pr.reverse) {  // q (b' - a' + c), zero where q = 0
          g_lo = Vec::blendv(zero, q_lo * (b_lo - a_lo + c), eb_lo > zero);
          g_hi = Vec::blendv(zero, q_hi * (b_hi - a_hi + c), eb_hi > zero);
        } else {           // p (a' - b' + c), zero where p = 0
          g_lo = Vec::blendv(zero, p_lo * (a_lo - b_lo + c), ea_lo > zero);
          g_hi = Vec::blendv(zero, p_hi * (a_hi - b_hi + c), ea_hi > zero);
        }
        L::store(weighted_grad + i, n, g_lo, g_hi);
      }
    }
  }
};

template <typename scalar_t>
void kl_rows_typed(const KLRowsProblem& pr) {
  using Solver = RowSolver<scalar_t>;
  using acc_t = typename Solver::acc_t;
  const bool keep = pr.grad_student != nullptr || pr.grad_teacher != nullptr;
  const int64_t padded = (pr.vocab + Solver::kStep - 1) / Solver::kStep * Solver::kStep;
  // Enough rows per task that tiny vocabularies do not pay one task per row.
  const int64_t grain = std::max<int64_t>(1, 16384 / pr.vocab);
  at::parallel_for(0, pr.rows, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> scratch(keep ? new acc_t[2 * padded] : nullptr);
    const Solver solver{pr, scratch.get(), scratch.get() + (keep ? padded : 0)};
    for (int64_t row = begin; row < end; ++row) {
      if (pr.mask != nullptr && !pr.mask[row]) {
        static_cast<acc_t*>(pr.row_loss)[row] = acc_t(0);
        solver.zero_gradients(row);
        continue;
      }
      solver.solve(row);
    }
  });
}

// grad[row, :] *= upstream[row or 0]; rows whose factor is exactly 1 are left untouched.
template <typename scalar_t>
void grad_scale_typed(const GradScaleProblem& pr) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const acc_t* upstream = static_cast<const acc_t*>(pr.upstream);
  const int64_t V = pr.vocab;
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  at::parallel_for(0, pr.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t factor = upstream[pr.per_row ? row : 0];
      if (factor == acc_t(1)) continue;
      scalar_t* g = static_cast<scalar_t*>(pr.grad) + row * V;
      const Vec vf(factor);
      for (int64_t i = 0; i < V; i += L::kStep) {
        const int64_t n = std::min(L::kStep, V - i);
        Vec lo, hi;
        L::load(g + i, n, acc_t(0), lo, hi);
        L::store(g + i, n, lo * vf, hi * vf);
      }
    }
  });
}

}  // namespace

void kl_rows(c10::ScalarType dtype, const KLRowsProblem& problem) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_fused_cpu_kl_rows",
                                  [&] { kl_rows_typed<scalar_t>(problem); });
}

void grad_scale(c10::ScalarType dtype, const GradScaleProblem& problem) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_fused_cpu_grad_scale",
                                  [&] { grad_scale_typed<scalar_t>(problem); });
}

}  // namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE
