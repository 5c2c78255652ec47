// CUDA device code as the host compiler sees it under the SIMT emulator: the qualifiers, the
// built-in variables, barriers, warp shuffles and memory intrinsics the kl_fused kernels use,
// each either a plain C++ equivalent or a call into the emulator's runtime (runtime.h).
// Included by csrc/cuda/device_compat.cuh when KL_FUSED_EMULATOR is defined.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simt/runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static __shared__ arrays are not emulated: use KL_FUSED_DYNAMIC_SHARED (device_compat.cuh).
#define __shared__ simt_static_shared_memory_is_not_emulated_use_KL_FUSED_DYNAMIC_SHARED

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
#define warpSize 32

// The call site names the barrier: threads of a block that wait at different __syncthreads are an
// error, as is a thread that exits while others wait.
#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)

// Vector types of the CUDA headers that kernels move through memory.
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) double2 { double x, y; };

namespace simt {

template <typename T>
__forceinline__ T shuffle_value(ShuffleKind kind, const char* file, int line, unsigned int mask, T value, int arg,
                                int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(kind, file, line, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace simt

#define __shfl_sync(mask, var, src, ...) \
  ::simt::shuffle_value(::simt::ShuffleKind::Idx, __FILE__, __LINE__, mask, var, src, ##__VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...) \
  ::simt::shuffle_value(::simt::ShuffleKind::Up, __FILE__, __LINE__, mask, var, delta, ##__VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...) \
  ::simt::shuffle_value(::simt::ShuffleKind::Down, __FILE__, __LINE__, mask, var, delta, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::simt::shuffle_value(::simt::ShuffleKind::Xor, __FILE__, __LINE__, mask, var, lane_mask, ##__VA_ARGS__)

// Cache-hinted global loads and stores: the hint has no meaning here, the access rules do.
template <typename T>
__forceinline__ T __ldg(const T* p) {
  ::simt::check_vector_access(p, sizeof(T), "__ldg");
  return *p;
}
template <typename T>
__forceinline__ T __ldcs(const T* p) {
  ::simt::check_vector_access(p, sizeof(T), "__ldcs");
  return *p;
}
template <typename T>
__forceinline__ void __stcs(T* p, T value) {
  ::simt::check_vector_access(p, sizeof(T), "__stcs");
  *p = value;
}

// 32-bit atomics (atomicOr, atomicAnd, atomicAdd). The emulator checks the access (bounds,
// alignment, initialisation) and records it as an atomic for the race checks; fibers run one at a
// time, so the read-modify-write that follows is never interleaved.
namespace simt {
template <typename Op>
__forceinline__ unsigned int atomic_rmw(unsigned int* p, Op op) {
  atomic_access(p, sizeof(unsigned int));
  const unsigned int current = __atomic_load_n(p, __ATOMIC_RELAXED);
  __atomic_store_n(p, op(current), __ATOMIC_RELAXED);
  return current;
}
}  // namespace simt
__forceinline__ unsigned int atomicOr(unsigned int* p, unsigned int v) {
  return ::simt::atomic_rmw(p, [v](unsigned int x) { return x | v; });
}
__forceinline__ unsigned int atomicAnd(unsigned int* p, unsigned int v) {
  return ::simt::atomic_rmw(p, [v](unsigned int x) { return x & v; });
}
__forceinline__ unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  return ::simt::atomic_rmw(p, [v](unsigned int x) { return x + v; });
}

// The thread-block cluster of cooperative_groups (sm_90), as the kernels call it:
//   namespace cg = cooperative_groups;
//   const cg::cluster_group cluster = cg::this_cluster();
//   cluster.block_rank(); cluster.num_blocks(); cluster.sync(); cluster.map_shared_rank(p, rank);
// sync() is named by its call site (the default arguments take the caller's file and line, and the
// always-inline call keeps the caller's address for the runtime), like __syncthreads.
namespace cooperative_groups {
struct cluster_group {
  unsigned int block_rank() const { return ::simt::cluster_block_rank(); }
  unsigned int num_blocks() const { return ::simt::cluster_blocks(); }
  __forceinline__ void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::simt::cluster_sync(file, line);
  }
  template <typename T>
  T* map_shared_rank(T* p, unsigned int rank) const {
    return static_cast<T*>(::simt::map_shared_rank(p, rank));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups
