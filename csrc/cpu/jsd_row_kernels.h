// CPU row kernel of jsd_logits (the generalized Jensen-Shannon divergence), vectorised with at::vec.
// Not a normal header: like row_kernels.h it is compiled once per CPU capability, and the including
// file (kernels_generic.cpp, kernels_avx2.cpp) includes row_kernels.h first, whose RowSolver runs
// the first two passes here.
//
// One row of V elements of e bytes, a = t / T, b = s / T, p = softmax(a) (teacher),
// q = softmax(b) (student), m = beta p + (1 - beta) q with 0 < beta < 1 (jsd_cpu.cpp sends the
// endpoints to kl_rows), acc = float (double for float64):
//   JSD = beta K_p + (1 - beta) K_q,   K_p = KL(p || m) = sum p (log p - log m),   K_q = KL(q || m)
//   ds  = (1 - beta) f q (log q - log m - K_q),   dt = beta f p (log p - log m - K_p)
// with f = d(loss)/d(row loss) / T. log m needs the whole row's Z_a and Z_b, and the gradients
// need K, hence four passes, all but the first over cached data:
//   pass 1-2  RowSolver::gather: per chunk of 1024 the maxima, then Z_a, Z_b relative to them,
//             exp(a'), exp(b') kept in a per-thread scratch row      reads s, t from memory (2e),
//             2 exponentials per element                            (gather's W sum goes unused)
//   pass 3    K_p, K_q: p and q from the scratch, log m = log(beta p + (1 - beta) q), and
//             log p = (t - max t) / T - log Z_a, log q likewise from the logits again (in cache); keeps
//             log q - log m (log p - log m) in the scratch where a gradient is wanted, in place of
//             the exponential that gradient no longer needs      reads s, t from cache, 1 log
//   pass 4    the gradients, from the scratch alone: ds = (1 - beta) f q (d_q - K_q)   writes e per
//             gradient (non-temporal stores where the row is 32-byte aligned)
// Two exponentials and one logarithm per element in all; memory traffic is the 2e of the inputs plus
// e per gradient. A probability of 0 contributes 0 to K and to the gradient, never 0 * inf = NaN.
// Rows run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "cpu_kernels.h"
#include "row_loop.h"
#include "vec_lanes.h"

namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE {
namespace {

template <typename scalar_t, bool kHard>
struct JSDRowSolver {
  using Rows = RowSolver<scalar_t, /*kReverse=*/false, kHard>;
  using L = typename Rows::L;
  using acc_t = typename Rows::acc_t;
  using Vec = typename Rows::Vec;
  static constexpr int64_t kVec = Rows::kVec;
  static constexpr int64_t kStep = Rows::kStep;
  static constexpr int64_t kChunk = Rows::kChunk;

  Rows rows;            // passes 1-2 and the merge; its scratch_a, scratch_b receive exp(a'), exp(b')
  acc_t beta;
  acc_t* log_ratio_q;   // log q - log m of the current row when the student needs a gradient, else nullptr
  acc_t* log_ratio_p;   // log p - log m when the teacher needs one

  // Pass 3 on one vector of the row at scratch offset i: p, q (from the exponentials, times
  // `to_p` = chunk scale / Z_a, `to_q`), log m, and the terms p (log p - log m), q (log q - log m)
  // added to kp, kq. s_raw, t_raw are the logits (any value in lanes past the row: p = q = 0 there),
  // max_a, max_b the row's maxima of the raw logits.
  C10_ALWAYS_INLINE void divergence_terms(int64_t i, const Vec& s_raw, const Vec& t_raw, const Vec& to_p,
                                          const Vec& to_q, const Vec& inv_t, const Vec& max_a,
                                          const Vec& max_b, const Vec& log_z_a, const Vec& log_z_b, Vec& kp,
                                          Vec& kq) const {
    const Vec zero(acc_t(0));
    const Vec p = Vec::loadu(rows.scratch_a + i) * to_p;
    const Vec q = Vec::loadu(rows.scratch_b + i) * to_q;
    const Vec log_m = PositiveLog<acc_t>::log(at::vec::fmadd(p, Vec(beta), q * Vec(acc_t(1) - beta)));
    // log p - log m and log q - log m, zero where that probability is 0 (its log is -inf, and so is
    // log m where both are): such entries contribute nothing, and the gradient pass multiplies by 0.
    // log p = (t - max t) / T - log Z_a: the raw shift first, so that logits of +-1e4 keep their
    // digits and log p is exactly -log Z_a at the maximum however large |logit| / T is.
    const Vec log_p = (t_raw - max_a) * inv_t - log_z_a;
    const Vec log_q = (s_raw - max_b) * inv_t - log_z_b;
    const Vec ratio_p = Vec::blendv(zero, log_p - log_m, p > zero);
    const Vec ratio_q = Vec::blendv(zero, log_q - log_m, q > zero);
    kp = at::vec::fmadd(p, ratio_p, kp);
    kq = at::vec::fmadd(q, ratio_q, kq);
    // Stored after the loads above: a ratio may take the place of the exponential just read.
    if (log_ratio_q != nullptr) ratio_q.store(log_ratio_q + i);
    if (log_ratio_p != nullptr) ratio_p.store(log_ratio_p + i);
  }

  void solve(int64_t row) const {
    const KLRowsProblem& pr = rows.pr;
    const int64_t V = pr.vocab;
    const scalar_t* s = static_cast<const scalar_t*>(pr.student) + pr.student_rows.offset(row);
    const scalar_t* t = static_cast<const scalar_t*>(pr.teacher) + pr.teacher_rows.offset(row);
    const int64_t y = rows.label_of(row);
    if (y < 0) return rows.undefined(row);  // never read out of bounds
    const RowState<acc_t> st = rows.gather(s, t, /*keep=*/true);
    // A NaN or +inf logit, or every logit -inf on one side, leaves a softmax undefined.
    if (!st.defined || st.m_a == Rows::kNegInf || st.m_b == Rows::kNegInf) return rows.undefined(row);
    HardGradient<acc_t> hard{};
    if constexpr (kHard) hard = rows.hard_term(row, s, y, st);
    const int64_t n_chunks = (V + kChunk - 1) / kChunk;

    // Pass 3: K_p, K_q.
    const Vec inv_t(static_cast<acc_t>(pr.inv_temperature));
    const Vec max_a(st.m_a), max_b(st.m_b), log_z_a(std::log(st.z_a)), log_z_b(std::log(st.z_b));
    Vec kp(acc_t(0)), kq(acc_t(0));
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t begin = k * kChunk, len = std::min(kChunk, V - begin);
      const Vec to_p(rows.chunk_scales[2 * k] / st.z_a), to_q(rows.chunk_scales[2 * k + 1] / st.z_b);
      Rows::for_each_step(len, [&](int64_t j, auto n) {
        const int64_t i = begin + j;
        Vec s_lo, s_hi, t_lo, t_hi;
        L::load(s + i, n, acc_t(0), s_lo, s_hi);
        L::load(t + i, n, acc_t(0), t_lo, t_hi);
        divergence_terms(i, s_lo, t_lo, to_p, to_q, inv_t, max_a, max_b, log_z_a, log_z_b, kp, kq);
        divergence_terms(i + kVec, s_hi, t_hi, to_p, to_q, inv_t, max_a, max_b, log_z_a, log_z_b, kp, kq);
      });
    }
    const acc_t k_p = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), kp);
    const acc_t k_q = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), kq);
    // JSD >= 0; what rounding leaves below 0 (a row equal to itself) is clamped.
    static_cast<acc_t*>(pr.row_loss)[row] = std::max(beta * k_p + (acc_t(1) - beta) * k_q, acc_t(0));

    // Pass 4: the gradients, from the scratch: ds = (1 - beta) f q (d_q - K_q), dt = beta f p (d_p - K_p).
    scalar_t* ds = pr.grad_student ? static_cast<scalar_t*>(pr.grad_student) + row * V : nullptr;
    scalar_t* dt = pr.grad_teacher ? static_cast<scalar_t*>(pr.grad_teacher) + row * V : nullptr;
    if (ds == nullptr && dt == nullptr) return;
    const acc_t f = static_cast<acc_t>(pr.grad_factor);
    const Vec vk_p(k_p), vk_q(k_q);
    // Written once, never read back here: streamed past the caches where the row is aligned.
    const bool streaming_s = L::streaming_ok(ds), streaming_t = L::streaming_ok(dt);
    // out = e scale (ratio - kl), plus the hard term's share where it is the student's (h_lo, h_hi).
    const auto gradient = [&](scalar_t* out, const acc_t* e, const acc_t* ratio, const Vec& scale, const Vec& kl,
                              int64_t begin, int64_t j, auto n, bool streaming, const Vec& h_lo, const Vec& h_hi) {
      const int64_t i = begin + j;
      const Vec lo = at::vec::fmadd(Vec::loadu(e + i) * scale, Vec::loadu(ratio + i) - kl, h_lo);
      const Vec hi = at::vec::fmadd(Vec::loadu(e + i + kVec) * scale, Vec::loadu(ratio + i + kVec) - kl, h_hi);
      L::store_step(out + j, n, lo, hi, streaming);
    };
    const Vec zero(acc_t(0));
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t begin = k * kChunk, len = std::min(kChunk, V - begin);
      const Vec scale_q((acc_t(1) - beta) * f * rows.chunk_scales[2 * k + 1] / st.z_b);
      const Vec scale_p(beta * f * rows.chunk_scales[2 * k] / st.z_a);
      const Vec q1_f(kHard ? rows.hard_factor(k, st) : acc_t(0));
      Rows::for_each_step(len, [&](int64_t j, auto n) {
        if (ds != nullptr) {
          Vec h_lo(zero), h_hi(zero);
          if constexpr (kHard) {
            const int64_t i = begin + j;
            rows.hard_step(hard, s, i, n, q1_f, h_lo, h_hi);
          }
          gradient(ds + begin, rows.scratch_b, log_ratio_q, scale_q, vk_q, begin, j, n, streaming_s, h_lo, h_hi);
        }
        if (dt != nullptr) gradient(dt + begin, rows.scratch_a, log_ratio_p, scale_p, vk_p, begin, j, n, streaming_t, zero, zero);
      });
    }
    if (streaming_s || streaming_t) stream_fence();
  }
};

