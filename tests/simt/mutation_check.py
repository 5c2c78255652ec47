"""Mutation check of the emulated CUDA tests: inject plausible kernel bugs, one at a time, into a
copy of the sources, and show that the emulated test file of the mutated kernel fails on each.

    python tests/simt/mutation_check.py            every mutation
    python tests/simt/mutation_check.py --ci       the subset `make test` runs (ci=True below)
    python tests/simt/mutation_check.py NAME ...   some of them

The working tree is never modified, so an interrupted run leaves nothing behind in it: each
mutation is applied to a copy of csrc/ in a temporary directory under build/simt/mutants, the
translation units it affects (those its test file runs that include the mutated file) are compiled
from the copy and linked with the emulator's other objects (build/simt, brought up to date first),
and the test file runs against that library (SIMT_LIBRARY; SIMT_FMA=1 for a mutation only the
contracted build can show). Mutations are compiled and tested in parallel (MAX_JOBS, default the
CPU count). A mutation the tests do not catch is reported as SURVIVED, one whose text no longer
occurs exactly once as STALE; either makes the exit status 1.
"""

import argparse
import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from simt import build  # noqa: E402

ROOT = build.ROOT
CUDA = ROOT / "csrc" / "cuda"
# The kernel units each emulated test file needs mutated to see a bug in its kernels (the others
# keep their unmutated objects).
TEST_UNITS = {
    "tests/test_cuda_emulated.py": ("kl_div_cuda",),
    "tests/test_cuda_emulated_cluster.py": ("kl_div_cuda", "jsd_cuda"),
    "tests/test_cuda_emulated_jsd.py": ("jsd_cuda",),
    "tests/test_cuda_emulated_sparse.py": ("sparse_kl_cuda",),
    "tests/test_cuda_emulated_distill.py": ("kl_div_cuda", "jsd_cuda", "sparse_kl_cuda", "distill_cuda"),
    "tests/test_simt_emulator.py": ("probe_kernels",),
    "tests/test_cuda_traffic.py": ("kl_div_cuda", "jsd_cuda", "sparse_kl_cuda", "kl_shards_cuda"),
}
TEST_TIMEOUT = 900  # seconds; a mutant that hangs the tests counts as caught


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    why: str
    tests: str = "tests/test_cuda_emulated.py"  # the emulated test file that must catch it
    units: tuple = ()  # kernel units to mutate, when not TEST_UNITS[tests]
    fma: bool = False  # only the build that contracts a*b + c can show it
    ci: bool = False   # part of `make test`'s subset


