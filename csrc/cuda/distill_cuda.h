// The row kernels of each soft term as the distillation step runs them (distill_cuda.cu): on checked
// rows, at the caller's gradient factor, with the hard term riding along (hard_term.cuh; none when
// hard.labels is nullptr). Defined next to their kernels: kl_div_cuda.cu, jsd_cuda.cu, sparse_kl_cuda.cu.
#pragma once

#include "../kl_div_common.h"
#include "../sparse_kl_common.h"
#include "hard_term.cuh"
#include "row_loss_host.cuh"

namespace kl_fused::cuda {

// KL(x || y) rows (x the teacher unless `reverse`): per-row losses and the wanted gradients.
RowLossOutputs kl_rows_cuda(const PreparedRows& in, double temperature, bool reverse, bool student_grad,
                            bool teacher_grad, const GradFactor& factor, const HardTermInputs& hard);

// Generalized JSD rows, 0 < beta < 1.
RowLossOutputs jsd_rows_cuda(const PreparedRows& in, double beta, double temperature, bool student_grad,
                             bool teacher_grad, const GradFactor& factor, const HardTermInputs& hard);

// Sparse-teacher rows (K slots, or K = 0 with the hard term: no teacher) into `out`.
void sparse_rows_cuda(const PreparedSparseRows& in, SparseOutputs& out, double temperature, bool renormalize,
                      double mass_tolerance, const GradFactor& student_factor, const GradFactor& logprobs_factor,
                      const HardTermInputs& hard);

}  // namespace kl_fused::cuda
