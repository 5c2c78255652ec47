// The SIMT emulator's sanitizer: the hooks that the kernels' translation units call before each
// memory access (compiled with -fsanitize=thread, whose __tsan_readN / __tsan_writeN are defined
// here: libtsan is not linked), at each atomic (cuda_device.h) and on undefined behaviour
// (-fsanitize=alignment,signed-integer-overflow,bounds,shift: the __ubsan_handle_* below), and the
// shadows that remember who touched which byte. An access is a read, a write or an atomic, and is
// classified by address:
//   - the thread's own stack (its registers and local memory): not checked;
//   - the block's dynamic shared memory (an arena with guard zones around it): bounds against the
//     launch's size, initialisation (reading a byte no thread has written), and the race rule
//     between the threads of the block; in a cluster, each block's shared memory has its slot in the
//     arena, which the cluster's other blocks reach through map_shared_rank (distributed shared
//     memory): the same checks, and the race rule between blocks, which only a cluster barrier
//     orders (a block's __syncthreads orders its own threads, not another block's accesses);
//   - the kernel's parameters: read-only;
//   - anything else is global memory and must lie inside a tensor given to the current call
//     (begin_call registers the inputs, allocations made during the call are registered as they
//     happen) -- otherwise out of bounds. The race rule holds between the threads of a block and
//     between the blocks of a launch, which nothing orders;
//   - 2/4/8/16-byte accesses to shared or global memory must be aligned to their size.
// The race rule: two threads touching one byte between two barriers (two blocks, in one launch)
// race if one of them writes it plainly, or if one accesses it atomically and the other plainly.
// Reads by any number of threads, and atomics by any number, are no race.
//
// Global memory's shadow lives for one call and is kept per byte touched (pages allocated on first
// touch). It also records which bytes the call's kernels wrote, which check_outputs (library.cpp)
// uses to find output bytes no kernel wrote. Every checked global access passes through
// record_global() with its tensor, offset, size and kind: per-launch counters (bytes per tensor,
// distinct bytes) belong there.
// Host code compiled into the kernel units (outside any fiber) is not checked; its undefined
// behaviour is kept and reported when the call ends (take_host_error).
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "simt/execution.h"
#include "simt/host_control.h"

