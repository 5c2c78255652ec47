// The SIMT emulator's runtime: runs a CUDA grid on the CPU, one block at a time (one cluster at a
// time: its blocks together), each thread a fiber (a user-level thread with its own stack). The
// sanitizer that checks every memory access the kernel makes is memory_checks.cpp.
//
// Execution. A thread runs until it reaches __syncthreads, a warp shuffle, or its end; then the
// next ready thread runs. When none is ready, the scheduler completes what can be completed: a
// shuffle once every lane its mask names waits at it (values exchanged in lock-step), a barrier once
// every thread of the block waits at it, a cluster barrier once every thread of every block of the
// cluster does. Anything else is reported, never waited on: threads waiting at different barriers, a
// thread that exits while others wait, lanes that diverge at a shuffle. A
// barrier or shuffle is its source line and its call site in the compiled code: one line of an
// inlined helper (block_reduce.cuh) reached from two places is two barriers, as on the device.
//
// Schedules (host_control.h). The order of a launch's blocks and of a block's ready threads is
// forward, reverse or random; the random schedule also preempts threads at random global and
// shared accesses, so that accesses interleave between two synchronisation points. Every schedule
// is reproducible; a kernel's outputs must not depend on it.
#include "simt/runtime.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "simt/execution.h"
#include "simt/host_control.h"

namespace simt {
namespace detail {

LaunchState* g_launch = nullptr;
__thread Thread* g_thread __attribute__((tls_model("initial-exec"))) = nullptr;
char* g_arena = nullptr;  // [g_arena - guard, g_arena + kMaxCluster * kArenaBytes + guard) is mapped

char* arena() {
  if (g_arena == nullptr) {
    void* p = mmap(nullptr, kMaxCluster * kArenaBytes + 2 * kArenaGuard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "simt: could not map the shared-memory arena");
    g_arena = static_cast<char*>(p) + kArenaGuard;
  }
  return g_arena;
}

std::string base_name(const char* file) {
  if (file == nullptr) return "?";
  const char* slash = std::strrchr(file, '/');
  return slash ? slash + 1 : file;
}

std::string str(uint3 v) {
  std::ostringstream o;
  o << "(" << v.x << "," << v.y << "," << v.z << ")";
  return o.str();
}

uint3 block_index(uint32_t linear) {
  const dim3 g = g_launch->grid;
  return {linear % g.x, linear / g.x % g.y, linear / (g.x * g.y)};
}

uint32_t block_id(const Thread& t) { return g_launch->first_block + t.rank; }
uint3 block_idx_of(const Thread& t) { return block_index(block_id(t)); }
uint32_t interval_of(const Thread& t) { return g_launch->interval[t.rank]; }

namespace {

constexpr int kMaxBlockZ = 64;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kDefaultDynamicShared = 48 * 1024;
constexpr std::size_t kStackBytes = 128 * 1024;

// sm_90 (H100 SXM) by default; tests shrink them.
DeviceProperties g_props{132, 227 * 1024, 2147483647, true};

// ----------------------------------------------------------------------------------- fibers

#if defined(__x86_64__)
// Saves the callee-saved registers and the floating-point control words on the current stack,
// stores the stack pointer to *save_sp, switches to load_sp and restores what is saved there.
extern "C" void simt_switch_stack(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl simt_switch_stack
    .hidden simt_switch_stack
    .type simt_switch_stack, @function
simt_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch_stack, .-simt_switch_stack
)");

void switch_context(Context& from, Context& to) { simt_switch_stack(&from.sp, to.sp); }

// A fresh context that starts in entry() on the stack [lo, hi).
void make_context(Context& ctx, char* lo, char* hi, void (*entry)()) {
  (void)lo;
  auto top = reinterpret_cast<uintptr_t>(hi) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                        // entry's (never used) return address
  *--slot = reinterpret_cast<uint64_t>(entry);        // popped by `ret`
  for (int i = 0; i < 6; ++i) *--slot = 0;            // rbp rbx r12 r13 r14 r15
  *--slot = 0x037F00001F80ull;                        // mxcsr (low) and x87 control word
  ctx.sp = slot;
}
#else
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void make_context(Context& ctx, char* lo, char* hi, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = lo;
  ctx.uc.uc_stack.ss_size = static_cast<std::size_t>(hi - lo);
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}
#endif

// Stacks are mapped once and reused by every block; a PROT_NONE page below each one turns an
// overflow into a fault instead of silent corruption.
struct StackPool {
  std::vector<char*> bases;
  std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));

