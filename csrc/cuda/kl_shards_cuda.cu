// CUDA kernels of the vocab-parallel ops (kl_fused.distributed; math in kl_fused/_shard_math.py,
// contract in op_schemas.h), the same as cpu/kl_div_cpu.cpp's: each rank holds a shard (..., V_k)
// of every row, a = t / T, b = s / T.
//
//   kl_row_states       per row of the shard: m_a, m_b (maxima of the raw logits t, s, -inf for a
//                       side that is all -inf) and, relative to them, Z_a = sum e^((t - m_a) / T), Z_b,
//                       W = sum e^(x') (x' - y') (x the side the expectation is over). Raw maxima, as
//                       row_state.cuh keeps them: m / T rounded would be off by up to half an ulp of
//                       max |t| / T, which the merge's e^(m - M) and the gradient's shift amplify. One pass, the KL kernel's statistics
//                       step. Bytes: 2e per element read, 5 values per row written.
//   kl_grad_from_stats  the shard's gradients from the full rows' (M_a, M_b, log Z_a, log Z_b, KL)
//                       and f = d(loss)/d(row KL) / T: p = e^((t - M_a) / T - log Z_a), q likewise,
//                         forward: ds = (q - p) f,  dt = p (log p - log q - KL) f
//                         reverse: ds = q (log q - log p - KL) f,  dt = (p - q) f
//                       One pass, the KL kernel's gradient step, two exponentials per element.
//                       Bytes: 2e read, e written per gradient.
// Masked rows: the empty state (-inf, -inf, 0, 0, 0) and zero gradients, inputs never read.
// Undefined rows (a NaN or +inf logit): the state (-inf, -inf, NaN, NaN, NaN), NaN gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../kl_div_common.h"
#include "kl_row_math.cuh"
#include "launch.cuh"
#include "row_pipeline.cuh"

namespace kl_fused::cuda {
namespace {

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kMaxRowThreads<scalar_t>, kMinRowBlocksPerSM)
    kl_row_states_kernel(const KLRowsArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  KL_FUSED_DYNAMIC_SHARED(unsigned char, shared);
  auto* scratch = reinterpret_cast<RowState<acc_t>*>(shared);
  const int64_t units = args.vocab / N;
  const acc_t inf = static_cast<acc_t>(INFINITY);
  for (const int64_t row : block_rows(args.rows)) {
    acc_t* out = args.states + 5 * row;
    if (row_masked(args.mask, row)) {
      if (threadIdx.x == 0) {
        out[0] = out[1] = -inf;
        out[2] = out[3] = out[4] = acc_t(0);
      }
      continue;
    }
    const P* const in[2] = {reinterpret_cast<const P*>(args.x + args.x_rows.offset(row)),
                            reinterpret_cast<const P*>(args.y + args.y_rows.offset(row))};
    KLStatistics<acc_t> statistics{empty_row_state<acc_t>(), args.k};
    only_pass<kUnroll<N>>(in, units, statistics);
    const RowState<acc_t> st = block_merge(statistics.st, args.k, scratch);
    if (threadIdx.x == 0) {
      // A NaN logit makes its side's sum NaN; a +inf one its maximum +inf (row_state.cuh).
      if (st.zx != st.zx || st.zy != st.zy || st.mx == inf || st.my == inf) {
        out[0] = out[1] = -inf;
        out[2] = out[3] = out[4] = static_cast<acc_t>(NAN);
        continue;
      }
      // From the roles and log2 units of row_state.cuh to (t, s) and natural units; maxima stay raw.
      out[0] = args.reverse ? st.my : st.mx;
      out[1] = args.reverse ? st.mx : st.my;
      out[2] = args.reverse ? st.zy : st.zx;
      out[3] = args.reverse ? st.zx : st.zy;
      out[4] = st.w * static_cast<acc_t>(kLn2);
    }
  }
}

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kMaxRowThreads<scalar_t>, kMinRowBlocksPerSM)
    kl_grad_from_stats_kernel(const KLRowsArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  const int64_t units = args.vocab / N;
  for (const int64_t row : block_rows(args.rows)) {
    P* const gx = args.grad_x != nullptr ? reinterpret_cast<P*>(args.grad_x + row * args.vocab) : nullptr;
    P* const gy = args.grad_y != nullptr ? reinterpret_cast<P*>(args.grad_y + row * args.vocab) : nullptr;
    const acc_t* s = args.stats + 5 * row;
    const acc_t m_a = s[0], m_b = s[1], log_za = s[2], log_zb = s[3], kl = s[4];
    const bool masked = row_masked(args.mask, row);
    const bool undefined = !masked && (kl != kl || !finite_acc(m_a) || !finite_acc(m_b) || !finite_acc(log_za) ||
                                       !finite_acc(log_zb));
    if (masked || undefined) {
      const scalar_t fill = masked ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN();
      if (gx != nullptr) fill_row(gx, units, fill);
      if (gy != nullptr) fill_row(gy, units, fill);
      continue;
    }
    const P* const in[2] = {reinterpret_cast<const P*>(args.x + args.x_rows.offset(row)),
                            reinterpret_cast<const P*>(args.y + args.y_rows.offset(row))};
    // The full rows' statistics in the roles and units of the gradient step: raw maxima, log2.
    const acc_t f = args.row_factor[row];
    const acc_t log_zx = args.reverse ? log_zb : log_za, log_zy = args.reverse ? log_za : log_zb;
    KLGradConstants<acc_t> c;
    c.mx = args.reverse ? m_b : m_a;
    c.my = args.reverse ? m_a : m_b;
    c.k = args.k;
    c.px_f = f * exp2_acc(-log_zx * static_cast<acc_t>(kLog2E));
    c.py_f = f * exp2_acc(-log_zy * static_cast<acc_t>(kLog2E));
    c.wx = c.px_f * static_cast<acc_t>(kLn2);
    c.c2 = (log_zy - log_zx - kl) * static_cast<acc_t>(kLog2E);
    constexpr int U = kGradUnroll<N>;
    if (gx != nullptr && gy != nullptr) only_pass<U>(in, units, KLGradient<true, true, P, acc_t>{gx, gy, c});
    else if (gx != nullptr) only_pass<U>(in, units, KLGradient<true, false, P, acc_t>{gx, gy, c});
    else if (gy != nullptr) only_pass<U>(in, units, KLGradient<false, true, P, acc_t>{gx, gy, c});
  }
}

