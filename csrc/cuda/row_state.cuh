// Device-side building blocks of the kl_fused CUDA kernels: the mergeable per-row statistics
// (online softmax for two distributions plus the KL numerator) and 16-byte memory access.
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

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "device_compat.cuh"

namespace kl_fused::cuda {

constexpr double kLog2E = 1.4426950408889634;  // log2(e)
constexpr double kLn2 = 0.6931471805599453;     // ln(2)

// <= 2 ulp; -inf -> +0, NaN -> NaN. Results below 2^-126 flush to 0: such terms are below fp32
// resolution of a sum that contains the row's maximum (which contributes about 1).
__device__ __forceinline__ float exp2_acc(float x) { return ex2_approx_ftz(x); }
__device__ __forceinline__ double exp2_acc(double x) { return ::exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return ::log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return ::log2(x); }
// fmax ignores NaN on purpose: a NaN element keeps the running maximum finite and instead turns
// its exponential, hence Z, into NaN, which every later rescale and merge preserves.
__device__ __forceinline__ float max_acc(float a, float b) { return ::fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return ::fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// The shift actually subtracted from raw logits: the running maximum, or 0 while every value seen
// is -inf (so that -inf - shift stays -inf instead of becoming NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t finite_shift(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

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

// Symmetric in a and b (both are rescaled, then added), so every lane of a butterfly ends with
// bit-identical results.
template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> merge(RowState<acc_t> a, RowState<acc_t> b, acc_t k) {
  const acc_t mx = max_acc(a.mx, b.mx), my = max_acc(a.my, b.my);
  rescale(a, mx, my, k);
  rescale(b, mx, my, k);
  return {mx, my, a.zx + b.zx, a.zy + b.zy, a.w + b.w};
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> warp_merge(RowState<acc_t> s, acc_t k) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const RowState<acc_t> other{
        __shfl_xor_sync(0xffffffffu, s.mx, offset), __shfl_xor_sync(0xffffffffu, s.my, offset),
        __shfl_xor_sync(0xffffffffu, s.zx, offset), __shfl_xor_sync(0xffffffffu, s.zy, offset),
        __shfl_xor_sync(0xffffffffu, s.w, offset)};
    s = merge(s, other, k);
  }
  return s;
}

// Every thread of the block returns the row's state (bit-identical, fixed merge order).
// scratch holds blockDim.x / 32 states; the caller synchronises before scratch is written again.
template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> block_merge(RowState<acc_t> s, acc_t k,
                                                       RowState<acc_t>* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  s = warp_merge(s, k);
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  // Each warp merges the per-warp states itself: one barrier instead of two.
  return warp_merge(lane < warps ? scratch[lane] : empty_row_state<acc_t>(), k);
}

// N consecutive elements moved as one access: 16 bytes when the row allows it, else one element.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// kLastUse: the data will not be read from global memory again (evict-first), otherwise it is
// read again by the gradient pass and should stay in L2.
template <bool kLastUse, typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const Pack<T, N>* base, int64_t unit) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    const uint4* src = reinterpret_cast<const uint4*>(base) + unit;
    const uint4 raw = kLastUse ? __ldcs(src) : __ldg(src);
    Pack<T, N> out;
    memcpy(&out, &raw, 16);
    return out;
  } else {
    return base[unit];
  }
}

// Gradients are not read again by this kernel (backward reads them much later): evict-first, so
// they do not push the logits that the gradient pass re-reads out of L2.
template <typename T, int N>
__device__ __forceinline__ void store_pack(Pack<T, N>* base, int64_t unit,
                                           const Pack<T, N>& value) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    uint4 raw;
    memcpy(&raw, &value, 16);
    __stcs(reinterpret_cast<uint4*>(base) + unit, raw);
  } else {
    base[unit] = value;
  }
}

}  // namespace kl_fused::cuda