  char* get(std::size_t i) {
    while (bases.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "simt: could not map a fiber stack");
      mprotect(p, page, PROT_NONE);
      bases.push_back(static_cast<char*>(p) + page);
    }
    return bases[i];
  }
};

// ----------------------------------------------------------------------------------- state

Context g_scheduler;
StackPool g_stacks;
uint32_t g_launches = 0;   // launches of the process (LaunchState::id)
uint32_t g_intervals = 0;  // barrier intervals of the process (LaunchState::interval)

// The next number of a counter that names launches or intervals: never 0, which the shadows of
// memory_checks.cpp read as "none".
uint32_t next_number(uint32_t& counter) { return ++counter != 0 ? counter : ++counter; }

ScheduleKind g_schedule = ScheduleKind::Forward;
uint64_t g_seed = 0;
uint64_t g_call_launches = 0;  // launches of the current call: the random schedule's draws restart per call
uint64_t g_random = 0;         // the random schedule's generator state

// splitmix64
uint64_t draw() {
  uint64_t z = (g_random += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
void shuffle_order(std::vector<T>& order) {
  for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[draw() % i]);
}

// The order in which a round of the scheduler offers the block's threads to run (or a launch runs
// its blocks).
template <typename T>
void schedule_order(std::vector<T>& order) {
  std::iota(order.begin(), order.end(), T(0));
  if (g_schedule == ScheduleKind::Reverse) std::reverse(order.begin(), order.end());
  if (g_schedule == ScheduleKind::Random) shuffle_order(order);
}

std::map<const void*, int> g_max_dynamic_shared;  // per kernel, set by cudaFuncSetAttribute
std::vector<std::string> g_launch_log;
std::set<std::string>& launchable_names() {
  static std::set<std::string> names;
  return names;
}

// ----------------------------------------------------------------------------------- names, errors

// "const char* simt::kernel_pretty_name() [with auto kKernel = ns::{anonymous}::k<float, 4, true>]"
// -> "k<float, 4, true>"
std::string short_kernel_name(const char* pretty) {
  std::string s(pretty);
  const std::string key = "kKernel = ";
  auto at = s.find(key);
  if (at != std::string::npos) s = s.substr(at + key.size());
  if (!s.empty() && s.back() == ']') s.pop_back();
  const auto open = s.find('<');
  const auto scope = s.rfind("::", open == std::string::npos ? std::string::npos : open);
  if (scope != std::string::npos) s = s.substr(scope + 2);
  return s;
}

std::string where(const LaunchState& L, const Thread* t) {
  std::ostringstream o;
  o << " in kernel " << L.kernel;
  if (t != nullptr) {
    o << ", block " << str(block_idx_of(*t)) << ", thread " << str(t->idx);
  } else {
    o << (L.cluster > 1 ? ", cluster of block " : ", block ") << str(block_index(L.first_block));
  }
  return o.str();
}

// An error found by the scheduler between fibers.
[[noreturn]] void fail_block(const std::string& what, const Thread* t = nullptr) {
  TORCH_CHECK(false, "simt: ", what, where(*g_launch, t));
  __builtin_unreachable();
}

// ----------------------------------------------------------------------------------- scheduling

[[noreturn]] void fiber_main() {
  Thread* t = g_thread;
  try {
    g_launch->entry(g_launch->params);
  } catch (const std::exception& error) {
    fail(std::string("exception in kernel: ") + error.what());
  }
  LaunchState& L = *g_launch;
  if (++L.exited[t->rank] == L.block_threads && L.remote_access_interval[t->rank] == L.cluster_interval) {
    fail("block rank " + std::to_string(t->rank) + " of the cluster exits while another block may still access its "
         "shared memory (they did since the last cluster barrier): a cluster barrier before the exit keeps it alive");
  }
  t->state = State::Exited;
  switch_context(t->context, g_scheduler);
  __builtin_unreachable();
}

void resume(Thread& t) {
  g_thread = &t;
  switch_context(g_scheduler, t.context);
  g_thread = nullptr;
}

void suspend(State state, const char* file, int line, const void* pc) {
  Thread* t = g_thread;
  TORCH_CHECK(t != nullptr, "simt: a device intrinsic was called outside a kernel");
  t->state = state;
  t->file = file;
  t->line = line;
  t->pc = pc;
  switch_context(t->context, g_scheduler);
}

std::string site(const Thread& t) { return base_name(t.file) + ":" + std::to_string(t.line); }

const char* shuffle_name(ShuffleKind kind) {
  switch (kind) {
    case ShuffleKind::Idx: return "__shfl_sync";
    case ShuffleKind::Up: return "__shfl_up_sync";
    case ShuffleKind::Down: return "__shfl_down_sync";
    case ShuffleKind::Xor: return "__shfl_xor_sync";
  }
  return "?";
}

// The lane whose value `lane` receives, or `lane` itself where CUDA returns the caller's own value.
int source_lane(const Thread& t, int lane) {
  const int width = t.width;
  const int segment = lane / width * width;
  switch (t.kind) {
    case ShuffleKind::Idx: return segment + (t.arg % width + width) % width;
    case ShuffleKind::Up: return lane - t.arg < segment ? lane : lane - t.arg;
    case ShuffleKind::Down: return lane + t.arg >= segment + width ? lane : lane + t.arg;
    case ShuffleKind::Xor: {
      const int src = lane ^ t.arg;
      return (src < 0 || src >= segment + width) ? lane : src;
    }
  }
  return lane;
}

// Completes the shuffles whose every named lane has arrived. True if any did.
bool complete_shuffles(LaunchState& L) {
  bool progressed = false;
  const int n = static_cast<int>(L.block_threads);
  for (int block = 0; block < static_cast<int>(L.threads.size()); block += n) {
    for (int first = block; first < block + n; first += kWarpSize) {
      const int lanes = std::min(kWarpSize, block + n - first);
      Thread* leader = nullptr;
      for (int l = 0; l < lanes && leader == nullptr; ++l) {
        if (L.threads[first + l].state == State::AtShuffle) leader = &L.threads[first + l];
      }
      if (leader == nullptr) continue;
      const unsigned int mask = leader->mask;
      bool complete = true;
      for (int l = 0; l < kWarpSize; ++l) {
        const bool named = (mask >> l) & 1u;
        if (l >= lanes) {
          if (named) {
            fail_block(std::string(shuffle_name(leader->kind)) + " at " + site(*leader) + " names lane " +
                           std::to_string(l) + " in its mask, but the warp has only " + std::to_string(lanes) + " threads",
                       leader);
          }
          continue;
        }
        Thread& t = L.threads[first + l];
        if (t.state == State::AtShuffle && !((t.mask >> l) & 1u)) {
          fail_block(std::string(shuffle_name(t.kind)) + " at " + site(t) + " called with a mask that leaves out the calling lane", &t);
        }
        if (!named) continue;
        if (t.state == State::Exited) {
          fail_block("lane " + std::to_string(l) + " exited while its warp waits at " + shuffle_name(leader->kind) +
                         " (" + site(*leader) + "), whose mask names it",
                     &t);
        }
        if (t.state != State::AtShuffle || t.file != leader->file || t.line != leader->line || t.pc != leader->pc || t.mask != mask ||
            t.kind != leader->kind || t.width != leader->width) {
          complete = false;  // perhaps later, perhaps a deadlock (reported by the caller)
        }
      }
      if (!complete) continue;
      for (int l = 0; l < lanes; ++l) {
        if (!((mask >> l) & 1u)) continue;
        Thread& t = L.threads[first + l];
        const int src = source_lane(t, l);
        if (!((mask >> src) & 1u)) {
          fail_block(std::string(shuffle_name(t.kind)) + " at " + site(t) + " reads lane " + std::to_string(src) +
                         ", which its mask leaves out",
                     &t);
        }
        t.result = L.threads[first + src].bits;
      }
      for (int l = 0; l < lanes; ++l) {
        if ((mask >> l) & 1u) L.threads[first + l].state = State::Ready;
      }
      progressed = true;
    }
  }
  return progressed;
}

// Releases a block's barrier when every thread of the block waits at the same __syncthreads.
bool complete_block_barrier(LaunchState& L, unsigned int rank) {
  const auto block = std::next(L.threads.begin(), static_cast<std::ptrdiff_t>(rank * L.block_threads));
  const auto block_end = std::next(block, static_cast<std::ptrdiff_t>(L.block_threads));
  const Thread* waiting = nullptr;
  for (auto t = block; t != block_end; ++t) {
    if (t->state == State::AtShuffle || t->state == State::Ready) return false;  // not every thread has arrived
    if (t->state == State::AtBarrier && waiting == nullptr) waiting = &*t;
  }
  if (waiting == nullptr) return false;
  for (auto it = block; it != block_end; ++it) {
    const Thread& t = *it;
    if (t.state == State::Exited) {
      fail_block("thread " + str(t.idx) + " exited while other threads of its block wait at __syncthreads (" +
                     site(*waiting) + "): a barrier that not every thread reaches",
                 waiting);
    }
    if (t.state == State::AtClusterBarrier) {
      fail_block("divergent barriers: thread " + str(waiting->idx) + " waits at __syncthreads (" + site(*waiting) +
                     "), thread " + str(t.idx) + " of the same block at the cluster barrier " + site(t),
                 waiting);
    }
    if (t.file != waiting->file || t.line != waiting->line) {
      fail_block("divergent __syncthreads: thread " + str(waiting->idx) + " waits at " + site(*waiting) + ", thread " +
                     str(t.idx) + " at " + site(t),
                 waiting);
    }
    if (t.pc != waiting->pc) {
      fail_block("divergent __syncthreads: thread " + str(waiting->idx) + " and thread " + str(t.idx) + " wait at " +
                     site(t) + " reached through different call sites (one line of an inlined function called from "
                     "two places is two barriers)",
                 waiting);
    }
  }
  ++L.barriers;
  end_interval_traffic();
  L.interval[rank] = next_number(g_intervals);
  for (auto t = block; t != block_end; ++t) t->state = State::Ready;
  return true;
}

bool complete_barrier(LaunchState& L) {
  bool progressed = false;
  for (unsigned int rank = 0; rank < L.cluster; ++rank) progressed = complete_block_barrier(L, rank) || progressed;
  return progressed;
}

// Releases the cluster barrier when every thread of every block of the cluster waits at the same one.
bool complete_cluster_barrier(LaunchState& L) {
  const Thread* waiting = nullptr;
  for (const Thread& t : L.threads) {
    if (t.state != State::AtClusterBarrier && t.state != State::Exited) return false;
    if (t.state == State::AtClusterBarrier && waiting == nullptr) waiting = &t;
  }
  if (waiting == nullptr) return false;
  for (const Thread& t : L.threads) {
    if (t.state == State::Exited) {
      fail_block("thread " + str(t.idx) + " of block " + str(block_idx_of(t)) +
                     " exited while other threads of its cluster wait at the cluster barrier (" + site(*waiting) +
                     "): a barrier that not every thread reaches",
                 waiting);
    }
    if (t.file != waiting->file || t.line != waiting->line || t.pc != waiting->pc) {
      fail_block("divergent cluster barriers: thread " + str(waiting->idx) + " of block " + str(block_idx_of(*waiting)) +
                     " waits at " + site(*waiting) + ", thread " + str(t.idx) + " of block " + str(block_idx_of(t)) +
                     " at " + site(t) + (t.file == waiting->file && t.line == waiting->line ? " through another call site" : ""),
                 waiting);
    }
  }
  ++L.cluster_barriers;
  end_interval_traffic();
  for (uint32_t& interval : L.interval) interval = next_number(g_intervals);
  L.cluster_interval = next_number(g_intervals);
  for (Thread& t : L.threads) t.state = State::Ready;
  return true;
}

[[noreturn]] void report_deadlock(const LaunchState& L) {
  std::ostringstream o;
  o << "the block cannot proceed:";
  std::map<std::pair<std::string, const void*>, std::vector<int>> sites;
  for (const Thread& t : L.threads) {
    if (t.state == State::AtBarrier) sites[{"__syncthreads at " + site(t), t.pc}].push_back(t.id);
    if (t.state == State::AtShuffle) sites[{std::string(shuffle_name(t.kind)) + " at " + site(t), t.pc}].push_back(t.id);
    if (t.state == State::AtClusterBarrier) sites[{"the cluster barrier at " + site(t), t.pc}].push_back(t.id);
  }
  for (const auto& [what, ids] : sites) {
    o << " threads " << ids.front() << ".." << ids.back() << " (" << ids.size() << ") wait at " << what.first << ";";
  }
  fail_block(o.str());
}

// Runs the cluster whose rank-0 block is L.first_block (a lone block without a cluster).
void run_cluster(LaunchState& L) {
  const unsigned int per_block = L.block_threads;
  const unsigned int n = per_block * L.cluster;
  L.threads.assign(n, Thread{});
  for (unsigned int i = 0; i < n; ++i) {
    Thread& t = L.threads[i];
    t.id = static_cast<int>(i);
    t.rank = i / per_block;
    const unsigned int local = i % per_block;
    t.idx = {local % L.block.x, local / L.block.x % L.block.y, local / (L.block.x * L.block.y)};
    t.stack_lo = g_stacks.get(i);
    t.stack_hi = t.stack_lo + kStackBytes;
    make_context(t.context, t.stack_lo, t.stack_hi, &fiber_main);
  }
  begin_block_memory(L.shared_bytes, L.cluster);
  L.exited.assign(L.cluster, 0);
  L.remote_access_interval.assign(L.cluster, 0);
  L.interval.resize(L.cluster);
  for (uint32_t& interval : L.interval) interval = next_number(g_intervals);
  L.cluster_interval = next_number(g_intervals);
  std::vector<unsigned int> order(n);
  if (g_schedule != ScheduleKind::Random) schedule_order(order);
  for (;;) {
    if (g_schedule == ScheduleKind::Random) schedule_order(order);  // a new draw every round
    bool all_exited = true;
    for (const unsigned int i : order) {
      Thread& t = L.threads[i];
      if (t.state == State::Ready) resume(t);
      if (!L.error.empty()) TORCH_CHECK(false, L.error);
      all_exited = all_exited && t.state == State::Exited;
    }
    if (all_exited) return end_interval_traffic();
    if (complete_shuffles(L) || complete_barrier(L) || complete_cluster_barrier(L)) continue;
    bool any_ready = false;
    for (const Thread& t : L.threads) any_ready = any_ready || t.state == State::Ready;
    if (!any_ready) report_deadlock(L);
  }
}

[[noreturn]] void launch_failure(const std::string& error, const std::string& kernel, const std::string& why) {
  TORCH_CHECK(false, "CUDA error: ", error, " (simt: launch of ", kernel, ": ", why, ")");
  __builtin_unreachable();
}

}  // namespace

