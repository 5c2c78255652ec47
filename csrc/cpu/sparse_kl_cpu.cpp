// CPU implementation of sparse_kl_div: checks, outputs, and the AVX2 or portable row kernel
// (sparse_row_kernels.h has the math and the byte count).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../sparse_kl_common.h"
#include "cpu_kernels.h"
#include "cpu_ops.h"

namespace kl_fused::cpu {

SparseRowsProblem sparse_rows_problem(const PreparedSparseRows& in, SparseOutputs& out, double temperature,
                                      bool renormalize, double mass_tolerance) {
  SparseRowsProblem problem{};
  problem.student = in.student.const_data_ptr();
  problem.student_rows = in.student_rows;
  problem.indices = in.indices.const_data_ptr<int64_t>();
  problem.logprobs = in.logprobs.const_data_ptr();
  problem.mask = in.mask.has_value() ? in.mask->const_data_ptr<bool>() : nullptr;
  problem.row_loss = out.row_loss.mutable_data_ptr();
  problem.status = out.status.mutable_data_ptr<int32_t>();
  problem.grad_student = out.grad_student.numel() > 0 ? out.grad_student.mutable_data_ptr() : nullptr;
  problem.grad_logprobs = out.grad_logprobs_acc.numel() > 0 ? out.grad_logprobs_acc.mutable_data_ptr() : nullptr;
  problem.rows = in.rows;
  problem.vocab = in.vocab;
  problem.slots = in.slots;
  problem.inv_temperature = 1.0 / temperature;
  problem.renormalize = renormalize;
  problem.mass_tolerance = mass_tolerance;
  return problem;
}

void run_sparse_rows(c10::ScalarType dtype, const SparseRowsProblem& problem) {
  (cpu_has_avx2() ? avx2::sparse_kl_rows : generic::sparse_kl_rows)(dtype, problem);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kl_div_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_indices, const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& mask, double temperature, bool renormalize, c10::string_view reduction_name,
    double mass_tolerance, bool validate, bool student_grad, bool logprobs_grad) {
  const PreparedSparseRows in = prepare_sparse_rows(student_logits, teacher_indices, teacher_logprobs, mask,
                                                    temperature, reduction_name, mass_tolerance);
  const Reduction reduction = parse_reduction(reduction_name);
  SparseOutputs out = allocate_sparse_outputs(in, student_grad, logprobs_grad);
  advise_huge_pages(out.grad_student);
  const std::optional<at::Tensor> counted = counted_rows(in.mask);
  if (in.rows > 0) {
    SparseRowsProblem problem = sparse_rows_problem(in, out, temperature, renormalize, mass_tolerance);
    problem.student_factor = make_grad_factor(reduction, temperature, in.vocab, in.rows, counted).value();
    problem.logprobs_factor = make_grad_factor(reduction, 1.0, in.vocab, in.rows, counted).value();
    run_sparse_rows(in.student.scalar_type(), problem);
    if (validate) raise_on_bad_support(in, out.status, mass_tolerance);
  }
  return finish_sparse_outputs(in, out, counted, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_fused, CPU, m) { m.impl("sparse_kl_div", &sparse_kl_div_cpu); }

}  // namespace kl_fused::cpu
