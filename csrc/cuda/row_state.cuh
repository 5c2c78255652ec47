// The mergeable per-row statistics of the KL kernels: an online softmax of two distributions plus
// the KL numerator, which each thread accumulates over its share of a row and the block merges.
//
// Roles. The kernels never say "student"/"teacher": x is the distribution the expectation is
// taken over (teacher for forward KL, student for reverse), y the other one. Then, per row,
//   KL = sum p_x (log p_x - log p_y)
//   grad_x = p_x (log p_x - log p_y - KL) f,   grad_y = (p_y - p_x) f
// which is both directions of kl_div_common.h at once (forward: x = t, y = s; reverse: x = s,
// y = t).
//
// Units. Exponentials are ex2 (one MUFU instruction for fp32), so shifted logits are kept in log2
// units: x' = (x_raw - m_x) * k with k = log2(e) / T. Subtracting the raw maximum before scaling
// keeps logits of +-1e4 exact near the maximum and makes a row's maximum exactly 0 after the shift.
#pragma once

#include "block_reduce.cuh"
#include "device_math.cuh"

namespace kl_fused::cuda {

// Statistics of a set of elements of one row (a thread's elements, a warp's, the block's):
//   mx, my  raw maxima (before scaling by k)                        -inf while empty
//   zx = sum 2^x',  zy = sum 2^y'                                    x' = (x - shift(mx)) k
//   w  = sum over 2^x' > 0 of 2^x' (x' - y')                         in log2 units
// Two states merge exactly, in any order, which is what lets each thread stream its elements once.
//
// Moving a state to larger maxima mx2 >= mx, my2 >= my: every term's weight gains the factor
// rx = 2^((mx - mx2) k) and every difference x' - y' changes by the same amount, dy - dx with
// dx = (shift(mx2) - shift(mx)) k, dy likewise. Hence
//   zx <- rx zx,  zy <- ry zy,  w <- rx (w + zx (dy - dx)).
// Edge cases, each chosen to agree with the CPU kernels' two-pass arithmetic:
//   - a maximum still -inf: rx = 0 (or 1 if it stays -inf; never 2^(-inf + inf) = NaN), and
//     shift() keeps dx, dy finite, so an empty state merges as the identity;
//   - rx underflows to 0: every term of w now has weight 0 in the final frame, where the CPU
//     kernel drops them too ("zero where p == 0"), so w <- 0 even if it was +inf (0 * inf = NaN);
//   - a NaN element makes zx or zy NaN (its own exponential is NaN), and rx * NaN stays NaN, so
//     the row's loss is NaN even when w is reset above;
//   - y' = -inf where 2^x' > 0 makes w = +inf (q = 0 where p > 0), which survives rescaling.
template <typename acc_t>
struct RowState {
  acc_t mx, my, zx, zy, w;
};

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> empty_row_state() {
  return {neg_inf<acc_t>(), neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ void rescale(RowState<acc_t>& s, acc_t mx, acc_t my, acc_t k) {
  const acc_t rx = mx == s.mx ? acc_t(1) : exp2_acc((s.mx - mx) * k);
  const acc_t ry = my == s.my ? acc_t(1) : exp2_acc((s.my - my) * k);
  const acc_t dx = (finite_shift(mx) - finite_shift(s.mx)) * k;
  const acc_t dy = (finite_shift(my) - finite_shift(s.my)) * k;
  s.w = rx == acc_t(0) ? acc_t(0) : rx * (s.w + s.zx * (dy - dx));
  s.zx *= rx;
  s.zy *= ry;
  s.mx = mx;
  s.my = my;
}

// Symmetric in a and b in exact arithmetic (both are rescaled, then added); contracted into fused
// multiply-adds, the two orders may round differently (block_reduce.cuh makes the block agree).
template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> merge(RowState<acc_t> a, RowState<acc_t> b, acc_t k) {
  const acc_t mx = max_acc(a.mx, b.mx), my = max_acc(a.my, b.my);
  rescale(a, mx, my, k);
  rescale(b, mx, my, k);
  return {mx, my, a.zx + b.zx, a.zy + b.zy, a.w + b.w};
}

template <typename acc_t>
struct MergeRowStates {
  acc_t k;
  __device__ __forceinline__ RowState<acc_t> operator()(const RowState<acc_t>& a, const RowState<acc_t>& b) const {
    return merge(a, b, k);
  }
};

// Every thread of the block returns the row's state, with the same bits (block_reduce.cuh).
template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> block_merge(const RowState<acc_t>& s, acc_t k, RowState<acc_t>* scratch) {
  return block_reduce(s, MergeRowStates<acc_t>{k}, empty_row_state<acc_t>(), scratch);
}

}  // namespace kl_fused::cuda
