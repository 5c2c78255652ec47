// CUDA implementations of the kl_fused ops (same contract as cpu/kl_div_cpu.cpp): argument checks,
// output allocation, and the row kernels. Math of a row in kl_div_common.h; the mergeable row
// statistics, the x/y roles and the log2 units in row_state.cuh.
//
// The row kernel is the shared pipeline of row_pipeline.cuh with KL's math: each thread streams its
// share of the row once, keeping an online state (running maxima, Z_x, Z_y, W); the block merges
// the states (block_reduce.cuh). When a gradient is wanted, the row's logits read by that pass are
// also parked in shared memory (as much of the row as fits), so the gradient pass reads them
// on-chip; whatever does not fit is read again from global memory, most of it from L2 -- except on
// sm_90+, where a row too wide for one block is spread over a thread-block cluster whose blocks
// each cache a slice (kl_cluster_rows_kernel), so that nothing is read twice.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../kl_div_common.h"
#include "distill_cuda.h"
#include "kl_div_cuda.h"
#include "launch.cuh"
#include "kl_row_math.cuh"
#include "row_loss_host.cuh"
#include "row_pipeline.cuh"
#include "row_span.cuh"

namespace kl_fused::cuda {
namespace {

// Per-row KL of softmax(x/T) || softmax(y/T) (row_state.cuh), and with kGrad its gradients:
//   row_loss[r] = sum p_x (log p_x - log p_y)
//   grad_x[r]   = p_x (log p_x - log p_y - KL) f       grad_y[r] = (p_y - p_x) f
// Passes (row_pipeline.cuh): statistics, then with kGrad the gradient, the row cached in between.
// Bytes per element (e = sizeof(scalar_t)), each input read from global memory once:
//   loss only 2e; with one gradient 3e; with both 4e. Packs beyond the shared-memory row cache
//   are read a second time by the gradient pass, from L2 when the rows in flight fit there.
// Masked rows: loss 0, gradients 0, inputs never read.
// kHard (kl_hard_rows_kernel): the distillation step's cross-entropy rides along (hard_term.cuh):
// row_hard[r] = CE, and the student's gradient gains f_h (q_1 - eps / V - (1 - eps) onehot(y)); at
// T = 1 no exponential more, else one ex2 per element in each pass. A label outside [0, V): loss, CE and
// gradients NaN, status kLabelOutOfRange, the row never read. The same bytes.
// A row's KL in log2 units from its merged state, with log2 Z_x and log2 Z_y; NaN for a row whose x or
// y logits are all -inf (no distribution), as on the CPU.
template <typename acc_t>
struct RowKL {
  acc_t log_zx, log_zy, kl2;
  bool undefined;
};

template <typename acc_t>
__device__ __forceinline__ RowKL<acc_t> row_kl(const RowState<acc_t>& rs) {
  RowKL<acc_t> r;
  r.log_zx = log2_acc(rs.zx);
  r.log_zy = log2_acc(rs.zy);
  r.kl2 = rs.w / rs.zx - r.log_zx + r.log_zy;
  r.undefined = rs.mx == neg_inf<acc_t>() || rs.my == neg_inf<acc_t>();
  if (r.undefined) r.kl2 = static_cast<acc_t>(NAN);
  return r;
}

// The gradient pass's constants (kl_row_math.cuh) for upstream factor f.
template <typename acc_t>
__device__ __forceinline__ KLGradConstants<acc_t> kl_grad_constants(const RowState<acc_t>& rs, const RowKL<acc_t>& r,
                                                                    acc_t k, acc_t f) {
  KLGradConstants<acc_t> c;
  c.mx = rs.mx;
  c.my = rs.my;
  c.k = k;
  c.px_f = f / rs.zx;
  c.py_f = f / rs.zy;
  c.wx = c.px_f * static_cast<acc_t>(kLn2);
  c.c2 = r.log_zy - r.log_zx - r.kl2;
  return c;
}

// One row of kl_rows (below) over the part `span` gives this block. Returns early on a row it does
// not compute (masked; a label outside [0, V)), every block of a cluster alike.
template <typename scalar_t, int N, bool kGrad, bool kHard, typename Span>
__device__ __forceinline__ void kl_row(const KLRowsArgs<scalar_t>& args, int64_t row, const Span& span,
                                       std::conditional_t<kHard, RowHardState<at::opmath_type<scalar_t>>,
                                                          RowState<at::opmath_type<scalar_t>>>* scratch,
                                       Pack<scalar_t, N>* const (&cache)[2]) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  const acc_t k = args.k;
  // Read here, on the device: the counted-row count of batchmean/mean may be a mask's sum.
  const acc_t f = kGrad ? static_cast<acc_t>(args.factor.value()) : acc_t(0);
  // The row's gradient from this block's first pack on (its slice).
  const auto grad_span = [&](scalar_t* grad) {
    return grad != nullptr ? reinterpret_cast<P*>(grad + row * args.vocab) + span.begin : nullptr;
  };
  const auto fill_gradients = [&](int64_t, scalar_t value) {
    if constexpr (kGrad) {
      if (P* g = grad_span(args.grad_x)) fill_row(g, span.units, value);
      if (P* g = grad_span(args.grad_y)) fill_row(g, span.units, value);
    }
  };
  // The hard term's constants (kHard).
  const bool unit_t = args.inv_temperature == acc_t(1);
  const bool student_x = args.reverse;

