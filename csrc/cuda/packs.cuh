// 16-byte memory access of the kl_fused CUDA kernels: N consecutive elements moved as one access
// when the row allows it (16-byte aligned, whole packs), else one element at a time (N = 1).
#pragma once

#include <cstdint>
#include <cstring>

#include "device_compat.cuh"

namespace kl_fused::cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  using value_type = T;
  static constexpr int kSize = N;
  T v[N];
};

// kLastUse: the data will not be read from global memory again (evict-first), otherwise it is
// read again by a later pass and should stay in L2.
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

// Outputs are not read again by the kernel that writes them (backward reads them much later):
// evict-first, so they do not push inputs that a later pass re-reads out of L2.
template <typename T, int N>
__device__ __forceinline__ void store_pack(Pack<T, N>* base, int64_t unit, const Pack<T, N>& value) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    uint4 raw;
    memcpy(&raw, &value, 16);
    __stcs(reinterpret_cast<uint4*>(base) + unit, raw);
  } else {
    base[unit] = value;
  }
}

// Every element of a row (units packs) set to value, by the block's threads.
template <typename T, int N>
__device__ __forceinline__ void fill_row(Pack<T, N>* row, int64_t units, T value) {
  Pack<T, N> pack;
#pragma unroll
  for (int j = 0; j < N; ++j) pack.v[j] = value;
  for (int64_t unit = threadIdx.x; unit < units; unit += blockDim.x) store_pack(row, unit, pack);
}

}  // namespace kl_fused::cuda
