// What the kl_fused CUDA kernels need beyond C++ that differs between the two compilers that build
// them: nvcc for the GPU, and the host compiler for the SIMT emulator of the tests
// (tests/simt/, which defines KL_FUSED_EMULATOR). Everything else in csrc/cuda/ is the same source
// text in both builds; keep this file the only place where they part.
#pragma once

#if defined(KL_FUSED_EMULATOR)
#include "simt/cuda_device.h"  // threadIdx, __syncthreads, warp shuffles, __ldg, ... on fibers
#else
#include <cooperative_groups.h>
#endif

// Whether the device code being compiled may use thread-block clusters (cooperative_groups'
// this_cluster(), distributed shared memory): sm_90 and later, and the emulator. A cluster kernel's
// body is compiled only then; its host code launches it only on devices that have clusters
// (DeviceLimits::cluster_launch). nvcc's host pass (no __CUDA_ARCH__) never runs device code.
#if defined(KL_FUSED_EMULATOR) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define KL_FUSED_DEVICE_HAS_CLUSTERS 1
#else
#define KL_FUSED_DEVICE_HAS_CLUSTERS 0
#endif

namespace kl_fused::cuda {

// 2^x with PTX ex2.approx.ftz.f32: one MUFU instruction, documented error of at most 2 ulp over the
// full range, subnormal inputs and results flushed to zero, -inf -> +0, NaN -> NaN.
__device__ __forceinline__ float ex2_approx_ftz(float x) {
#if defined(KL_FUSED_EMULATOR)
  return ::simt::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// log2 of fp32 (log2f: one MUFU lg2 plus a range fix-up); the emulator counts the calls.
__device__ __forceinline__ float log2_f32(float x) {
#if defined(KL_FUSED_EMULATOR)
  return ::simt::log2_counted(x);
#else
  return ::log2f(x);
#endif
}

}  // namespace kl_fused::cuda

// `type* name` pointing at the block's dynamic shared memory (the launch's shared-memory size),
// 16-byte aligned.
#if defined(KL_FUSED_EMULATOR)
#define KL_FUSED_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::simt::dynamic_shared())
#else
#define KL_FUSED_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