namespace simt {
namespace detail {
namespace {

// ----------------------------------------------------------------------------------- the race rule

// Who touched one byte in one barrier interval (Id: thread id + 1) or in one launch (block id + 1):
// 0 nobody, kSeveral more than one.
template <typename Id>
struct Touches {
  static constexpr Id kSeveral = std::numeric_limits<Id>::max();
  Id writer = 0, reader = 0, atomic = 0;
};

// Whether the access `kind` by `me` races with an earlier touch by another thread (block): then
// *earlier and *other say which. Otherwise records the access.
template <typename Id>
bool races(Touches<Id>& t, Id me, Access kind, Access* earlier, Id* other) {
  const auto by_other = [me](Id id) { return id != 0 && id != me; };
  if (by_other(t.writer)) {
    *earlier = Access::Write;
    *other = t.writer;
    return true;
  }
  if (kind != Access::Atomic && by_other(t.atomic)) {
    *earlier = Access::Atomic;
    *other = t.atomic;
    return true;
  }
  if (kind != Access::Read && by_other(t.reader)) {
    *earlier = Access::Read;
    *other = t.reader;
    return true;
  }
  const auto add = [me](Id& id) { id = (id == 0 || id == me) ? me : Touches<Id>::kSeveral; };
  switch (kind) {
    case Access::Write: t.writer = me; break;
    case Access::Read: add(t.reader); break;
    case Access::Atomic: add(t.atomic); break;
  }
  return false;
}

// An access kind in messages: "(write after read)", "written by thread (0,0,0)".
const char* noun(Access kind) {
  static const char* const names[] = {"read", "write", "atomic"};
  return names[static_cast<int>(kind)];
}

const char* past(Access kind) {
  static const char* const names[] = {"read", "written", "accessed atomically"};
  return names[static_cast<int>(kind)];
}

std::string thread_name(uint16_t id) {
  if (id == Touches<uint16_t>::kSeveral) return "several threads";
  const Thread& t = g_launch->threads[static_cast<std::size_t>(id - 1)];
  return "thread " + str(t.idx) + (g_launch->cluster > 1 ? " of block " + str(block_idx_of(t)) : "");
}

// A block of the running cluster by rank + 1.
std::string rank_name(uint8_t id) {
  if (id == Touches<uint8_t>::kSeveral) return "several blocks of the cluster";
  return "block " + str(block_index(g_launch->first_block + id - 1u)) + " (rank " + std::to_string(id - 1) + " of the cluster)";
}

std::string block_name(uint32_t id) {
  if (id == Touches<uint32_t>::kSeveral) return "several blocks";
  return "block " + str(block_index(id - 1));
}

// "<place>: written by thread (0,0,0) and read by this thread <between> (read after write)"
[[noreturn]] void race(const std::string& place, Access earlier, const std::string& by, Access kind,
                       const char* between) {
  std::ostringstream o;
  o << place << ": " << past(earlier) << " by " << by << " and " << past(kind) << " by this thread " << between << " ("
    << noun(kind) << " after " << noun(earlier) << ")";
  fail(o.str());
}

void check_alignment(uintptr_t a, std::size_t size, const char* space) {
  if ((size == 2 || size == 4 || size == 8 || size == 16) && a % size != 0) {
    std::ostringstream o;
    o << "misaligned " << size << "-byte " << space << " access at address 0x" << std::hex << a << std::dec << " ("
      << a % size << " bytes past a " << size << "-byte boundary)";
    fail(o.str());
  }
}

void count_shared(std::size_t size, Access kind);  // the traffic record, below

// ----------------------------------------------------------------------------------- shared memory

struct SharedShadow {
  Touches<uint16_t> threads;  // in barrier interval `interval` of the accessing thread's block
  uint32_t interval;
  Touches<uint8_t> blocks;    // the cluster's blocks (rank + 1), in cluster interval `cluster_interval`
  uint32_t cluster_interval;
  uint8_t written;            // any thread wrote it since the cluster (block) began
};

std::vector<SharedShadow> g_shared;  // kArenaBytes per block of the running cluster

void shared_access(Thread* t, uintptr_t a, std::size_t size, Access kind, bool natural) {
  LaunchState& L = *g_launch;
  const auto from_arena = static_cast<int64_t>(a - reinterpret_cast<uintptr_t>(g_arena));
  const auto slot = static_cast<int64_t>(kArenaBytes);
  // The block whose shared memory it is (the caller's own below and above the arena), and the offset.
  const int64_t rank = from_arena < 0 ? t->rank : std::min<int64_t>(from_arena / slot, L.cluster - 1);
  const int64_t offset = from_arena - rank * slot;
  const int64_t limit = L.shared_bytes;
  const bool remote = rank != static_cast<int64_t>(t->rank);
  if (offset < 0 || offset + static_cast<int64_t>(size) > limit) {
    std::ostringstream o;
    o << "out-of-bounds " << (remote ? "distributed " : "") << "shared-memory " << noun(kind) << " of " << size
      << " bytes at offset " << offset;
    if (remote) o << " of the shared memory of block rank " << rank;
    o << " (the launch has " << limit << " bytes of dynamic shared memory)";
    fail(o.str());
  }
  if (remote && L.exited[static_cast<std::size_t>(rank)] == L.block_threads) {
    fail("distributed shared-memory " + std::string(noun(kind)) + " of block rank " + std::to_string(rank) +
         ", whose threads have all exited: a block's shared memory lives as long as the block (a cluster barrier "
         "before it exits keeps it for the others)");
  }
  if (remote) L.remote_access_interval[static_cast<std::size_t>(rank)] = L.cluster_interval;
  if (natural) check_alignment(a, size, "shared-memory");
  count_shared(size, kind);
  const uint32_t interval = interval_of(*t);
  const auto me = static_cast<uint16_t>(t->id + 1);
  const auto my_block = static_cast<uint8_t>(t->rank + 1);
  const std::string space = remote ? "distributed shared-memory" : "shared-memory";
  const std::string where = remote ? " of block rank " + std::to_string(rank) : "";
  for (std::size_t i = 0; i < size; ++i) {
    const int64_t at = offset + static_cast<int64_t>(i);
    SharedShadow& s = g_shared[static_cast<std::size_t>(rank * slot + at)];
    if (s.interval != interval) {
      s.interval = interval;
      s.threads = {};
    }
    if (s.cluster_interval != L.cluster_interval) {
      s.cluster_interval = L.cluster_interval;
      s.blocks = {};
    }
    if (kind != Access::Write && !s.written) {
      fail(std::string(kind == Access::Read ? "read" : "atomic") + " of uninitialised " +
           (remote ? "distributed shared memory" : "shared memory") + " at offset " +
           std::to_string(at) + where + " (no thread has written it)");
    }
    Access earlier;
    uint8_t other_block;
    if (races(s.blocks, my_block, kind, &earlier, &other_block)) {
      race(space + " race at offset " + std::to_string(at) + where, earlier, rank_name(other_block), kind,
           "of another block of the cluster with no cluster barrier between");
    }
    uint16_t other;
    if (races(s.threads, me, kind, &earlier, &other)) {
      race(space + " race at offset " + std::to_string(at) + where, earlier, thread_name(other), kind,
           "with no __syncthreads between");
    }
    if (kind != Access::Read) s.written = 1;
  }
}

// ----------------------------------------------------------------------------------- global memory

struct Region {
  uintptr_t end;
  std::string label;
  uint64_t call;     // the call it belongs to
  bool parameters;   // the launch's kernel parameters: read-only, valid for the launch
  bool allocated;    // allocated during its call (not one of the call's inputs)
};

std::map<uintptr_t, Region> g_regions;
uint64_t g_regions_version = 0;  // changes whenever g_regions or the current call does
uint64_t g_call = 0;             // generation of the current call
bool g_in_call = false;
std::string g_host_error;

struct GlobalShadow {
  Touches<uint16_t> threads;     // of the block, in barrier interval `interval`
  uint16_t block_writer_thread;  // the thread of blocks.writer that wrote it
  uint32_t interval;
  Touches<uint32_t> blocks;      // in launch `launch`
  uint32_t launch;
  uint32_t written;              // a kernel of the call wrote it
  uint8_t loaded_in_launch;      // read (or accessed atomically) by launch `launch`: a later read re-reads it
  uint8_t stored_in_launch;      // written by launch `launch`
};

// The shadow of every global byte the call's kernels touch, a page at a time. All zero is
// "untouched": intervals and launches are numbered from 1.
class GlobalShadowTable {
 public:
  GlobalShadow& at(uintptr_t a) {
    const uintptr_t page = a >> kPageBits;
    if (page != last_page_) {
      auto& slot = pages_[page];
      if (!slot) {
        slot.reset(static_cast<GlobalShadow*>(std::calloc(kPageBytes, sizeof(GlobalShadow))));
        TORCH_CHECK(slot != nullptr, "simt: out of memory for the global-memory shadow");
      }
      last_page_ = page;
      last_ = slot.get();
    }
    return last_[a & (kPageBytes - 1)];
  }

