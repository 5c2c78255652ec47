// What the tests control in the emulator (library.cpp exposes it as torch.ops.simt.*): the
// emulated device's limits, the calls whose tensors a launch may touch, and the log of launches.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "simt/runtime.h"

namespace simt {

void configure(const DeviceProperties& props);

// Global memory a kernel may touch is what the current call was given: begin_call opens a call,
// register_global adds a tensor's bytes to it (inputs; the allocator adds what the call allocates),
// end_call closes it. Outside a call no global memory is valid. Each call starts with a clean
// record of which thread and block touched which global byte (the race checks) and of what the
// kernels wrote (allocated: memory the call allocated, whose unwritten bytes check_outputs finds).
void begin_call();
void end_call();
bool in_call();
void register_global(const void* p, std::size_t bytes, std::string label, bool allocated = false);
void unregister_global(const void* p);

// Memory allocated during a call is filled with this byte before any kernel runs: every float
// type reads it as NaN, so an output a kernel forgot to write is never a plausible 0.
constexpr unsigned char kPoisonByte = 0xFF;
// p lies in memory allocated during the current call (not an input).
bool allocated_by_call(const void* p);
// A kernel launched in the current call wrote the byte at p.
bool written_by_kernel(const void* p);
// Undefined behaviour that host code compiled into the kernel units ran into during the call (it
// cannot be thrown where it happens), or "" if none; clears it.
std::string take_host_error();

// The order in which a launch runs its blocks and a block's ready threads:
//   forward  blocks and threads by increasing index, each thread to its next barrier or shuffle;
//   reverse  both by decreasing index;
//   random   a permutation drawn per launch and per scheduling round from `seed` (and the launch's
//            position in the call), and threads preempted at random global and shared accesses,
//            so that their accesses interleave between two synchronisation points.
enum class ScheduleKind { Forward, Reverse, Random };
void set_schedule(ScheduleKind kind, uint64_t seed);

// One JSON object per launch since the last call: global bytes loaded and stored per tensor
// (distinct too), shared-memory bytes, barriers, MUFU ex2/lg2 calls, and the L2 model's figures
// (memory_checks.cpp says what the model is).
std::vector<std::string> take_traffic();
// The L2 model: l2_bytes shared by resident_blocks blocks (0: min(grid, SMs)).
void configure_l2_model(int64_t l2_bytes, int64_t resident_blocks);

// "kernel grid=G block=B shared=S" per launch since the last call.
std::vector<std::string> take_launch_log();
// Every kernel instantiation that host code can launch, by name ("kl_rows_kernel<float, 4, true>").
std::vector<std::string> launchable_kernels();

}  // namespace simt
