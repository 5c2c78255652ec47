// Host-side pieces of the distillation_loss op shared by the CPU and CUDA implementations (see the header).
#include "distill_common.h"

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>

namespace kl_fused {

namespace {

void check_weight(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, name, " must be finite and >= 0, got ", value);
}

Divergence parse_divergence(std::string_view divergence) {
  if (divergence == "forward_kl") return Divergence::kForwardKL;
  if (divergence == "reverse_kl") return Divergence::kReverseKL;
  if (divergence == "jsd") return Divergence::kJSD;
  TORCH_CHECK_VALUE(false, "divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', got '",
                    std::string(divergence), "'");
}

}  // namespace

DistillOptions check_distill_inputs(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                    const std::optional<at::Tensor>& teacher_indices,
                                    const std::optional<at::Tensor>& teacher_logprobs,
                                    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& mask,
                                    const std::optional<at::Tensor>& num_items, std::string_view divergence,
                                    double beta, bool renormalize, double temperature, double soft_weight,
                                    double hard_weight, int64_t ignore_index, double label_smoothing,
                                    std::string_view reduction, bool validate) {
  const auto dtype = student.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "student_logits must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(student.dim() >= 1 && student.size(-1) > 0,
                    "student_logits must have shape (..., V) with V >= 1, got shape ", student.sizes());
  TORCH_CHECK_VALUE(teacher_indices.has_value() == teacher_logprobs.has_value(),
                    "teacher_topk needs both teacher_indices and teacher_logprobs");
  TORCH_CHECK_VALUE(!(teacher.has_value() && teacher_indices.has_value()),
                    "give the teacher either as teacher_logits or as teacher_topk, not both");
  DistillOptions options{};
  options.teacher = teacher.has_value() ? TeacherForm::kDense
                                        : (teacher_indices.has_value() ? TeacherForm::kSparse : TeacherForm::kNone);
  options.divergence = parse_divergence(divergence);
  TORCH_CHECK_VALUE(options.teacher != TeacherForm::kSparse || options.divergence == Divergence::kForwardKL,
                    "teacher_topk supports divergence='forward_kl' only, got '", std::string(divergence), "'");
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "temperature must be finite and > 0, got ",
                    temperature);
  check_weight("soft_weight", soft_weight);
  check_weight("hard_weight", hard_weight);
  TORCH_CHECK_VALUE(std::isfinite(label_smoothing) && label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
  options.reduction = parse_reduction(reduction);
  const auto leading = student.sizes().slice(0, student.dim() - 1);
  if (labels.has_value()) {
    TORCH_CHECK_TYPE(labels->scalar_type() == at::kLong || labels->scalar_type() == at::kInt,
                     "labels must be int64 or int32 class indices, got ", labels->scalar_type());
    TORCH_CHECK_VALUE(labels->sizes() == leading, "labels must have the leading shape ", leading,
                      " of the logits, got ", labels->sizes());
    TORCH_CHECK_VALUE(labels->device() == student.device(), "labels must be on the logits' device ",
                      student.device(), ", got ", labels->device());
  }
  TORCH_CHECK_VALUE(hard_weight == 0.0 || labels.has_value(), "hard_weight = ", hard_weight,
                    " > 0 needs labels for the cross-entropy term");
  TORCH_CHECK_VALUE(options.teacher != TeacherForm::kNone || (labels.has_value() && hard_weight > 0.0),
                    "nothing to compute: without a teacher the loss is the cross-entropy term, which needs labels "
                    "and hard_weight > 0");
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->sizes() == leading, "mask must have the leading shape ", leading, " of the logits, got ",
                      mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == student.device(), "mask must be on the logits' device ", student.device(),
                      ", got ", mask->device());
  }
  if (num_items.has_value()) {
    TORCH_CHECK_VALUE(options.reduction == Reduction::BatchMean,
                      "num_items_in_batch replaces the count of batchmean; it needs reduction='batchmean', got '",
                      std::string(reduction), "'");
    TORCH_CHECK_VALUE(num_items->dim() == 0 && num_items->device() == student.device(),
                      "num_items_in_batch must be a 0-dim tensor on the logits' device ", student.device(),
                      ", got shape ", num_items->sizes(), " on ", num_items->device());
  }
  options.beta = beta;
  options.renormalize = renormalize;
  options.temperature = options.teacher == TeacherForm::kNone ? 1.0 : temperature;
  options.soft_weight = soft_weight;
  options.hard_weight = hard_weight;
  options.ignore_index = ignore_index;
  options.smoothing = label_smoothing;
  options.validate = validate;
  return options;
}

