// The row contract shared by every kl_fused kernel, and the input checks that speak to the user.
//
// One row of V logits: student s, teacher t, temperature T.
//   a = t / T, b = s / T, p = softmax(a), q = softmax(b)
//   forward KL (teacher || student): KL_f = sum p (log p - log q)
//   reverse KL (student || teacher): KL_r = sum q (log q - log p)
// Kernels gather, per row, the maxima m_a, m_b and, with a' = a - m_a and b' = b - m_b,
//   Z_a = sum exp(a'),  Z_b = sum exp(b'),  W = sum exp(x') (x' - y')   (x = a, y = b for forward)
// and finish with KL = W / Z_x - log Z_x + log Z_y. Shifting by the maxima before the difference
// keeps logits of +-1e4 exact: near the maximum a' and b' are small and exactly representable.
//
// Inputs are (..., V) with unit stride along V and any strides along the leading dims (a shifted
// view logits[:, :-1] is read in place). RowLayout maps a flat row index to an element offset.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

namespace kl_fused {

enum class Reduction { None, Sum, BatchMean, Mean };

// The gradient written by the forward launch is d(reduced loss)/d(logits) at upstream gradient 1:
// the per-row gradient times this factor. For batchmean/mean the counted-row count may live on
// the device (a mask's sum); kernels read it there, so nothing waits on the host.
struct GradFactor {
  double base;               // 1/T, times 1/V for mean
  bool per_counted_row;      // batchmean and mean divide by max(counted rows, 1)
  const int64_t* count;      // counted rows on the kernel's device (a mask's sum), or nullptr
  int64_t rows;              // counted rows when there is no mask

  C10_HOST_DEVICE double value() const {
    if (!per_counted_row) return base;
    const int64_t n = count != nullptr ? *count : rows;
    return base / static_cast<double>(n > 1 ? n : 1);
  }
};

// A row status bit of the distillation step (distill_common.h), next to SparseRowStatus's: a counted
// row's label is neither ignore_index nor in [0, V). Such a row's loss and gradients are NaN.
constexpr int32_t kLabelOutOfRange = 8;

constexpr int kMaxRowDims = 6;

// Flat row index -> element offset, for the leading dims of a (..., V) tensor after coalescing.
struct RowLayout {
  int ndim = 0;
  int64_t sizes[kMaxRowDims] = {};
  int64_t strides[kMaxRowDims] = {};

  C10_HOST_DEVICE int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      off += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return off;
  }
};

// Coalesces the leading dims of x (unit stride along the last dim). Returns nullopt when more than
// kMaxRowDims remain, in which case the caller makes the tensor contiguous.
std::optional<RowLayout> make_row_layout(const at::Tensor& x);

// x with unit stride along V and a RowLayout; copies only when that is impossible.
at::Tensor rows_readable(const at::Tensor& x);

Reduction parse_reduction(std::string_view reduction);

// Every argument check of kl_fused::kl_div_logits, with messages that name the problem.
// Raises ValueError/TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE).
void check_kl_inputs(const at::Tensor& student, const at::Tensor& teacher,
                     const std::optional<at::Tensor>& mask, double temperature,
                     std::string_view reduction);

// The rows of a checked (student, teacher) pair as every kernel reads them: unit stride along V
// (copied only where a RowLayout cannot address them) and the mask made contiguous.
struct PreparedRows {
  at::Tensor student;
  at::Tensor teacher;
  std::optional<at::Tensor> mask;
  int64_t vocab;
  int64_t rows;
  at::ScalarType acc_dtype;  // float, or double for float64 logits
  RowLayout student_rows;    // valid when rows > 0
  RowLayout teacher_rows;
  at::IntArrayRef leading() const { return student.sizes().slice(0, student.dim() - 1); }
};

// check_kl_inputs, then the rows ready for a kernel.
PreparedRows prepare_rows(const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& mask, double temperature,
                          std::string_view reduction);

// The inputs of kl_grad_from_stats beyond the logits: (rows, 5) statistics of the full rows and
// (rows,) factors, both contiguous in the accumulation type on the logits' device.
void check_full_row_stats(const PreparedRows& rows, const at::Tensor& stats, const at::Tensor& row_factor);

// Counted rows as a 0-dim int64 tensor on the mask's device (no host synchronisation), or
// nullopt when there is no mask and every row counts.
std::optional<at::Tensor> counted_rows(const std::optional<at::Tensor>& mask);

GradFactor make_grad_factor(Reduction reduction, double temperature, int64_t vocab, int64_t rows,
                            const std::optional<at::Tensor>& counted);

// Loss from per-row losses (rows,): none -> leading shape; sum; batchmean -> / max(count, 1);
// mean -> / (max(count, 1) * V), with count = counted rows.
at::Tensor reduce_row_losses(const at::Tensor& row_loss, const std::optional<at::Tensor>& counted,
                             Reduction reduction, at::IntArrayRef leading_shape, int64_t vocab);

// grad_scale_(grad, upstream): grad is a contiguous (..., V) gradient written by kl_div_logits,
// upstream holds one factor or one per row.
void check_grad_scale_inputs(const at::Tensor& grad, const at::Tensor& upstream);

// The output tensors every device implementation allocates, with the shapes the fake kernel gives.
at::Tensor empty_row_gradient(const at::Tensor& like, bool needed);

}  // namespace kl_fused