  const GlobalShadow* find(uintptr_t a) const {
    const auto it = pages_.find(a >> kPageBits);
    return it == pages_.end() ? nullptr : &it->second.get()[a & (kPageBytes - 1)];
  }

  void clear() {
    pages_.clear();
    last_page_ = ~uintptr_t(0);
    last_ = nullptr;
  }

 private:
  static constexpr int kPageBits = 12;
  static constexpr uintptr_t kPageBytes = uintptr_t(1) << kPageBits;
  struct Free {
    void operator()(GlobalShadow* p) const { std::free(p); }
  };
  std::unordered_map<uintptr_t, std::unique_ptr<GlobalShadow, Free>> pages_;
  uintptr_t last_page_ = ~uintptr_t(0);
  GlobalShadow* last_ = nullptr;
};

GlobalShadowTable g_global;

using RegionEntry = std::pair<const uintptr_t, Region>;

// ----------------------------------------------------------------------------------- traffic
// What each launch moves: global bytes loaded and stored per tensor (and how many distinct bytes),
// shared-memory bytes, barriers, MUFU calls; and a model of L2 for the question "does a re-read come
// from L2 or from device memory?". The model, per block: an LRU over 128-byte lines holding the
// block's share of L2 (l2_bytes / resident blocks; by default 50 MB over min(grid, SMs) blocks, one
// resident block per SM as the row kernels' registers and shared memory allow), fed by the block's
// global accesses in lock-step order (within a barrier interval, every thread's k-th access before
// any thread's (k+1)-th: the threads of a block progress together on the device, whereas the
// emulator runs each to its barrier in turn; a line's accesses in one interval go together, at its
// first: so a line touched twice far apart within one interval counts as touched once). A load or store inserts its line at the most recently
// used end, an evict-first one (__ldcs, __stcs) at the least recently used end. A block starts with
// an empty share (its inputs are not in L2). Modelled device-memory bytes: 128 per load that misses,
// plus every distinct byte stored (written back once). It is a model, not a measurement: the real
// L2 is shared, hashed, sectored (32-byte sectors) and set-associative.

struct RegionTraffic {
  std::string label;
  uint64_t loaded = 0, stored = 0, distinct_loaded = 0, distinct_stored = 0;
};

struct PendingAccess {
  uint32_t seq;      // the thread's k-th global access in the interval
  uint16_t thread;
  bool store;
  bool evict_first;
  uint32_t reread;   // bytes of it that the launch had read before
  uintptr_t line;
};

struct LaunchTraffic {
  std::map<uintptr_t, RegionTraffic> regions;  // by the tensor's first byte
  uint64_t shared_loaded = 0, shared_stored = 0;
  uint64_t reread_bytes = 0;        // global bytes loaded again by the launch
  uint64_t reread_dram_bytes = 0;   // 128 per re-read access whose line the model has lost
  uint64_t dram_read_bytes = 0;     // 128 per load whose line misses
  uint64_t l2_share_bytes = 0;
};

LaunchTraffic g_traffic;
std::vector<std::string> g_traffic_log;
int64_t g_l2_bytes = 50 * 1000 * 1000;
int64_t g_l2_resident_blocks = 0;  // 0: min(grid, SMs)
uint64_t g_reread_pending = 0;     // re-read bytes of the access being recorded
uint64_t g_new_stores_pending = 0; // bytes of it that the launch had not written before
std::vector<PendingAccess> g_pending;
std::vector<uint32_t> g_thread_seq(kMaxBlockThreads * kMaxCluster);

// An LRU over line addresses.
class LineLru {
 public:
  void reset(std::size_t capacity) {
    capacity_ = capacity;
    order_.clear();
    where_.clear();
  }
  // Touches the line; true if it was held. evict_first puts it at the least recently used end.
  bool touch(uintptr_t line, bool evict_first) {
    auto it = where_.find(line);
    const bool hit = it != where_.end();
    if (hit) order_.erase(it->second);
    if (capacity_ == 0) return false;
    if (!hit && where_.size() >= capacity_) {
      where_.erase(order_.back());
      order_.pop_back();
    }
    if (evict_first) {
      order_.push_back(line);
      where_[line] = std::prev(order_.end());
    } else {
      order_.push_front(line);
      where_[line] = order_.begin();
    }
    return hit;
  }