// An error found while a fiber runs: recorded, and the fiber never runs again; the scheduler
// turns it into an exception on the host stack.
[[noreturn]] void fail(const std::string& what) {
  Thread* t = g_thread;
  TORCH_CHECK(t != nullptr && g_launch != nullptr, "simt: ", what);
  g_launch->error = "simt: " + what + where(*g_launch, t);
  t->state = State::Failed;
  switch_context(t->context, g_scheduler);
  __builtin_unreachable();
}

void maybe_preempt() {
  if (g_schedule != ScheduleKind::Random || draw() % 8 != 0) return;
  Thread* t = g_thread;
  t->state = State::Ready;
  switch_context(t->context, g_scheduler);
}

void begin_call_schedule() { g_call_launches = 0; }

}  // namespace detail

using namespace detail;

// ----------------------------------------------------------------------------------- device API

uint3 thread_idx() { return g_thread->idx; }
uint3 block_idx() { return block_idx_of(*g_thread); }
dim3 block_dim() { return g_launch->block; }
dim3 grid_dim() { return g_launch->grid; }
void* dynamic_shared() { return arena() + g_thread->rank * kArenaBytes; }

unsigned int cluster_block_rank() { return g_thread->rank; }
unsigned int cluster_blocks() { return g_launch->cluster; }

