// CUDA implementation of jsd_logits (same contract as cpu/jsd_cpu.cpp): the shared host side of
// the row-loss ops (row_loss_host.cuh) with the JSD row kernel below. At beta = 0 and beta = 1 the
// op is kl_div_logits itself (kl_div_cuda.h): forward and reverse KL, exactly.
//
// Roles and units as in row_state.cuh: x = teacher (p), y = student (q), shifted logits in log2
// units x' = (x - m_x) log2(e) / T, so that the exponentials are ex2.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../jsd_common.h"
#include "../kl_div_common.h"
#include "block_reduce.cuh"
#include "distill_cuda.h"
#include "kl_div_cuda.h"
#include "kl_row_math.cuh"
#include "launch.cuh"
#include "row_loss_host.cuh"
#include "row_pipeline.cuh"
#include "row_span.cuh"
#include "row_state.cuh"

namespace kl_fused::cuda {
namespace {

// K_p = sum p (log2 p - log2 m) and K_q = sum q (log2 q - log2 m) over some of a row's elements.
template <typename acc_t>
struct Divergences {
  acc_t kp, kq;
};

template <typename acc_t>
struct AddDivergences {
  __device__ __forceinline__ Divergences<acc_t> operator()(const Divergences<acc_t>& a,
                                                           const Divergences<acc_t>& b) const {
    return {a.kp + b.kp, a.kq + b.kq};
  }
};

// What passes 2 and 3 know of a row once its statistics are merged.
template <typename acc_t>
struct JSDRowConstants {
  acc_t mx, my;           // raw maxima (finite: rows without them are undefined and skipped)
  acc_t k;                // log2(e) / T
  acc_t inv_zx, inv_zy;   // p = 2^x' / Z_x, q = 2^y' / Z_y
  acc_t log_zx, log_zy;   // log2 Z_x, log2 Z_y
  acc_t beta;             // the teacher's weight in the mixture, 0 < beta < 1
};

// One element: p, q, and log2 p - log2 m, log2 q - log2 m with m = beta p + (1 - beta) q, each
// ratio 0 where its probability is 0 (its log is -inf, and so is log m where both are), so that
// such entries contribute 0 to K and to the gradient, never 0 * inf. Two ex2 and one log2.
template <typename acc_t>
struct JSDTerms {
  acc_t p, q, ratio_p, ratio_q;
};

template <typename acc_t>
__device__ __forceinline__ JSDTerms<acc_t> jsd_terms(acc_t x, acc_t y, const JSDRowConstants<acc_t>& c) {
  const acc_t xs = (x - c.mx) * c.k, ys = (y - c.my) * c.k;
  const acc_t p = exp2_acc(xs) * c.inv_zx, q = exp2_acc(ys) * c.inv_zy;
  const acc_t log_m = log2_acc(c.beta * p + (acc_t(1) - c.beta) * q);
  return {p, q, p > acc_t(0) ? xs - c.log_zx - log_m : acc_t(0), q > acc_t(0) ? ys - c.log_zy - log_m : acc_t(0)};
}

// Pass 2, one step at a time: the thread's share of K_p, K_q.
template <typename acc_t>
struct JSDDivergencePass {
  Divergences<acc_t> sums;
  JSDRowConstants<acc_t> c;
  template <typename P, int U>
  __device__ __forceinline__ void operator()(const P (&packs)[2][U], const bool (&valid)[U], int64_t) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!valid[i]) continue;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) {
        const JSDTerms<acc_t> e = jsd_terms(to_acc(packs[0][i].v[j]), to_acc(packs[1][i].v[j]), c);
        sums.kp += e.p * e.ratio_p;
        sums.kq += e.q * e.ratio_q;
      }
    }
  }
};

