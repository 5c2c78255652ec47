// The part of a row one block computes, and how the block's statistics become the row's: the one
// piece in which the one-block row kernels and their thread-block-cluster forms (sm_90+) differ.
// The row kernels (kl_div_cuda.cu's kl_row, jsd_cuda.cu's jsd_row) are written once over a span:
//
//   OneBlockRow  the whole row (`units` packs, the leading `cached` of them kept in the row cache);
//                the block's merged state is the row's; block_rows' barrier separates two rows.
//   ClusterRow   packs [begin, begin + units) of the row, all of them cached; each total the block
//                merges goes to one of its slots, and after a cluster barrier every block merges the
//                cluster's slots in rank order through distributed shared memory (the same order
//                everywhere, so every block holds the same bits of the row's total). cluster_rows
//                ends every row with a cluster barrier: the slots are read before the next row
//                rewrites them, and before a block exits.
//
// leader(): the one thread that writes the row's outputs (loss, cross-entropy, status).
//
// Bytes: a cluster of B blocks reads each input byte of a row from global memory once (its slices
// are disjoint and all cached) and moves B slot states per merge through distributed shared memory
// (tens of bytes: nothing next to the row).
#pragma once

#include <algorithm>
#include <cstdint>

#include "device_compat.cuh"

namespace kl_fused::cuda {

struct OneBlockRow {
  int64_t begin, units, cached;
  __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }
  // The row's total of a state the block has merged: the block's own.
  template <typename State, typename Merge>
  __device__ __forceinline__ State row_total(const State& mine, Merge, int = 0) const {
    return mine;
  }
};

// Bytes rounded up to a multiple of 16 (the alignment of every piece of the dynamic shared memory;
// for constants: device code computes it inline).
constexpr int round16(int bytes) { return (bytes + 15) / 16 * 16; }

#if KL_FUSED_DEVICE_HAS_CLUSTERS
struct ClusterRow {
  int64_t begin, units, cached;
  unsigned int rank, blocks;
  unsigned char* slots;  // this block's, in its shared memory; a total at slot_offset
  __device__ __forceinline__ bool leader() const { return rank == 0 && threadIdx.x == 0; }
  template <typename State, typename Merge>
  __device__ __forceinline__ State row_total(const State& mine, Merge merge_states, int slot_offset = 0) const {
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    auto* own = reinterpret_cast<State*>(slots + slot_offset);
    if (threadIdx.x == 0) *own = mine;
    cluster.sync();
    State total = *cluster.map_shared_rank(own, 0);
    for (unsigned int r = 1; r < blocks; ++r) total = merge_states(total, *cluster.map_shared_rank(own, r));
    return total;
  }
};

// This block's span of a row of `units` packs whose cluster blocks take `per_block` packs each (the
// launch plan's cached units), its `slot_bytes` of slots at the end of the scratch, where
// plan_rows_launch puts its extra_scratch_bytes (`scratch_bytes` is the whole scratch).
__device__ __forceinline__ ClusterRow cluster_row_span(int64_t units, int64_t per_block, unsigned char* shared,
                                                       int scratch_bytes, int slot_bytes) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned int rank = cluster.block_rank();
  const int64_t begin = std::min<int64_t>(units, rank * per_block);
  const int64_t slice = std::min<int64_t>(units, begin + per_block) - begin;
  return {begin, slice, slice, rank, cluster.num_blocks(), shared + scratch_bytes - (slot_bytes + 15) / 16 * 16};
}

// row_fn(row) for the rows of the cluster of `span`, grid-stride by clusters (a cluster is
// span.blocks consecutive blocks along x), every block of a cluster the same rows (cluster-uniform
// branches and barriers), each row followed by a cluster barrier.
template <typename RowFn>
__device__ __forceinline__ void cluster_rows(int64_t rows, const ClusterRow& span, RowFn&& row_fn) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  for (int64_t row = blockIdx.x / span.blocks; row < rows; row += gridDim.x / span.blocks) {
    row_fn(row);
    cluster.sync();
  }
}
#endif

}  // namespace kl_fused::cuda
