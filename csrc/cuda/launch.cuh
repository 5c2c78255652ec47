// The host side of a kernel launch, behind one small interface that two runtimes implement: the
// CUDA runtime (through c10::cuda: current stream, device guard, launch check) and the SIMT
// emulator of the tests (tests/simt/, with KL_FUSED_EMULATOR defined), which runs the launch on
// CPU fibers with sanitizer checks. The op implementations and their launch plans are written once
// against this interface, so the emulator exercises the same host code path as the GPU.
//
//   DeviceGuard guard(device);                       select the tensors' device
//   Stream stream = current_stream(device);          the stream ATen uses
//   DeviceLimits limits = device_limits(device);     SMs, opt-in shared memory, max grid
//   allow_dynamic_shared<kernel>(bytes);             opt a kernel in to > 48 KB of shared memory
//   launch_kernel<kernel>(grid, block, shared_bytes, stream, args...);   launch, then check it
//   launch_cluster_kernel<kernel>(grid, cluster, block, shared_bytes, stream, args...);
//                                                    the same in thread-block clusters (sm_90+)
//   max_active_clusters<kernel>(cluster, block, shared_bytes, stream)
//                                                    how many such clusters fit on the device at once
//
// KL_FUSED_CUDA_LIBRARY / KL_FUSED_CUDA_DISPATCH_KEY name where TORCH_LIBRARY_IMPL registers the
// CUDA implementations: kl_fused/CUDA on the GPU, the emulator's own namespace on its CPU tensors.
#pragma once

#include "launch_plan.h"

#if defined(KL_FUSED_EMULATOR)
#include "simt/cuda_host.h"

#define KL_FUSED_CUDA_LIBRARY kl_fused_emulated
#define KL_FUSED_CUDA_DISPATCH_KEY CPU

namespace kl_fused::cuda {
using Stream = ::simt::Stream;
using DeviceGuard = ::simt::DeviceGuard;
using ::simt::allow_dynamic_shared;
using ::simt::current_stream;
using ::simt::launch_cluster_kernel;
using ::simt::launch_kernel;

// The emulated device holds one row-kernel block per SM (their registers allow no more): a cluster
// of `cluster` blocks fits sm_count / cluster times. Refused shapes are the launch's to report.
template <auto kKernel>
int max_active_clusters(unsigned int cluster, int, int64_t, Stream) {
  const ::simt::DeviceProperties props = ::simt::device_properties();
  return props.cluster_launch ? props.sm_count / static_cast<int>(cluster) : 0;
}

// The emulated device's limits, which a test may shrink.
inline DeviceLimits device_limits(int) {
  const ::simt::DeviceProperties props = ::simt::device_properties();
  DeviceLimits limits;
  limits.sm_count = props.sm_count;
  limits.max_shared_optin = props.max_shared_optin;
  limits.max_grid_x = props.max_grid_x;
  limits.cluster_launch = props.cluster_launch;
  return limits;
}
}  // namespace kl_fused::cuda

#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/Device.h>

#define KL_FUSED_CUDA_LIBRARY kl_fused
#define KL_FUSED_CUDA_DISPATCH_KEY CUDA

namespace kl_fused::cuda {

using Stream = cudaStream_t;

struct DeviceGuard {
  explicit DeviceGuard(c10::Device device) : guard(device) {}
  c10::cuda::OptionalCUDAGuard guard;
};

inline Stream current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }

inline DeviceLimits device_limits(int device) {
  DeviceLimits limits;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.max_shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  int max_grid_x = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_grid_x, cudaDevAttrMaxGridDimX, device));
  limits.max_grid_x = max_grid_x;
  int cluster_launch = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device));
  limits.cluster_launch = cluster_launch != 0;
  return limits;
}

// Always the device's limit, never one launch's size: the same value from every host thread, so
// concurrent launches of different sizes cannot undercut each other.
template <auto kKernel>
void allow_dynamic_shared(int bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

template <auto kKernel, typename... Args>
void launch_kernel(unsigned int grid, int block, int64_t shared_bytes, Stream stream, const Args&... args) {
  kKernel<<<grid, block, static_cast<size_t>(shared_bytes), stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The launch configuration of a kernel in clusters of `cluster` blocks along x (sm_90+).
struct ClusterConfig {
  cudaLaunchAttribute attribute{};
  cudaLaunchConfig_t config{};
  ClusterConfig(unsigned int grid, unsigned int cluster, int block, int64_t shared_bytes, Stream stream) {
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.gridDim = dim3(grid);
    config.blockDim = dim3(static_cast<unsigned int>(block));
    config.dynamicSmemBytes = static_cast<size_t>(shared_bytes);
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  ClusterConfig(const ClusterConfig&) = delete;  // config.attrs points into this object
};

template <auto kKernel>
int max_active_clusters(unsigned int cluster, int block, int64_t shared_bytes, Stream stream) {
  const ClusterConfig c(cluster, cluster, block, shared_bytes, stream);
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kKernel, &c.config));
  return clusters;
}

// Clusters of `cluster` blocks along x, which the hardware schedules together (sm_90+).
template <auto kKernel, typename... Args>
void launch_cluster_kernel(unsigned int grid, unsigned int cluster, int block, int64_t shared_bytes, Stream stream,
                           const Args&... args) {
  const ClusterConfig c(grid, cluster, block, shared_bytes, stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&c.config, kKernel, args...));
}

}  // namespace kl_fused::cuda
#endif