// ---------------------------------------------------------------------------------------------
// Host side (launch.cuh).

at::Tensor kl_row_states_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                              const std::optional<at::Tensor>& mask, double temperature, bool reverse) {
  const DeviceGuard guard(student_logits.device());
  const PreparedRows in = prepare_rows(student_logits, teacher_logits, mask, temperature, "sum");
  at::Tensor states = at::empty({in.rows, 5}, in.student.options().dtype(in.acc_dtype));
  if (in.rows == 0) return states;
  const int device = in.student.get_device();
  const Stream stream = current_stream(device);
  const DeviceLimits limits = device_limits(device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student.scalar_type(), "kl_fused_cuda_row_states", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    KLRowsArgs<scalar_t> args = kl_rows_args<scalar_t>(in, temperature, reverse, nullptr, nullptr);
    args.states = states.mutable_data_ptr<acc_t>();
    const auto launch = [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      const RowsLaunch plan = plan_rows_launch(in.rows, in.vocab / N, 2 * kUnroll<N>, kMaxRowThreads<scalar_t>,
                                               sizeof(RowState<acc_t>), sizeof(Pack<scalar_t, N>), false, limits);
      launch_kernel<kl_row_states_kernel<scalar_t, N>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
    };
    constexpr int kPack = 16 / sizeof(scalar_t);
    if (kl_rows_vectorizable(args, kPack)) launch(std::integral_constant<int, kPack>{});
    else launch(std::integral_constant<int, 1>{});
  });
  return states;
}

std::tuple<at::Tensor, at::Tensor> kl_grad_from_stats_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& mask,
    const at::Tensor& stats, const at::Tensor& row_factor, double temperature, bool reverse, bool student_grad,
    bool teacher_grad) {
  const DeviceGuard guard(student_logits.device());
  const PreparedRows in = prepare_rows(student_logits, teacher_logits, mask, temperature, "sum");
  check_full_row_stats(in, stats, row_factor);
  at::Tensor grad_student = empty_row_gradient(in.student, student_grad);
  at::Tensor grad_teacher = empty_row_gradient(in.teacher, teacher_grad);
  if (in.rows == 0 || !(student_grad || teacher_grad)) return {grad_student, grad_teacher};
  const int device = in.student.get_device();
  const Stream stream = current_stream(device);
  const DeviceLimits limits = device_limits(device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student.scalar_type(), "kl_fused_cuda_grad_from_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    KLRowsArgs<scalar_t> args = kl_rows_args<scalar_t>(
        in, temperature, reverse, student_grad ? grad_student.mutable_data_ptr<scalar_t>() : nullptr,
        teacher_grad ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr);
    args.stats = stats.const_data_ptr<acc_t>();
    args.row_factor = row_factor.const_data_ptr<acc_t>();
    const auto launch = [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      const RowsLaunch plan = plan_rows_launch(in.rows, in.vocab / N, 2 * kGradUnroll<N>, kMaxRowThreads<scalar_t>,
                                               0, sizeof(Pack<scalar_t, N>), false, limits);
      launch_kernel<kl_grad_from_stats_kernel<scalar_t, N>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
    };
    constexpr int kPack = 16 / sizeof(scalar_t);
    if (kl_rows_vectorizable(args, kPack)) launch(std::integral_constant<int, kPack>{});
    else launch(std::integral_constant<int, 1>{});
  });
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(KL_FUSED_CUDA_LIBRARY, KL_FUSED_CUDA_DISPATCH_KEY, m) {
  m.impl("kl_row_states", &kl_row_states_cuda);
  m.impl("kl_grad_from_stats", &kl_grad_from_stats_cuda);
}

}  // namespace kl_fused::cuda
