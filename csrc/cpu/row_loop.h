// The row loop every CPU row kernel shares: rows in parallel, each task with its own scratch, and
// compile-time flags from run-time ones. Like vec_lanes.h this is compiled once per CPU capability:
// the including file defines KL_FUSED_CPU_NAMESPACE (and, for AVX2, the CPU_CAPABILITY macros).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE {
namespace {

// body(scratch, begin, end) over [0, rows) in parallel tasks of at least ~16K elements (tiny
// vocabularies do not pay one task per row); each task gets its own `scratch_elems` of acc_t.
template <typename acc_t, typename Body>
void parallel_rows(int64_t rows, int64_t vocab, int64_t scratch_elems, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> scratch(scratch_elems > 0 ? new acc_t[scratch_elems] : nullptr);
    body(scratch.get(), begin, end);
  });
}

// run(std::true_type{}) or run(std::false_type{}): a run-time flag as a compile-time one.
template <typename Run>
void with_flag(bool flag, const Run& run) {
  if (flag) run(std::true_type{});
  else run(std::false_type{});
}

}  // namespace
}  // namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE
