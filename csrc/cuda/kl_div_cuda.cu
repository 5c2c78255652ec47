// CUDA implementations of the kl_fused ops (same contract as cpu/kl_div_cpu.cpp): argument checks,
// output allocation, and the row kernels. Math of a row in kl_div_common.h; the mergeable row
// statistics, the x/y roles and the log2 units in row_state.cuh.
//
// The row kernel is the shared pipeline of row_pipeline.cuh with KL's math: each thread streams its
// share of the row once, keeping an online state (running maxima, Z_x, Z_y, W); the block merges
// the states (block_reduce.cuh). When a gradient is wanted, the row's logits read by that pass are
// also parked in shared memory (as much of the row as fits), so the gradient pass reads them
// on-chip; whatever does not fit is read again from global memory, most of it from L2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../kl_div_common.h"
#include "launch.cuh"
#include "row_pipeline.cuh"
#include "row_state.cuh"

namespace kl_fused::cuda {
namespace {

// fp64 exp2/log2 are software routines: at 1024 threads (64 registers each) they spill.
template <typename scalar_t>
constexpr int kMaxRowThreads = sizeof(scalar_t) == 8 ? 512 : kMaxThreads;
// The launch bound's minimum of one resident block per SM lets ptxas use the whole register budget
// of kMaxRowThreads (128 registers at 512 threads): without it, ptxas held the fp64 vector
// kernel to 64 registers on sm_80 and spilled (tests/cuda_resources.py).
constexpr int kMinRowBlocksPerSM = 1;
// Packs loaded per thread before any of them is used, so several loads are in flight per thread:
// 2 x 16 bytes per tensor on the vector path, 8 elements on the scalar one.
template <int N>
constexpr int kUnroll = N == 1 ? 8 : 2;
// The gradient pass holds more per pack (two output packs, the row constants): one 16-byte pack
// per tensor per step keeps it within 64 registers at 1024 threads.
template <int N>
constexpr int kGradUnroll = N == 1 ? 2 : 1;

template <typename scalar_t>
struct KLRowsArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;        // (..., V) through x_rows: teacher for forward KL, student for reverse
  const scalar_t* y;        // (..., V) through y_rows: the other input
  RowLayout x_rows;
  RowLayout y_rows;
  const bool* mask;         // (rows,) or nullptr; rows where it is false are never read
  acc_t* row_loss;          // (rows,)
  scalar_t* grad_x;         // (rows, V) contiguous, or nullptr when not wanted
  scalar_t* grad_y;         // (rows, V) contiguous, or nullptr when not wanted
  int64_t rows;
  int64_t vocab;
  acc_t k;                  // log2(e) / T
  GradFactor factor;        // d(loss)/d(row loss) / T; its count lives on the device
  int64_t cached_units;     // leading packs of each row kept in shared memory (gradient kernel)
  int scratch_bytes;        // dynamic shared memory before the row cache (per-warp states)
};

// One step of the statistics pass: folds packs of x and y into the thread's online state.
template <typename acc_t, typename P, int U>
__device__ __forceinline__ void accumulate_step(RowState<acc_t>& st, const P (&packs)[2][U], const bool (&valid)[U],
                                                acc_t k) {
  constexpr int N = P::kSize;
  const auto& px = packs[0];
  const auto& py = packs[1];
  // One rescale per step at most (and rarely: only when this step raises a maximum).
  acc_t step_mx = neg_inf<acc_t>(), step_my = neg_inf<acc_t>();
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!valid[i]) continue;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      step_mx = max_acc(step_mx, to_acc(px[i].v[j]));
      step_my = max_acc(step_my, to_acc(py[i].v[j]));
    }
  }
  if (step_mx > st.mx || step_my > st.my) rescale(st, max_acc(st.mx, step_mx), max_acc(st.my, step_my), k);
  const acc_t sx = finite_shift(st.mx), sy = finite_shift(st.my);
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!valid[i]) continue;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t xs = (to_acc(px[i].v[j]) - sx) * k;
      const acc_t ys = (to_acc(py[i].v[j]) - sy) * k;
      const acc_t ex = exp2_acc(xs);
      st.zx += ex;
      st.zy += exp2_acc(ys);
      // p_x = 0 contributes 0, never 0 * inf (x = -inf, or y' = -inf where p_x = 0).
      st.w += ex > acc_t(0) ? ex * (xs - ys) : acc_t(0);
    }
  }
}