// Pass 3, one step at a time: grad_x = beta f p (ln p - ln m - KL(p || m)) and grad_y =
// (1 - beta) f q (ln q - ln m - KL(q || m)), in log2 units times ln 2 (folded into the scales), plus the
// hard term's share of the student's (y) gradient (Hard: NoHardTerm or HardTermShare, whose q1_f
// multiplies q itself).
template <bool kNeedX, bool kNeedY, typename P, typename acc_t, typename Hard = NoHardTerm>
struct JSDGradientPass {
  P* grad_x;
  P* grad_y;
  JSDRowConstants<acc_t> c;
  Divergences<acc_t> k2;  // the row's K_p, K_q in log2 units
  acc_t scale_x;          // beta f ln 2
  acc_t scale_y;          // (1 - beta) f ln 2
  Hard hard;
  __device__ __forceinline__ void element(acc_t x, acc_t y, acc_t& gx, acc_t& gy) const {
    const JSDTerms<acc_t> e = jsd_terms(x, y, c);
    if constexpr (kNeedX) gx = (e.p * scale_x) * (e.ratio_p - k2.kp);
    if constexpr (kNeedY) gy = (e.q * scale_y) * (e.ratio_q - k2.kq);
    hard.template add<kNeedX, kNeedY>(x, y, e.p, e.q, gx, gy);
  }
  template <int U>
  __device__ __forceinline__ void operator()(const P (&packs)[2][U], const bool (&valid)[U], int64_t first) const {
    store_gradient_step<kNeedX, kNeedY>(packs, valid, first, grad_x, grad_y,
                                        [&](acc_t x, acc_t y, acc_t& gx, acc_t& gy) { element(x, y, gx, gy); });
  }
};

// The gradient pass holds more per element than KL's (two exponentials, a logarithm, both
// probabilities and both ratios): at 1024 threads (64 registers) ptxas spilled the bfloat16 vector
// kernel on sm_90, so the gradient kernels run at most 512 threads per block (128 registers).
template <typename scalar_t, bool kGrad>
constexpr int kMaxJSDThreads = kGrad ? 512 : kMaxRowThreads<scalar_t>;
// With the hard term (jsd_hard_rows_kernel) at most 512 threads as well: its sums and constants add to both;
// fp64 at most 256 (at 512 threads, 128 registers, ptxas spilled the fp64 kernels on sm_90).
template <typename scalar_t, bool kGrad, bool kHard>
constexpr int kMaxJSDRowThreads = kHard ? (sizeof(scalar_t) == 8 ? 256 : 512) : kMaxJSDThreads<scalar_t, kGrad>;

// Per-row generalized JSD of p = softmax(x/T) (teacher) and q = softmax(y/T) (student), m =
// beta p + (1 - beta) q, 0 < beta < 1, and with kGrad its gradients:
//   row_loss[r] = beta K_p + (1 - beta) K_q,   K_p = KL(p || m), K_q = KL(q || m)
//   grad_x[r]   = beta f p (log p - log m - K_p)     grad_y[r] = (1 - beta) f q (log q - log m - K_q)
// Passes (row_pipeline.cuh), the row cached in shared memory after the first:
//   1  statistics: online maxima, Z_x, Z_y (KL's statistics step; its W goes unused)   2 ex2
//   2  K_p, K_q against log m, which needs the whole row's Z                  2 ex2 + 1 log2
//   3  with kGrad, the gradients, which need the whole row's K                2 ex2 + 1 log2
// Bytes per element (e = sizeof(scalar_t)), each input read from global memory once when the row
// fits the cache: loss only 2e; with one gradient 3e; with both 4e. In the one-block kernel packs
// beyond the cache are read again by each later pass, from L2 when the rows in flight fit there; the
// cluster kernel (below) caches every pack, so it reads nothing twice.
// Masked rows: loss 0, gradients 0, inputs never read. Undefined rows (a NaN or +inf logit, a side
// all -inf): loss and gradients NaN.
// kHard (jsd_hard_rows_kernel): the distillation step's cross-entropy rides along as in kl_div_cuda.cu's
// kl_row (hard_term.cuh): its sums in pass 1, CE per row, its share of grad_y in pass 3, the label's
// element rewritten once. At T = 1 no exponential more (q_1 is q), else one ex2 per element per pass.
//
// One row of it over the part `span` gives this block (row_span.cuh): its two totals (the statistics
// after pass 1, K_p and K_q after pass 2) are the block's or, in a cluster, the cluster's. Returns
// early on a row it does not compute (masked, undefined, a label outside [0, V)), every block of a
// cluster alike. Scratch: per-warp Divergences, then per-warp states (two reductions per row, each
// with its own scratch: a warp may still read the merge's states while a faster one writes its
// share of K, with no barrier between); a cluster's slots: the state, then the Divergences.
template <typename acc_t, bool kHard>
using JSDState = std::conditional_t<kHard, RowHardState<acc_t>, RowState<acc_t>>;