 private:
  std::size_t capacity_ = 0;
  std::list<uintptr_t> order_;
  std::unordered_map<uintptr_t, std::list<uintptr_t>::iterator> where_;
};

LineLru g_l2;

void count_shared(std::size_t size, Access kind) {
  if (kind != Access::Write) g_traffic.shared_loaded += size;
  if (kind != Access::Read) g_traffic.shared_stored += size;
}

// Per byte, before the shadow records the access: distinct and re-read bytes.
void count_global_byte(GlobalShadow& s, Access kind) {
  if (kind != Access::Write) {
    if (s.loaded_in_launch) ++g_reread_pending;
    s.loaded_in_launch = 1;
  }
  if (kind != Access::Read) {
    if (!s.stored_in_launch) ++g_new_stores_pending;
    s.stored_in_launch = 1;
  }
}

RegionTraffic& region_traffic(const RegionEntry& region) {
  auto [it, fresh] = g_traffic.regions.try_emplace(region.first);
  if (fresh) it->second.label = region.second.label;
  return it->second;
}

void count_global_access(Thread* t, const RegionEntry& region, uintptr_t a, std::size_t size, Access kind) {
  RegionTraffic& r = region_traffic(region);
  const uint64_t reread = std::exchange(g_reread_pending, 0);
  if (kind != Access::Write) {
    r.loaded += size;
    r.distinct_loaded += size - reread;
    g_traffic.reread_bytes += reread;
  }
  const uint64_t new_stores = std::exchange(g_new_stores_pending, 0);
  if (kind != Access::Read) {
    r.stored += size;
    r.distinct_stored += new_stores;
  }
  const bool evict_first = a >= t->evict_first_lo && a + size <= t->evict_first_hi;
  uint32_t& seq = g_thread_seq[static_cast<std::size_t>(t->id)];
  for (uintptr_t line = a >> 7; line <= (a + size - 1) >> 7; ++line) {
    if (kind != Access::Write) {
      g_pending.push_back({seq, static_cast<uint16_t>(t->id), false, evict_first, static_cast<uint32_t>(reread), line});
    }
    if (kind != Access::Read) g_pending.push_back({seq, static_cast<uint16_t>(t->id), true, evict_first, 0, line});
  }
  ++seq;
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

void reset_thread_sequences() {
  std::fill_n(g_thread_seq.begin(), std::min<std::size_t>(g_launch->threads.size(), g_thread_seq.size()), 0u);
}

}  // namespace

void begin_launch_traffic() {
  g_traffic = LaunchTraffic{};
  g_pending.clear();
  g_reread_pending = g_new_stores_pending = 0;
  const DeviceProperties props = device_properties();
  const uint64_t blocks = uint64_t(g_launch->grid.x) * g_launch->grid.y * g_launch->grid.z;
  const uint64_t resident = g_l2_resident_blocks > 0 ? static_cast<uint64_t>(g_l2_resident_blocks)
                                                      : std::min<uint64_t>(blocks, static_cast<uint64_t>(props.sm_count));
  g_traffic.l2_share_bytes = static_cast<uint64_t>(g_l2_bytes) / std::max<uint64_t>(resident, 1);
}

void begin_block_traffic() {
  g_l2.reset(g_traffic.l2_share_bytes * g_launch->cluster / 128);  // a cluster's blocks share their shares
  g_pending.clear();
  std::fill(g_thread_seq.begin(), g_thread_seq.end(), 0u);
}

// The interval's global accesses, in lock-step order, through the block's L2 share. A line's
// accesses in the interval go together, at the place of its first one: the threads that skip a
// load (past the end of a range) fall behind the others in their count of accesses, and would
// otherwise split the eight 16-byte accesses of one line across the sweep.
void end_interval_traffic() {
  const auto before = [](const PendingAccess& x, const PendingAccess& y) {
    return x.seq != y.seq ? x.seq < y.seq : x.thread < y.thread;
  };
  std::unordered_map<uintptr_t, const PendingAccess*> first;
  first.reserve(g_pending.size());
  for (const PendingAccess& p : g_pending) {
    auto [it, fresh] = first.try_emplace(p.line, &p);
    if (!fresh && before(p, *it->second)) it->second = &p;
  }
  std::vector<std::pair<PendingAccess, PendingAccess>> keyed;  // (the line's first access, the access)
  keyed.reserve(g_pending.size());
  for (const PendingAccess& p : g_pending) keyed.emplace_back(*first[p.line], p);
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    if (before(x.first, y.first)) return true;
    if (before(y.first, x.first)) return false;
    return before(x.second, y.second);
  });
  for (std::size_t i = 0; i < keyed.size(); ++i) g_pending[i] = keyed[i].second;
  for (const PendingAccess& p : g_pending) {
    const bool hit = g_l2.touch(p.line, p.evict_first);
    if (p.store || hit) continue;
    g_traffic.dram_read_bytes += 128;
    if (p.reread > 0) g_traffic.reread_dram_bytes += 128;
  }
  g_pending.clear();
  reset_thread_sequences();
}

void end_launch_traffic() {
  const LaunchState& L = *g_launch;
  const LaunchTraffic& T = g_traffic;
  std::ostringstream o;
  o << "{\"kernel\": " << json_string(L.kernel) << ", \"grid\": " << L.grid.x << ", \"block\": " << L.block.x
    << ", \"shared\": " << L.shared_bytes << ", \"cluster\": " << L.cluster << ", \"barriers\": " << L.barriers
    << ", \"cluster_barriers\": " << L.cluster_barriers << ", \"ex2\": " << L.ex2
    << ", \"lg2\": " << L.lg2 << ", \"shared_loaded\": " << T.shared_loaded << ", \"shared_stored\": " << T.shared_stored
    << ", \"reread_bytes\": " << T.reread_bytes << ", \"reread_dram_bytes\": " << T.reread_dram_bytes
    << ", \"dram_read_bytes\": " << T.dram_read_bytes << ", \"l2_share_bytes\": " << T.l2_share_bytes
    << ", \"regions\": [";
  const char* comma = "";
  for (const auto& [address, r] : T.regions) {
    o << comma << "{\"address\": " << address << ", \"label\": " << json_string(r.label) << ", \"loaded\": " << r.loaded
      << ", \"stored\": " << r.stored << ", \"distinct_loaded\": " << r.distinct_loaded
      << ", \"distinct_stored\": " << r.distinct_stored << "}";
    comma = ", ";
  }
  o << "]}";
  g_traffic_log.push_back(o.str());
}

namespace {

// Every checked access to the bytes [a, a + size) of a tensor: the race rule within the block and
// across the launch's blocks, and the record of what the call's kernels wrote.
void record_global(Thread* t, const RegionEntry& region, uintptr_t a, std::size_t size, Access kind) {
  const LaunchState& L = *g_launch;
  const auto me = static_cast<uint16_t>(t->id + 1);
  const uint32_t block = block_id(*t) + 1;
  const uint32_t interval = interval_of(*t);
  for (std::size_t i = 0; i < size; ++i) {
    GlobalShadow& s = g_global.at(a + i);
    if (s.interval != interval) {
      s.interval = interval;
      s.threads = {};
    }
    if (s.launch != L.id) {
      s.launch = L.id;
      s.blocks = {};
      s.block_writer_thread = 0;
      s.loaded_in_launch = 0;
      s.stored_in_launch = 0;
    }
    count_global_byte(s, kind);
    const auto place = [&] {
      return "global-memory race at byte " + std::to_string(a + i - region.first) + " of " + region.second.label;
    };
    Access earlier;
    uint16_t other_thread;
    if (races(s.threads, me, kind, &earlier, &other_thread)) {
      race(place(), earlier, thread_name(other_thread), kind, "with no __syncthreads between");
    }
    uint32_t other_block;
    if (races(s.blocks, block, kind, &earlier, &other_block)) {
      std::string by = block_name(other_block);
      if (earlier == Access::Write) by += " (" + thread_name(s.block_writer_thread) + ")";
      race(place(), earlier, by, kind, "of another block of the same launch (nothing orders two blocks)");
    }
    if (kind == Access::Write) s.block_writer_thread = me;
    if (kind != Access::Read) s.written = 1;
  }
  count_global_access(t, region, a, size, kind);
}

// The region starting at or before a (a may lie past its end), or nullptr.
const RegionEntry* region_at_or_before(uintptr_t a) {
  auto it = g_regions.upper_bound(a);
  return it == g_regions.begin() ? nullptr : &*std::prev(it);
}

[[noreturn]] void out_of_bounds_global(Thread* t, uintptr_t a, std::size_t size, Access kind, const RegionEntry* hit,
                                      bool given) {
  for (const Thread& other : g_launch->threads) {
    if (&other != t && a >= reinterpret_cast<uintptr_t>(other.stack_lo) && a < reinterpret_cast<uintptr_t>(other.stack_hi)) {
      fail(std::string(noun(kind)) + " of another thread's local memory (thread " + str(other.idx) + ")");
    }
  }
  std::ostringstream o;
  o << "out-of-bounds global " << noun(kind) << " of " << size << " bytes at address 0x" << std::hex << a << std::dec;
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

void global_access(Thread* t, uintptr_t a, std::size_t size, Access kind, bool natural) {
  // Most accesses fall in the region the previous one did.
  static const RegionEntry* last = nullptr;
  static uint64_t last_version = ~uint64_t(0);
  const RegionEntry* hit = nullptr;
  if (last_version == g_regions_version && a >= last->first && a + size <= last->second.end) {
    hit = last;
  } else {
    hit = region_at_or_before(a);
    const bool given = hit != nullptr && (hit->second.parameters || (g_in_call && hit->second.call == g_call));
    if (hit == nullptr || !given || a + size > hit->second.end) out_of_bounds_global(t, a, size, kind, hit, given);
    last = hit;
    last_version = g_regions_version;
  }
  if (hit->second.parameters) {
    if (kind != Access::Read) fail("write to the kernel's parameters (they are read-only)");
    return;
  }
  if (natural) check_alignment(a, size, "global-memory");
  record_global(t, *hit, a, size, kind);
}

void access(void* addr, std::size_t size, Access kind, bool natural) {
  Thread* t = g_thread;
  if (t == nullptr) return;  // host code compiled into a kernel unit
  const auto a = reinterpret_cast<uintptr_t>(addr);
  if (a >= reinterpret_cast<uintptr_t>(t->stack_lo) && a < reinterpret_cast<uintptr_t>(t->stack_hi)) {
    if (kind == Access::Atomic) fail("atomic on the thread's local memory");
    return;
  }
  maybe_preempt();
  if (in_shared_arena(a)) return shared_access(t, a, size, kind, natural);
  global_access(t, a, size, kind, natural);
}

// Undefined behaviour at `location`: a fiber fails; host code leaves it for the end of the call.
void undefined_behaviour(const std::string& what, const char* file, uint32_t line) {
  const std::string message = what + " at " + base_name(file) + ":" + std::to_string(line);
  if (g_thread != nullptr) fail(message);
  if (g_host_error.empty()) g_host_error = "simt: undefined behaviour in host code: " + message;
}

}  // namespace

void begin_block_memory(int64_t shared_bytes, unsigned int blocks) {
  // Shared memory starts with unknown content: poison it (NaN for floats), and forget what the
  // previous block (cluster) wrote.
  if (g_shared.size() < blocks * kArenaBytes) g_shared.resize(blocks * kArenaBytes);
  for (unsigned int rank = 0; rank < blocks; ++rank) {
    std::memset(arena() + rank * kArenaBytes, 0xFF, static_cast<std::size_t>(shared_bytes));
    std::fill_n(g_shared.begin() + static_cast<std::ptrdiff_t>(rank * kArenaBytes), shared_bytes, SharedShadow{});
  }
  begin_block_traffic();
}

void register_parameters(const void* p, std::size_t bytes) {
  const auto begin = reinterpret_cast<uintptr_t>(p);
  g_regions[begin] = Region{begin + bytes, "the kernel parameters", g_call, true, false};
  ++g_regions_version;
}

void unregister_parameters(const void* p) {
  g_regions.erase(reinterpret_cast<uintptr_t>(p));
  ++g_regions_version;
}

}  // namespace detail

using namespace detail;

void check_vector_access(const void* p, std::size_t bytes, const char* intrinsic) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  // The access that follows (perhaps split into narrower moves) is evict-first for the L2 model.
  if (g_thread != nullptr) {
    const bool streaming = std::strcmp(intrinsic, "__ldcs") == 0 || std::strcmp(intrinsic, "__stcs") == 0;
    g_thread->evict_first_lo = streaming ? a : 0;
    g_thread->evict_first_hi = streaming ? a + bytes : 0;
  }
  if (in_shared_arena(a)) {
    fail(std::string(intrinsic) + " on a shared-memory address: it reads and writes global memory only");
  }
  if (a % bytes != 0) {
    std::ostringstream o;
    o << "misaligned " << bytes << "-byte " << intrinsic << " at address 0x" << std::hex << a << std::dec << " ("
      << a % bytes << " bytes past a " << bytes << "-byte boundary)";
    fail(o.str());
  }
}

