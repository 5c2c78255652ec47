// The host side the CPU row-loss ops share (kl_div_cpu.cpp defines it): every op that writes a
// per-row loss and, in the same pass, the gradients of the reduced loss (kl_div_logits,
// jsd_logits) differs from the others only in its row kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "../sparse_kl_common.h"
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

// The per-row losses and the wanted gradients of checked rows: allocates them, completes `problem`
// with them and the gradient factor, runs the kernel (the AVX2 or the portable one).
struct RowLossOutputs {
  at::Tensor row_loss;
  at::Tensor grad_student;
  at::Tensor grad_teacher;
};
RowLossOutputs run_rows_kernel(const PreparedRows& in, KLRowsProblem problem, bool student_grad, bool teacher_grad,
                               double grad_factor, const RowsKernels& kernels);

// (loss, grad_student, grad_teacher) of checked rows: run_rows_kernel at the reduction's factor, reduced.
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_loss_cpu(const PreparedRows& in, c10::string_view reduction,
                                                         double temperature, KLRowsProblem problem,
                                                         bool student_grad, bool teacher_grad,
                                                         const RowsKernels& kernels);

// The fields of a SparseRowsProblem that describe checked rows and the outputs to write (the gradient
// factors are the caller's), and the kernel that runs it.
SparseRowsProblem sparse_rows_problem(const PreparedSparseRows& in, SparseOutputs& out, double temperature,
                                      bool renormalize, double mass_tolerance);
void run_sparse_rows(c10::ScalarType dtype, const SparseRowsProblem& problem);

// The kl_div_logits op (its schema in op_schemas.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_logits_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& mask,
    double temperature, bool reverse, c10::string_view reduction, bool student_grad, bool teacher_grad);

}  // namespace kl_fused::cpu