DistillRows distill_rows(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& num_items,
                         const DistillOptions& options) {
  DistillRows rows;
  std::optional<at::Tensor> keep = mask;
  if (labels.has_value()) {
    // O(rows): the rows whose label counts; a row with ignore_index is a masked row to every kernel.
    rows.labels = labels->to(at::kLong).contiguous().view({-1});
    const at::Tensor labelled = labels->ne(options.ignore_index);
    keep = mask.has_value() ? at::logical_and(labelled, *mask) : labelled;
  }
  if (keep.has_value()) rows.mask = keep->contiguous();
  if (num_items.has_value()) {
    rows.count = num_items->to(at::kLong);  // on the device: no host synchronisation
  } else {
    rows.count = counted_rows(rows.mask);
  }
  (void)student;
  return rows;
}

GradFactor soft_grad_factor(const DistillOptions& options, int64_t vocab, int64_t rows, const DistillRows& counted,
                            bool divide_by_temperature) {
  GradFactor factor = make_grad_factor(options.reduction, divide_by_temperature ? options.temperature : 1.0, vocab,
                                       rows, counted.count);
  factor.base *= options.soft_weight;
  return factor;
}

GradFactor hard_grad_factor(const DistillOptions& options, int64_t vocab, int64_t rows, const DistillRows& counted) {
  GradFactor factor = make_grad_factor(options.reduction, 1.0, vocab, rows, counted.count);
  factor.base *= options.hard_weight;
  return factor;
}

DistillStart start_distill(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                           const std::optional<at::Tensor>& teacher_indices,
                           const std::optional<at::Tensor>& teacher_logprobs, const std::optional<at::Tensor>& labels,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& num_items,
                           std::string_view divergence, double beta, bool renormalize, double temperature,
                           double soft_weight, double hard_weight, int64_t ignore_index, double label_smoothing,
                           std::string_view reduction, bool validate) {
  DistillStart start;
  start.options = check_distill_inputs(student, teacher, teacher_indices, teacher_logprobs, labels, mask, num_items,
                                       divergence, beta, renormalize, temperature, soft_weight, hard_weight,
                                       ignore_index, label_smoothing, reduction, validate);
  start.counted = distill_rows(student, labels, mask, num_items, start.options);
  start.vocab = student.size(-1);
  start.rows = student.numel() / start.vocab;
  if (start.counted.labels.defined()) {
    const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    start.out.row_hard = at::empty({start.rows}, student.options().dtype(acc));
    start.out.status = at::empty({start.rows}, student.options().dtype(at::kInt));
  }
  return start;
}

bool any_bad_row(const at::Tensor& status) {
  if (!status.defined() || status.numel() == 0) return false;
  if (status.is_cpu()) {
    const int32_t* s = status.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < status.numel(); ++i) {
      if (s[i] != 0) return true;
    }
    return false;
  }
  return status.ne(0).any().item<bool>();
}

void raise_on_bad_labels(const at::Tensor& labels, const at::Tensor& status, at::IntArrayRef leading,
                         int64_t vocab, int64_t ignore_index) {
  const at::Tensor bad = status.bitwise_and(kLabelOutOfRange).ne(0);
  const at::Tensor summary = at::stack({bad.any().to(at::kLong), bad.to(at::kInt).argmax().to(at::kLong)}).cpu();
  const int64_t* s = summary.const_data_ptr<int64_t>();
  if (s[0] == 0) return;
  const int64_t row = s[1];
  std::ostringstream where;
  where << "row " << row;
  if (leading.size() > 1) where << " of the flattened leading shape " << leading;
  TORCH_CHECK_VALUE(false, "labels must lie in [0, V) = [0, ", vocab, ") or equal ignore_index = ", ignore_index,
                    " on every counted row, but ", where.str(), " holds ", labels[row].item<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> finish_distill(const DistillRowOutputs& rows, const DistillOptions& options,
                                                  const DistillRows& counted, at::IntArrayRef leading, int64_t vocab) {
  const bool soft = options.teacher != TeacherForm::kNone, hard = rows.row_hard.defined();
  const at::Tensor zeros = at::zeros_like(rows.row_soft);
  // A term whose weight is 0 stays out of the loss (0 * inf would be NaN); its part is still reported.
  at::Tensor row_loss = zeros;
  if (soft && options.soft_weight != 0.0) row_loss = rows.row_soft * options.soft_weight;
  if (hard && options.hard_weight != 0.0) {
    row_loss = soft && options.soft_weight != 0.0 ? row_loss + rows.row_hard * options.hard_weight
                                                  : rows.row_hard * options.hard_weight;
  }
  const auto reduce = [&](const at::Tensor& per_row) {
    return reduce_row_losses(per_row, counted.count, options.reduction, leading, vocab);
  };
  at::Tensor parts = at::stack({reduce(soft ? rows.row_soft : zeros), reduce(hard ? rows.row_hard : zeros)});
  return {reduce(row_loss), parts};
}

}  // namespace kl_fused
