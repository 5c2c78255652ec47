// Host-side pieces of sparse_kl_div shared by the CPU and CUDA implementations (see the header).
#include "sparse_kl_common.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <sstream>

namespace kl_fused {

void check_sparse_inputs(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                         const std::optional<at::Tensor>& mask, double temperature, std::string_view reduction,
                         double mass_tolerance) {
  const auto dtype = student.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "student_logits must be float32, float64, float16 or bfloat16, got ", dtype);
  const auto lp_dtype = logprobs.scalar_type();
  TORCH_CHECK_TYPE(lp_dtype == at::kFloat || lp_dtype == at::kDouble || lp_dtype == at::kHalf ||
                       lp_dtype == at::kBFloat16,
                   "teacher_logprobs must be float32, float64, float16 or bfloat16, got ", lp_dtype);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "teacher_indices must be int64 or int32 token ids, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(student.dim() >= 1, "student_logits must have shape (..., V) with at least one dimension, got a "
                    "0-dim tensor");
  TORCH_CHECK_VALUE(student.size(-1) > 0, "the vocabulary (last) dimension must be non-empty, got shape ",
                    student.sizes());
  const auto leading = student.sizes().slice(0, student.dim() - 1);
  for (const auto* x : {&indices, &logprobs}) {
    TORCH_CHECK_VALUE(x->dim() == student.dim() && x->sizes().slice(0, x->dim() - 1) == leading,
                      x == &indices ? "teacher_indices" : "teacher_logprobs",
                      " must have shape (..., K) with the leading shape ", leading, " of student_logits, got ",
                      x->sizes());
    TORCH_CHECK_VALUE(x->device() == student.device(), x == &indices ? "teacher_indices" : "teacher_logprobs",
                      " must be on the student_logits' device ", student.device(), ", got ", x->device());
  }
  TORCH_CHECK_VALUE(indices.sizes() == logprobs.sizes(),
                    "teacher_indices and teacher_logprobs must have the same shape, got ", indices.sizes(), " and ",
                    logprobs.sizes());
  TORCH_CHECK_VALUE(indices.size(-1) > 0, "the teacher support needs K >= 1 slots, got K = 0");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "temperature must be finite and > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(std::isfinite(mass_tolerance) && mass_tolerance >= 0.0,
                    "mass_tolerance must be finite and >= 0, got ", mass_tolerance);
  parse_reduction(reduction);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->sizes() == leading, "mask must have the leading shape ", leading, " of the logits, got ",
                      mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == student.device(), "mask must be on the logits' device ", student.device(),
                      ", got ", mask->device());
  }
}

PreparedSparseRows prepare_sparse_rows(const at::Tensor& student, const at::Tensor& indices,
                                       const at::Tensor& logprobs, const std::optional<at::Tensor>& mask,
                                       double temperature, std::string_view reduction, double mass_tolerance) {
  check_sparse_inputs(student, indices, logprobs, mask, temperature, reduction, mass_tolerance);
  PreparedSparseRows in;
  in.student = rows_readable(student);
  in.vocab = in.student.size(-1);
  in.rows = in.student.numel() / in.vocab;
  in.slots = indices.size(-1);
  in.acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // O(rows K) conversions (K << V): the kernels read one index type and one log-prob type.
  in.indices = indices.to(at::kLong).contiguous().view({in.rows, in.slots});
  in.logprobs = logprobs.to(in.acc_dtype).contiguous().view({in.rows, in.slots});
  in.logprobs_arg = logprobs;
  in.mask = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  if (in.rows > 0) in.student_rows = make_row_layout(in.student).value();
  return in;
}

PreparedSparseRows prepare_student_rows(const at::Tensor& student, const std::optional<at::Tensor>& mask) {
  PreparedSparseRows in;
  in.student = rows_readable(student);
  in.vocab = in.student.size(-1);
  in.rows = in.student.numel() / in.vocab;
  in.slots = 0;
  in.acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  in.indices = at::empty({in.rows, 0}, student.options().dtype(at::kLong));
  in.logprobs = at::empty({in.rows, 0}, student.options().dtype(in.acc_dtype));
  in.logprobs_arg = in.logprobs;
  in.mask = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  if (in.rows > 0) in.student_rows = make_row_layout(in.student).value();
  return in;
}

