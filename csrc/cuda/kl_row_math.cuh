// KL's per-step math, shared by the full-row kernel (kl_div_cuda.cu) and the vocab-parallel shard
// kernels (kl_shards_cuda.cu): the statistics step (online maxima, Z_x, Z_y, W in log2 units; see
// row_state.cuh for the roles x, y and the units) and the gradient step
//   grad_x = p_x (log p_x - log p_y - KL) f,   grad_y = (p_y - p_x) f,
// in the form the row pipeline (row_pipeline.cuh) calls them.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../kl_div_common.h"
#include "device_math.cuh"
#include "hard_term.cuh"
#include "launch_plan.h"
#include "packs.cuh"
#include "row_pipeline.cuh"
#include "row_state.cuh"

namespace kl_fused::cuda {

// The arguments of the KL row kernels, full rows (kl_div_cuda.cu) and shards (kl_shards_cuda.cu).
template <typename scalar_t>
struct KLRowsArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;        // (..., V) through x_rows: teacher for forward KL, student for reverse
  const scalar_t* y;        // (..., V) through y_rows: the other input
  RowLayout x_rows;
  RowLayout y_rows;
  const bool* mask;         // (rows,) or nullptr; rows where it is false are never read
  scalar_t* grad_x;         // (rows, V) contiguous, or nullptr when not wanted
  scalar_t* grad_y;         // (rows, V) contiguous, or nullptr when not wanted
  int64_t rows;
  int64_t vocab;
  acc_t k;                  // log2(e) / T
  acc_t inv_temperature;    // 1 / T
  bool reverse;             // x is the student
  // kl_div_logits
  acc_t* row_loss;          // (rows,)
  GradFactor factor;        // d(loss)/d(row loss) / T; its count lives on the device
  int64_t cached_units;     // leading packs of each row kept in shared memory (gradient kernel)
  int scratch_bytes;        // dynamic shared memory before the row cache (per-warp states)
  // kl_row_states: (rows, 5) m_a, m_b, Z_a, Z_b, W of each row's shard (kl_fused/_shard_math.py)
  acc_t* states;
  // kl_grad_from_stats: (rows, 5) M_a, M_b, log Z_a, log Z_b, KL of the full rows, and (rows,)
  // d(loss)/d(row KL) / T
  const acc_t* stats;
  const acc_t* row_factor;
  // distillation_loss: the hard term riding in the row kernels' passes (hard_term.cuh), or none
  HardTermArgs<acc_t> hard;
};

// The arguments every KL row kernel shares, from checked rows: x is the distribution the
// expectation is over (row_state.cuh).
template <typename scalar_t>
KLRowsArgs<scalar_t> kl_rows_args(const PreparedRows& in, double temperature, bool reverse, scalar_t* grad_student,
                                  scalar_t* grad_teacher) {
  using acc_t = at::opmath_type<scalar_t>;
  KLRowsArgs<scalar_t> args{};
  const auto* s = in.student.const_data_ptr<scalar_t>();
  const auto* t = in.teacher.const_data_ptr<scalar_t>();
  args.x = reverse ? s : t;
  args.y = reverse ? t : s;
  args.x_rows = reverse ? in.student_rows : in.teacher_rows;
  args.y_rows = reverse ? in.teacher_rows : in.student_rows;
  args.grad_x = reverse ? grad_student : grad_teacher;
  args.grad_y = reverse ? grad_teacher : grad_student;
  args.mask = in.mask.has_value() ? in.mask->const_data_ptr<bool>() : nullptr;
  args.rows = in.rows;
  args.vocab = in.vocab;
  args.k = static_cast<acc_t>(kLog2E / temperature);
  args.inv_temperature = static_cast<acc_t>(1.0 / temperature);
  args.reverse = reverse;
  return args;
}

// Every row of both inputs, and every gradient, can be moved in 16-byte packs of `pack` elements.
template <typename scalar_t>
bool kl_rows_vectorizable(const KLRowsArgs<scalar_t>& args, int64_t pack) {
  return rows_vectorizable(args.x, args.x_rows, args.vocab, pack) &&
         rows_vectorizable(args.y, args.y_rows, args.vocab, pack) &&
         (args.grad_x == nullptr || aligned16(args.grad_x)) && (args.grad_y == nullptr || aligned16(args.grad_y));
}

// One step of the statistics pass: folds packs of x and y into the thread's online state.
template <typename acc_t, typename P, int U>
__device__ __forceinline__ void kl_statistics_step(RowState<acc_t>& st, const P (&packs)[2][U], const bool (&valid)[U],
                                                acc_t k) {
  constexpr int N = P::kSize;
  const auto& px = packs[0];
  const auto& py = packs[1];
  // One rescale per step at most (and rarely: only when this step raises a maximum).
  acc_t step_mx = neg_inf<acc_t>(), step_my = neg_inf<acc_t>();
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!valid[i]) continue;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      step_mx = max_acc(step_mx, to_acc(px[i].v[j]));
      step_my = max_acc(step_my, to_acc(py[i].v[j]));
    }
  }
  if (step_mx > st.mx || step_my > st.my) rescale(st, max_acc(st.mx, step_mx), max_acc(st.my, step_my), k);
  const acc_t sx = finite_shift(st.mx), sy = finite_shift(st.my);
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!valid[i]) continue;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t xs = (to_acc(px[i].v[j]) - sx) * k;
      const acc_t ys = (to_acc(py[i].v[j]) - sy) * k;
      const acc_t ex = exp2_acc(xs);
      st.zx += ex;
      st.zy += exp2_acc(ys);
      // p_x = 0 contributes 0, never 0 * inf (x = -inf, or y' = -inf where p_x = 0).
      st.w += ex > acc_t(0) ? ex * (xs - ys) : acc_t(0);
    }
  }
}

// Per-row constants of the gradient pass, everything in log2 units except f.
template <typename acc_t>
struct KLGradConstants {
  acc_t mx, my;   // raw maxima; -inf gives NaN gradients, as the CPU kernels do
  acc_t k;        // log2(e) / T
  acc_t px_f;     // f / Z_x:      p_x f = 2^x' px_f
  acc_t py_f;     // f / Z_y
  acc_t wx;       // f ln2 / Z_x: turns (x' - y') in log2 units back into natural units
  acc_t c2;       // (log p_x - log p_y - KL) - (x' - y') ln2, divided by ln2
};

// No hard term: what a gradient step adds to the student's gradient when the distillation step's
// cross-entropy does not ride along.
struct NoHardTerm {
  template <bool kNeedX, bool kNeedY, typename acc_t>
  __device__ __forceinline__ void add(acc_t, acc_t, acc_t, acc_t, acc_t&, acc_t&) const {}
};

// The hard term's share of the student's gradient (hard_term.cuh): the student is x (reverse KL) or y.
// kept_x, kept_y: the elements' q numerators at temperature T (2^x', 2^y').
template <typename acc_t>
struct HardTermShare {
  HardRow<acc_t> h;
  bool student_x;
  template <bool kNeedX, bool kNeedY>
  __device__ __forceinline__ void add(acc_t x, acc_t y, acc_t kept_x, acc_t kept_y, acc_t& gx, acc_t& gy) const {
    if (student_x) {
      if constexpr (kNeedX) gx += hard_element(h, kept_x, x);
    } else {
      if constexpr (kNeedY) gy += hard_element(h, kept_y, y);
    }
  }
};

// One step of a gradient pass, for every row kernel: element(x, y, gx, gy) sets the gradients of
// one element from its logits (acc_t), and the packs of the wanted gradients are stored whole.
// kNeedX/kNeedY: which gradients are written (compile-time, so that each output pack is built in
// registers and the other gradient's arithmetic is never emitted).
template <bool kNeedX, bool kNeedY, typename P, int U, typename Element>
__device__ __forceinline__ void store_gradient_step(const P (&packs)[2][U], const bool (&valid)[U], int64_t first,
                                                    P* grad_x, P* grad_y, const Element& element) {
  using scalar_t = typename P::value_type;
  using acc_t = at::opmath_type<scalar_t>;
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!valid[i]) continue;
    P gx, gy;
#pragma unroll
    for (int j = 0; j < P::kSize; ++j) {
      acc_t dx, dy;
      element(to_acc(packs[0][i].v[j]), to_acc(packs[1][i].v[j]), dx, dy);
      if constexpr (kNeedX) gx.v[j] = static_cast<scalar_t>(dx);
      if constexpr (kNeedY) gy.v[j] = static_cast<scalar_t>(dy);
    }
    if constexpr (kNeedX) store_pack(grad_x, step_unit(first, i), gx);
    if constexpr (kNeedY) store_pack(grad_y, step_unit(first, i), gy);
  }
}

// KL's gradients of one element, plus the hard term's share of the student's (Hard: NoHardTerm or
// HardTermShare).
template <bool kNeedX, bool kNeedY, typename acc_t, typename Hard>
__device__ __forceinline__ void kl_gradient_element(acc_t x, acc_t y, const KLGradConstants<acc_t>& c, const Hard& hard,
                                                    acc_t& gx, acc_t& gy) {
  const acc_t xs = (x - c.mx) * c.k;
  const acc_t ys = (y - c.my) * c.k;
  const acc_t ex = exp2_acc(xs);
  const acc_t ey = exp2_acc(ys);
  // grad_x = p_x (log p_x - log p_y - KL) f, zero where p_x = 0.
  if constexpr (kNeedX) gx = ex > acc_t(0) ? (ex * c.wx) * (xs - ys + c.c2) : acc_t(0);
  // grad_y = (p_y - p_x) f.
  if constexpr (kNeedY) gy = ey * c.py_f - ex * c.px_f;
  hard.template add<kNeedX, kNeedY>(x, y, ex, ey, gx, gy);
}

// One step of KL's gradient pass.
template <bool kNeedX, bool kNeedY, typename P, int U, typename acc_t, typename Hard = NoHardTerm>
__device__ __forceinline__ void kl_gradient_step(const P (&packs)[2][U], const bool (&valid)[U], int64_t first,
                                              P* grad_x, P* grad_y, const KLGradConstants<acc_t>& c,
                                              const Hard& hard = {}) {
  store_gradient_step<kNeedX, kNeedY>(packs, valid, first, grad_x, grad_y, [&](acc_t x, acc_t y, acc_t& gx, acc_t& gy) {
    kl_gradient_element<kNeedX, kNeedY>(x, y, c, hard, gx, gy);
  });
}

// The two passes as the pipeline calls them, one step at a time.
template <typename acc_t>
struct KLStatistics {
  RowState<acc_t> st;
  acc_t k;
  template <typename P, int U>
  __device__ __forceinline__ void operator()(const P (&packs)[2][U], const bool (&valid)[U], int64_t) {
    kl_statistics_step(st, packs, valid, k);
  }
};

template <bool kNeedX, bool kNeedY, typename P, typename acc_t, typename Hard = NoHardTerm>
struct KLGradient {
  P* grad_x;
  P* grad_y;
  KLGradConstants<acc_t> c;
  Hard hard;
  template <int U>
  __device__ __forceinline__ void operator()(const P (&packs)[2][U], const bool (&valid)[U], int64_t first) const {
    kl_gradient_step<kNeedX, kNeedY>(packs, valid, first, grad_x, grad_y, c, hard);
  }
};

// The statistics pass with the hard term: KL's statistics and the student's hard-term sums.
template <typename acc_t>
struct KLHardStatistics {
  RowState<acc_t> st;
  acc_t k;
  HardSums<acc_t> h;
  bool student_x, need_z1, need_sum;
  template <typename P, int U>
  __device__ __forceinline__ void operator()(const P (&packs)[2][U], const bool (&valid)[U], int64_t) {
    kl_statistics_step(st, packs, valid, k);
    if (student_x) hard_sums_step(h, packs[0], valid, need_z1, need_sum);
    else hard_sums_step(h, packs[1], valid, need_z1, need_sum);
  }
};

// A row state with the hard term's sums, as a block reduction merges it.
template <typename acc_t>
struct RowHardState {
  RowState<acc_t> st;
  HardSums<acc_t> h;
};

template <typename acc_t>
struct MergeRowHardStates {
  acc_t k;
  __device__ __forceinline__ RowHardState<acc_t> operator()(RowHardState<acc_t> a, const RowHardState<acc_t>& b) const {
    merge_hard_sums(a.h, b.h);
    return {merge(a.st, b.st, k), a.h};
  }
};

}  // namespace kl_fused::cuda
