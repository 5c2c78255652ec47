"""Mutation check of the emulated CUDA tests: inject plausible kernel bugs, one at a time, into the
real sources, and show that the emulated test file of the mutated kernel fails on each.

    python tests/simt/mutation_check.py            every mutation
    python tests/simt/mutation_check.py NAME ...   some of them

Each mutation replaces one exact piece of csrc/cuda/ text (it must occur exactly once), rebuilds the
emulator, runs the emulated test file of the kernel it mutates, and restores the file whatever happens. A mutation the tests do
not catch is reported as SURVIVED and makes the exit status 1. Not part of `make test` (each
mutation rebuilds a kernel unit): run it after changing a kernel or its tests.
"""

import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA = ROOT / "csrc" / "cuda"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    why: str
    tests: str = "tests/test_cuda_emulated.py"  # the emulated test file that must catch it


MUTATIONS = [
    Mutation("cached_prefix_off_by_one", "row_pipeline.cuh",
             "  stream_packs<U, Source::kGlobalLastUse, true>(in, cache, 0, cached, fn);\n"
             "  stream_packs<U, Source::kGlobal, false>(in, cache, cached, units, fn);",
             "  stream_packs<U, Source::kGlobalLastUse, true>(in, cache, 0, cached - 1, fn);\n"
             "  stream_packs<U, Source::kGlobal, false>(in, cache, cached - 1, units, fn);",
             "the last cached pack is read from global memory but never parked in the row cache"),
    Mutation("uncached_range_off_by_one", "row_pipeline.cuh",
             "stream_packs<U, kLast ? Source::kGlobalLastUse : Source::kGlobal, false>(in, cache, cached, units, fn);",
             "stream_packs<U, kLast ? Source::kGlobalLastUse : Source::kGlobal, false>(in, cache, cached + 1, units, fn);",
             "a later pass skips the first pack after the cached prefix"),
    Mutation("missing_syncthreads_in_block_reduce", "block_reduce.cuh",
             "  if (lane == 0) scratch[warp] = state;\n  __syncthreads();",
             "  if (lane == 0) scratch[warp] = state;",
             "warps read the per-warp states before every warp has written its own"),
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
             "the weighted gradient forgets the log2 -> ln conversion"),
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
             "auto* merge_scratch = reinterpret_cast<RowState<acc_t>*>(sum_scratch + blockDim.x / 32);",
             "auto* merge_scratch = reinterpret_cast<RowState<acc_t>*>(shared);",
             "the K sums overwrite the merge states that slower warps still read",
             tests="tests/test_cuda_emulated_jsd.py"),
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
             "the pass reads the bitmap before every thread has marked its slots",
             tests="tests/test_cuda_emulated_sparse.py"),
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
             "  args.bitmap_offset = (plan.threads / 32 * static_cast<int>(sizeof(BucketState<acc_t>)) + 15) / 16 * 16;",
             "  args.bitmap_offset = 0;",
             "the bitmap shares its bytes with the per-warp merge states",
             tests="tests/test_cuda_emulated_sparse.py"),
    Mutation("renormalize_fill_races_the_support", "sparse_kl_cuda.cu",
             "      __syncthreads();  // the fill before the support's values\n",
             "",
             "the zero fill of a slower thread overwrites the support's gradient",
             tests="tests/test_cuda_emulated_sparse.py"),
]


def run(mutation):
    path = CUDA / mutation.file
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return "STALE", f"the text to mutate occurs {original.count(mutation.old)} times in {mutation.file}"
    try:
        path.write_text(original.replace(mutation.old, mutation.new))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", mutation.tests],
            cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(original)
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return "SURVIVED", output.strip().splitlines()[-1]
    failed = re.search(r"^FAILED (\S+)", output, re.M)
    error = re.search(r"^E\s+(.+)$", output, re.M)
    test = failed[1].split("::", 1)[-1] if failed else "(collection or build)"
    return "CAUGHT", f"{test}: {error[1].strip()[:300] if error else output.strip().splitlines()[-1]}"


def main(names):
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTATIONS}
    if unknown:
        sys.exit(f"unknown mutations {sorted(unknown)}; choose from {[m.name for m in MUTATIONS]}")
    survived = 0
    for mutation in chosen:
        verdict, detail = run(mutation)
        survived += verdict != "CAUGHT"
        print(f"{verdict:8} {mutation.name} ({mutation.why})\n         {detail}", flush=True)
    subprocess.run([sys.executable, str(ROOT / "tests" / "simt" / "build.py")], cwd=ROOT, capture_output=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