  int64_t label;
  if (row_skipped<kHard>(args, row, label, fill_gradients, span.leader())) return;
  const P* const in[2] = {reinterpret_cast<const P*>(args.x + args.x_rows.offset(row)) + span.begin,
                          reinterpret_cast<const P*>(args.y + args.y_rows.offset(row)) + span.begin};
  const auto statistics_pass = [&](auto& accumulate) {
    if constexpr (kGrad) {
      first_pass<kUnroll<N>>(in, cache, span.cached, span.units, accumulate);
    } else {
      only_pass<kUnroll<N>>(in, span.units, accumulate);
    }
  };
  std::conditional_t<kHard, RowHardState<acc_t>, RowState<acc_t>> st;
  if constexpr (kHard) {
    KLHardStatistics<acc_t> accumulate{empty_row_state<acc_t>(), k, empty_hard_sums<acc_t>(), student_x, !unit_t,
                                       args.hard.smoothing != acc_t(0)};
    statistics_pass(accumulate);
    // The merge's barrier also orders the row-cache writes before the gradient pass reads them.
    st = block_reduce(RowHardState<acc_t>{accumulate.st, accumulate.h}, MergeRowHardStates<acc_t>{k},
                      RowHardState<acc_t>{empty_row_state<acc_t>(), empty_hard_sums<acc_t>()}, scratch);
    st = span.row_total(st, MergeRowHardStates<acc_t>{k});
  } else {
    KLStatistics<acc_t> accumulate{empty_row_state<acc_t>(), k};
    statistics_pass(accumulate);
    st = span.row_total(block_merge(accumulate.st, k, scratch), MergeRowStates<acc_t>{k});
  }
  const RowState<acc_t>& rs = [&]() -> const RowState<acc_t>& {
    if constexpr (kHard) return st.st;
    else return st;
  }();

  const RowKL<acc_t> kl = row_kl(rs);
  if (span.leader()) args.row_loss[row] = kl.kl2 * static_cast<acc_t>(kLn2);

  HardRow<acc_t> hard{};
  if constexpr (kHard) {
    // The student's raw maximum and log Z_1: at T = 1 its soft statistics, else the hard sums'.
    const acc_t m_s = unit_t ? (student_x ? rs.mx : rs.my) : st.h.m;
    const acc_t log2_z1 = unit_t ? (student_x ? kl.log_zx : kl.log_zy) : log2_acc(st.h.z1);
    const scalar_t* student = student_x ? args.x + args.x_rows.offset(row) : args.y + args.y_rows.offset(row);
    if (span.leader()) {
      const acc_t ce = cross_entropy(m_s, log2_z1 * static_cast<acc_t>(kLn2), st.h.sum, to_acc(student[label]),
                                     args.hard.smoothing, args.vocab);
      args.hard.row_hard[row] = kl.undefined ? static_cast<acc_t>(NAN) : ce;
    }
    if constexpr (kGrad) {
      const acc_t f_h = static_cast<acc_t>(args.hard.factor.value());
      hard.q1_f = f_h / (student_x ? rs.zx : rs.zy);
      hard.q1_scale = f_h / st.h.z1;
      hard.m = m_s;
      hard.uniform = f_h * args.hard.smoothing / static_cast<acc_t>(args.vocab);
      hard.pull = f_h * (acc_t(1) - args.hard.smoothing);
      hard.unit = unit_t;
      hard.f = f_h;
    }
  }

