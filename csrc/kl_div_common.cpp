// Host-side pieces shared by the CPU and CUDA implementations: checks, row layout, reductions.
#include "kl_div_common.h"

#include <ATen/ATen.h>

#include <vector>

namespace kl_fused {

std::optional<RowLayout> make_row_layout(const at::Tensor& x) {
  // Innermost leading dim first; drop size-1 dims; merge a dim into the one inside it when
  // stride[outer] == stride[inner] * size[inner].
  std::vector<int64_t> sizes, strides;
  for (int64_t d = x.dim() - 2; d >= 0; --d) {
    const int64_t size = x.size(d), stride = x.stride(d);
    if (size == 1) continue;
    if (!sizes.empty() && stride == strides.back() * sizes.back()) {
      sizes.back() *= size;
      continue;
    }
    sizes.push_back(size);
    strides.push_back(stride);
  }
  if (static_cast<int>(sizes.size()) > kMaxRowDims) return std::nullopt;
  RowLayout layout;
  layout.ndim = static_cast<int>(sizes.size());
  for (int i = 0; i < layout.ndim; ++i) {  // outermost first
    layout.sizes[i] = sizes[layout.ndim - 1 - i];
    layout.strides[i] = strides[layout.ndim - 1 - i];
  }
  return layout;
}

at::Tensor rows_readable(const at::Tensor& x) {
  if (x.dim() >= 1 && x.stride(-1) == 1 && make_row_layout(x).has_value()) return x;
  return x.contiguous();
}

Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "none") return Reduction::None;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "batchmean") return Reduction::BatchMean;
  if (reduction == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'none', 'sum', 'batchmean', 'mean', got '",
                    std::string(reduction), "'");
}

void check_kl_inputs(const at::Tensor& student, const at::Tensor& teacher,
                     const std::optional<at::Tensor>& mask, double temperature,
                     std::string_view reduction) {
  TORCH_CHECK_TYPE(student.is_floating_point(),
                   "student_logits must be a floating-point tensor, got ", student.scalar_type());
  TORCH_CHECK_TYPE(teacher.is_floating_point(),
                   "teacher_logits must be a floating-point tensor, got ", teacher.scalar_type());
  const auto dtype = student.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "logits must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(teacher.scalar_type() == dtype,
                   "student_logits and teacher_logits must have the same dtype, got ", dtype,
                   " and ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.device() == teacher.device(),
                    "student_logits and teacher_logits must be on the same device, got ",
                    student.device(), " and ", teacher.device());
  TORCH_CHECK_VALUE(student.dim() >= 1,
                    "logits must have shape (..., V) with at least one dimension, got a 0-dim "
                    "tensor");
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(),
                    "student_logits and teacher_logits must have the same shape, got ",
                    student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(-1) > 0, "the vocabulary (last) dimension must be non-empty, got ",
                    "shape ", student.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be finite and > 0, got ", temperature);
  parse_reduction(reduction);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ",
                     mask->scalar_type());
    const auto leading = student.sizes().slice(0, student.dim() - 1);
    TORCH_CHECK_VALUE(mask->sizes() == leading, "mask must have the leading shape ", leading,
                      " of the logits, got ", mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == student.device(), "mask must be on the logits' device ",
                      student.device(), ", got ", mask->device());
  }
}

PreparedRows prepare_rows(const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& mask, double temperature,
                          std::string_view reduction) {
  check_kl_inputs(student, teacher, mask, temperature, reduction);
  PreparedRows prepared;
  prepared.student = rows_readable(student);
  prepared.teacher = rows_readable(teacher);
  prepared.mask = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  prepared.vocab = prepared.student.size(-1);
  prepared.rows = prepared.student.numel() / prepared.vocab;
  prepared.acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (prepared.rows > 0) {
    prepared.student_rows = make_row_layout(prepared.student).value();
    prepared.teacher_rows = make_row_layout(prepared.teacher).value();
  }
  return prepared;
}

