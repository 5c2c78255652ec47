// What the tests control in the emulator (library.cpp exposes it as torch.ops.simt.*): the
// emulated device's limits, the calls whose tensors a launch may touch, and the log of launches.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "simt/runtime.h"

namespace simt {

void configure(const DeviceProperties& props);

// Global memory a kernel may touch is what the current call was given: begin_call opens a call,
// register_global adds a tensor's bytes to it (inputs; the allocator adds what the call allocates),
// end_call closes it. Outside a call no global memory is valid.
void begin_call();
void end_call();
bool in_call();
void register_global(const void* p, std::size_t bytes, std::string label);
void unregister_global(const void* p);

// "kernel grid=G block=B shared=S" per launch since the last call.
std::vector<std::string> take_launch_log();
// Every kernel instantiation that host code can launch, by name ("kl_rows_kernel<float, 4, true>").
std::vector<std::string> launchable_kernels();

}  // namespace simt
