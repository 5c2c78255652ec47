// The host side of the distillation step (the distillation_loss op) shared by the CPU and CUDA
// implementations: its checks, the counted rows, the gradient factors, and the outputs.
//
// Per counted row (labels != ignore_index where labels are given, and mask), with s the student's
// logits, y the label, eps the label smoothing, q_1 = softmax(s) at temperature 1:
//   CE   = (1 - eps)(LSE(s) - s_y) + eps (LSE(s) - mean_v s_v)
//   loss = soft_weight * D + hard_weight * CE
//   ds   = soft_weight f dD/ds + hard_weight f (q_1 - (1 - eps) onehot(y) - eps / V)
// D is the divergence of kl_div_logits / jsd_logits (a dense teacher) or sparse_kl_div (top-k slots),
// or 0 without a teacher; f = d(reduced loss)/d(row loss). The row kernels compute CE in the passes
// they make for D (their HardTerm rider) and write both terms per row; the weights go into the
// gradient factors, so that backward only scales by the upstream gradient.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "kl_div_common.h"

namespace kl_fused {

enum class TeacherForm { kNone, kDense, kSparse };
enum class Divergence { kForwardKL, kReverseKL, kJSD };

// The options of one call, checked.
struct DistillOptions {
  TeacherForm teacher;
  Divergence divergence;
  double beta;
  bool renormalize;
  double temperature;      // 1 without a teacher (the hard term is at temperature 1)
  double soft_weight;
  double hard_weight;
  int64_t ignore_index;
  double smoothing;
  Reduction reduction;
  bool validate;
};

// Every check that needs no tensor values, with messages that name the problem; returns the options.
DistillOptions check_distill_inputs(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                    const std::optional<at::Tensor>& teacher_indices,
                                    const std::optional<at::Tensor>& teacher_logprobs,
                                    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& mask,
                                    const std::optional<at::Tensor>& num_items, std::string_view divergence,
                                    double beta, bool renormalize, double temperature, double soft_weight,
                                    double hard_weight, int64_t ignore_index, double label_smoothing,
                                    std::string_view reduction, bool validate);

// The rows that count and their labels, as the row kernels read them.
struct DistillRows {
  std::optional<at::Tensor> mask;   // mask & labels != ignore_index, contiguous bool (rows,), or nullopt: all
  at::Tensor labels;                // (rows,) int64, contiguous, or undefined without labels
  std::optional<at::Tensor> count;  // batchmean/mean's count on the device: num_items, or the mask's sum
};

DistillRows distill_rows(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& num_items,
                         const DistillOptions& options);

// The gradient factors of the two terms: soft_weight / T and hard_weight, each times the reduction's
// factor (1, 1 / count, 1 / (count V)); the count is read on the device.
GradFactor soft_grad_factor(const DistillOptions& options, int64_t vocab, int64_t rows, const DistillRows& counted,
                            bool divide_by_temperature = true);
GradFactor hard_grad_factor(const DistillOptions& options, int64_t vocab, int64_t rows, const DistillRows& counted);

// What the row kernels write: the soft and hard term per row (acc dtype) and a status word per row
// (kLabelOutOfRange, and SparseRowStatus bits for a sparse teacher).
struct DistillRowOutputs {
  at::Tensor row_soft;
  at::Tensor row_hard;   // (rows,), or undefined without labels
  at::Tensor status;     // (rows,) int32, or undefined without labels and a sparse teacher
};

// What both devices' ops start with: the checks (check_distill_inputs), the counted rows
// (distill_rows), the problem's size and, with labels, the hard term's per-row outputs allocated
// (row_hard in the accumulation type, a status word per row; row_soft is the soft kernel's).
struct DistillStart {
  DistillOptions options;
  DistillRows counted;
  DistillRowOutputs out;
  int64_t vocab, rows;
};

DistillStart start_distill(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                           const std::optional<at::Tensor>& teacher_indices,
                           const std::optional<at::Tensor>& teacher_logprobs, const std::optional<at::Tensor>& labels,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& num_items,
                           std::string_view divergence, double beta, bool renormalize, double temperature,
                           double soft_weight, double hard_weight, int64_t ignore_index, double label_smoothing,
                           std::string_view reduction, bool validate);

// Whether some row's status word is nonzero: one host synchronisation on CUDA (none on the CPU).
bool any_bad_row(const at::Tensor& status);

// Raises a ValueError naming the first row whose label is out of range, if there is one.
void raise_on_bad_labels(const at::Tensor& labels, const at::Tensor& status, at::IntArrayRef leading,
                         int64_t vocab, int64_t ignore_index);

// (loss, parts): the weighted loss reduced as the options say, and the unweighted soft and hard terms
// reduced alike, stacked ((2,) or (2, leading...) for "none").
std::tuple<at::Tensor, at::Tensor> finish_distill(const DistillRowOutputs& rows, const DistillOptions& options,
                                                  const DistillRows& counted, at::IntArrayRef leading, int64_t vocab);

}  // namespace kl_fused