template <typename acc_t, bool kHard>
constexpr int kDivergenceSlotOffset = round16(sizeof(JSDState<acc_t, kHard>));
template <typename acc_t, bool kHard>
constexpr int kJSDSlotBytes = kDivergenceSlotOffset<acc_t, kHard> + sizeof(Divergences<acc_t>);

template <typename scalar_t, int N, bool kGrad, bool kHard, typename Span>
__device__ __forceinline__ void jsd_row(const KLRowsArgs<scalar_t>& args, const at::opmath_type<scalar_t> beta,
                                        int64_t row, const Span& span, unsigned char* scratch,
                                        Pack<scalar_t, N>* const (&cache)[2]) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  using State = JSDState<acc_t, kHard>;
  // The sums come first, at offsets that are multiples of their size (16 bytes for double).
  auto* sum_scratch = reinterpret_cast<Divergences<acc_t>*>(scratch);
  auto* merge_scratch = reinterpret_cast<State*>(sum_scratch + blockDim.x / 32);
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
  const bool unit_t = args.inv_temperature == acc_t(1);

  int64_t label;
  if (row_skipped<kHard>(args, row, label, fill_gradients, span.leader())) return;
  const P* const in[2] = {reinterpret_cast<const P*>(args.x + args.x_rows.offset(row)) + span.begin,
                          reinterpret_cast<const P*>(args.y + args.y_rows.offset(row)) + span.begin};
  RowState<acc_t> st;
  HardSums<acc_t> hs{};
  if constexpr (kHard) {
    KLHardStatistics<acc_t> statistics{empty_row_state<acc_t>(), k, empty_hard_sums<acc_t>(), false, !unit_t,
                                       args.hard.smoothing != acc_t(0)};
    first_pass<kUnroll<N>>(in, cache, span.cached, span.units, statistics);
    // The merge's barrier also orders the row-cache writes before the later passes read them.
    const RowHardState<acc_t> merged = span.row_total(
        block_reduce(RowHardState<acc_t>{statistics.st, statistics.h}, MergeRowHardStates<acc_t>{k},
                     RowHardState<acc_t>{empty_row_state<acc_t>(), empty_hard_sums<acc_t>()}, merge_scratch),
        MergeRowHardStates<acc_t>{k});
    st = merged.st;
    hs = merged.h;
  } else {
    KLStatistics<acc_t> statistics{empty_row_state<acc_t>(), k};
    first_pass<kUnroll<N>>(in, cache, span.cached, span.units, statistics);
    // The merge's barrier also orders the row-cache writes before the later passes read them.
    st = span.row_total(block_merge(statistics.st, k, merge_scratch), MergeRowStates<acc_t>{k});
  }
  // A NaN logit makes its side's Z NaN, and so does a +inf one (inf - inf); a side all -inf has
  // no distribution. Uniform over the block (block_reduce gives every thread the same bits of the
  // state) and over a cluster (every block merges the same slots in the same order).
  if (st.zx != st.zx || st.zy != st.zy || st.mx == neg_inf<acc_t>() || st.my == neg_inf<acc_t>()) {
    if (span.leader()) {
      args.row_loss[row] = static_cast<acc_t>(NAN);
      if constexpr (kHard) args.hard.row_hard[row] = static_cast<acc_t>(NAN);
    }
    fill_gradients(row, static_cast<scalar_t>(NAN));
    return;
  }
  HardRow<acc_t> hard{};
  if constexpr (kHard) {  // the student is y: at T = 1 its soft statistics are the hard term's
    const acc_t m_s = unit_t ? st.my : hs.m;
    const acc_t log2_z1 = unit_t ? log2_acc(st.zy) : log2_acc(hs.z1);
    if (span.leader()) {
      args.hard.row_hard[row] = cross_entropy(m_s, log2_z1 * static_cast<acc_t>(kLn2), hs.sum,
                                              to_acc(args.y[args.y_rows.offset(row) + label]), args.hard.smoothing,
                                              args.vocab);
    }
    if constexpr (kGrad) {
      const acc_t f_h = static_cast<acc_t>(args.hard.factor.value());
      hard = {f_h, f_h / hs.z1, m_s, f_h * args.hard.smoothing / static_cast<acc_t>(args.vocab),
              f_h * (acc_t(1) - args.hard.smoothing), unit_t, f_h};
    }
  }
  const JSDRowConstants<acc_t> c{st.mx, st.my, k, acc_t(1) / st.zx, acc_t(1) / st.zy,
                                 log2_acc(st.zx), log2_acc(st.zy), beta};
  JSDDivergencePass<acc_t> divergences{{acc_t(0), acc_t(0)}, c};
  later_pass<kGradUnroll<N>, !kGrad>(in, cache, span.cached, span.units, divergences);
  const Divergences<acc_t> k2 = span.row_total(
      block_reduce(divergences.sums, AddDivergences<acc_t>{}, Divergences<acc_t>{acc_t(0), acc_t(0)}, sum_scratch),
      AddDivergences<acc_t>{}, kDivergenceSlotOffset<acc_t, kHard>);
  // JSD >= 0; what rounding leaves below 0 (a row equal to itself) is clamped, as on the CPU.
  const acc_t jsd2 = beta * k2.kp + (acc_t(1) - beta) * k2.kq;
  if (span.leader()) args.row_loss[row] = jsd2 > acc_t(0) ? jsd2 * static_cast<acc_t>(kLn2) : acc_t(0);

  if constexpr (kGrad) {
    const acc_t scale_x = beta * f * static_cast<acc_t>(kLn2);
    const acc_t scale_y = (acc_t(1) - beta) * f * static_cast<acc_t>(kLn2);
    P* const gx = grad_span(args.grad_x);
    P* const gy = grad_span(args.grad_y);
    constexpr int U = kGradUnroll<N>;
    const auto pass = [&](auto need_x, auto need_y) {
      constexpr bool kX = decltype(need_x)::value, kY = decltype(need_y)::value;
      if constexpr (kHard) {
        const JSDGradientPass<kX, kY, P, acc_t, HardTermShare<acc_t>> step{
            gx, gy, c, k2, scale_x, scale_y, HardTermShare<acc_t>{hard, false}};
        later_pass<U, true>(in, cache, span.cached, span.units, step);
        // The label's element of the student's gradient, rewritten once with its pull -f_h (1 - eps),
        // by the block whose part holds it.
        const int64_t at = label - span.begin * N;
        if (gy != nullptr && at >= 0 && at < span.units * N) {  // block-uniform
          __syncthreads();  // the pass's write of that element comes first
          if (threadIdx.x == 0) {
            acc_t dx = acc_t(0), dy = acc_t(0);
            step.element(to_acc(args.x[args.x_rows.offset(row) + label]),
                         to_acc(args.y[args.y_rows.offset(row) + label]), dx, dy);
            reinterpret_cast<scalar_t*>(gy)[at] = static_cast<scalar_t>(dy - hard.pull);
          }
        }
      } else {
        later_pass<U, true>(in, cache, span.cached, span.units, JSDGradientPass<kX, kY, P, acc_t>{gx, gy, c, k2, scale_x, scale_y, {}});
      }
    };
    with_wanted_gradients(gx, gy, pass);
  }
}