  if constexpr (kGrad) {
    const KLGradConstants<acc_t> c = kl_grad_constants(rs, kl, k, f);
    P* const gx = grad_span(args.grad_x);
    P* const gy = grad_span(args.grad_y);
    const auto pass = [&](auto need_x, auto need_y) {
      constexpr bool kX = decltype(need_x)::value, kY = decltype(need_y)::value;
      if constexpr (kHard) {
        const HardTermShare<acc_t> share{hard, student_x};
        later_pass<kGradUnroll<N>, true>(in, cache, span.cached, span.units,
                                         KLGradient<kX, kY, P, acc_t, HardTermShare<acc_t>>{gx, gy, c, share});
        // The label's element of the student's gradient, rewritten once with its pull -f_h (1 - eps),
        // by the block whose part holds it.
        P* const g_student = student_x ? gx : gy;
        const int64_t at = label - span.begin * N;
        if (g_student != nullptr && at >= 0 && at < span.units * N) {  // block-uniform
          __syncthreads();  // the pass's write of that element comes first
          if (threadIdx.x == 0) {
            const acc_t xv = to_acc(args.x[args.x_rows.offset(row) + label]);
            const acc_t yv = to_acc(args.y[args.y_rows.offset(row) + label]);
            acc_t dx = acc_t(0), dy = acc_t(0);
            kl_gradient_element<kX, kY>(xv, yv, c, share, dx, dy);
            reinterpret_cast<scalar_t*>(g_student)[at] = static_cast<scalar_t>((student_x ? dx : dy) - hard.pull);
          }
        }
      } else {
        later_pass<kGradUnroll<N>, true>(in, cache, span.cached, span.units,
                                         KLGradient<kX, kY, P, acc_t>{gx, gy, c, {}});
      }
    };
    with_wanted_gradients(gx, gy, pass);
  }
}

template <typename scalar_t, int N, bool kGrad, bool kHard>
__device__ __forceinline__ void kl_rows(const KLRowsArgs<scalar_t>& args) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  using State = std::conditional_t<kHard, RowHardState<acc_t>, RowState<acc_t>>;
  KL_FUSED_DYNAMIC_SHARED(unsigned char, shared);
  auto* scratch = reinterpret_cast<State*>(shared);
  P* const cache[2] = {reinterpret_cast<P*>(shared + args.scratch_bytes),
                       reinterpret_cast<P*>(shared + args.scratch_bytes) + args.cached_units};
  const OneBlockRow span{0, args.vocab / N, kGrad ? args.cached_units : 0};
  for (const int64_t row : block_rows(args.rows)) kl_row<scalar_t, N, kGrad, kHard>(args, row, span, scratch, cache);
}

template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(kMaxRowThreads<scalar_t>, kMinRowBlocksPerSM)
    kl_rows_kernel(const KLRowsArgs<scalar_t> args) {
  kl_rows<scalar_t, N, kGrad, false>(args);
}

// The hard term holds more per element (its sums, the label's constants): at most 512 threads per
// block (128 registers), as the JSD gradient kernel.
template <typename scalar_t>
constexpr int kMaxHardRowThreads = 512;

template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(kMaxHardRowThreads<scalar_t>, kMinRowBlocksPerSM)
    kl_hard_rows_kernel(const KLRowsArgs<scalar_t> args) {
  kl_rows<scalar_t, N, kGrad, true>(args);
}

