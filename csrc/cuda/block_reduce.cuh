// Reductions of a small per-thread state (any trivially copyable struct of 4-byte words: a float,
// a few sums, an online-softmax state) over a warp and over the block, with a combine that must be
// commutative so that every lane of the butterfly ends with bit-identical results.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_compat.cuh"

namespace kl_fused::cuda {

// The state of the lane `offset` away, word by word.
template <typename State>
__device__ __forceinline__ State shuffle_xor(const State& state, int offset) {
  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) % 4 == 0, "states move as 4-byte words");
  constexpr int kWords = sizeof(State) / 4;
  uint32_t words[kWords];
  memcpy(words, &state, sizeof(State));
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __shfl_xor_sync(0xffffffffu, words[i], offset);
  State other;
  memcpy(&other, words, sizeof(State));
  return other;
}

// Every lane returns combine() of the warp's 32 states (butterfly).
template <typename State, typename Combine>
__device__ __forceinline__ State warp_reduce(State state, const Combine& combine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) state = combine(state, shuffle_xor(state, offset));
  return state;
}

// Every thread of the block returns combine() of all its threads' states, in a fixed order.
// scratch holds blockDim.x / 32 states in shared memory; the caller synchronises before scratch is
// written again (the row loop's barrier does).
template <typename State, typename Combine>
__device__ __forceinline__ State block_reduce(State state, const Combine& combine, const State& identity,
                                              State* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  state = warp_reduce(state, combine);
  if (lane == 0) scratch[warp] = state;
  __syncthreads();
  // Each warp reduces the per-warp states itself: one barrier instead of two.
  return warp_reduce(lane < warps ? scratch[lane] : identity, combine);
}

}  // namespace kl_fused::cuda