// Per-row constants of the gradient pass, everything in log2 units except f.
template <typename acc_t>
struct GradConstants {
  acc_t mx, my;   // raw maxima; -inf gives NaN gradients, as the CPU kernels do
  acc_t k;        // log2(e) / T
  acc_t px_f;     // f / Z_x:      p_x f = 2^x' px_f
  acc_t py_f;     // f / Z_y
  acc_t wx;       // f ln2 / Z_x: turns (x' - y') in log2 units back into natural units
  acc_t c2;       // (log p_x - log p_y - KL) - (x' - y') ln2, divided by ln2
};

// One step of the gradient pass. kNeedX/kNeedY: which gradients are written (compile-time, so
// that each output pack is built whole in registers).
template <bool kNeedX, bool kNeedY, typename P, int U, typename acc_t>
__device__ __forceinline__ void gradient_step(const P (&packs)[2][U], const bool (&valid)[U], int64_t first,
                                              P* grad_x, P* grad_y, const GradConstants<acc_t>& c) {
  using scalar_t = typename P::value_type;
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!valid[i]) continue;
    P gx, gy;
#pragma unroll
    for (int j = 0; j < P::kSize; ++j) {
      const acc_t xs = (to_acc(packs[0][i].v[j]) - c.mx) * c.k;
      const acc_t ys = (to_acc(packs[1][i].v[j]) - c.my) * c.k;
      const acc_t ex = exp2_acc(xs);
      // grad_x = p_x (log p_x - log p_y - KL) f, zero where p_x = 0.
      if constexpr (kNeedX) gx.v[j] = static_cast<scalar_t>(ex > acc_t(0) ? (ex * c.wx) * (xs - ys + c.c2) : acc_t(0));
      // grad_y = (p_y - p_x) f.
      if constexpr (kNeedY) gy.v[j] = static_cast<scalar_t>(exp2_acc(ys) * c.py_f - ex * c.px_f);
    }
    if constexpr (kNeedX) store_pack(grad_x, step_unit(first, i), gx);
    if constexpr (kNeedY) store_pack(grad_y, step_unit(first, i), gy);
  }
}

// The two passes as the pipeline calls them, one step at a time.
template <typename acc_t>
struct Accumulate {
  RowState<acc_t> st;
  acc_t k;
  template <typename P, int U>
  __device__ __forceinline__ void operator()(const P (&packs)[2][U], const bool (&valid)[U], int64_t) {
    accumulate_step(st, packs, valid, k);
  }
};

template <bool kNeedX, bool kNeedY, typename P, typename acc_t>
struct Gradient {
  P* grad_x;
  P* grad_y;
  GradConstants<acc_t> c;
  template <int U>
  __device__ __forceinline__ void operator()(const P (&packs)[2][U], const bool (&valid)[U], int64_t first) const {
    gradient_step<kNeedX, kNeedY>(packs, valid, first, grad_x, grad_y, c);
  }
};

