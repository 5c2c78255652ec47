// Launch plans of the kl_fused CUDA kernels: threads per block, grid, dynamic shared memory and
// the vectorised-or-scalar choice, as plain C++ functions of the problem and the device's limits.
// Nothing here touches the CUDA runtime, so the same decisions run on the GPU and under the SIMT
// emulator of the tests, which can shrink the limits (a small opt-in shared memory forces the
// partially cached row, a small grid the grid-stride loop).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../kl_div_common.h"

namespace kl_fused::cuda {

// What a launch plan needs to know about the device.
struct DeviceLimits {
  int sm_count = 0;
  int max_shared_optin = 0;    // bytes of dynamic shared memory a kernel may opt in to
  int64_t max_grid_x = 0;      // largest gridDim.x
  bool cluster_launch = false; // thread-block clusters with distributed shared memory (sm_90+)
};

constexpr int kMaxThreads = 1024;
constexpr int kMinThreads = 32;
constexpr int kDefaultSharedBytes = 48 * 1024;  // above this a kernel must opt in

// Smallest power of two (kMinThreads..max_threads) giving each thread about `per_thread` items.
inline int block_threads(int64_t items, int64_t per_thread, int max_threads = kMaxThreads) {
  int threads = kMinThreads;
  while (threads < max_threads && threads * per_thread < items) threads *= 2;
  return threads;
}

// One block per row up to the device's grid limit; the kernels loop over the rest (grid-stride).
inline unsigned int grid_blocks(int64_t rows, const DeviceLimits& limits) {
  return static_cast<unsigned int>(std::min<int64_t>(rows, limits.max_grid_x));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every row of x starts on a 16-byte boundary and holds a whole number of `pack`-element packs.
inline bool rows_vectorizable(const void* base, const RowLayout& layout, int64_t vocab, int64_t pack) {
  if (!aligned16(base) || vocab % pack != 0) return false;
  for (int d = 0; d < layout.ndim; ++d) {
    if (layout.strides[d] % pack != 0) return false;
  }
  return true;
}

// The row kernel of kl_div_logits: one block per row, each thread streaming about
// `per_thread_units` packs; per-warp merge states first in shared memory, then (with a gradient)
// the row cache: the whole row when it fits in the opt-in shared memory (2 V e bytes: the gradient
// pass then reads nothing from global memory), else as many leading packs as fit. A kernel that
// streams one input instead of two says so (`inputs`), and one that keeps more per row in shared
// memory (sparse_kl_cuda.cu: the support's bitmap) reserves it in the scratch (`extra_scratch_bytes`).
struct RowsLaunch {
  int threads = 0;
  unsigned int grid = 0;
  int scratch_bytes = 0;       // per-warp merge states, rounded up to 16 bytes
  int64_t cached_units = 0;    // leading packs of each input kept in shared memory
  int64_t shared_bytes = 0;    // scratch + the row cache of both inputs
  bool opt_in = false;         // shared_bytes is above the default limit
};

inline RowsLaunch plan_rows_launch(int64_t rows, int64_t units, int64_t per_thread_units, int max_threads,
                                   int state_bytes, int pack_bytes, bool cache_rows,
                                   const DeviceLimits& limits, int inputs = 2, int extra_scratch_bytes = 0) {
  RowsLaunch plan;
  plan.threads = block_threads(units, per_thread_units, max_threads);
  plan.grid = grid_blocks(rows, limits);
  plan.scratch_bytes = (plan.threads / 32 * state_bytes + 15) / 16 * 16 + (extra_scratch_bytes + 15) / 16 * 16;
  if (cache_rows) {
    const int64_t budget = std::max<int64_t>(limits.max_shared_optin - plan.scratch_bytes, 0);
    plan.cached_units = std::min<int64_t>(units, budget / (inputs * static_cast<int64_t>(pack_bytes)));
  }
  plan.shared_bytes = plan.scratch_bytes + inputs * plan.cached_units * pack_bytes;
  plan.opt_in = plan.shared_bytes > kDefaultSharedBytes;
  return plan;
}

// A row kernel whose row, too wide for one block's shared memory, is spread over a thread-block
// cluster (sm_90+): each of `blocks` blocks streams and caches a slice of ceil(units / blocks)
// packs (its scratch also holds `slot_bytes` that the cluster's other blocks read through
// distributed shared memory), so every input byte is read from global memory once. The fewest
// blocks whose slices fit, up to kMaxClusterBlocks (the portable cluster size); blocks == 1 when
// the device has no clusters or no cluster is enough (the one-block kernel then caches what fits).
constexpr int kMaxClusterBlocks = 8;

struct ClusterRowsLaunch {
  int blocks = 1;              // per cluster; 1: no cluster launch
  RowsLaunch block;            // one block's plan for its slice (grid: every cluster's blocks)
};

inline ClusterRowsLaunch plan_cluster_rows_launch(int64_t rows, int64_t units, int64_t per_thread_units,
                                                  int max_threads, int state_bytes, int pack_bytes,
                                                  int slot_bytes, const DeviceLimits& limits, int inputs = 2) {
  ClusterRowsLaunch plan;
  if (!limits.cluster_launch) return plan;
  for (int blocks = 2; blocks <= kMaxClusterBlocks; ++blocks) {
    const int64_t slice = (units + blocks - 1) / blocks;
    const RowsLaunch block = plan_rows_launch(rows, slice, per_thread_units, max_threads, state_bytes, pack_bytes,
                                              true, limits, inputs, slot_bytes);
    if (block.cached_units < slice) continue;
    plan.blocks = blocks;
    plan.block = block;
    plan.block.grid = static_cast<unsigned int>(std::min<int64_t>(rows, limits.max_grid_x / blocks) * blocks);
    return plan;
  }
  return plan;
}

}  // namespace kl_fused::cuda