void atomic_access(void* p, std::size_t bytes) {
  TORCH_CHECK(g_thread != nullptr, "simt: an atomic was called outside a kernel");
  access(p, bytes, Access::Atomic, true);
}

// ----------------------------------------------------------------------------------- test control

void begin_call() {
  TORCH_CHECK(!g_in_call, "simt: begin_call inside a call");
  ++g_call;
  g_in_call = true;
  ++g_regions_version;
  g_global.clear();
  begin_call_schedule();
}

void end_call() {
  g_in_call = false;
  ++g_regions_version;
  g_global.clear();
}

bool in_call() { return g_in_call; }

void register_global(const void* p, std::size_t bytes, std::string label, bool allocated) {
  const auto begin = reinterpret_cast<uintptr_t>(p);
  g_regions[begin] = Region{begin + bytes, std::move(label), g_call, false, allocated};
  ++g_regions_version;
}

void unregister_global(const void* p) {
  auto it = g_regions.find(reinterpret_cast<uintptr_t>(p));
  if (it != g_regions.end() && !it->second.parameters) {
    g_regions.erase(it);
    ++g_regions_version;
  }
}

bool allocated_by_call(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const RegionEntry* hit = region_at_or_before(a);
  return g_in_call && hit != nullptr && a < hit->second.end && hit->second.allocated && hit->second.call == g_call;
}

