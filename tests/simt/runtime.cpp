// The SIMT emulator's runtime: runs a CUDA grid on the CPU, one block at a time, each thread of the
// block a fiber (a user-level thread with its own stack), and checks every memory access the
// kernel makes, as compute-sanitizer would on the device.
//
// Execution. A thread runs until it reaches __syncthreads, a warp shuffle, or its end; then the
// next ready thread runs. When none is ready, the scheduler completes what can be completed: a
// shuffle once every lane its mask names waits at it (values exchanged in lock-step), a barrier once
// every thread of the block waits at it. Anything else is reported, never waited on: threads waiting
// at different barriers, a thread that exits while others wait, lanes that diverge at a shuffle.
// The order is fixed, so results are bitwise reproducible.
//
// Memory checks. The kernels' translation units are compiled with -fsanitize=thread, which makes
// the compiler call __tsan_readN / __tsan_writeN before each load and store; this file defines
// those hooks itself (libtsan is not linked). An access is classified by address:
//   - the thread's own stack (its registers and local memory): not checked;
//   - the block's dynamic shared memory (an arena with guard zones around it): bounds against the
//     launch's size, initialisation (reading a byte no thread has written), and the racecheck rule:
//     two different threads touching the same byte between two barriers, at least one writing;
//   - the kernel's parameters: read-only;
//   - anything else is global memory and must lie inside a tensor given to the current call
//     (begin_call registers the inputs, allocations made during the call are registered as they
//     happen) -- otherwise out of bounds;
//   - 2/4/8/16-byte accesses to shared or global memory must be aligned to their size.
// Host code compiled into the same units (outside any fiber) is not checked.
#include "simt/runtime.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "simt/host_control.h"

