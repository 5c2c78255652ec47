// The host side of launch.cuh under the SIMT emulator: a stream and a device guard that do
// nothing, the device's limits as configured for the test, the opt-in of a kernel to large shared
// memory, and the launch itself, which runs the grid on fibers before it returns.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <tuple>

#include "simt/runtime.h"

namespace simt {

struct Stream {};

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline Stream current_stream(int) { return {}; }

// __PRETTY_FUNCTION__ of this function names the kernel with its template arguments.
template <auto kKernel>
const char* kernel_pretty_name() {
  return __PRETTY_FUNCTION__;
}

template <auto kKernel>
struct Launchable {
  static inline const bool registered = register_launchable(kernel_pretty_name<kKernel>());
};

template <auto kKernel>
void allow_dynamic_shared(int bytes) {
  set_max_dynamic_shared(kernel_pretty_name<kKernel>(), reinterpret_cast<const void*>(kKernel), bytes);
}

template <auto kKernel, typename Params>
void run_kernel(const void* params) {
  std::apply(kKernel, *static_cast<const Params*>(params));
}

template <auto kKernel, typename... Args>
void launch_kernel(unsigned int grid, int block, int64_t shared_bytes, Stream, const Args&... args) {
  (void)Launchable<kKernel>::registered;
  // The parameters live in their own region for the launch's duration, readable by every thread
  // (kernel parameter space); each thread's copy of them is its own.
  const std::tuple<Args...> params(args...);
  launch(kernel_pretty_name<kKernel>(), reinterpret_cast<const void*>(kKernel), dim3(grid),
         dim3(static_cast<unsigned int>(block)), shared_bytes, &params, sizeof(params), &run_kernel<kKernel, std::tuple<Args...>>);
}

// A launch in thread-block clusters of `cluster` blocks along x (sm_90): they run together.
template <auto kKernel, typename... Args>
void launch_cluster_kernel(unsigned int grid, unsigned int cluster, int block, int64_t shared_bytes, Stream,
                           const Args&... args) {
  (void)Launchable<kKernel>::registered;
  const std::tuple<Args...> params(args...);
  launch(kernel_pretty_name<kKernel>(), reinterpret_cast<const void*>(kKernel), dim3(grid),
         dim3(static_cast<unsigned int>(block)), shared_bytes, &params, sizeof(params), &run_kernel<kKernel, std::tuple<Args...>>,
         cluster);
}

}  // namespace simt
