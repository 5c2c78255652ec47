// The host side the CPU row-loss ops share (kl_div_cpu.cpp defines it): every op that writes a
// per-row loss and, in the same pass, the gradients of the reduced loss (kl_div_logits,
// jsd_logits) differs from the others only in its row kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "cpu_kernels.h"

namespace kl_fused::cpu {

using RowsKernel = void (*)(c10::ScalarType, const KLRowsProblem&);

// A row kernel as compiled for each CPU capability; the AVX2 one runs where ATen reports AVX2.
struct RowsKernels {
  RowsKernel avx2;
  RowsKernel generic;
};

// The fields of a KLRowsProblem that describe the rows to read.
KLRowsProblem rows_problem(const PreparedRows& in, double temperature, bool reverse);

// (loss, grad_student, grad_teacher) of checked rows: allocates the per-row losses and the wanted
// gradients, completes `problem` with them and the gradient factor, runs the kernel, reduces.
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_loss_cpu(const PreparedRows& in, c10::string_view reduction,
                                                         double temperature, KLRowsProblem problem,
                                                         bool student_grad, bool teacher_grad,
                                                         const RowsKernels& kernels);

// The kl_div_logits op (its schema in op_schemas.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_logits_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& mask,
    double temperature, bool reverse, c10::string_view reduction, bool student_grad, bool teacher_grad);

}  // namespace kl_fused::cpu