// Per-row KL of softmax(x/T) || softmax(y/T) (row_state.cuh), and with kGrad its gradients:
//   row_loss[r] = sum p_x (log p_x - log p_y)
//   grad_x[r]   = p_x (log p_x - log p_y - KL) f       grad_y[r] = (p_y - p_x) f
// Passes (row_pipeline.cuh): statistics, then with kGrad the gradient, the row cached in between.
// Bytes per element (e = sizeof(scalar_t)), each input read from global memory once:
//   loss only 2e; with one gradient 3e; with both 4e. Packs beyond the shared-memory row cache
//   are read a second time by the gradient pass, from L2 when the rows in flight fit there.
// Masked rows: loss 0, gradients 0, inputs never read.
template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(kMaxRowThreads<scalar_t>, kMinRowBlocksPerSM)
    kl_rows_kernel(const KLRowsArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  KL_FUSED_DYNAMIC_SHARED(unsigned char, shared);
  auto* scratch = reinterpret_cast<RowState<acc_t>*>(shared);
  P* const cache[2] = {reinterpret_cast<P*>(shared + args.scratch_bytes),
                       reinterpret_cast<P*>(shared + args.scratch_bytes) + args.cached_units};
  const int64_t units = args.vocab / N;
  const int64_t cached = kGrad ? args.cached_units : 0;
  const acc_t k = args.k;
  // Read here, on the device: the counted-row count of batchmean/mean may be a mask's sum.
  const acc_t f = kGrad ? static_cast<acc_t>(args.factor.value()) : acc_t(0);
  const auto grad_row = [&](scalar_t* grad, int64_t row) {
    return grad != nullptr ? reinterpret_cast<P*>(grad + row * args.vocab) : nullptr;
  };

  for (const int64_t row : block_rows(args.rows)) {
    if (row_masked(args.mask, row)) {  // block-uniform; touches no shared memory
      if (threadIdx.x == 0) args.row_loss[row] = acc_t(0);
      if constexpr (kGrad) {
        if (P* g = grad_row(args.grad_x, row)) zero_row(g, units);
        if (P* g = grad_row(args.grad_y, row)) zero_row(g, units);
      }
      continue;
    }
    const P* const in[2] = {reinterpret_cast<const P*>(args.x + args.x_rows.offset(row)),
                            reinterpret_cast<const P*>(args.y + args.y_rows.offset(row))};
    Accumulate<acc_t> accumulate{empty_row_state<acc_t>(), k};
    if constexpr (kGrad) {
      first_pass<kUnroll<N>>(in, cache, cached, units, accumulate);
    } else {
      only_pass<kUnroll<N>>(in, units, accumulate);
    }
    // The merge's barrier also orders the row-cache writes before the gradient pass reads them.
    const RowState<acc_t> st = block_merge(accumulate.st, k, scratch);

    const acc_t log_zx = log2_acc(st.zx), log_zy = log2_acc(st.zy);
    acc_t kl2 = st.w / st.zx - log_zx + log_zy;  // KL / ln2
    // A row whose x or y logits are all -inf has no distribution: NaN, as on the CPU.
    if (st.mx == neg_inf<acc_t>() || st.my == neg_inf<acc_t>()) kl2 = static_cast<acc_t>(NAN);
    if (threadIdx.x == 0) args.row_loss[row] = kl2 * static_cast<acc_t>(kLn2);

    if constexpr (kGrad) {
      GradConstants<acc_t> c;
      c.mx = st.mx;
      c.my = st.my;
      c.k = k;
      c.px_f = f / st.zx;
      c.py_f = f / st.zy;
      c.wx = c.px_f * static_cast<acc_t>(kLn2);
      c.c2 = log_zy - log_zx - kl2;
      P* const gx = grad_row(args.grad_x, row);
      P* const gy = grad_row(args.grad_y, row);
      if (gx != nullptr && gy != nullptr) {
        later_pass<kGradUnroll<N>, true>(in, cache, cached, units, Gradient<true, true, P, acc_t>{gx, gy, c});
      } else if (gx != nullptr) {
        later_pass<kGradUnroll<N>, true>(in, cache, cached, units, Gradient<true, false, P, acc_t>{gx, gy, c});
      } else {
        later_pass<kGradUnroll<N>, true>(in, cache, cached, units, Gradient<false, true, P, acc_t>{gx, gy, c});
      }
    }
  }
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

template <typename scalar_t, int N>
void launch_kl_rows(KLRowsArgs<scalar_t> args, bool any_grad, const DeviceLimits& limits, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowsLaunch plan = plan_rows_launch(args.rows, args.vocab / N, 2 * kUnroll<N>, kMaxRowThreads<scalar_t>,
                                           sizeof(RowState<acc_t>), sizeof(Pack<scalar_t, N>), any_grad, limits);
  args.scratch_bytes = plan.scratch_bytes;
  args.cached_units = plan.cached_units;
  if (!any_grad) {
    launch_kernel<kl_rows_kernel<scalar_t, N, false>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
    return;
  }
  if (plan.opt_in) allow_dynamic_shared<kl_rows_kernel<scalar_t, N, true>>(limits.max_shared_optin);
  launch_kernel<kl_rows_kernel<scalar_t, N, true>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_logits_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& mask_arg, double temperature, bool reverse,
    c10::string_view reduction_name, bool student_grad, bool teacher_grad) {
  const DeviceGuard guard(student_logits.device());
  const PreparedRows in = prepare_rows(student_logits, teacher_logits, mask_arg, temperature, reduction_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const at::Tensor& student = in.student;
  const at::Tensor& teacher = in.teacher;
  const std::optional<at::Tensor>& mask = in.mask;
  const int64_t vocab = in.vocab;
  const int64_t rows = in.rows;

  at::Tensor row_loss = at::empty({rows}, student.options().dtype(in.acc_dtype));
  at::Tensor grad_student = empty_row_gradient(student, student_grad);
  at::Tensor grad_teacher = empty_row_gradient(teacher, teacher_grad);
  const std::optional<at::Tensor> counted = counted_rows(mask);  // stays on the device

  if (rows > 0) {
    const RowLayout& student_rows = in.student_rows;
    const RowLayout& teacher_rows = in.teacher_rows;
    const GradFactor factor = make_grad_factor(reduction, temperature, vocab, rows, counted);
    const int device = student.get_device();
    const Stream stream = current_stream(device);
    const DeviceLimits limits = device_limits(device);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                    "kl_fused_cuda_kl_rows", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto* s = student.const_data_ptr<scalar_t>();
      const auto* t = teacher.const_data_ptr<scalar_t>();
      scalar_t* ds = student_grad ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* dt = teacher_grad ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr;
      KLRowsArgs<scalar_t> args;
      // x is the distribution the expectation is over (row_state.cuh).
      args.x = reverse ? s : t;
      args.y = reverse ? t : s;
      args.x_rows = reverse ? student_rows : teacher_rows;
      args.y_rows = reverse ? teacher_rows : student_rows;
      args.grad_x = reverse ? ds : dt;
      args.grad_y = reverse ? dt : ds;
      args.mask = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
      args.row_loss = row_loss.mutable_data_ptr<acc_t>();
      args.rows = rows;
      args.vocab = vocab;
      args.k = static_cast<acc_t>(kLog2E / temperature);
      args.factor = factor;
      args.cached_units = 0;
      args.scratch_bytes = 0;

      constexpr int kPack = 16 / sizeof(scalar_t);
      const bool vectorized =
          rows_vectorizable(s, student_rows, vocab, kPack) &&
          rows_vectorizable(t, teacher_rows, vocab, kPack) &&
          (ds == nullptr || aligned16(ds)) && (dt == nullptr || aligned16(dt));
      const bool any_grad = ds != nullptr || dt != nullptr;
      if (vectorized) launch_kl_rows<scalar_t, kPack>(args, any_grad, limits, stream);
      else launch_kl_rows<scalar_t, 1>(args, any_grad, limits, stream);
    });
  }
  return {reduce_row_losses(row_loss, counted, reduction, in.leading(), vocab), grad_student,
          grad_teacher};
}

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
