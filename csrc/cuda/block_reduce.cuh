// Reductions of a small per-thread state (any trivially copyable struct of 4-byte words: a float,
// a few sums, an online-softmax state) over a warp and over the block, with a combine that is
// commutative in exact arithmetic. In floating point it need not be: where a*b + c is contracted
// into one fused multiply-add (nvcc's default, -fmad=true), combine(a, b) and combine(b, a) may
// round differently, and so may the lanes of a butterfly. block_reduce therefore gives every thread
// one lane's result, so that the whole block holds the same bits and may branch on them.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_compat.cuh"

namespace kl_fused::cuda {

// A state moved between lanes word by word: shuffle(word) is one warp shuffle of a 4-byte word.
template <typename State, typename Shuffle>
__device__ __forceinline__ State shuffle_words(const State& state, const Shuffle& shuffle) {
  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) % 4 == 0, "states move as 4-byte words");
  constexpr int kWords = sizeof(State) / 4;
  uint32_t words[kWords];
  memcpy(words, &state, sizeof(State));
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = shuffle(words[i]);
  State other;
  memcpy(&other, words, sizeof(State));
  return other;
}

// The state of the lane `offset` away.
template <typename State>
__device__ __forceinline__ State shuffle_xor(const State& state, int offset) {
  return shuffle_words(state, [offset](uint32_t word) { return __shfl_xor_sync(0xffffffffu, word, offset); });
}

// Every lane returns combine() of the warp's 32 states (butterfly), each lane its own rounding of it.
template <typename State, typename Combine>
__device__ __forceinline__ State warp_reduce(State state, const Combine& combine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) state = combine(state, shuffle_xor(state, offset));
  return state;
}

// Every thread of the block returns combine() of all its threads' states, in a fixed order, with
// the same bits: lane 0's result, which is the same in every warp (each reduces the same per-warp
// states). scratch holds blockDim.x / 32 states in shared memory; the caller synchronises before
// scratch is written again (the row loop's barrier does).
template <typename State, typename Combine>
__device__ __forceinline__ State block_reduce(State state, const Combine& combine, const State& identity,
                                              State* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  state = warp_reduce(state, combine);
  if (lane == 0) scratch[warp] = state;
  __syncthreads();
  // Each warp reduces the per-warp states itself: one barrier instead of two.
  const State total = warp_reduce(lane < warps ? scratch[lane] : identity, combine);
  return shuffle_words(total, [](uint32_t word) { return __shfl_sync(0xffffffffu, word, 0); });
}

}  // namespace kl_fused::cuda