SparseOutputs allocate_sparse_outputs(const PreparedSparseRows& in, bool student_grad, bool logprobs_grad) {
  SparseOutputs out;
  const auto options = in.student.options();
  out.row_loss = at::empty({in.rows}, options.dtype(in.acc_dtype));
  out.status = at::empty({in.rows}, options.dtype(at::kInt));
  out.grad_student = empty_row_gradient(in.student, student_grad);
  out.grad_logprobs = empty_row_gradient(in.logprobs_arg, logprobs_grad);
  if (!logprobs_grad) {
    out.grad_logprobs_acc = out.grad_logprobs;
  } else if (in.logprobs_arg.scalar_type() == in.acc_dtype) {
    out.grad_logprobs_acc = out.grad_logprobs.view({in.rows, in.slots});  // written in place
  } else {
    out.grad_logprobs_acc = at::empty({in.rows, in.slots}, options.dtype(in.acc_dtype));
  }
  return out;
}

namespace {

std::string row_name(const PreparedSparseRows& in, int64_t row) {
  std::ostringstream name;
  name << "row " << row;
  if (in.student.dim() > 2) name << " of the flattened leading shape " << in.leading();
  return name.str();
}

}  // namespace

void raise_on_bad_support(const PreparedSparseRows& in, const at::Tensor& status, double mass_tolerance) {
  if (in.rows == 0) return;
  // One host synchronisation (none on the CPU) when every row is fine, the common case.
  if (status.is_cpu()) {
    const int32_t* s = status.const_data_ptr<int32_t>();
    if (std::all_of(s, s + in.rows, [](int32_t word) { return word == 0; })) return;
  } else if (!status.ne(0).any().item<bool>()) {
    return;
  }
  // The error path may take its time: for each problem, whether some row has it and the first such row.
  std::vector<at::Tensor> parts;
  for (const int32_t bit : {kSlotOutOfRange, kDuplicateSlot, kMassAboveOne}) {
    const at::Tensor has = status.bitwise_and(bit).ne(0);
    parts.push_back(has.any().to(at::kLong));
    parts.push_back(has.to(at::kInt).argmax().to(at::kLong));
  }
  const at::Tensor summary = at::stack(parts).cpu();
  const int64_t* s = summary.const_data_ptr<int64_t>();
  // The offending row's slots, for the message.
  if (s[0] != 0) {
    const int64_t row = s[1];
    const at::Tensor idx = in.indices[row].cpu(), lp = in.logprobs[row].cpu();
    std::ostringstream detail;
    for (int64_t k = 0; k < in.slots; ++k) {
      const int64_t i = idx[k].item<int64_t>();
      if (lp[k].item<double>() != -INFINITY && (i < 0 || i >= in.vocab)) {
        detail << "slot " << k << " holds token id " << i;
        break;
      }
    }
    TORCH_CHECK_VALUE(false, "teacher_indices must lie in [0, V) = [0, ", in.vocab, ") on every used slot (one whose "
                      "teacher_logprobs is not -inf), but in ", row_name(in, row), " ", detail.str());
  }
  if (s[2] != 0) {
    TORCH_CHECK_VALUE(false, "teacher_indices holds the same token id twice among the used slots of ",
                      row_name(in, s[3]), "; each token may appear once in a row's support");
  }
  if (s[4] != 0) {
    const int64_t row = s[5];
    const at::Tensor lp = in.logprobs[row].to(at::kDouble);
    const double mass = lp.exp().sum().item<double>();
    TORCH_CHECK_VALUE(false, "the teacher's support mass sum(exp(teacher_logprobs)) in ", row_name(in, row), " is ",
                      mass, ", above 1 by more than the rounding tolerance ", mass_tolerance,
                      " of its dtype; teacher_logprobs must be log-probabilities (log_softmax of the teacher)");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_sparse_outputs(const PreparedSparseRows& in,
                                                                      SparseOutputs& out,
                                                                      const std::optional<at::Tensor>& counted,
                                                                      Reduction reduction) {
  if (out.grad_logprobs.numel() > 0 && !out.grad_logprobs_acc.is_same(out.grad_logprobs) &&
      out.grad_logprobs_acc.data_ptr() != out.grad_logprobs.data_ptr()) {
    out.grad_logprobs.copy_(out.grad_logprobs_acc.view(out.grad_logprobs.sizes()));
  }
  return {reduce_row_losses(out.row_loss, counted, reduction, in.leading(), in.vocab), out.grad_student,
          out.grad_logprobs};
}

}  // namespace kl_fused