// kl_div_logits (and, kHard, distillation_loss's KL with the hard term) with a gradient, for rows too
// wide for one block's shared memory, on sm_90+: a thread-block cluster of B blocks per row
// (launch_plan.h, plan_cluster_rows_launch), block b taking packs [b S, (b + 1) S) of the row,
// S = args.cached_units (row_span.cuh's ClusterRow):
//   1. each block streams its slice once from global memory into its row cache, keeping the online
//      state of its slice (and the hard term's sums), and merges its threads' states into its slot;
//   2. cluster barrier; every block merges the B slots in rank order through distributed shared
//      memory; block 0 writes the row's loss (and cross-entropy);
//   3. each block writes its slice's gradients from its row cache (the block holding the label
//      rewrites the label's element); cluster barrier.
// Bytes per element: read x, y once, write each wanted gradient once: 3e with one gradient, 4e with
// both -- the floor, at any width up to B = 8 blocks' shared memory (a 262144-wide bf16 row takes
// 5 blocks of 227 KB). Skipped rows: each block fills its slice of the gradients.
template <typename scalar_t, int N, bool kHard>
__device__ __forceinline__ void kl_cluster_rows(const KLRowsArgs<scalar_t>& args) {
#if KL_FUSED_DEVICE_HAS_CLUSTERS
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  using State = std::conditional_t<kHard, RowHardState<acc_t>, RowState<acc_t>>;
  KL_FUSED_DYNAMIC_SHARED(unsigned char, shared);
  auto* scratch = reinterpret_cast<State*>(shared);
  P* const cache[2] = {reinterpret_cast<P*>(shared + args.scratch_bytes),
                       reinterpret_cast<P*>(shared + args.scratch_bytes) + args.cached_units};
  const ClusterRow span =
      cluster_row_span(args.vocab / N, args.cached_units, shared, args.scratch_bytes, sizeof(State));
  cluster_rows(args.rows, span, [&](int64_t row) { kl_row<scalar_t, N, true, kHard>(args, row, span, scratch, cache); });
#else
  (void)args;  // launched only where DeviceLimits::cluster_launch (sm_90+)
#endif
}

// The cluster kernel keeps its slice's bounds and its rank beside the one-block kernel's state: at 1024
// threads (64 registers) it sat at the edge, and ptxas spilled 8 bytes of the float and half vector
// kernels on sm_90 after a change that moved code between headers and altered no arithmetic. At most 512
// threads (128 registers), as the other cluster kernels: a slice is at most one block's shared memory,
// ~14 packs per thread and input at 512 threads.
template <typename scalar_t>
constexpr int kMaxClusterRowThreads = 512;

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kMaxClusterRowThreads<scalar_t>, kMinRowBlocksPerSM)
    kl_cluster_rows_kernel(const KLRowsArgs<scalar_t> args) {
  kl_cluster_rows<scalar_t, N, false>(args);
}

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kMaxHardRowThreads<scalar_t>, kMinRowBlocksPerSM)
    kl_hard_cluster_rows_kernel(const KLRowsArgs<scalar_t> args) {
  kl_cluster_rows<scalar_t, N, true>(args);
}

