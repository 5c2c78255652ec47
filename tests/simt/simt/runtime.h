// The interface between the emulated CUDA code (cuda_device.h and cuda_host.h, compiled into the
// kernels' translation units with -fsanitize=thread) and the emulator's runtime (runtime.cpp,
// compiled without instrumentation). Everything a kernel asks of "the hardware" crosses here by
// value, so that the kernel's own memory accesses are the only ones the sanitizer sees.
#pragma once

#include <cstddef>
#include <cstdint>

namespace simt {

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- device side: the current fiber's view of the launch
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void* dynamic_shared();
void syncthreads(const char* file, int line);

// Thread-block clusters (sm_90): a launch's blocks in groups of cluster_blocks() consecutive ones
// (1-D grids) that run together. cluster_block_rank() is the block's place in its cluster; cluster_sync is
// barrier.cluster (arrive and wait) for every thread of every block of the cluster, named by its
// call site like __syncthreads; map_shared_rank(p, rank) is the address in the shared memory of the
// cluster's block `rank` at p's offset in the caller's own (distributed shared memory). A launch
// without a cluster is one of a single block.
unsigned int cluster_block_rank();
unsigned int cluster_blocks();
void cluster_sync(const char* file, int line);
void* map_shared_rank(const void* p, unsigned int rank);

enum class ShuffleKind { Idx, Up, Down, Xor };
// One lane's part of a warp shuffle of up to 8 bytes; returns the bits the lane receives once every
// lane named in `mask` has arrived at the same shuffle (lock-step at the intrinsic).
uint64_t shuffle(ShuffleKind kind, const char* file, int line, unsigned int mask, uint64_t bits, int arg, int width);

// A vector load/store intrinsic (__ldg, __ldcs, __stcs) of `bytes` at p: global memory only, and
// aligned to its size.
void check_vector_access(const void* p, std::size_t bytes, const char* intrinsic);

// The memory access of an atomic read-modify-write of `bytes` at p (atomicOr, atomicAnd, ...),
// checked like a plain access (bounds, alignment, initialisation) and recorded as a third kind for
// the race checks: it races with plain reads and writes of other threads, never with atomics.
// The caller then performs the operation; fibers run one at a time, so it is never interleaved.
void atomic_access(void* p, std::size_t bytes);

// PTX ex2.approx.ftz.f32 with its documented semantics: subnormal inputs and results flushed to
// zero, and an error as large as the documented bound (2 ulp), deterministic in the input.
float ex2_approx_ftz(float x);
// log2f, counted as one MUFU lg2 of the launch (what log2f of fp32 compiles to, with its range fix-up).
float log2_counted(float x);

// ---- host side
struct DeviceProperties {
  int sm_count;
  int max_shared_optin;    // bytes a kernel may opt in to with cudaFuncSetAttribute
  int64_t max_grid_x;
  bool cluster_launch;     // thread-block clusters (sm_90+)
};
DeviceProperties device_properties();

using KernelEntry = void (*)(const void* params);
// kernel_id identifies the kernel (its address), pretty_name is __PRETTY_FUNCTION__ of a template
// naming it. Runs the whole grid before returning; throws c10::Error on a launch failure or
// whatever the sanitizer finds.
// cluster: blocks per cluster along x (1: none); a grid of clusters must be 1-D.
void launch(const char* pretty_name, const void* kernel_id, dim3 grid, dim3 block, int64_t shared_bytes,
            const void* params, std::size_t params_bytes, KernelEntry entry, unsigned int cluster = 1);
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
void set_max_dynamic_shared(const char* pretty_name, const void* kernel_id, int bytes);
// Called once per kernel instantiation that host code can launch (at library load).
bool register_launchable(const char* pretty_name);

}  // namespace simt