void check_full_row_stats(const PreparedRows& rows, const at::Tensor& stats, const at::Tensor& row_factor) {
  const auto device = rows.student.device();
  TORCH_CHECK_TYPE(stats.scalar_type() == rows.acc_dtype && row_factor.scalar_type() == rows.acc_dtype,
                   "stats and row_factor must be ", rows.acc_dtype, " for ", rows.student.scalar_type(),
                   " logits, got ", stats.scalar_type(), " and ", row_factor.scalar_type());
  TORCH_CHECK_VALUE(stats.device() == device && row_factor.device() == device,
                    "stats and row_factor must be on the logits' device ", device, ", got ",
                    stats.device(), " and ", row_factor.device());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == rows.rows && stats.size(1) == 5 &&
                        stats.is_contiguous(),
                    "stats must be a contiguous (rows, 5) tensor with rows = ", rows.rows,
                    ", got shape ", stats.sizes());
  TORCH_CHECK_VALUE(row_factor.dim() == 1 && row_factor.size(0) == rows.rows && row_factor.is_contiguous(),
                    "row_factor must be a contiguous (rows,) tensor with rows = ", rows.rows,
                    ", got shape ", row_factor.sizes());
}

void check_grad_scale_inputs(const at::Tensor& grad, const at::Tensor& upstream) {
  TORCH_CHECK_TYPE(grad.is_floating_point(), "grad must be a floating-point tensor, got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(grad.dim() >= 1 && grad.is_contiguous(),
                    "grad must be a contiguous (..., V) tensor, got shape ", grad.sizes(),
                    " and strides ", grad.strides());
  TORCH_CHECK_TYPE(upstream.is_floating_point(),
                   "upstream gradient must be a floating-point tensor, got ", upstream.scalar_type());
  TORCH_CHECK_VALUE(upstream.device() == grad.device(), "upstream gradient must be on ",
                    grad.device(), ", got ", upstream.device());
  const int64_t vocab = grad.size(-1);
  const int64_t rows = vocab > 0 ? grad.numel() / vocab : 0;
  TORCH_CHECK_VALUE(upstream.numel() == 1 || upstream.numel() == rows,
                    "upstream gradient must hold 1 value or one per row (", rows, "), got ",
                    upstream.numel());
}

std::optional<at::Tensor> counted_rows(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  return mask->sum(at::kLong);
}

GradFactor make_grad_factor(Reduction reduction, double temperature, int64_t vocab, int64_t rows,
                            const std::optional<at::Tensor>& counted) {
  GradFactor factor;
  factor.base = 1.0 / temperature;
  if (reduction == Reduction::Mean) factor.base /= static_cast<double>(vocab);
  factor.per_counted_row = reduction == Reduction::BatchMean || reduction == Reduction::Mean;
  factor.count = counted.has_value() ? counted->const_data_ptr<int64_t>() : nullptr;
  factor.rows = rows;
  return factor;
}

at::Tensor reduce_row_losses(const at::Tensor& row_loss, const std::optional<at::Tensor>& counted,
                             Reduction reduction, at::IntArrayRef leading_shape, int64_t vocab) {
  if (reduction == Reduction::None) return row_loss.view(leading_shape);
  at::Tensor total = row_loss.sum();
  if (reduction == Reduction::Sum) return total;
  const double per_row = reduction == Reduction::Mean ? static_cast<double>(vocab) : 1.0;
  if (counted.has_value()) {
    // Divide in float64 so that count * V (up to ~2^35) is exact; stays on the device.
    at::Tensor denominator = counted->clamp_min(1).to(at::kDouble) * per_row;
    return (total.to(at::kDouble) / denominator).to(row_loss.scalar_type());
  }
  const int64_t rows = row_loss.numel();
  return (total.to(at::kDouble) / (static_cast<double>(rows > 1 ? rows : 1) * per_row))
      .to(row_loss.scalar_type());
}

at::Tensor empty_row_gradient(const at::Tensor& like, bool needed) {
  if (!needed) return at::empty({0}, like.options());
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace kl_fused
