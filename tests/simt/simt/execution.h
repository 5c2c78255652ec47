// What the emulator's two halves share: the runtime (runtime.cpp: fibers, scheduling, launches)
// and the memory checks (memory_checks.cpp: the sanitizer's hooks and shadows). The state of the
// launch that runs and of its threads. Internal to the emulator: kernels see runtime.h only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "simt/runtime.h"

namespace simt::detail {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr std::size_t kArenaBytes = 256 * 1024;  // above any device's opt-in limit (227 KB on sm_90)
constexpr std::size_t kArenaGuard = 64 * 1024;   // each side: accesses there are out-of-bounds shared
// Blocks of a cluster, at most (the portable limit; 16 needs a non-portable opt-in, not emulated).
// The arena holds one block's shared memory per rank, kArenaBytes apart: what lies past a block's
// launch size in its slot is out of bounds, like the guards.
constexpr unsigned int kMaxCluster = 8;

// A fiber's saved execution context.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

enum class State { Ready, AtBarrier, AtClusterBarrier, AtShuffle, Exited, Failed };

// What a memory access does, for the race checks (atomics race with the plain accesses of other
// threads, never with atomics).
enum class Access { Read, Write, Atomic };

struct Thread {
  int id = 0;  // linear index among the threads that run together (the cluster's blocks, one after another)
  unsigned int rank = 0;  // its block's rank in the cluster
  uint3 idx{0, 0, 0};
  State state = State::Ready;
  Context context;
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
  // Where it waits: the source line, and the call site in the compiled code, which tells apart one
  // line of an inlined helper reached from two places.
  const char* file = nullptr;
  int line = 0;
  const void* pc = nullptr;
  ShuffleKind kind = ShuffleKind::Xor;
  unsigned int mask = 0;
  uint64_t bits = 0;
  int arg = 0;
  int width = kWarpSize;
  uint64_t result = 0;
  // The bytes of the last __ldcs / __stcs: the accesses that perform it are evict-first (L2 model).
  uintptr_t evict_first_lo = 0, evict_first_hi = 0;
};

struct LaunchState {
  std::string kernel;
  dim3 grid, block;
  int64_t shared_bytes = 0;
  KernelEntry entry = nullptr;
  const void* params = nullptr;
  uint32_t id = 0;        // numbers the launches of the process
  unsigned int cluster = 1;         // blocks per cluster
  unsigned int block_threads = 0;   // threads per block
  uint32_t first_block = 0;         // linear index of the running cluster's rank-0 block
  std::vector<Thread> threads;      // the running cluster's, block after block
  // Barrier intervals, numbered across every block of every launch: each block's current one
  // (__syncthreads ends it), and the cluster's (a cluster barrier ends it and every block's).
  std::vector<uint32_t> interval;
  uint32_t cluster_interval = 0;
  std::vector<unsigned int> exited;  // per block of the cluster, its threads that have exited
  // Per block of the cluster, the cluster interval in which another block last accessed its shared
  // memory: a block that exits in that interval may take the memory from under the access.
  std::vector<uint32_t> remote_access_interval;
  std::string error;
  // Counted for the traffic record (memory_checks.cpp): barriers completed (summed over blocks) and
  // fp32 MUFU calls (ex2.approx, lg2 through log2_acc).
  uint64_t barriers = 0, cluster_barriers = 0, ex2 = 0, lg2 = 0;
};

extern LaunchState* g_launch;
extern __thread Thread* g_thread __attribute__((tls_model("initial-exec")));
extern char* g_arena;  // kMaxCluster blocks' dynamic shared memory, with kArenaGuard mapped on each side
// Whether address a lies in the arena or its guards: shared memory (of any slot), in bounds or not.
inline bool in_shared_arena(uintptr_t a) {
  if (g_arena == nullptr) return false;
  const auto lo = reinterpret_cast<uintptr_t>(g_arena) - kArenaGuard;
  return a >= lo && a < lo + kMaxCluster * kArenaBytes + 2 * kArenaGuard;
}
char* arena();
// The linear index in the grid of thread t's block, its index, and its current barrier interval.
uint32_t block_id(const Thread& t);
uint3 block_idx_of(const Thread& t);
uint32_t interval_of(const Thread& t);

// Ends the running thread with an error naming `what`, its kernel, block and thread.
[[noreturn]] void fail(const std::string& what);
std::string str(uint3 v);
std::string base_name(const char* file);
uint3 block_index(uint32_t linear);  // in the running launch's grid

// runtime.cpp: under the random schedule, sometimes lets other threads of the block run first.
void maybe_preempt();
// runtime.cpp: a call begins (the random schedule's draws restart from the call's first launch).
void begin_call_schedule();
// memory_checks.cpp: a cluster (or a lone block) begins, each block with shared memory of unknown content.
void begin_block_memory(int64_t shared_bytes, unsigned int blocks);
// memory_checks.cpp, the traffic record: a launch begins and ends (its counters are appended to the
// log take_traffic returns), a block (cluster) begins, and a barrier interval ends (the global
// accesses since the last are fed to the L2 model in lock-step order; in a cluster, the interval of
// any of its blocks ends one for the model).
void begin_launch_traffic();
void end_launch_traffic();
void end_interval_traffic();
void begin_block_traffic();
// memory_checks.cpp: a launch's kernel parameters, readable by every thread while it runs.
void register_parameters(const void* p, std::size_t bytes);
void unregister_parameters(const void* p);

}  // namespace simt::detail