bool written_by_kernel(const void* p) {
  const GlobalShadow* s = g_global.find(reinterpret_cast<uintptr_t>(p));
  return s != nullptr && s->written != 0;
}

std::string take_host_error() { return std::exchange(g_host_error, {}); }

std::vector<std::string> take_traffic() { return std::exchange(g_traffic_log, {}); }

void configure_l2_model(int64_t l2_bytes, int64_t resident_blocks) {
  TORCH_CHECK(l2_bytes >= 0 && resident_blocks >= 0, "simt: the L2 model takes sizes >= 0");
  g_l2_bytes = l2_bytes;
  g_l2_resident_blocks = resident_blocks;
}

}  // namespace simt

// ----------------------------------------------------------------------------------- ubsan hooks
// The handlers of -fsanitize=alignment,signed-integer-overflow,bounds,shift (libubsan is not
// linked), with the data layouts the compiler passes them.
extern "C" {
struct SimtSourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct SimtTypeDescriptor {
  uint16_t kind;  // 0: integer, info = log2(bit width) << 1 | signed
  uint16_t info;
  char name[1];   // quoted: "'int'"
};
struct SimtTypeMismatch {
  SimtSourceLocation location;
  const SimtTypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};
struct SimtOverflow {
  SimtSourceLocation location;
  const SimtTypeDescriptor* type;
};
struct SimtShiftOutOfBounds {
  SimtSourceLocation location;
  const SimtTypeDescriptor* lhs_type;
  const SimtTypeDescriptor* rhs_type;
};
struct SimtOutOfBounds {
  SimtSourceLocation location;
  const SimtTypeDescriptor* array_type;
  const SimtTypeDescriptor* index_type;
};
}

