// The shape every kl_fused row kernel shares, written once; each kernel supplies only its math.
//
// One block per row, grid-stride over the rows (block_rows). A pass streams the packs of
// the row's inputs: each thread takes units threadIdx.x, + blockDim.x, ..., U of them per step, all
// loaded before any is used so that several loads are in flight (stream_packs). A kernel whose math
// needs the row more than once keeps a row cache in shared memory: its first pass parks the
// leading `cached` packs of each input there (first_pass), and later passes read those on-chip and
// only the rest from global memory, most of it from L2 (later_pass; one followed by another pass
// reads that rest in the opposite order to the pass before it: most recently read first). Each
// thread handles the same units in every pass, so a thread reads back only cache entries it wrote
// itself.
//
// Bytes: each input is read from global memory once when the row fits the cache (2 V e for two
// inputs); packs beyond the cache are read once more per later pass, from L2 when the rows in
// flight fit there.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device_compat.cuh"
#include "launch_plan.h"
#include "packs.cuh"

namespace kl_fused::cuda {

// Tuning shared by the row kernels.
// fp64 exp2/log2 are software routines: at 1024 threads (64 registers each) they spill.
template <typename scalar_t>
constexpr int kMaxRowThreads = sizeof(scalar_t) == 8 ? 512 : kMaxThreads;
// The launch bound's minimum of one resident block per SM lets ptxas use the whole register budget
// of kMaxRowThreads (128 registers at 512 threads): without it, ptxas held the fp64 vector
// kernel to 64 registers on sm_80 and spilled (tests/cuda_resources.py).
constexpr int kMinRowBlocksPerSM = 1;
// Packs loaded per thread before any of them is used, so several loads are in flight per thread:
// 2 x 16 bytes per tensor on the vector path, 8 elements on the scalar one.
template <int N>
constexpr int kUnroll = N == 1 ? 8 : 2;
// The gradient pass holds more per pack (two output packs, the row constants): one 16-byte pack
// per tensor per step keeps it within 64 registers at 1024 threads.
template <int N>
constexpr int kGradUnroll = N == 1 ? 2 : 1;

// Where a pass reads its packs: global memory to be read again (kept in L2), global memory read
// for the last time (evict-first), or the shared-memory row cache.
enum class Source { kGlobal, kGlobalLastUse, kCache };

// The unit of packs[.][i] in a thread step that starts at unit `first`.
__device__ __forceinline__ int64_t step_unit(int64_t first, int i) {
  return first + static_cast<int64_t>(i) * blockDim.x;
}

// fn(packs, valid, first) over units [begin, end) of the rows in[0..kIn): each thread step loads
// P packs[kIn][U] (packs[t][i] is unit step_unit(first, i) of input t; valid[i] says whether that
// unit is below end) before fn uses any of them. kStore also parks every pack loaded in cache[.]
// at the same unit. kBackward takes the block's steps from the last to the first (each thread still
// handles the same units), so that a pass starts where the previous one ended. (Plain arrays, not a
// struct holding them: nvcc kept the struct's packs out of registers and the kernels spilled.)
template <int U, Source kSource, bool kStore, bool kBackward = false, typename P, int kIn, typename Fn>
__device__ __forceinline__ void stream_packs(const P* const (&in)[kIn], P* const (&cache)[kIn], int64_t begin,
                                             int64_t end, Fn&& fn) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * U;
  // Backward: from this thread's unit in the block's last step down to its unit in the first (one
  // induction variable, as forward: a step count beside it made the fp64 kernels spill on sm_90).
  const int64_t start = !kBackward ? begin + threadIdx.x
                        : end > begin ? begin + (end - begin - 1) / stride * stride + threadIdx.x
                                      : begin - 1;
  for (int64_t first = start; kBackward ? first >= begin : first < end; first += kBackward ? -stride : stride) {
    if (kBackward && first >= end) continue;
    P packs[kIn][U];
    bool valid[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int64_t unit = step_unit(first, i);
      valid[i] = unit < end;
      if (!valid[i]) continue;
#pragma unroll
      for (int t = 0; t < kIn; ++t) {
        if constexpr (kSource == Source::kCache) {
          packs[t][i] = cache[t][unit];
        } else {
          packs[t][i] = load_pack<kSource == Source::kGlobalLastUse>(in[t], unit);
        }
      }
    }
    if constexpr (kStore) {
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (!valid[i]) continue;
#pragma unroll
        for (int t = 0; t < kIn; ++t) cache[t][step_unit(first, i)] = packs[t][i];
      }
    }
    fn(packs, valid, first);
  }
}