namespace simt {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr int kMaxBlockZ = 64;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kDefaultDynamicShared = 48 * 1024;
constexpr std::size_t kArenaBytes = 256 * 1024;   // above any device's opt-in limit (227 KB on sm_90)
constexpr std::size_t kArenaGuard = 64 * 1024;    // each side: accesses there are out-of-bounds shared
constexpr std::size_t kStackBytes = 128 * 1024;

// sm_90 (H100 SXM) by default; tests shrink them.
DeviceProperties g_props{132, 227 * 1024, 2147483647};

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

struct Context {
  void* sp = nullptr;
};

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
struct Context {
  ucontext_t uc;
};

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

enum class State { Ready, AtBarrier, AtShuffle, Exited, Failed };

struct Thread {
  int id = 0;  // linear index in the block
  uint3 idx{0, 0, 0};
  State state = State::Ready;
  Context context;
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
  const char* file = nullptr;  // where it waits
  int line = 0;
  ShuffleKind kind = ShuffleKind::Xor;
  unsigned int mask = 0;
  uint64_t bits = 0;
  int arg = 0;
  int width = kWarpSize;
  uint64_t result = 0;
};

// What the racecheck and initcheck rules remember per byte of shared memory.
struct SharedShadow {
  uint32_t epoch;    // barrier interval of writer/reader
  int16_t writer;    // thread that wrote it in that interval, or -1
  int16_t reader;    // thread that read it in that interval, -1 none, -2 several
  uint8_t written;   // any thread wrote it since the block started
};

struct Region {
  uintptr_t end;
  std::string label;
  uint64_t call;     // the call it belongs to
  bool parameters;   // the launch's kernel parameters: read-only, valid for the launch
};

struct LaunchState {
  std::string kernel;
  dim3 grid, block;
  int64_t shared_bytes = 0;
  KernelEntry entry = nullptr;
  const void* params = nullptr;
  uint3 block_idx{0, 0, 0};
  std::vector<Thread> threads;
  uint32_t epoch = 1;
  std::string error;
};

LaunchState* g_launch = nullptr;
__thread Thread* g_thread __attribute__((tls_model("initial-exec"))) = nullptr;
Context g_scheduler;
StackPool g_stacks;

char* g_arena = nullptr;  // [g_arena - guard, g_arena + kArenaBytes + guard) is mapped
std::vector<SharedShadow> g_shadow(kArenaBytes);

std::map<uintptr_t, Region> g_regions;
uint64_t g_regions_version = 0;  // changes whenever g_regions or the current call does
uint64_t g_call = 0;     // generation of the current call
bool g_in_call = false;

std::map<const void*, int> g_max_dynamic_shared;  // per kernel, set by cudaFuncSetAttribute
std::vector<std::string> g_launch_log;
std::set<std::string>& launchable_names() {
  static std::set<std::string> names;
  return names;
}

char* arena() {
  if (g_arena == nullptr) {
    void* p = mmap(nullptr, kArenaBytes + 2 * kArenaGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "simt: could not map the shared-memory arena");
    g_arena = static_cast<char*>(p) + kArenaGuard;
  }
  return g_arena;
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

std::string where(const LaunchState& L, const Thread* t) {
  std::ostringstream o;
  o << " in kernel " << L.kernel << ", block " << str(L.block_idx);
  if (t != nullptr) o << ", thread " << str(t->idx);
  return o.str();
}

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

// An error found by the scheduler between fibers.
[[noreturn]] void fail_block(const std::string& what, const Thread* t = nullptr) {
  TORCH_CHECK(false, "simt: ", what, where(*g_launch, t));
  __builtin_unreachable();
}

// ----------------------------------------------------------------------------------- memory checks

const char* kind_of(bool write) { return write ? "write" : "read"; }

void check_alignment(uintptr_t a, std::size_t size, const char* space) {
  if ((size == 2 || size == 4 || size == 8 || size == 16) && a % size != 0) {
    std::ostringstream o;
    o << "misaligned " << size << "-byte " << space << " access at address 0x" << std::hex << a << std::dec << " ("
      << a % size << " bytes past a " << size << "-byte boundary)";
    fail(o.str());
  }
}

[[noreturn]] void shared_race(int64_t offset, const char* kind, const std::string& first, const char* second) {
  std::ostringstream o;
  o << "shared-memory race at offset " << offset << ": " << first << " and " << second
    << " by this thread with no __syncthreads between (" << kind << ")";
  fail(o.str());
}

std::string thread_name(int16_t id) { return "thread " + str(g_launch->threads[static_cast<std::size_t>(id)].idx); }

void shared_access(Thread* t, uintptr_t a, std::size_t size, bool write, bool natural) {
  const auto base = reinterpret_cast<uintptr_t>(g_arena);
  const auto offset = static_cast<int64_t>(a - base);
  const int64_t limit = g_launch->shared_bytes;
  if (offset < 0 || offset + static_cast<int64_t>(size) > limit) {
    std::ostringstream o;
    o << "out-of-bounds shared-memory " << kind_of(write) << " of " << size << " bytes at offset " << offset
      << " (the launch has " << limit << " bytes of dynamic shared memory)";
    fail(o.str());
  }
  if (natural) check_alignment(a, size, "shared-memory");
  const uint32_t epoch = g_launch->epoch;
  const auto me = static_cast<int16_t>(t->id);
  for (std::size_t i = 0; i < size; ++i) {
    const int64_t at = offset + static_cast<int64_t>(i);
    SharedShadow& s = g_shadow[static_cast<std::size_t>(at)];
    if (s.epoch != epoch) s = {epoch, -1, -1, s.written};
    if (write) {
      if (s.writer >= 0 && s.writer != me) shared_race(at, "write after write", "written by " + thread_name(s.writer), "written");
      if (s.reader == -2 || (s.reader >= 0 && s.reader != me)) {
        shared_race(at, "write after read", "read by " + (s.reader == -2 ? std::string("several threads") : thread_name(s.reader)),
                    "written");
      }
      s.writer = me;
      s.written = 1;
    } else {
      if (!s.written) {
        fail("read of uninitialised shared memory at offset " + std::to_string(at) +
             " (no thread of the block has written it)");
      }
      if (s.writer >= 0 && s.writer != me) shared_race(at, "read after write", "written by " + thread_name(s.writer), "read");
      s.reader = (s.reader == -1 || s.reader == me) ? me : int16_t(-2);
    }
  }
}

// The region starting at or before a (a may lie past its end), or nullptr.
const std::pair<const uintptr_t, Region>* region_at_or_before(uintptr_t a) {
  auto it = g_regions.upper_bound(a);
  return it == g_regions.begin() ? nullptr : &*std::prev(it);
}

[[noreturn]] void out_of_bounds_global(Thread* t, uintptr_t a, std::size_t size, bool write,
                                      const std::pair<const uintptr_t, Region>* hit, bool given) {
  for (const Thread& other : g_launch->threads) {
    if (&other != t && a >= reinterpret_cast<uintptr_t>(other.stack_lo) && a < reinterpret_cast<uintptr_t>(other.stack_hi)) {
      fail(std::string(kind_of(write)) + " of another thread's local memory (thread " + str(other.idx) + ")");
    }
  }
  std::ostringstream o;
    o << "out-of-bounds global " << kind_of(write) << " of " << size << " bytes at address 0x" << std::hex << a << std::dec;
    if (hit == nullptr) {
      o << ", below every tensor given to the launch";
    } else if (a >= hit->second.end) {
      o << ", " << a - hit->second.end << " bytes past the end of " << hit->second.label << " ("
        << hit->second.end - hit->first << " bytes), outside every tensor given to the launch";
    } else if (!given) {
      o << ": " << hit->second.label << " was not given to this launch's call";
    } else {
      o << ": offset " << a - hit->first << " of " << hit->second.label << " (" << hit->second.end - hit->first
        << " bytes) runs " << a + size - hit->second.end << " bytes past its end";
    }
    fail(o.str());
}

void global_access(Thread* t, uintptr_t a, std::size_t size, bool write, bool natural) {
  // Most accesses fall in the region the previous one did.
  static const std::pair<const uintptr_t, Region>* last = nullptr;
  static uint64_t last_version = ~uint64_t(0);
  const std::pair<const uintptr_t, Region>* hit = nullptr;
  if (last_version == g_regions_version && a >= last->first && a + size <= last->second.end) {
    hit = last;
  } else {
    hit = region_at_or_before(a);
    const bool given = hit != nullptr && (hit->second.parameters || (g_in_call && hit->second.call == g_call));
    if (hit == nullptr || !given || a + size > hit->second.end) out_of_bounds_global(t, a, size, write, hit, given);
    last = hit;
    last_version = g_regions_version;
  }
  if (write && hit->second.parameters) fail("write to the kernel's parameters (they are read-only)");
  if (natural) check_alignment(a, size, "global-memory");
}

void on_access(void* addr, std::size_t size, bool write, bool natural) {
  Thread* t = g_thread;
  if (t == nullptr) return;  // host code compiled into a kernel unit
  const auto a = reinterpret_cast<uintptr_t>(addr);
  if (a >= reinterpret_cast<uintptr_t>(t->stack_lo) && a < reinterpret_cast<uintptr_t>(t->stack_hi)) return;
  const auto arena_lo = reinterpret_cast<uintptr_t>(g_arena) - kArenaGuard;
  const auto arena_hi = reinterpret_cast<uintptr_t>(g_arena) + kArenaBytes + kArenaGuard;
  if (a >= arena_lo && a < arena_hi) return shared_access(t, a, size, write, natural);
  global_access(t, a, size, write, natural);
}

// ----------------------------------------------------------------------------------- scheduling

[[noreturn]] void fiber_main() {
  Thread* t = g_thread;
  try {
    g_launch->entry(g_launch->params);
  } catch (const std::exception& error) {
    fail(std::string("exception in kernel: ") + error.what());
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

void suspend(State state, const char* file, int line) {
  Thread* t = g_thread;
  TORCH_CHECK(t != nullptr, "simt: a device intrinsic was called outside a kernel");
  t->state = state;
  t->file = file;
  t->line = line;
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
  const int n = static_cast<int>(L.threads.size());
  for (int first = 0; first < n; first += kWarpSize) {
    const int lanes = std::min(kWarpSize, n - first);
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
      if (t.state != State::AtShuffle || t.file != leader->file || t.line != leader->line || t.mask != mask ||
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
  return progressed;
}

// Releases the barrier when every thread of the block waits at the same __syncthreads.
bool complete_barrier(LaunchState& L) {
  const Thread* waiting = nullptr;
  for (const Thread& t : L.threads) {
    if (t.state == State::AtShuffle) return false;
    if (t.state == State::AtBarrier && waiting == nullptr) waiting = &t;
  }
  if (waiting == nullptr) return false;
  for (const Thread& t : L.threads) {
    if (t.state == State::Exited) {
      fail_block("thread " + str(t.idx) + " exited while other threads of its block wait at __syncthreads (" +
                     site(*waiting) + "): a barrier that not every thread reaches",
                 waiting);
    }
    if (t.file != waiting->file || t.line != waiting->line) {
      fail_block("divergent __syncthreads: thread " + str(waiting->idx) + " waits at " + site(*waiting) + ", thread " +
                     str(t.idx) + " at " + site(t),
                 waiting);
    }
  }
  ++L.epoch;
  for (Thread& t : L.threads) t.state = State::Ready;
  return true;
}

[[noreturn]] void report_deadlock(const LaunchState& L) {
  std::ostringstream o;
  o << "the block cannot proceed:";
  std::map<std::string, std::vector<int>> sites;
  for (const Thread& t : L.threads) {
    if (t.state == State::AtBarrier) sites["__syncthreads at " + site(t)].push_back(t.id);
    if (t.state == State::AtShuffle) sites[std::string(shuffle_name(t.kind)) + " at " + site(t)].push_back(t.id);
  }
  for (const auto& [what, ids] : sites) {
    o << " threads " << ids.front() << ".." << ids.back() << " (" << ids.size() << ") wait at " << what << ";";
  }
  fail_block(o.str());
}

void run_block(LaunchState& L) {
  const unsigned int n = L.block.x * L.block.y * L.block.z;
  L.threads.assign(n, Thread{});
  for (unsigned int i = 0; i < n; ++i) {
    Thread& t = L.threads[i];
    t.id = static_cast<int>(i);
    t.idx = {i % L.block.x, i / L.block.x % L.block.y, i / (L.block.x * L.block.y)};
    t.stack_lo = g_stacks.get(i);
    t.stack_hi = t.stack_lo + kStackBytes;
    make_context(t.context, t.stack_lo, t.stack_hi, &fiber_main);
  }
  // A block starts with shared memory of unknown content: poison it (NaN for floats), and forget
  // what the previous block wrote.
  std::memset(arena(), 0xFF, static_cast<std::size_t>(L.shared_bytes));
  std::fill_n(g_shadow.begin(), L.shared_bytes, SharedShadow{0, -1, -1, 0});
  L.epoch = 1;
  for (;;) {
    bool all_exited = true;
    for (Thread& t : L.threads) {
      if (t.state == State::Ready) resume(t);
      if (!L.error.empty()) TORCH_CHECK(false, L.error);
      all_exited = all_exited && t.state == State::Exited;
    }
    if (all_exited) return;
    if (complete_shuffles(L) || complete_barrier(L)) continue;
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

// ----------------------------------------------------------------------------------- device API

uint3 thread_idx() { return g_thread->idx; }
uint3 block_idx() { return g_launch->block_idx; }
dim3 block_dim() { return g_launch->block; }
dim3 grid_dim() { return g_launch->grid; }
void* dynamic_shared() { return arena(); }

void syncthreads(const char* file, int line) { suspend(State::AtBarrier, file, line); }

uint64_t shuffle(ShuffleKind kind, const char* file, int line, unsigned int mask, uint64_t bits, int arg, int width) {
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
  suspend(State::AtShuffle, file, line);
  return t->result;
}

void check_vector_access(const void* p, std::size_t bytes, const char* intrinsic) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto arena_lo = reinterpret_cast<uintptr_t>(g_arena) - kArenaGuard;
  if (g_arena != nullptr && a >= arena_lo && a < arena_lo + kArenaBytes + 2 * kArenaGuard) {
    fail(std::string(intrinsic) + " on a shared-memory address: it reads and writes global memory only");
  }
  if (a % bytes != 0) {
    std::ostringstream o;
    o << "misaligned " << bytes << "-byte " << intrinsic << " at address 0x" << std::hex << a << std::dec << " ("
      << a % bytes << " bytes past a " << bytes << "-byte boundary)";
    fail(o.str());
  }
}

float ex2_approx_ftz(float x) {
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
            const void* params, std::size_t params_bytes, KernelEntry entry) {
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
  g_launch_log.push_back(log.str());

  LaunchState L;
  L.kernel = kernel;
  L.grid = grid;
  L.block = block;
  L.shared_bytes = shared_bytes;
  L.entry = entry;
  L.params = params;
  const auto params_begin = reinterpret_cast<uintptr_t>(params);
  g_regions[params_begin] = Region{params_begin + params_bytes, "the kernel parameters", g_call, true};
  ++g_regions_version;
  g_launch = &L;
  struct Cleanup {
    uintptr_t params;
    ~Cleanup() {
      g_launch = nullptr;
      g_thread = nullptr;
      g_regions.erase(params);
      ++g_regions_version;
    }
  } cleanup{params_begin};
  arena();
  for (unsigned int z = 0; z < grid.z; ++z) {
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) {
        L.block_idx = {x, y, z};
        run_block(L);
      }
    }
  }
}

// ----------------------------------------------------------------------------------- test control

void configure(const DeviceProperties& props) {
  TORCH_CHECK(props.sm_count > 0 && props.max_grid_x > 0, "simt: sm_count and max_grid_x must be positive");
  TORCH_CHECK(props.max_shared_optin >= 0 && static_cast<std::size_t>(props.max_shared_optin) <= kArenaBytes,
              "simt: max_shared_optin must lie in [0, ", kArenaBytes, "]");
  g_props = props;
  g_max_dynamic_shared.clear();  // attributes above a shrunk limit would be refused now
}

void begin_call() {
  TORCH_CHECK(!g_in_call, "simt: begin_call inside a call");
  ++g_call;
  g_in_call = true;
  ++g_regions_version;
}

void end_call() {
  g_in_call = false;
  ++g_regions_version;
}

bool in_call() { return g_in_call; }

void register_global(const void* p, std::size_t bytes, std::string label) {
  const auto begin = reinterpret_cast<uintptr_t>(p);
  g_regions[begin] = Region{begin + bytes, std::move(label), g_call, false};
  ++g_regions_version;
}

void unregister_global(const void* p) {
  auto it = g_regions.find(reinterpret_cast<uintptr_t>(p));
  if (it != g_regions.end() && !it->second.parameters) {
    g_regions.erase(it);
    ++g_regions_version;
  }
}

std::vector<std::string> take_launch_log() { return std::exchange(g_launch_log, {}); }

std::vector<std::string> launchable_kernels() {
  return {launchable_names().begin(), launchable_names().end()};
}

}  // namespace simt

// ----------------------------------------------------------------------------------- ubsan hook
// -fsanitize=alignment: called before a load or store through a T* (or T&) whose address is not a
// multiple of alignof(T). The host compiler may split an aligned 16-byte copy into narrower moves,
// so this type-level check, not the size of each move, is what catches a misaligned vector access.
extern "C" {
struct SimtSourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct SimtTypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct SimtTypeMismatch {
  SimtSourceLocation location;
  const SimtTypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};

void __ubsan_handle_type_mismatch_v1(SimtTypeMismatch* data, uintptr_t pointer) {
  if (simt::g_thread == nullptr || pointer == 0) return;  // host code, or a null check we do not enable
  const uintptr_t alignment = uintptr_t(1) << data->log_alignment;
  std::ostringstream o;
  o << "misaligned " << alignment << "-byte access to " << data->type->name << " at address 0x" << std::hex << pointer
    << std::dec << " (" << pointer % alignment << " bytes past a " << alignment << "-byte boundary) at "
    << simt::base_name(data->location.file) << ":" << data->location.line;
  simt::fail(o.str());
}
void __ubsan_handle_type_mismatch_v1_abort(SimtTypeMismatch* data, uintptr_t pointer) {
  __ubsan_handle_type_mismatch_v1(data, pointer);
}
}

// ----------------------------------------------------------------------------------- tsan hooks
// Called by code compiled with -fsanitize=thread. Plain loads and stores are checked; atomics
// (reference counts in host code) are performed, sequentially consistent.
extern "C" {
#define SIMT_ACCESS_HOOKS(n)                                                                          \
  void __tsan_read##n(void* p) { simt::on_access(p, n, false, true); }                               \
  void __tsan_write##n(void* p) { simt::on_access(p, n, true, true); }                               \
  void __tsan_unaligned_read##n(void* p) { simt::on_access(p, n, false, false); }                    \
  void __tsan_unaligned_write##n(void* p) { simt::on_access(p, n, true, false); }
SIMT_ACCESS_HOOKS(1)
SIMT_ACCESS_HOOKS(2)
SIMT_ACCESS_HOOKS(4)
SIMT_ACCESS_HOOKS(8)
SIMT_ACCESS_HOOKS(16)
#undef SIMT_ACCESS_HOOKS
void __tsan_read_range(void* p, unsigned long n) { simt::on_access(p, n, false, false); }
void __tsan_write_range(void* p, unsigned long n) { simt::on_access(p, n, true, false); }
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_init() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}

#define SIMT_ATOMICS(bits, T)                                                                          \
  T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {               \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
  }                                                                                                   \
  int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                 \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
  }                                                                                                   \
  T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                     \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
    return c;                                                                                         \
  }
SIMT_ATOMICS(8, char)
SIMT_ATOMICS(16, short)
SIMT_ATOMICS(32, int)
SIMT_ATOMICS(64, long long)
#undef SIMT_ATOMICS
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}
