// CPU implementation of distillation_loss (schema in op_schemas.h, host side in ../distill_common.h):
// the row kernel of the soft term's family -- kl_rows or jsd_rows for a dense teacher, sparse_kl_rows
// for top-k slots or for no teacher at all (K = 0) -- with the hard term riding in its passes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../distill_common.h"
#include "../jsd_common.h"
#include "../sparse_kl_common.h"
#include "cpu_kernels.h"
#include "cpu_ops.h"

namespace kl_fused::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> distillation_loss_cpu(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& teacher_indices, const std::optional<at::Tensor>& teacher_logprobs,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& num_items, c10::string_view divergence, double beta, bool renormalize,
    double temperature, double soft_weight, double hard_weight, int64_t ignore_index, double label_smoothing,
    c10::string_view reduction, double mass_tolerance, bool validate, bool student_grad, bool teacher_grad,
    bool logprobs_grad) {
  DistillStart start = start_distill(student, teacher, teacher_indices, teacher_logprobs, labels, mask, num_items,
                                     divergence, beta, renormalize, temperature, soft_weight, hard_weight,
                                     ignore_index, label_smoothing, reduction, validate);
  const DistillOptions& options = start.options;
  const DistillRows& counted = start.counted;
  DistillRowOutputs& out = start.out;
  const int64_t vocab = start.vocab, rows = start.rows;
  const double T = options.temperature;
  const bool with_labels = counted.labels.defined();
  HardTerm hard{};  // the CPU kernels' rider (cpu_kernels.h)
  if (with_labels) {
    hard.labels = counted.labels.const_data_ptr<int64_t>();
    hard.row_hard = out.row_hard.mutable_data_ptr();
    hard.status = out.status.mutable_data_ptr<int32_t>();
    hard.smoothing = options.smoothing;
    hard.grad_factor = hard_grad_factor(options, vocab, rows, counted).value();
  }
  at::Tensor grad_student, grad_teacher = at::empty({0}, student.options()),
             grad_logprobs = at::empty({0}, student.options());  // distinct: outputs never alias
  at::IntArrayRef leading = student.sizes().slice(0, student.dim() - 1);

  if (options.teacher == TeacherForm::kDense) {
    const PreparedRows in = prepare_rows(student, *teacher, counted.mask, T, reduction);
    // JSD at beta = 0 and 1 is forward and reverse KL, kl_rows' rows (jsd_common.h).
    const std::optional<bool> endpoint =
        options.divergence == Divergence::kJSD ? jsd_kl_endpoint(beta) : std::optional<bool>(
            options.divergence == Divergence::kReverseKL);
    KLRowsProblem problem = rows_problem(in, T, endpoint.value_or(false));
    problem.beta = beta;
    problem.hard = hard;
    const RowsKernels kernels = endpoint.has_value() ? RowsKernels{avx2::kl_rows, generic::kl_rows}
                                                     : RowsKernels{avx2::jsd_rows, generic::jsd_rows};
    RowLossOutputs rows_out = run_rows_kernel(in, problem, student_grad, teacher_grad,
                                              soft_grad_factor(options, in.vocab, in.rows, counted).value(), kernels);
    out.row_soft = rows_out.row_loss;
    grad_student = rows_out.grad_student;
    grad_teacher = rows_out.grad_teacher;
  } else {
    // A sparse teacher, or none: K = 0 slots, whose bucket term is exactly 0 (sparse_row_kernels.h).
    const double tolerance = options.renormalize ? INFINITY : mass_tolerance;
    const PreparedSparseRows in = options.teacher == TeacherForm::kSparse
                                      ? prepare_sparse_rows(student, *teacher_indices, *teacher_logprobs,
                                                            counted.mask, T, reduction, mass_tolerance)
                                      : prepare_student_rows(student, counted.mask);
    SparseOutputs sparse = allocate_sparse_outputs(in, student_grad, logprobs_grad && in.slots > 0);
    advise_huge_pages(sparse.grad_student);
    if (with_labels) sparse.status = out.status;  // one status word per row for both kinds of problem
    if (in.rows > 0) {
      SparseRowsProblem problem =
          sparse_rows_problem(in, sparse, T, options.teacher == TeacherForm::kSparse && options.renormalize, tolerance);
      problem.student_factor = soft_grad_factor(options, in.vocab, in.rows, counted).value();
      problem.logprobs_factor = soft_grad_factor(options, in.vocab, in.rows, counted, false).value();
      problem.hard = hard;
      run_sparse_rows(in.student.scalar_type(), problem);
    }
    out.row_soft = sparse.row_loss;
    if (!with_labels) out.status = sparse.status;
    if (options.validate && options.teacher == TeacherForm::kSparse && !with_labels) {
      raise_on_bad_support(in, sparse.status, mass_tolerance);
    } else if (options.validate && options.teacher == TeacherForm::kSparse && any_bad_row(sparse.status)) {
      raise_on_bad_labels(counted.labels, sparse.status, leading, vocab, options.ignore_index);
      raise_on_bad_support(in, sparse.status, mass_tolerance);
    }
    grad_student = sparse.grad_student;
    if (options.teacher == TeacherForm::kSparse) {
      std::tie(std::ignore, std::ignore, grad_logprobs) = finish_sparse_outputs(in, sparse, counted.count,
                                                                                Reduction::Sum);
    }
  }
  if (options.validate && with_labels && options.teacher != TeacherForm::kSparse && any_bad_row(out.status)) {
    raise_on_bad_labels(counted.labels, out.status, leading, vocab, options.ignore_index);
  }
  auto [loss, parts] = finish_distill(out, options, counted, leading, vocab);
  if (!grad_student.defined()) grad_student = at::empty({0}, student.options());
  return {loss, grad_student, grad_teacher, grad_logprobs, parts};
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_fused, CPU, m) { m.impl("distillation_loss", &distillation_loss_cpu); }

}  // namespace kl_fused::cpu
