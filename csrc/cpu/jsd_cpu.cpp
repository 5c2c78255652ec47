// CPU implementation of jsd_logits (schema in op_schemas.h): the shared host side of the row-loss
// ops (cpu_ops.h) with the JSD row kernel (jsd_row_kernels.h has its math and byte count). At
// beta = 0 and beta = 1 the op is kl_div_logits itself (forward and reverse KL).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../jsd_common.h"
#include "cpu_ops.h"

namespace kl_fused::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> jsd_logits_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& mask,
    double beta, double temperature, c10::string_view reduction, bool student_grad, bool teacher_grad) {
  check_jsd_beta(beta);
  if (const std::optional<bool> reverse = jsd_kl_endpoint(beta)) {
    return kl_div_logits_cpu(student_logits, teacher_logits, mask, temperature, *reverse, reduction, student_grad,
                             teacher_grad);
  }
  const PreparedRows in = prepare_rows(student_logits, teacher_logits, mask, temperature, reduction);
  KLRowsProblem problem = rows_problem(in, temperature, /*reverse=*/false);
  problem.beta = beta;
  return row_loss_cpu(in, reduction, temperature, problem, student_grad, teacher_grad,
                      {avx2::jsd_rows, generic::jsd_rows});
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_fused, CPU, m) { m.impl("jsd_logits", &jsd_logits_cpu); }

}  // namespace kl_fused::cpu
