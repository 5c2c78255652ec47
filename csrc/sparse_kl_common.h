// The host side shared by the CPU and CUDA implementations of sparse_kl_div: the argument checks,
// the rows as the kernels read them, the outputs, and the report of a bad teacher support.
//
// One row: student logits s (V), temperature T, and K teacher slots (index i_k, log-prob l_k). A slot
// with l_k = -inf is unused (its index is never read); the others form the support S. With
// b = s / T, q = softmax(b) over all V, p_k = exp(l_k):
//   bucket:       KL = sum_S p_k (l_k - log q_{i_k}) + p_r (log p_r - log q_r)
//                 p_r = 1 - sum_S p (0 when that is within the tolerance below 0, or when S covers
//                 the whole vocabulary), q_r = sum over j not in S of q_j
//   renormalize:  KL(p~ || q~), p~ = p / sum_S p, q~ = q_S / sum_S q  (reads only the support)
// Kernels write, per row, the loss, a status word (SparseRowStatus bits) and the gradients at
// upstream 1 already multiplied by the reduction's factor (GradFactor). A row with a nonzero status
// has a NaN loss and NaN gradients and is never read out of bounds; with validate=true the op
// raises a ValueError naming the first such row instead (one host synchronisation on CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "kl_div_common.h"

namespace kl_fused {

// Problems a kernel finds in a row's teacher support, as bits of the row's status word.
enum SparseRowStatus : int32_t {
  kSlotOutOfRange = 1,     // a used slot's index is outside [0, V)
  kDuplicateSlot = 2,      // two used slots name the same token
  kMassAboveOne = 4,       // bucket: sum_S exp(l_k) > 1 + mass_tolerance
};

// Every check of sparse_kl_div that needs no tensor values, with messages that name the problem.
void check_sparse_inputs(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                         const std::optional<at::Tensor>& mask, double temperature, std::string_view reduction,
                         double mass_tolerance);

// The rows of a checked problem as every kernel reads them.
struct PreparedSparseRows {
  at::Tensor student;                 // unit stride along V, rows through student_rows
  at::Tensor indices;                 // (rows, K) int64, contiguous
  at::Tensor logprobs;                // (rows, K) in acc_dtype, contiguous
  std::optional<at::Tensor> mask;     // (rows,) contiguous
  at::Tensor logprobs_arg;            // the caller's, whose dtype and shape its gradient takes
  int64_t vocab;
  int64_t rows;
  int64_t slots;                      // K
  at::ScalarType acc_dtype;           // float, or double for float64 logits
  RowLayout student_rows;             // valid when rows > 0
  at::IntArrayRef leading() const { return student.sizes().slice(0, student.dim() - 1); }
};

PreparedSparseRows prepare_sparse_rows(const at::Tensor& student, const at::Tensor& indices,
                                       const at::Tensor& logprobs, const std::optional<at::Tensor>& mask,
                                       double temperature, std::string_view reduction, double mass_tolerance);

// The rows of a student with no teacher at all (K = 0 slots): the sparse kernels' student-only
// streaming, for the distillation step's fused cross-entropy (distill_common.h).
PreparedSparseRows prepare_student_rows(const at::Tensor& student, const std::optional<at::Tensor>& mask);

// What a kernel writes: (rows,) losses and status words, and the gradients when asked for. The
// log-probs' gradient is written in acc_dtype (rows, K) and handed out in the caller's dtype and shape.
struct SparseOutputs {
  at::Tensor row_loss;
  at::Tensor status;
  at::Tensor grad_student;            // (..., V) contiguous, or empty
  at::Tensor grad_logprobs_acc;       // (rows, K) acc_dtype, or empty
  at::Tensor grad_logprobs;           // the caller's shape and dtype (may share grad_logprobs_acc)
};

SparseOutputs allocate_sparse_outputs(const PreparedSparseRows& in, bool student_grad, bool logprobs_grad);

// With validate: raises a ValueError naming the first row whose status is nonzero and its problem.
// Reads the status on the host (a synchronisation on CUDA), hence the opt-out.
void raise_on_bad_support(const PreparedSparseRows& in, const at::Tensor& status, double mass_tolerance);

// (loss reduced as `reduction`, grad_student, grad_logprobs in the caller's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_sparse_outputs(const PreparedSparseRows& in,
                                                                      SparseOutputs& out,
                                                                      const std::optional<at::Tensor>& counted,
                                                                      Reduction reduction);

}  // namespace kl_fused
