// The schemas of every kl_fused op, defined once. ops.cpp declares them as the `kl_fused`
// library; the CUDA emulator of the tests declares the same schemas under its own namespace, so
// that the emulated kernels are called exactly as the real ones.
#pragma once

#include <torch/library.h>

namespace kl_fused {

inline void define_op_schemas(torch::Library& m) {
  // Loss of (..., V) logits reduced as `reduction`, and, when asked for, the gradients of that
  // loss with respect to each input at upstream gradient 1, computed in the same pass.
  // reverse=False: KL(softmax(t/T) || softmax(s/T)); reverse=True: KL(softmax(s/T) || softmax(t/T)).
  m.def(
      "kl_div_logits(Tensor student, Tensor teacher, Tensor? mask, float temperature, "
      "bool reverse, str reduction, bool student_grad, bool teacher_grad) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher)");
  // Generalized Jensen-Shannon divergence of the same rows (kl_fused.jsd_logits), p = softmax(t/T),
  // q = softmax(s/T), m = beta p + (1 - beta) q: beta KL(p || m) + (1 - beta) KL(q || m) for
  // 0 < beta < 1; beta = 0 is KL(p || q) and beta = 1 KL(q || p) exactly (kl_div_logits' rows).
  m.def(
      "jsd_logits(Tensor student, Tensor teacher, Tensor? mask, float beta, float temperature, "
      "str reduction, bool student_grad, bool teacher_grad) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher)");
  // grad[row] *= upstream[row] (or upstream[0]), in place; rows whose factor is 1 are not touched.
  m.def("grad_scale_(Tensor(a!) grad, Tensor upstream) -> ()");
  // Vocab-parallel (kl_fused.distributed): each rank holds a shard (..., V_k) of every row.
  // The partial state of each row's shard, (rows, 5) in the accumulation type: the maxima m_a, m_b
  // of the raw logits t and s, and Z_a, Z_b, W relative to them, Z_a = sum e^((t - m_a)/T) (see
  // kl_fused/_shard_math.py). Masked rows
  // give the empty state (-inf, -inf, 0, 0, 0), undefined ones (-inf, -inf, NaN, NaN, NaN).
  m.def("kl_row_states(Tensor student, Tensor teacher, Tensor? mask, float temperature, bool reverse) -> Tensor");
  // The gradients of a shard, given the full rows' statistics stats = (m_a, m_b, log Z_a, log Z_b,
  // KL) per row (m_a, m_b raw maxima) and row_factor = d(loss)/d(row KL) / T per row.
  m.def(
      "kl_grad_from_stats(Tensor student, Tensor teacher, Tensor? mask, Tensor stats, "
      "Tensor row_factor, float temperature, bool reverse, bool student_grad, bool teacher_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
  // KL against a teacher known by K (index, log-prob) slots per row, bucket tail or renormalized
  // (sparse_kl_common.h), with the gradients to the student and to teacher_logprobs at upstream 1.
  m.def(
      "sparse_kl_div(Tensor student, Tensor teacher_indices, Tensor teacher_logprobs, Tensor? mask, "
      "float temperature, bool renormalize, str reduction, float mass_tolerance, bool validate, "
      "bool student_grad, bool logprobs_grad) -> (Tensor loss, Tensor grad_student, Tensor grad_logprobs)");
  // The whole distillation step (distill_common.h): per counted row (labels != ignore_index and mask),
  // soft_weight * D + hard_weight * CE, D the divergence of kl_div_logits / jsd_logits (dense teacher)
  // or sparse_kl_div (teacher_indices, teacher_logprobs), or none without a teacher, and CE the
  // label-smoothed cross-entropy at temperature 1, in the soft term's passes. Returns the reduced loss,
  // the gradients at upstream 1 with both weights folded in, and parts = the unweighted soft and hard
  // terms, reduced alike ((2,), or (2, ...) for "none"). num_items (a 0-d count on the device) replaces
  // the counted rows of batchmean.
  m.def(
      "distillation_loss(Tensor student, Tensor? teacher, Tensor? teacher_indices, Tensor? teacher_logprobs, "
      "Tensor? labels, Tensor? mask, Tensor? num_items, str divergence, float beta, bool renormalize, "
      "float temperature, float soft_weight, float hard_weight, int ignore_index, float label_smoothing, "
      "str reduction, float mass_tolerance, bool validate, bool student_grad, bool teacher_grad, "
      "bool logprobs_grad) -> (Tensor loss, Tensor grad_student, Tensor grad_teacher, Tensor grad_logprobs, "
      "Tensor parts)");
}

}  // namespace kl_fused