// The one-block kernels: a block per row, grid-stride.
template <typename scalar_t, int N, bool kGrad, bool kHard>
__device__ __forceinline__ void jsd_rows(const KLRowsArgs<scalar_t>& args, const at::opmath_type<scalar_t> beta) {
  using P = Pack<scalar_t, N>;
  KL_FUSED_DYNAMIC_SHARED(unsigned char, shared);
  P* const cache[2] = {reinterpret_cast<P*>(shared + args.scratch_bytes),
                       reinterpret_cast<P*>(shared + args.scratch_bytes) + args.cached_units};
  const OneBlockRow span{0, args.vocab / N, args.cached_units};
  for (const int64_t row : block_rows(args.rows)) jsd_row<scalar_t, N, kGrad, kHard>(args, beta, row, span, shared, cache);
}

template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(kMaxJSDThreads<scalar_t, kGrad>, kMinRowBlocksPerSM)
    jsd_rows_kernel(const KLRowsArgs<scalar_t> args, const at::opmath_type<scalar_t> beta) {
  jsd_rows<scalar_t, N, kGrad, false>(args, beta);
}

template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(kMaxJSDRowThreads<scalar_t, kGrad, true>, kMinRowBlocksPerSM)
    jsd_hard_rows_kernel(const KLRowsArgs<scalar_t> args, const at::opmath_type<scalar_t> beta) {
  jsd_rows<scalar_t, N, kGrad, true>(args, beta);
}

