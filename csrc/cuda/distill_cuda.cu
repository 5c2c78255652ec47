// CUDA implementation of distillation_loss (same contract as cpu/distill_cpu.cpp; host side in
// ../distill_common.h): the row kernel of the soft term's family -- kl_hard_rows_kernel or
// jsd_hard_rows_kernel for a dense teacher, sparse_bucket_hard_kernel for top-k slots or for no teacher
// (K = 0) -- with the hard term riding in its passes (hard_term.cuh), or the soft kernels themselves
// when there are no labels. No host synchronisation except the one validate asks for.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../distill_common.h"
#include "../jsd_common.h"
#include "../sparse_kl_common.h"
#include "distill_cuda.h"
#include "launch.cuh"

namespace kl_fused::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> distillation_loss_cuda(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& teacher_indices, const std::optional<at::Tensor>& teacher_logprobs,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& num_items, c10::string_view divergence, double beta, bool renormalize,
    double temperature, double soft_weight, double hard_weight, int64_t ignore_index, double label_smoothing,
    c10::string_view reduction, double mass_tolerance, bool validate, bool student_grad, bool teacher_grad,
    bool logprobs_grad) {
  const DeviceGuard guard(student.device());
  DistillStart start = start_distill(student, teacher, teacher_indices, teacher_logprobs, labels, mask, num_items,
                                     divergence, beta, renormalize, temperature, soft_weight, hard_weight,
                                     ignore_index, label_smoothing, reduction, validate);
  const DistillOptions& options = start.options;
  const DistillRows& counted = start.counted;
  const double T = options.temperature;
  const bool with_labels = counted.labels.defined();
  const int64_t vocab = start.vocab, rows = start.rows;
  const at::IntArrayRef leading = student.sizes().slice(0, student.dim() - 1);
  DistillRowOutputs& out = start.out;
  HardTermInputs hard;  // the CUDA kernels' rider (hard_term.cuh)
  if (with_labels) {
    hard.labels = counted.labels.const_data_ptr<int64_t>();
    hard.row_hard = out.row_hard.mutable_data_ptr();
    hard.status = out.status.mutable_data_ptr<int32_t>();
    hard.smoothing = options.smoothing;
    hard.factor = hard_grad_factor(options, vocab, rows, counted);
  }
  at::Tensor grad_student, grad_teacher = at::empty({0}, student.options()),
             grad_logprobs = at::empty({0}, student.options());  // distinct: outputs never alias

  if (options.teacher == TeacherForm::kDense) {
    const PreparedRows in = prepare_rows(student, *teacher, counted.mask, T, reduction);
    const GradFactor factor = soft_grad_factor(options, in.vocab, in.rows, counted);
    // JSD at beta = 0 and 1 is forward and reverse KL, kl_rows' rows (jsd_common.h).
    const std::optional<bool> endpoint =
        options.divergence == Divergence::kJSD ? jsd_kl_endpoint(beta)
                                               : std::optional<bool>(options.divergence == Divergence::kReverseKL);
    RowLossOutputs rows_out = endpoint.has_value()
                                  ? kl_rows_cuda(in, T, *endpoint, student_grad, teacher_grad, factor, hard)
                                  : jsd_rows_cuda(in, beta, T, student_grad, teacher_grad, factor, hard);
    out.row_soft = rows_out.row_loss;
    grad_student = rows_out.grad_student;
    grad_teacher = rows_out.grad_teacher;
    if (options.validate && with_labels && any_bad_row(out.status)) {
      raise_on_bad_labels(counted.labels, out.status, leading, vocab, options.ignore_index);
    }
  } else {
    // A sparse teacher, or none: K = 0 slots, whose bucket term is exactly 0.
    const bool sparse = options.teacher == TeacherForm::kSparse;
    const PreparedSparseRows in = sparse ? prepare_sparse_rows(student, *teacher_indices, *teacher_logprobs,
                                                               counted.mask, T, reduction, mass_tolerance)
                                         : prepare_student_rows(student, counted.mask);
    SparseOutputs sparse_out = allocate_sparse_outputs(in, student_grad, logprobs_grad && in.slots > 0);
    if (with_labels) sparse_out.status = out.status;  // one status word per row for both kinds of problem
    sparse_rows_cuda(in, sparse_out, T, sparse && options.renormalize, mass_tolerance,
                     soft_grad_factor(options, in.vocab, in.rows, counted),
                     soft_grad_factor(options, in.vocab, in.rows, counted, false), hard);
    out.row_soft = sparse_out.row_loss;
    if (options.validate && in.rows > 0 && any_bad_row(sparse_out.status)) {
      if (with_labels) raise_on_bad_labels(counted.labels, sparse_out.status, leading, vocab, options.ignore_index);
      if (sparse) raise_on_bad_support(in, sparse_out.status, mass_tolerance);
    }
    grad_student = sparse_out.grad_student;
    if (sparse) {
      std::tie(std::ignore, std::ignore, grad_logprobs) =
          finish_sparse_outputs(in, sparse_out, counted.count, Reduction::Sum);
    }
  }
  auto [loss, parts] = finish_distill(out, options, counted, leading, vocab);
  return {loss, grad_student, grad_teacher, grad_logprobs, parts};
}

}  // namespace

TORCH_LIBRARY_IMPL(KL_FUSED_CUDA_LIBRARY, KL_FUSED_CUDA_DISPATCH_KEY, m) {
  m.impl("distillation_loss", &distillation_loss_cuda);
}

}  // namespace kl_fused::cuda