MUTATIONS = [
    Mutation("cached_prefix_off_by_one", "row_pipeline.cuh",
             "  stream_packs<U, Source::kGlobalLastUse, true>(in, cache, 0, cached, fn);\n"
             "  stream_packs<U, Source::kGlobal, false>(in, cache, cached, units, fn);",
             "  stream_packs<U, Source::kGlobalLastUse, true>(in, cache, 0, cached - 1, fn);\n"
             "  stream_packs<U, Source::kGlobal, false>(in, cache, cached - 1, units, fn);",
             "the last cached pack is read from global memory but never parked in the row cache"),
    Mutation("uncached_range_off_by_one", "row_pipeline.cuh",
             "kTailBackward>(in, cache, cached, units, fn);",
             "kTailBackward>(in, cache, cached + 1, units, fn);",
             "a later pass skips the first pack after the cached prefix"),
    # Mutants whose values are right and whose cost is not: only the traffic budgets can catch them.
    Mutation("later_pass_rereads_the_cached_prefix_from_global", "row_pipeline.cuh",
             "  stream_packs<U, Source::kCache, false>(in, cache, 0, cached, fn);",
             "  stream_packs<U, Source::kGlobal, false>(in, cache, 0, cached, fn);",
             "the gradient pass reads the whole row from global memory again (a pass more)",
             tests="tests/test_cuda_traffic.py", units=("kl_div_cuda",)),
    Mutation("tail_reread_in_the_order_it_was_read", "row_pipeline.cuh",
             "kTailBackward>(in, cache, cached, units, fn);",
             "false>(in, cache, cached, units, fn);",
             "the uncached tail is re-read oldest first: an L2 share smaller than the tail loses it to JSD's second pass",
             tests="tests/test_cuda_traffic.py", units=("jsd_cuda",)),
    Mutation("grad_scale_scales_rows_whose_factor_is_one", "kl_div_cuda.cu",
             "    if (factor == acc_t(1)) continue;  // block-uniform\n",
             "",
             "backward reads and writes rows x V when the upstream gradient is 1 (x * 1 == x: values unchanged)",
             tests="tests/test_cuda_traffic.py", units=("kl_div_cuda",)),
    # The cluster kernel: its barriers, its merge and its slices.
    Mutation("cluster_rows_without_the_closing_cluster_barrier", "row_span.cuh",
             "    row_fn(row);\n    cluster.sync();\n",
             "    row_fn(row);\n",
             "a block rewrites its state for the next row (or exits) while the cluster's others may still read it",
             tests="tests/test_cuda_emulated_cluster.py", ci=True),
    Mutation("cluster_row_state_of_one_block", "row_span.cuh",
             "    State total = *cluster.map_shared_rank(own, 0);\n"
             "    for (unsigned int r = 1; r < blocks; ++r) total = merge_states(total, *cluster.map_shared_rank(own, r));",
             "    State total = mine;",
             "each block normalises its slice by its own slice's statistics", tests="tests/test_cuda_emulated_cluster.py"),
    Mutation("cluster_slices_overlap", "row_span.cuh",
             "  const int64_t begin = std::min<int64_t>(units, rank * per_block);",
             "  const int64_t begin = std::min<int64_t>(units, rank * (per_block - 1));",
             "neighbouring blocks both take a slice's last pack (and the row's end goes unread)",
             tests="tests/test_cuda_emulated_cluster.py"),
    Mutation("hard_label_rewritten_by_every_block_of_the_cluster", "kl_div_cuda.cu",
             "        if (g_student != nullptr && at >= 0 && at < span.units * N) {  // block-uniform",
             "        if (g_student != nullptr) {",
             "every block of a cluster rewrites the label's element, at its own offset from the label",
             tests="tests/test_cuda_emulated_cluster.py"),
    Mutation("jsd_cluster_divergences_of_one_block", "jsd_cuda.cu",
             "      AddDivergences<acc_t>{}, kDivergenceSlotOffset<acc_t, kHard>);",
             "      [](Divergences<acc_t> a, const Divergences<acc_t>&) { return a; }, kDivergenceSlotOffset<acc_t, kHard>);",
             "the second cluster merge keeps block 0's K_p, K_q: the row's K is its first slice's",
             tests="tests/test_cuda_emulated_cluster.py"),
    Mutation("jsd_divergences_in_the_state_slot", "jsd_cuda.cu",
             "constexpr int kDivergenceSlotOffset = round16(sizeof(JSDState<acc_t, kHard>));",
             "constexpr int kDivergenceSlotOffset = 0;",
             "a block writes its K_p, K_q over its row state while the cluster's others may still read the state",
             tests="tests/test_cuda_emulated_cluster.py"),
    Mutation("jsd_hard_label_rewritten_by_every_block_of_the_cluster", "jsd_cuda.cu",
             "        if (gy != nullptr && at >= 0 && at < span.units * N) {  // block-uniform",
             "        if (gy != nullptr) {",
             "every block of a JSD cluster rewrites the label's element, at its own offset from the label",
             tests="tests/test_cuda_emulated_cluster.py"),
    Mutation("missing_syncthreads_in_block_reduce", "block_reduce.cuh",
             "  if (lane == 0) scratch[warp] = state;\n  __syncthreads();",
             "  if (lane == 0) scratch[warp] = state;",
             "warps read the per-warp states before every warp has written its own", ci=True),
    Mutation("missing_syncthreads_between_rows", "row_pipeline.cuh",
             "    __syncthreads();\n    row += gridDim.x;",
             "    row += gridDim.x;",
             "a block's next row overwrites scratch while slower warps still read it"),
    Mutation("wrong_shuffle_offset", "block_reduce.cuh",
             "for (int offset = 16; offset > 0; offset >>= 1)",
             "for (int offset = 8; offset > 0; offset >>= 1)",
             "the butterfly reduces only half-warps"),
    Mutation("dropped_rescale_in_merge", "row_state.cuh",
             "  rescale(a, mx, my, k);\n  rescale(b, mx, my, k);",
             "  rescale(a, mx, my, k);",
             "one side of a merge keeps sums relative to its own maxima"),
    Mutation("merge_multiplies_an_underflowed_scale", "row_state.cuh",
             "  s.w = rx == acc_t(0) ? acc_t(0) : rx * (s.w + s.zx * (dy - dx));",
             "  s.w = rx * (s.w + s.zx * (dy - dx));",
             "a state far below a logit near float32's limit adds 0 * inf = NaN to W"),
    Mutation("shift_after_scaling", "kl_row_math.cuh",
             "      const acc_t xs = (to_acc(px[i].v[j]) - sx) * k;",
             "      const acc_t xs = to_acc(px[i].v[j]) * k - sx * k;",
             "the maximum shifted after scaling by 1/T keeps its rounding, which overflows ex2 at |logit| / T ~ 1e10"),
    Mutation("shard_maxima_divided_by_t", "kl_shards_cuda.cu",
             "      out[0] = args.reverse ? st.my : st.mx;",
             "      out[0] = (args.reverse ? st.my : st.mx) * args.inv_temperature;",
             "the exported maximum of t / T instead of the raw one: the merge's shifts disagree with the sums"),
    Mutation("wrong_gradient_factor", "kl_div_cuda.cu",
             "c.wx = c.px_f * static_cast<acc_t>(kLn2);",
             "c.wx = c.px_f;",
             "the weighted gradient forgets the log2 -> ln conversion", ci=True),
    Mutation("unaligned_vector_path", "launch_plan.h",
             "if (!aligned16(base) || vocab % pack != 0) return false;",
             "if (vocab % pack != 0) return false;",
             "misaligned rows take the 16-byte vector path"),
    Mutation("missing_opt_in", "kl_div_cuda.cu",
             "  if (plan.opt_in) allow_dynamic_shared<kl_rows_kernel<scalar_t, N, true>>(limits.max_shared_optin);\n",
             "",
             "more than 48 KB of shared memory without cudaFuncSetAttribute"),
    Mutation("cache_budget_ignores_scratch", "launch_plan.h",
             "const int64_t budget = std::max<int64_t>(limits.max_shared_optin - plan.scratch_bytes, 0);",
             "const int64_t budget = limits.max_shared_optin;",
             "the row cache overlaps the per-warp merge states' share of the budget"),
    # jsd_rows_kernel (csrc/cuda/jsd_cuda.cu)
    Mutation("jsd_one_scratch_for_both_reductions", "jsd_cuda.cu",
             "auto* merge_scratch = reinterpret_cast<State*>(sum_scratch + blockDim.x / 32);",
             "auto* merge_scratch = reinterpret_cast<State*>(scratch);",
             "the K sums overwrite the merge states that slower warps still read",
             tests="tests/test_cuda_emulated_jsd.py", ci=True),
    Mutation("jsd_mixture_weights_swapped", "jsd_cuda.cu",
             "log2_acc(c.beta * p + (acc_t(1) - c.beta) * q)",
             "log2_acc((acc_t(1) - c.beta) * p + c.beta * q)",
             "m = (1 - beta) p + beta q instead of beta p + (1 - beta) q",
             tests="tests/test_cuda_emulated_jsd.py"),
    Mutation("jsd_zero_probability_not_masked", "jsd_cuda.cu",
             "p > acc_t(0) ? xs - c.log_zx - log_m : acc_t(0)",
             "xs - c.log_zx - log_m",
             "an entry with p = 0 contributes 0 * (-inf - log m), NaN where q = 0 too",
             tests="tests/test_cuda_emulated_jsd.py"),
    Mutation("jsd_gradient_forgets_the_row_kl", "jsd_cuda.cu",
             "(e.q * scale_y) * (e.ratio_q - k2.kq)",
             "(e.q * scale_y) * e.ratio_q",
             "the student gradient drops its - KL(q || m) q term",
             tests="tests/test_cuda_emulated_jsd.py"),
    Mutation("jsd_nan_rows_not_detected", "jsd_cuda.cu",
             "if (st.zx != st.zx || st.zy != st.zy || st.mx == neg_inf<acc_t>() || st.my == neg_inf<acc_t>()) {",
             "if (st.mx == neg_inf<acc_t>() || st.my == neg_inf<acc_t>()) {",
             "a NaN logit's NaN Z is masked away by p > 0 and the row looks finite",
             tests="tests/test_cuda_emulated_jsd.py"),
    Mutation("jsd_loss_only_rows_uncached", "jsd_cuda.cu",
             "sizeof(Pack<scalar_t, N>), /*cache_rows=*/true, limits);",
             "sizeof(Pack<scalar_t, N>), /*cache_rows=*/any_grad, limits);",
             "the loss-only launch reads the row from global memory twice instead of caching it",
             tests="tests/test_cuda_emulated_jsd.py"),
    # sparse_kl_div (csrc/cuda/sparse_kl_cuda.cu)
    Mutation("support_left_in_the_rest", "sparse_kl_cuda.cu",
             "support[i] = valid[i] ? support_bits<N>(bitmap, step_unit(first, i)) : 0u;",
             "support[i] = 0u;",
             "the complement's sums include the support (the bitmap is ignored)",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("tail_as_one_minus_support", "sparse_kl_cuda.cu",
             "const double log_qr = log_rest - log_z;",
             "const double log_qr = ::log(::fmax(1.0 - ::exp(lse_support - log_z), 0.0));",
             "q_r as 1 - sum_S q, which cancels when the student is confident",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("missing_barrier_after_marking", "sparse_kl_cuda.cu",
             "    __syncthreads();  // the bitmap is complete before the pass reads it\n",
             "",
             "the pass reads the bitmap before every thread has marked its slots (a plain read racing an atomic)",
             tests="tests/test_cuda_emulated_sparse.py", ci=True),
    Mutation("support_written_before_the_pass_ends", "sparse_kl_cuda.cu",
             "      __syncthreads();  // the pass's writes before the support's overwrite them\n",
             "",
             "a slower thread's gradient pass overwrites the support's gradient",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("bitmap_left_marked", "sparse_kl_cuda.cu",
             "        if (used) unmark_slot(bitmap, i, V);\n        if (row_state == 2",
             "        if (row_state == 2",
             "a row leaves its support marked for the block's next row",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("mass_tolerance_ignored", "sparse_kl_cuda.cu",
             "const bool bad = st.status != 0 || (st.mass > 1.0 + args.mass_tolerance);",
             "const bool bad = st.status != 0 || (st.mass > 1.0);",
             "a support mass above 1 by rounding makes the row invalid",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("tail_dropped_from_rest_gradient", "sparse_kl_cuda.cu",
             "f * (total * ::exp(log_qr) - p_r) / static_cast<double>(st.z_rest)",
             "f * (total * ::exp(log_qr)) / static_cast<double>(st.z_rest)",
             "the gradient off the support forgets the bucket's pull",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("bitmap_over_the_merge_states", "sparse_kl_cuda.cu",
             "  args.bitmap_offset = (plan.threads / 32 * state_bytes + 15) / 16 * 16;",
             "  args.bitmap_offset = 0;",
             "the bitmap shares its bytes with the per-warp merge states",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("renormalize_fill_races_the_support", "sparse_kl_cuda.cu",
             "      __syncthreads();  // the fill before the support's values\n",
             "",
             "the zero fill of a slower thread overwrites the support's gradient",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("missing_barrier_after_clearing_the_bitmap", "sparse_kl_cuda.cu",
             "  __syncthreads();\n\n  for (const int64_t row : block_rows(args.rows)) {\n"
             "    const int64_t* idx = args.indices + row * K;\n    const acc_t* lp = args.logprobs + row * K;\n"
             "    acc_t* dl = args.grad_logprobs != nullptr ? args.grad_logprobs + row * K : nullptr;\n    scalar_t* ds",
             "\n  for (const int64_t row : block_rows(args.rows)) {\n"
             "    const int64_t* idx = args.indices + row * K;\n    const acc_t* lp = args.logprobs + row * K;\n"
             "    acc_t* dl = args.grad_logprobs != nullptr ? args.grad_logprobs + row * K : nullptr;\n    scalar_t* ds",
             "the renormalizing kernel marks slots in a bitmap that slower threads are still clearing",
             tests="tests/test_cuda_emulated_sparse.py"),
    # Blind spots of the emulator before issue 26: races through global memory, outputs no kernel
    # writes, lanes that disagree once a*b + c is contracted.
    Mutation("fill_row_by_every_thread", "packs.cuh",
             "for (int64_t unit = threadIdx.x; unit < units; unit += blockDim.x) store_pack(row, unit, pack);",
             "for (int64_t unit = 0; unit < units; ++unit) store_pack(row, unit, pack);",
             "every thread writes the whole masked row: a write-write race through global memory", ci=True),
    Mutation("row_loss_by_every_thread", "kl_div_cuda.cu",
             "  if (span.leader()) args.row_loss[row] = kl.kl2 * static_cast<acc_t>(kLn2);",
             "  args.row_loss[row] = kl.kl2 * static_cast<acc_t>(kLn2);",
             "every thread stores the row's loss (the same value): a write-write race through global memory"),
    Mutation("masked_gradient_left_unwritten", "hard_term.cuh",
             "    fill_gradients(row, 0.0f);\n",
             "",
             "a masked row's gradient keeps whatever the allocation held (zero, on a fresh page)", ci=True),
    Mutation("masked_loss_left_unwritten", "hard_term.cuh",
             "      args.row_loss[row] = acc_t(0);\n",
             "",
             "a masked row's loss is never written", tests="tests/test_cuda_emulated_jsd.py"),
    Mutation("block_reduce_without_broadcast", "block_reduce.cuh",
             "  return shuffle_words(total, [](uint32_t word) { return __shfl_sync(0xffffffffu, word, 0); });",
             "  return total;",
             "each lane keeps its own rounding of the reduction, and block-uniform branches may diverge",
             tests="tests/test_simt_emulator.py", fma=True, ci=True),
    # the hard term of the distillation step (hard_term.cuh and the *_hard_* kernels)
    Mutation("hard_label_pull_dropped", "kl_div_cuda.cu",
             "static_cast<scalar_t>((student_x ? dx : dy) - hard.pull);",
             "static_cast<scalar_t>(student_x ? dx : dy);",
             "the label's element forgets -f_h (1 - eps)", tests="tests/test_cuda_emulated_distill.py", ci=True),
    Mutation("hard_label_fixup_races_the_pass", "kl_div_cuda.cu",
             "          __syncthreads();  // the pass's write of that element comes first\n",
             "",
             "the label's rewrite races a slower thread's write of the same element", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("hard_student_side_fixed", "kl_div_cuda.cu",
             "const bool student_x = args.reverse;",
             "const bool student_x = false;",
             "reverse KL adds the hard term to the teacher's side", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("hard_soft_statistics_at_any_temperature", "kl_div_cuda.cu",
             "const acc_t log2_z1 = unit_t ? (student_x ? kl.log_zx : kl.log_zy) : log2_acc(st.h.z1);",
             "const acc_t log2_z1 = student_x ? kl.log_zx : kl.log_zy;",
             "CE at T != 1 takes the student's Z at T instead of at 1", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("hard_state_scratch_too_small", "kl_div_cuda.cu",
             "hard ? sizeof(RowHardState<acc_t>) : sizeof(RowState<acc_t>),",
             "sizeof(RowState<acc_t>),",
             "the merge scratch is sized for the soft state only and runs into the row cache", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("hard_z1_not_rescaled", "hard_term.cuh",
             "h.z1 = h.m == neg_inf<acc_t>() ? acc_t(0) : h.z1 * exp2_acc((h.m - step_m) * static_cast<acc_t>(kLog2E));",
             "h.z1 = h.m == neg_inf<acc_t>() ? acc_t(0) : h.z1;",
             "Z_1 keeps its terms relative to an old maximum", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("hard_uniform_dropped", "hard_term.cuh",
             "  return q1_f - h.uniform;",
             "  return q1_f;",
             "the gradient forgets label smoothing's -f_h eps / V", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("hard_sum_not_merged", "hard_term.cuh",
             "  a.sum += b.sum;",
             "",
             "the block keeps one warp's sum of the logits", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("hard_label_range_unchecked", "hard_term.cuh",
             "const bool inside = y >= 0 && y < vocab;",
             "const bool inside = y >= 0;",
             "a label >= V is read out of bounds", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("jsd_hard_label_pull_dropped", "jsd_cuda.cu",
             "static_cast<scalar_t>(dy - hard.pull);",
             "static_cast<scalar_t>(dy);",
             "the JSD kernel's label element forgets -f_h (1 - eps)", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("jsd_hard_q1_not_q", "jsd_cuda.cu",
             "hard = {f_h, f_h / hs.z1,",
             "hard = {f_h / st.zy, f_h / hs.z1,",
             "at T = 1 q_1 is taken as q / Z instead of q", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("bucket_hard_label_off_support_not_fixed", "sparse_kl_cuda.cu",
             "          if (!label_on_support) {",
             "          if (false) {",
             "a label off the support never gets its pull", tests="tests/test_cuda_emulated_distill.py", ci=True),
    Mutation("bucket_hard_slot_pull_dropped", "sparse_kl_cuda.cu",
             " - h.uniform - (is_label ? h.pull : acc_t(0));",
             " - h.uniform;",
             "a label on the support never gets its pull", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("renormalize_hard_soft_off_support", "sparse_kl_cuda.cu",
             "const double coef = st.z_rest > acc_t(0) && !renormalize",
             "const double coef = st.z_rest > acc_t(0)",
             "renormalized, the bucket's pull reaches the tokens off the support", tests="tests/test_cuda_emulated_distill.py"),
    Mutation("bucket_hard_sums_skip_the_support", "sparse_kl_cuda.cu",
             "    if constexpr (kHard) hard_sums_step(h, packs[0], valid, need_z1, need_sum);",
             "    if constexpr (kHard) { bool rest[U]; for (int i = 0; i < U; ++i) rest[i] = valid[i] && support_bits<P::kSize>(bitmap, step_unit(first, i)) == 0; hard_sums_step(h, packs[0], rest, need_z1, need_sum); }",
             "Z_1 and the logits' sum leave out packs that hold a support token", tests="tests/test_cuda_emulated_distill.py"),
]


def _unit_source(stem, csrc):
    return build.SIMT / "probe_kernels.cpp" if stem == "probe_kernels" else csrc / "cuda" / f"{stem}.cu"


def _includes(path, csrc, seen):
    """The files `path` includes with quotes, transitively, that lie in csrc or tests/simt."""
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), re.M):
        for directory in (path.parent, csrc / "cuda", csrc, build.SIMT):
            found = (directory / name).resolve()
            if found.exists():
                if found not in seen:
                    seen.add(found)
                    _includes(found, csrc, seen)
                break
    return seen


def affected_units(mutation, csrc):
    """The kernel units of the mutation's test file that include the mutated file."""
    target = (csrc / "cuda" / mutation.file).resolve()
    units = mutation.units or TEST_UNITS[mutation.tests]
    return [stem for stem in units
            if _unit_source(stem, csrc).resolve() == target or target in _includes(_unit_source(stem, csrc), csrc, set())]


def _run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def mutant_library(mutation, work):
    """Builds the emulator with `mutation` applied to a copy of csrc/ under `work`; returns its path."""
    csrc = work / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    path = csrc / "cuda" / mutation.file
    path.write_text(path.read_text().replace(mutation.old, mutation.new))
    mode = "fma" if mutation.fma else "plain"
    mutated = {}
    for stem in affected_units(mutation, csrc):
        source = _unit_source(stem, csrc)
        unit = build.wrapper(source, work) if source.suffix == ".cu" else source
        obj = work / f"{stem}.kernel.o"
        result = _run([build.cxx(), *build.common_flags(csrc), *build.kernel_flags(mode), "-c", str(unit), "-o", str(obj)])
        if result.returncode != 0:
            raise RuntimeError(f"compiling the mutated {stem} failed:\n{result.stderr[-3000:]}")
        mutated[stem] = obj
    if not mutated:
        raise RuntimeError(f"no unit of {mutation.tests} includes {mutation.file}")
    objects = [build.plain_object(source) for source in build.plain_sources()]
    objects += [mutated.get(source.stem, build.kernel_object(source, mode)) for source in build.kernel_sources()]
    library = work / "libkl_fused_simt_mutant.so"
    result = _run([build.cxx(), "-shared", *map(str, objects), "-o", str(library), *build.link_flags()])
    if result.returncode != 0:
        raise RuntimeError(f"linking the mutant failed:\n{result.stderr[-3000:]}")
    return library


def run(mutation):
    """(verdict, detail, seconds) of one mutation."""
    start = time.monotonic()
    original = (CUDA / mutation.file).read_text()
    if original.count(mutation.old) != 1:
        return "STALE", f"the text to mutate occurs {original.count(mutation.old)} times in {mutation.file}", 0.0
    if mutation.fma and not build.host_has_fma():
        return "SKIPPED", "this CPU has no fused multiply-add instructions for the fma build", 0.0
    (build.BUILD / "mutants").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{mutation.name}.", dir=build.BUILD / "mutants") as work:
        library = mutant_library(mutation, pathlib.Path(work))
        env = {**os.environ, "SIMT_LIBRARY": str(library), "SIMT_FMA": "1" if mutation.fma else "0"}
        try:
            result = _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", mutation.tests],
                          cwd=ROOT, env=env, timeout=TEST_TIMEOUT)
        except subprocess.TimeoutExpired:
            return "CAUGHT", f"the tests ran past {TEST_TIMEOUT} s (a hang)", time.monotonic() - start
    output = result.stdout + result.stderr
    seconds = time.monotonic() - start
    if result.returncode == 0:
        return "SURVIVED", output.strip().splitlines()[-1], seconds
    failed = re.search(r"^FAILED (\S+)", output, re.M)
    error = re.search(r"^E\s+(.+)$", output, re.M)
    test = failed[1].split("::", 1)[-1] if failed else "(collection or build)"
    return "CAUGHT", f"{test}: {error[1].strip()[:300] if error else output.strip().splitlines()[-1]}", seconds


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--ci", action="store_true", help="only the subset that make test runs")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        sys.exit(f"unknown mutations {sorted(unknown)}; choose from {[m.name for m in MUTATIONS]}")
    chosen = [m for m in MUTATIONS if (not args.names or m.name in args.names) and (m.ci or not args.ci)]
    build.build("plain")
    if any(m.fma for m in chosen) and build.host_has_fma():
        build.build("fma")
    jobs = int(os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
    failures = 0
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, m): m for m in chosen}
        for future in concurrent.futures.as_completed(futures):
            mutation = futures[future]
            try:
                verdict, detail, seconds = future.result()
            except RuntimeError as error:
                verdict, detail, seconds = "BROKEN", str(error), 0.0
            failures += verdict not in ("CAUGHT", "SKIPPED")
            print(f"{verdict:8} {mutation.name} ({mutation.why}) [{seconds:.0f} s]\n         {detail}", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutations caught or skipped in {time.monotonic() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