__attribute__((noinline)) void cluster_sync(const char* file, int line) {
  suspend(State::AtClusterBarrier, file, line, __builtin_return_address(0));
}

void* map_shared_rank(const void* p, unsigned int rank) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto lo = reinterpret_cast<uintptr_t>(arena());
  if (a < lo || a >= lo + g_launch->cluster * kArenaBytes) {
    fail("map_shared_rank of an address that is not in the shared memory of a block of the cluster");
  }
  if (rank >= g_launch->cluster) {
    fail("map_shared_rank to block rank " + std::to_string(rank) + " of a cluster of " +
         std::to_string(g_launch->cluster) + " blocks");
  }
  return arena() + rank * kArenaBytes + (a - lo) % kArenaBytes;
}

// The return address is the call site in the kernel's compiled code (noinline keeps it so).
__attribute__((noinline)) void syncthreads(const char* file, int line) {
  suspend(State::AtBarrier, file, line, __builtin_return_address(0));
}

__attribute__((noinline)) uint64_t shuffle(ShuffleKind kind, const char* file, int line, unsigned int mask,
                                           uint64_t bits, int arg, int width) {
  Thread* t = g_thread;
  TORCH_CHECK(t != nullptr, "simt: a warp shuffle was called outside a kernel");
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail(std::string(shuffle_name(kind)) + " with width " + std::to_string(width) + ": a power of two up to 32 is required");
  }
  t->kind = kind;
  t->mask = mask;
  t->bits = bits;
  t->arg = arg;
  t->width = width;
  suspend(State::AtShuffle, file, line, __builtin_return_address(0));
  return t->result;
}