// The cluster kernels (sm_90+), for rows too wide for one block's shared memory: a thread-block
// cluster of B blocks per row (launch_plan.h, plan_cluster_rows_launch), block b taking packs
// [b S, (b + 1) S) of the row, S = args.cached_units, all of them cached:
//   1. each block streams its slice once into its row cache (statistics), merges its threads' states
//      into its first slot; cluster barrier; every block merges the B slots in rank order;
//   2. each block's K_p, K_q of its slice from the cache into its second slot; cluster barrier; every
//      block merges them; block 0 writes the row's loss (and cross-entropy);
//   3. with kGrad, each block writes its slice's gradients from its cache (the block holding the
//      label rewrites its element); cluster barrier.
// Bytes per element: read x, y once, write each wanted gradient once: 2e loss only, 3e with one
// gradient, 4e with both -- the floor, at any width up to B = 8 blocks' shared memory (262144 bf16
// with a gradient: 5 blocks of 227 KB). Skipped and undefined rows: each block fills its slice of
// the gradients.
template <typename scalar_t, int N, bool kGrad, bool kHard>
__device__ __forceinline__ void jsd_cluster_rows(const KLRowsArgs<scalar_t>& args, const at::opmath_type<scalar_t> beta) {
#if KL_FUSED_DEVICE_HAS_CLUSTERS
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  KL_FUSED_DYNAMIC_SHARED(unsigned char, shared);
  P* const cache[2] = {reinterpret_cast<P*>(shared + args.scratch_bytes),
                       reinterpret_cast<P*>(shared + args.scratch_bytes) + args.cached_units};
  const ClusterRow span =
      cluster_row_span(args.vocab / N, args.cached_units, shared, args.scratch_bytes, kJSDSlotBytes<acc_t, kHard>);
  cluster_rows(args.rows, span, [&](int64_t row) { jsd_row<scalar_t, N, kGrad, kHard>(args, beta, row, span, shared, cache); });
#else
  (void)args;  // launched only where DeviceLimits::cluster_launch (sm_90+)
  (void)beta;
#endif
}

// The cluster kernels keep the slice's bounds and the cluster's rank beside what the one-block kernels
// hold: at 1024 threads (the loss alone) and at 512 for fp64, ptxas spilled them on sm_90. At most 512
// threads (fp64 256) for both; a slice holds at most a block's shared memory, so 512 threads still
// stream ~14 packs each.
template <typename scalar_t>
constexpr int kMaxJSDClusterThreads = sizeof(scalar_t) == 8 ? 256 : 512;

template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(kMaxJSDClusterThreads<scalar_t>, kMinRowBlocksPerSM)
    jsd_cluster_rows_kernel(const KLRowsArgs<scalar_t> args, const at::opmath_type<scalar_t> beta) {
  jsd_cluster_rows<scalar_t, N, kGrad, false>(args, beta);
}

template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(kMaxJSDClusterThreads<scalar_t>, kMinRowBlocksPerSM)
    jsd_hard_cluster_rows_kernel(const KLRowsArgs<scalar_t> args, const at::opmath_type<scalar_t> beta) {
  jsd_cluster_rows<scalar_t, N, kGrad, true>(args, beta);
}

// ---------------------------------------------------------------------------------------------
// Host side (launch.cuh: the same code runs on the GPU and under the SIMT emulator of the tests).

// The row is always cached: even the loss needs a second pass (log m needs the whole row's Z). A row
// one block cannot cache goes to the cluster kernel where the device has clusters and one fits.
template <int N, typename scalar_t>
void launch_jsd_rows(KLRowsArgs<scalar_t> args, at::opmath_type<scalar_t> beta, bool any_grad,
                     const DeviceLimits& limits, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool hard = args.hard.labels != nullptr;
  const auto launch = [&](auto grad, auto with_hard) {
    constexpr bool kGrad = decltype(grad)::value, kHard = decltype(with_hard)::value;
    constexpr int kThreads = kHard ? kMaxJSDRowThreads<scalar_t, kGrad, true> : kMaxJSDThreads<scalar_t, kGrad>;
    constexpr int kStateBytes = sizeof(JSDState<acc_t, kHard>) + sizeof(Divergences<acc_t>);
    constexpr auto kOneBlock = kHard ? jsd_hard_rows_kernel<scalar_t, N, kGrad> : jsd_rows_kernel<scalar_t, N, kGrad>;
    constexpr auto kCluster =
        kHard ? jsd_hard_cluster_rows_kernel<scalar_t, N, kGrad> : jsd_cluster_rows_kernel<scalar_t, N, kGrad>;
    const RowsLaunch plan = plan_rows_launch(args.rows, args.vocab / N, 2 * kUnroll<N>, kThreads, kStateBytes,
                                             sizeof(Pack<scalar_t, N>), /*cache_rows=*/true, limits);
    if (plan.cached_units < args.vocab / N &&
        launch_cluster_rows<kCluster, kMaxJSDClusterThreads<scalar_t>, N>(args, kStateBytes, kJSDSlotBytes<acc_t, kHard>,
                                                                          limits, stream, beta)) {
      return;
    }
    args.scratch_bytes = plan.scratch_bytes;
    args.cached_units = plan.cached_units;
    if (plan.opt_in) allow_dynamic_shared<kOneBlock>(limits.max_shared_optin);
    launch_kernel<kOneBlock>(plan.grid, plan.threads, plan.shared_bytes, stream, args, beta);
  };
  if (any_grad) {
    if (hard) launch(std::true_type{}, std::true_type{});
    else launch(std::true_type{}, std::false_type{});
  } else {
    if (hard) launch(std::false_type{}, std::true_type{});
    else launch(std::false_type{}, std::false_type{});
  }
}

}  // namespace

RowLossOutputs jsd_rows_cuda(const PreparedRows& in, double beta, double temperature, bool student_grad,
                             bool teacher_grad, const GradFactor& factor, const HardTermInputs& hard) {
  // x = teacher, y = student: the roles of forward KL.
  return run_rows_cuda(in, temperature, /*reverse=*/false, student_grad, teacher_grad, factor, hard,
                       [&](auto args, auto pack, bool any_grad, const DeviceLimits& limits, Stream stream) {
                         using acc_t = typename decltype(args)::acc_t;
                         launch_jsd_rows<decltype(pack)::value>(args, static_cast<acc_t>(beta), any_grad, limits, stream);
                       });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> jsd_logits_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& mask,
    double beta, double temperature, c10::string_view reduction, bool student_grad, bool teacher_grad) {
  check_jsd_beta(beta);
  if (const std::optional<bool> reverse = jsd_kl_endpoint(beta)) {
    return kl_div_logits_cuda(student_logits, teacher_logits, mask, temperature, *reverse, reduction, student_grad,
                              teacher_grad);
  }
  // x = teacher, y = student: the roles of forward KL.
  return row_loss_cuda(student_logits, teacher_logits, mask, temperature, /*reverse=*/false, reduction, student_grad,
                       teacher_grad, [&](auto args, auto pack, bool any_grad, const DeviceLimits& limits, Stream stream) {
                         using acc_t = typename decltype(args)::acc_t;
                         launch_jsd_rows<decltype(pack)::value>(args, static_cast<acc_t>(beta), any_grad, limits, stream);
                       });
}

}  // namespace

TORCH_LIBRARY_IMPL(KL_FUSED_CUDA_LIBRARY, KL_FUSED_CUDA_DISPATCH_KEY, m) { m.impl("jsd_logits", &jsd_logits_cuda); }

}  // namespace kl_fused::cuda