template <typename scalar_t, bool kHard>
void jsd_rows_typed(const KLRowsProblem& pr) {
  using Solver = JSDRowSolver<scalar_t, kHard>;
  using acc_t = typename Solver::acc_t;
  const bool student_grad = pr.grad_student != nullptr, teacher_grad = pr.grad_teacher != nullptr;
  const int64_t padded = (pr.vocab + Solver::kStep - 1) / Solver::kStep * Solver::kStep;
  const int64_t n_chunks = (pr.vocab + Solver::kChunk - 1) / Solver::kChunk;
  // Per task: exp(a'), exp(b') and the log ratios of one row, then the chunk scales. A ratio takes
  // the place of the exponential its gradient does not need (the teacher's for ds); with both
  // gradients wanted, both exponentials are needed and the ratios get rows of their own.
  // The hard term's exponentials at T != 1 get one more (RowSolver::scratch_1).
  const bool keep_1 = keep_hard_exponentials<kHard>(pr, student_grad || teacher_grad);
  const int64_t row_arrays = (student_grad && teacher_grad ? 4 : 2) + (keep_1 ? 1 : 0);
  parallel_rows<acc_t>(pr.rows, pr.vocab, row_arrays * padded + 2 * n_chunks,
                       [&](acc_t* scratch, int64_t begin, int64_t end) {
    std::unique_ptr<ChunkState<acc_t>[]> chunks(new ChunkState<acc_t>[n_chunks]);
    acc_t* const exp_a = scratch;
    acc_t* const exp_b = scratch + padded;
    acc_t* const ratio_q = !student_grad ? nullptr : (teacher_grad ? scratch + 2 * padded : exp_a);
    acc_t* const ratio_p = !teacher_grad ? nullptr : (student_grad ? scratch + 3 * padded : exp_b);
    acc_t* const exp_1 = keep_1 ? scratch + (row_arrays - 1) * padded : nullptr;
    const Solver solver{{pr, exp_a, exp_b, chunks.get(), scratch + row_arrays * padded, exp_1},
                        static_cast<acc_t>(pr.beta), ratio_q, ratio_p};
    for (int64_t row = begin; row < end; ++row) {
      if (pr.mask != nullptr && !pr.mask[row]) solver.rows.skip(row);
      else solver.solve(row);
    }
  });
}

}  // namespace

void jsd_rows(c10::ScalarType dtype, const KLRowsProblem& problem) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_fused_cpu_jsd_rows", [&] {
    with_flag(problem.hard.labels != nullptr, [&](auto hard) { jsd_rows_typed<scalar_t, decltype(hard)::value>(problem); });
  });
}

}  // namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE
