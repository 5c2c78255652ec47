// The hard term of the distillation step (../distill_common.h) as the CUDA row kernels add it to their
// own passes: per counted row, with s the student's raw logits, y the label, eps the label smoothing and
// q_1 = softmax(s) at temperature 1,
//   CE   = log Z_1 + (1 - eps)(m - s_y) + eps (m - mean s),    Z_1 = sum exp(s - m), m = max s
//   ds  += f_h (q_1 - eps / V) - f_h (1 - eps) onehot(y)
// At T = 1 the soft term's student statistics are the hard term's (Z_1 is its Z, no exponential more);
// at T != 1 the statistics pass adds an online (m, Z_1) of s (one ex2 per element) and the gradient
// pass one ex2 per element for q_1. With label smoothing the pass adds sum s. s_y is one load per row,
// and the label's element is rewritten once after the gradient pass (one thread, after a barrier).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>

#include "../kl_div_common.h"
#include "device_math.cuh"
#include "packs.cuh"
#include "row_pipeline.cuh"

namespace kl_fused::cuda {

// The hard term as the host hands it to the CUDA ops (distill_cuda.cu); labels == nullptr: none.
struct HardTermInputs {
  const int64_t* labels = nullptr;   // (rows,) int64 on the device
  void* row_hard = nullptr;          // (rows,) in the accumulation type
  int32_t* status = nullptr;         // (rows,)
  double smoothing = 0.0;
  GradFactor factor{};
};

// What a row kernel takes for the hard term; labels == nullptr: none.
template <typename acc_t>
struct HardTermArgs {
  const int64_t* labels;    // (rows,) targets; only counted rows' are read
  acc_t* row_hard;          // (rows,) CE per row
  int32_t* status;          // (rows,) kLabelOutOfRange where a counted row's label is outside [0, V)
  acc_t smoothing;          // eps
  GradFactor factor;        // f_h = hard_weight * d(loss)/d(row loss); its count lives on the device
};

template <typename acc_t>
HardTermArgs<acc_t> hard_term_args(const HardTermInputs& in) {
  return {in.labels, static_cast<acc_t*>(in.row_hard), in.status, static_cast<acc_t>(in.smoothing), in.factor};
}

// The online softmax of a set of values (raw maximum m, z = sum 2^((x - m) k)): a thread's, then the
// block's. Merging is symmetric in exact arithmetic; block_reduce gives every thread the same bits.
template <typename acc_t>
__device__ __forceinline__ void merge_softmax(acc_t& m, acc_t& z, acc_t m2, acc_t z2, acc_t k) {
  const acc_t mm = max_acc(m, m2);
  const acc_t r1 = m == mm ? acc_t(1) : exp2_acc((m - mm) * k);
  const acc_t r2 = m2 == mm ? acc_t(1) : exp2_acc((m2 - mm) * k);
  z = z * r1 + z2 * r2;
  m = mm;
}

// A thread's (then the block's) hard-term sums of a row's student logits: the online (m, Z_1) at
// temperature 1 (T != 1 only) and sum s (label smoothing only).
template <typename acc_t>
struct HardSums {
  acc_t m, z1, sum;
  // Four words: a block reduction moves states whole through shared memory, and the bucket kernel's
  // float state would otherwise end in 4 bytes of padding that nothing writes.
  acc_t unused;
};

template <typename acc_t>
__device__ __forceinline__ HardSums<acc_t> empty_hard_sums() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ void merge_hard_sums(HardSums<acc_t>& a, const HardSums<acc_t>& b) {
  merge_softmax(a.m, a.z1, b.m, b.z1, static_cast<acc_t>(kLog2E));
  a.sum += b.sum;
}

// Folds one step's packs of student logits into the sums. A NaN logit keeps m finite and makes z1 NaN
// (the soft term's statistics find such a row undefined anyway).
template <typename acc_t, typename P, int U>
__device__ __forceinline__ void hard_sums_step(HardSums<acc_t>& h, const P (&s)[U], const bool (&valid)[U],
                                               bool need_z1, bool need_sum) {
  constexpr int N = P::kSize;
  if (need_z1) {
    acc_t step_m = neg_inf<acc_t>();
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!valid[i]) continue;
#pragma unroll
      for (int j = 0; j < N; ++j) step_m = max_acc(step_m, to_acc(s[i].v[j]));
    }
    if (step_m > h.m) {
      h.z1 = h.m == neg_inf<acc_t>() ? acc_t(0) : h.z1 * exp2_acc((h.m - step_m) * static_cast<acc_t>(kLog2E));
      h.m = step_m;
    }
    const acc_t shift = finite_shift(h.m);
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!valid[i]) continue;
#pragma unroll
      for (int j = 0; j < N; ++j) h.z1 += exp2_acc((to_acc(s[i].v[j]) - shift) * static_cast<acc_t>(kLog2E));
    }
  }
  if (need_sum) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!valid[i]) continue;
#pragma unroll
      for (int j = 0; j < N; ++j) h.sum += to_acc(s[i].v[j]);
    }
  }
}

// CE of a row from the student's raw maximum m, log Z_1 (natural units), sum s and s_y.
template <typename acc_t>
__device__ __forceinline__ acc_t cross_entropy(acc_t m, acc_t log_z1, acc_t sum, acc_t s_y, acc_t eps, int64_t vocab) {
  acc_t ce = log_z1 + (acc_t(1) - eps) * (m - s_y);
  if (eps != acc_t(0)) ce += eps * (m - sum / static_cast<acc_t>(vocab));
  return ce;
}

// What the gradient pass needs of a row's hard term.
template <typename acc_t>
struct HardRow {
  acc_t q1_f;       // T = 1: f_h q_1 = (the soft term's q numerator of the element) q1_f
  acc_t q1_scale;   // T != 1: f_h q_1 = 2^((s - m) log2 e) q1_scale, i.e. f_h / Z_1
  acc_t m;          // T != 1: the raw student maximum
  acc_t uniform;    // f_h eps / V
  acc_t pull;       // f_h (1 - eps), taken from the label's element
  bool unit;        // T = 1
  acc_t f;          // f_h
};

// f_h (q_1 - eps / V) of one element, from the soft term's q numerator `kept` (T = 1) or its raw logit s.
template <typename acc_t>
__device__ __forceinline__ acc_t hard_element(const HardRow<acc_t>& h, acc_t kept, acc_t s) {
  const acc_t q1_f = h.unit ? kept * h.q1_f : exp2_acc((s - h.m) * static_cast<acc_t>(kLog2E)) * h.q1_scale;
  return q1_f - h.uniform;
}

// The hard term's label of a row, or -1 where it lies outside [0, V) (the row is then undefined: NaN
// loss and gradients, status kLabelOutOfRange, written by thread 0). Block-uniform.
template <typename acc_t>
__device__ __forceinline__ int64_t row_label(const HardTermArgs<acc_t>& hard, int64_t row, int64_t vocab, bool leader) {
  const int64_t y = hard.labels[row];
  const bool inside = y >= 0 && y < vocab;
  if (leader) hard.status[row] = inside ? 0 : kLabelOutOfRange;
  return inside ? y : -1;
}

// The rows a dense row kernel (KL, JSD) does not compute, block-uniform and touching no shared memory:
// a masked row (loss and hard term 0, gradients 0) and, with the hard term, a counted row whose label
// lies outside [0, V) (NaN everywhere; the host reports its status). Returns whether the row is done;
// otherwise `label` holds the row's label (0 without the hard term). The row's outputs are written by
// the `leader` thread (a cluster's blocks share a row: one thread of them all).
template <bool kHard, typename Args, typename FillGradients>
__device__ __forceinline__ bool row_skipped(const Args& args, int64_t row, int64_t& label,
                                            const FillGradients& fill_gradients, bool leader = threadIdx.x == 0) {
  using acc_t = std::remove_pointer_t<decltype(args.row_loss)>;
  label = 0;
  if (row_masked(args.mask, row)) {
    if (leader) {
      args.row_loss[row] = acc_t(0);
      if constexpr (kHard) {
        args.hard.row_hard[row] = acc_t(0);
        args.hard.status[row] = 0;
      }
    }
    fill_gradients(row, 0.0f);
    return true;
  }
  if constexpr (kHard) {
    label = row_label(args.hard, row, args.vocab, leader);
    if (label < 0) {
      if (leader) args.row_loss[row] = args.hard.row_hard[row] = static_cast<acc_t>(NAN);
      fill_gradients(row, NAN);
      return true;
    }
  }
  return false;
}

}  // namespace kl_fused::cuda
