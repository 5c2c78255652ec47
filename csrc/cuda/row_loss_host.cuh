// The host side every CUDA row-loss op shares (kl_div_logits, jsd_logits): an op that writes one
// loss per row and, in the same launch, the gradients of the reduced loss differs from the others
// only in the kernel it launches.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "../kl_div_common.h"
#include "hard_term.cuh"
#include "kl_row_math.cuh"
#include "launch.cuh"
#include "row_pipeline.cuh"

namespace kl_fused::cuda {

// The per-row losses and the wanted gradients of checked rows: allocates them and calls
//   launch(args, pack, any_grad, limits, stream)
// with the rows' KLRowsArgs<scalar_t> (x is the side the expectation is over: the teacher unless
// `reverse`; row_loss, the gradient factor and the hard term set) and pack =
// std::integral_constant<int, N>, the elements per access that every row allows (a 16-byte pack, or 1).
struct RowLossOutputs {
  at::Tensor row_loss;
  at::Tensor grad_student;
  at::Tensor grad_teacher;
};

// A cluster kernel (kKernel(args, extra...), at most kMaxThreads threads; row_span.cuh's ClusterRow)
// for rows one block cannot cache: per-warp scratch of `state_bytes` and `slot_bytes` of slots per
// block. Launched where the device has clusters and a cluster of at most 8 blocks caches the row and
// can be resident (cudaOccupancyMaxActiveClusters); false otherwise, nothing launched.
template <auto kKernel, int kMaxThreads, int N, typename scalar_t, typename... Extra>
bool launch_cluster_rows(KLRowsArgs<scalar_t> args, int state_bytes, int slot_bytes, const DeviceLimits& limits,
                         Stream stream, const Extra&... extra) {
  const ClusterRowsLaunch plan = plan_cluster_rows_launch(args.rows, args.vocab / N, 2 * kUnroll<N>, kMaxThreads,
                                                          state_bytes, sizeof(Pack<scalar_t, N>), slot_bytes, limits);
  if (plan.blocks == 1) return false;
  if (plan.block.opt_in) allow_dynamic_shared<kKernel>(limits.max_shared_optin);
  if (max_active_clusters<kKernel>(plan.blocks, plan.block.threads, plan.block.shared_bytes, stream) == 0) return false;
  args.scratch_bytes = plan.block.scratch_bytes;
  args.cached_units = plan.block.cached_units;
  launch_cluster_kernel<kKernel>(plan.block.grid, plan.blocks, plan.block.threads, plan.block.shared_bytes, stream, args,
                                 extra...);
  return true;
}

template <typename Launch>
RowLossOutputs run_rows_cuda(const PreparedRows& in, double temperature, bool reverse, bool student_grad,
                             bool teacher_grad, const GradFactor& factor, const HardTermInputs& hard,
                             const Launch& launch) {
  RowLossOutputs out{at::empty({in.rows}, in.student.options().dtype(in.acc_dtype)),
                     empty_row_gradient(in.student, student_grad), empty_row_gradient(in.teacher, teacher_grad)};
  if (in.rows == 0) return out;
  const int device = in.student.get_device();
  const Stream stream = current_stream(device);
  const DeviceLimits limits = device_limits(device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student.scalar_type(), "kl_fused_cuda_row_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* ds = student_grad ? out.grad_student.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dt = teacher_grad ? out.grad_teacher.mutable_data_ptr<scalar_t>() : nullptr;
    KLRowsArgs<scalar_t> args = kl_rows_args(in, temperature, reverse, ds, dt);
    args.row_loss = out.row_loss.mutable_data_ptr<acc_t>();
    args.factor = factor;
    args.hard = hard_term_args<acc_t>(hard);
    constexpr int kPack = 16 / sizeof(scalar_t);
    const bool any_grad = ds != nullptr || dt != nullptr;
    if (kl_rows_vectorizable(args, kPack)) {
      launch(args, std::integral_constant<int, kPack>{}, any_grad, limits, stream);
    } else {
      launch(args, std::integral_constant<int, 1>{}, any_grad, limits, stream);
    }
  });
  return out;
}

// (loss, grad_student, grad_teacher) of (..., V) logits: checks and prepares the rows, runs them
// (run_rows_cuda, at the reduction's factor, the count left on the device), reduces the per-row losses.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_loss_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& mask,
    double temperature, bool reverse, c10::string_view reduction_name, bool student_grad, bool teacher_grad,
    const Launch& launch) {
  const DeviceGuard guard(student_logits.device());
  const PreparedRows in = prepare_rows(student_logits, teacher_logits, mask, temperature, reduction_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const std::optional<at::Tensor> counted = counted_rows(in.mask);  // stays on the device
  const GradFactor factor = make_grad_factor(reduction, temperature, in.vocab, in.rows, counted);
  RowLossOutputs out = run_rows_cuda(in, temperature, reverse, student_grad, teacher_grad, factor, {}, launch);
  return {reduce_row_losses(out.row_loss, counted, reduction, in.leading(), in.vocab), out.grad_student,
          out.grad_teacher};
}

}  // namespace kl_fused::cuda