namespace {

// An integer operand as the handlers receive it (inline up to the width of a pointer).
std::string value_text(const SimtTypeDescriptor* type, uintptr_t handle) {
  const unsigned width = 1u << (type->info >> 1);
  if (type->kind != 0 || width > 64) return "?";
  if (type->info & 1) {
    const int64_t value = width == 64 ? static_cast<int64_t>(handle)
                                      : static_cast<int64_t>(handle << (64 - width)) >> (64 - width);
    return std::to_string(value);
  }
  return std::to_string(width == 64 ? handle : handle & ((uint64_t(1) << width) - 1));
}

void overflow(const SimtOverflow* data, uintptr_t lhs, uintptr_t rhs, const char* op) {
  simt::detail::undefined_behaviour("signed integer overflow: " + value_text(data->type, lhs) + " " + op + " " +
                                        value_text(data->type, rhs) + " cannot be represented in type " +
                                        data->type->name,
                                    data->location.file, data->location.line);
}

}  // namespace

extern "C" {
// -fsanitize=alignment: called before a load or store through a T* (or T&) whose address is not a
// multiple of alignof(T). The host compiler may split an aligned 16-byte copy into narrower moves,
// so this type-level check, not the size of each move, is what catches a misaligned vector access.
void __ubsan_handle_type_mismatch_v1(SimtTypeMismatch* data, uintptr_t pointer) {
  if (simt::detail::g_thread == nullptr || pointer == 0) return;  // host code, or a null check we do not enable
  const uintptr_t alignment = uintptr_t(1) << data->log_alignment;
  std::ostringstream o;
  o << "misaligned " << alignment << "-byte access to " << data->type->name << " at address 0x" << std::hex << pointer
    << std::dec << " (" << pointer % alignment << " bytes past a " << alignment << "-byte boundary) at "
    << simt::detail::base_name(data->location.file) << ":" << data->location.line;
  simt::detail::fail(o.str());
}
void __ubsan_handle_type_mismatch_v1_abort(SimtTypeMismatch* data, uintptr_t pointer) {
  __ubsan_handle_type_mismatch_v1(data, pointer);
}

void __ubsan_handle_add_overflow(SimtOverflow* data, uintptr_t lhs, uintptr_t rhs) { overflow(data, lhs, rhs, "+"); }
void __ubsan_handle_sub_overflow(SimtOverflow* data, uintptr_t lhs, uintptr_t rhs) { overflow(data, lhs, rhs, "-"); }
void __ubsan_handle_mul_overflow(SimtOverflow* data, uintptr_t lhs, uintptr_t rhs) { overflow(data, lhs, rhs, "*"); }
void __ubsan_handle_divrem_overflow(SimtOverflow* data, uintptr_t lhs, uintptr_t rhs) { overflow(data, lhs, rhs, "/"); }
void __ubsan_handle_negate_overflow(SimtOverflow* data, uintptr_t old) {
  simt::detail::undefined_behaviour("signed integer overflow: negation of " + value_text(data->type, old) +
                                        " cannot be represented in type " + data->type->name,
                                    data->location.file, data->location.line);
}
void __ubsan_handle_shift_out_of_bounds(SimtShiftOutOfBounds* data, uintptr_t lhs, uintptr_t rhs) {
  simt::detail::undefined_behaviour("shift out of bounds: " + value_text(data->lhs_type, lhs) + " of type " +
                                        data->lhs_type->name + " shifted by " + value_text(data->rhs_type, rhs) +
                                        " bits",
                                    data->location.file, data->location.line);
}
void __ubsan_handle_out_of_bounds(SimtOutOfBounds* data, uintptr_t index) {
  simt::detail::undefined_behaviour("index " + value_text(data->index_type, index) + " out of bounds for type " +
                                        data->array_type->name,
                                    data->location.file, data->location.line);
}
void __ubsan_handle_add_overflow_abort(SimtOverflow* d, uintptr_t l, uintptr_t r) { __ubsan_handle_add_overflow(d, l, r); }
void __ubsan_handle_sub_overflow_abort(SimtOverflow* d, uintptr_t l, uintptr_t r) { __ubsan_handle_sub_overflow(d, l, r); }
void __ubsan_handle_mul_overflow_abort(SimtOverflow* d, uintptr_t l, uintptr_t r) { __ubsan_handle_mul_overflow(d, l, r); }
void __ubsan_handle_divrem_overflow_abort(SimtOverflow* d, uintptr_t l, uintptr_t r) {
  __ubsan_handle_divrem_overflow(d, l, r);
}
void __ubsan_handle_negate_overflow_abort(SimtOverflow* d, uintptr_t old) { __ubsan_handle_negate_overflow(d, old); }
void __ubsan_handle_shift_out_of_bounds_abort(SimtShiftOutOfBounds* d, uintptr_t l, uintptr_t r) {
  __ubsan_handle_shift_out_of_bounds(d, l, r);
}
void __ubsan_handle_out_of_bounds_abort(SimtOutOfBounds* d, uintptr_t index) { __ubsan_handle_out_of_bounds(d, index); }
}