float log2_counted(float x) {
  if (g_thread != nullptr && g_launch != nullptr) ++g_launch->lg2;
  return std::log2(x);
}

float ex2_approx_ftz(float x) {
  if (g_thread != nullptr && g_launch != nullptr) ++g_launch->ex2;
  if (std::isnan(x)) return x;
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;  // ftz: subnormal input
  if (x == -INFINITY) return 0.0f;
  if (x == INFINITY) return INFINITY;
  const float rounded = static_cast<float>(std::exp2(static_cast<double>(x)));
  if (std::isinf(rounded)) return rounded;
  if (rounded < 0x1p-126f) return 0.0f;  // ftz: subnormal result
  // The documented bound is 2 ulp; move the correctly rounded result by -2..2 ulp, picked by a hash
  // of the input, so that tolerances are tested against an error as large as the hardware may make.
  uint32_t in;
  std::memcpy(&in, &x, sizeof in);
  uint32_t h = in * 0x9E3779B1u;
  h ^= h >> 15;
  const int ulps = static_cast<int>(h % 5u) - 2;
  uint32_t out;
  std::memcpy(&out, &rounded, sizeof out);
  out = static_cast<uint32_t>(static_cast<int64_t>(out) + ulps);
  float result;
  std::memcpy(&result, &out, sizeof result);
  return result < 0x1p-126f ? 0.0f : result;
}