// The only pass over the row: every pack read from global memory once, evict-first.
template <int U, typename P, int kIn, typename Fn>
__device__ __forceinline__ void only_pass(const P* const (&in)[kIn], int64_t units, Fn&& fn) {
  P* const no_cache[kIn] = {};
  stream_packs<U, Source::kGlobalLastUse, false>(in, no_cache, 0, units, fn);
}

// The first of several passes: packs [0, cached) go to the row cache and are never read from global
// memory again; the rest is read last, so that it is the most recent data in L2 when a later pass
// comes back for it. The caller synchronises (a block reduction does) before a later pass reads
// the cache.
template <int U, typename P, int kIn, typename Fn>
__device__ __forceinline__ void first_pass(const P* const (&in)[kIn], P* const (&cache)[kIn], int64_t cached,
                                           int64_t units, Fn&& fn) {
  stream_packs<U, Source::kGlobalLastUse, true>(in, cache, 0, cached, fn);
  stream_packs<U, Source::kGlobal, false>(in, cache, cached, units, fn);
}

// A later pass: the uncached packs first, then the cached ones. A pass with another after it (JSD's
// second) reads the uncached ones in the order opposite to the previous pass's (kTailBackward: from
// the row's end after a forward pass), so that the most recently read come first and are still in
// L2 when the share of L2 holds only part of them (read in the same order, an LRU loses every one
// of them once the tail exceeds it); a third pass goes forward again. The last pass (kLast) loads
// evict-first, which in the L2 model keeps the lines it has not reached yet in either order, so it
// reads forward by default: its backward loop cost two registers more, and spills on sm_90
// (kl_rows_kernel<bf16, 8, true>, the fp64 hard kernels).
template <int U, bool kLast, bool kTailBackward = !kLast, typename P, int kIn, typename Fn>
__device__ __forceinline__ void later_pass(const P* const (&in)[kIn], P* const (&cache)[kIn], int64_t cached,
                                           int64_t units, Fn&& fn) {
  stream_packs<U, kLast ? Source::kGlobalLastUse : Source::kGlobal, false, kTailBackward>(in, cache, cached, units, fn);
  stream_packs<U, Source::kCache, false>(in, cache, 0, cached, fn);
}

// pass(need_x, need_y) with the gradients wanted (at least one pointer is set) as compile-time flags, so
// that a gradient pass compiles only the arithmetic of the gradients it writes.
template <typename P, typename Pass>
__device__ __forceinline__ void with_wanted_gradients(const P* gx, const P* gy, Pass&& pass) {
  if (gx != nullptr && gy != nullptr) {
    pass(std::true_type{}, std::true_type{});
  } else if (gx != nullptr) {
    pass(std::true_type{}, std::false_type{});
  } else {
    pass(std::false_type{}, std::true_type{});
  }
}

// The block's rows, grid-stride, with a barrier between one row and the next (the next row
// overwrites the reduction scratch and the row cache):
//   for (const int64_t row : block_rows(rows)) { ... }
// Every thread of a block runs the same rows, so the barrier is reached by all of them, also after
// a `continue` (a masked row).
struct BlockRowIterator {
  int64_t row;
  __device__ __forceinline__ int64_t operator*() const { return row; }
  __device__ __forceinline__ bool operator!=(const BlockRowIterator& end) const { return row < end.row; }
  __device__ __forceinline__ BlockRowIterator& operator++() {
    __syncthreads();
    row += gridDim.x;
    return *this;
  }
};

struct BlockRows {
  int64_t rows;
  __device__ __forceinline__ BlockRowIterator begin() const { return {static_cast<int64_t>(blockIdx.x)}; }
  __device__ __forceinline__ BlockRowIterator end() const { return {rows}; }
};

__device__ __forceinline__ BlockRows block_rows(int64_t rows) { return {rows}; }

__device__ __forceinline__ bool row_masked(const bool* mask, int64_t row) { return mask != nullptr && !mask[row]; }

}  // namespace kl_fused::cuda