// grad[row, :] *= factors[row] (or factors[0]), in place, in acc_t. Rows whose factor is exactly 1
// are not touched: 2e bytes per element of a scaled row, none otherwise. The factor is read on the
// device, so backward never waits for the host.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kMaxThreads)
    grad_scale_kernel(scalar_t* __restrict__ grad,
                      const at::opmath_type<scalar_t>* __restrict__ factors, bool per_row,
                      int64_t rows, int64_t vocab) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  constexpr int U = kUnroll<N>;
  const int64_t units = vocab / N;
  const int64_t step = static_cast<int64_t>(blockDim.x) * U;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const acc_t factor = factors[per_row ? row : 0];
    if (factor == acc_t(1)) continue;  // block-uniform
    P* g = reinterpret_cast<P*>(grad + row * vocab);
    for (int64_t first = threadIdx.x; first < units; first += step) {
      P values[U];
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int64_t unit = first + static_cast<int64_t>(i) * blockDim.x;
        if (unit < units) values[i] = load_pack<true>(g, unit);
      }
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int64_t unit = first + static_cast<int64_t>(i) * blockDim.x;
        if (unit >= units) continue;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          values[i].v[j] = static_cast<scalar_t>(to_acc(values[i].v[j]) * factor);
        }
        store_pack(g, unit, values[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side (launch.cuh: the same code runs on the GPU and under the SIMT emulator of the tests).

template <int N, typename scalar_t>
void launch_kl_rows(KLRowsArgs<scalar_t> args, bool any_grad, const DeviceLimits& limits, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool hard = args.hard.labels != nullptr;
  const RowsLaunch plan = plan_rows_launch(args.rows, args.vocab / N, 2 * kUnroll<N>,
                                           hard ? kMaxHardRowThreads<scalar_t> : kMaxRowThreads<scalar_t>,
                                           hard ? sizeof(RowHardState<acc_t>) : sizeof(RowState<acc_t>),
                                           sizeof(Pack<scalar_t, N>), any_grad, limits);
  args.scratch_bytes = plan.scratch_bytes;
  args.cached_units = plan.cached_units;
  const bool partial = plan.cached_units < args.vocab / N;
  if (hard) {
    if (!any_grad) {
      launch_kernel<kl_hard_rows_kernel<scalar_t, N, false>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
      return;
    }
    if (partial && launch_cluster_rows<kl_hard_cluster_rows_kernel<scalar_t, N>, kMaxHardRowThreads<scalar_t>, N>(
                       args, sizeof(RowHardState<acc_t>), sizeof(RowHardState<acc_t>), limits, stream)) {
      return;
    }
    if (plan.opt_in) allow_dynamic_shared<kl_hard_rows_kernel<scalar_t, N, true>>(limits.max_shared_optin);
    launch_kernel<kl_hard_rows_kernel<scalar_t, N, true>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
    return;
  }
  if (!any_grad) {
    launch_kernel<kl_rows_kernel<scalar_t, N, false>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
    return;
  }
  if (partial && launch_cluster_rows<kl_cluster_rows_kernel<scalar_t, N>, kMaxClusterRowThreads<scalar_t>, N>(
                     args, sizeof(RowState<acc_t>), sizeof(RowState<acc_t>), limits, stream)) {
    return;
  }
  if (plan.opt_in) allow_dynamic_shared<kl_rows_kernel<scalar_t, N, true>>(limits.max_shared_optin);
  launch_kernel<kl_rows_kernel<scalar_t, N, true>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
}

}  // namespace

RowLossOutputs kl_rows_cuda(const PreparedRows& in, double temperature, bool reverse, bool student_grad,
                            bool teacher_grad, const GradFactor& factor, const HardTermInputs& hard) {
  return run_rows_cuda(in, temperature, reverse, student_grad, teacher_grad, factor, hard,
                       [](auto args, auto pack, bool any_grad, const DeviceLimits& limits, Stream stream) {
                         launch_kl_rows<decltype(pack)::value>(args, any_grad, limits, stream);
                       });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_logits_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& mask,
    double temperature, bool reverse, c10::string_view reduction, bool student_grad, bool teacher_grad) {
  return row_loss_cuda(student_logits, teacher_logits, mask, temperature, reverse, reduction, student_grad,
                       teacher_grad, [](auto args, auto pack, bool any_grad, const DeviceLimits& limits, Stream stream) {
                         launch_kl_rows<decltype(pack)::value>(args, any_grad, limits, stream);
                       });
}

namespace {

void grad_scale_cuda(at::Tensor& grad, const at::Tensor& upstream) {
  check_grad_scale_inputs(grad, upstream);
  const int64_t vocab = grad.size(-1);
  const int64_t rows = vocab > 0 ? grad.numel() / vocab : 0;
  if (rows == 0) return;
  const DeviceGuard guard(grad.device());
  // Converted on the device; nothing here reads a value on the host.
  const at::Tensor factors =
      upstream.to(grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const bool per_row = factors.numel() != 1;
  const Stream stream = current_stream(grad.get_device());
  const DeviceLimits limits = device_limits(grad.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "kl_fused_cuda_grad_scale", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const acc_t* f = factors.const_data_ptr<acc_t>();
    constexpr int kPack = 16 / sizeof(scalar_t);
    const unsigned int grid = grid_blocks(rows, limits);
    if (aligned16(g) && vocab % kPack == 0) {
      const int threads = block_threads(vocab / kPack, 2 * kUnroll<kPack>);
      launch_kernel<grad_scale_kernel<scalar_t, kPack>>(grid, threads, 0, stream, g, f, per_row, rows, vocab);
    } else {
      const int threads = block_threads(vocab, 2 * kUnroll<1>);
      launch_kernel<grad_scale_kernel<scalar_t, 1>>(grid, threads, 0, stream, g, f, per_row, rows, vocab);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(KL_FUSED_CUDA_LIBRARY, KL_FUSED_CUDA_DISPATCH_KEY, m) {
  m.impl("kl_div_logits", &kl_div_logits_cuda);
  m.impl("grad_scale_", &grad_scale_cuda);
}

}  // namespace kl_fused::cuda