// ----------------------------------------------------------------------------------- host API

DeviceProperties device_properties() { return g_props; }

void set_max_dynamic_shared(const char* pretty_name, const void* kernel_id, int bytes) {
  if (bytes < 0 || bytes > g_props.max_shared_optin) {
    launch_failure("invalid argument", short_kernel_name(pretty_name),
                   "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize, " + std::to_string(bytes) +
                       ") is above the device's opt-in limit of " + std::to_string(g_props.max_shared_optin) + " bytes");
  }
  g_max_dynamic_shared[kernel_id] = bytes;
}

bool register_launchable(const char* pretty_name) {
  launchable_names().insert(short_kernel_name(pretty_name));
  return true;
}

void launch(const char* pretty_name, const void* kernel_id, dim3 grid, dim3 block, int64_t shared_bytes,
            const void* params, std::size_t params_bytes, KernelEntry entry, unsigned int cluster) {
  TORCH_CHECK(g_launch == nullptr, "simt: a launch from inside a kernel is not emulated");
  const std::string kernel = short_kernel_name(pretty_name);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxBlockThreads || block.x > kMaxBlockThreads || block.y > kMaxBlockThreads ||
      block.z > kMaxBlockZ) {
    launch_failure("invalid configuration argument", kernel,
                   "block of " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" + std::to_string(block.z) +
                       " threads; at most 1024 per block");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > g_props.max_grid_x || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) {
    launch_failure("invalid configuration argument", kernel,
                   "grid of " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) +
                       " blocks; gridDim.x must be 1.." + std::to_string(g_props.max_grid_x));
  }
  if (cluster == 0 || cluster > kMaxCluster || grid.x % cluster != 0 || (cluster > 1 && (grid.y != 1 || grid.z != 1))) {
    launch_failure(cluster > kMaxCluster ? "cluster misconfiguration" : "invalid argument", kernel,
                   "clusters of " + std::to_string(cluster) + " blocks over a grid of " + std::to_string(grid.x) + "x" +
                       std::to_string(grid.y) + "x" + std::to_string(grid.z) + ": a cluster holds 1.." +
                       std::to_string(kMaxCluster) + " blocks (the portable limit) and divides a 1-D grid");
  }
  if (cluster > 1 && !g_props.cluster_launch) {
    launch_failure("not supported", kernel, "a cluster launch on a device without thread-block clusters (before sm_90)");
  }
  const auto opted = g_max_dynamic_shared.find(kernel_id);
  const int64_t allowed = opted == g_max_dynamic_shared.end() ? kDefaultDynamicShared : std::max(opted->second, kDefaultDynamicShared);
  if (shared_bytes < 0 || shared_bytes > allowed) {
    launch_failure("invalid argument", kernel,
                   std::to_string(shared_bytes) + " bytes of dynamic shared memory, above the " + std::to_string(allowed) +
                       (opted == g_max_dynamic_shared.end()
                            ? " a kernel may use without cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)"
                            : " the kernel opted in to"));
  }
  std::ostringstream log;
  log << kernel << " grid=" << grid.x << " block=" << block.x << " shared=" << shared_bytes;
  if (cluster > 1) log << " cluster=" << cluster;
  g_launch_log.push_back(log.str());

  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  TORCH_CHECK(blocks < 0xFFFFFFFEull, "simt: a grid of ", blocks, " blocks is more than the emulator numbers");

  LaunchState L;
  L.kernel = kernel;
  L.grid = grid;
  L.block = block;
  L.shared_bytes = shared_bytes;
  L.entry = entry;
  L.params = params;
  L.cluster = cluster;
  L.block_threads = static_cast<unsigned int>(threads);
  L.id = next_number(g_launches);
  register_parameters(params, params_bytes);
  g_launch = &L;
  struct Cleanup {
    const void* params;
    ~Cleanup() {
      g_launch = nullptr;
      g_thread = nullptr;
      unregister_parameters(params);
    }
  } cleanup{params};
  arena();
  begin_launch_traffic();
  g_random = g_seed * 0xD1B54A32D192ED03ull + ++g_call_launches;
  std::vector<uint32_t> order(blocks / cluster);
  schedule_order(order);
  for (const uint32_t c : order) {
    L.first_block = c * cluster;
    run_cluster(L);
  }
  end_launch_traffic();
}

// ----------------------------------------------------------------------------------- test control

void configure(const DeviceProperties& props) {
  TORCH_CHECK(props.sm_count > 0 && props.max_grid_x > 0, "simt: sm_count and max_grid_x must be positive");
  TORCH_CHECK(props.max_shared_optin >= 0 && static_cast<std::size_t>(props.max_shared_optin) <= kArenaBytes,
              "simt: max_shared_optin must lie in [0, ", kArenaBytes, "]");
  g_props = props;
  g_max_dynamic_shared.clear();  // attributes above a shrunk limit would be refused now
}

void set_schedule(ScheduleKind kind, uint64_t seed) {
  g_schedule = kind;
  g_seed = seed;
}

std::vector<std::string> take_launch_log() { return std::exchange(g_launch_log, {}); }

std::vector<std::string> launchable_kernels() {
  return {launchable_names().begin(), launchable_names().end()};
}

}  // namespace simt