// ----------------------------------------------------------------------------------- tsan hooks
// Called by code compiled with -fsanitize=thread. Plain loads and stores are checked; the
// compiler's atomics (reference counts in host code, and the read-modify-write of cuda_device.h's
// atomics, which check themselves through atomic_access) are performed, sequentially consistent.
extern "C" {
#define SIMT_ACCESS_HOOKS(n)                                                                                  \
  void __tsan_read##n(void* p) { simt::detail::access(p, n, simt::detail::Access::Read, true); }             \
  void __tsan_write##n(void* p) { simt::detail::access(p, n, simt::detail::Access::Write, true); }           \
  void __tsan_unaligned_read##n(void* p) { simt::detail::access(p, n, simt::detail::Access::Read, false); }  \
  void __tsan_unaligned_write##n(void* p) { simt::detail::access(p, n, simt::detail::Access::Write, false); }
SIMT_ACCESS_HOOKS(1)
SIMT_ACCESS_HOOKS(2)
SIMT_ACCESS_HOOKS(4)
SIMT_ACCESS_HOOKS(8)
SIMT_ACCESS_HOOKS(16)
#undef SIMT_ACCESS_HOOKS
void __tsan_read_range(void* p, unsigned long n) { simt::detail::access(p, n, simt::detail::Access::Read, false); }
void __tsan_write_range(void* p, unsigned long n) { simt::detail::access(p, n, simt::detail::Access::Write, false); }
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
