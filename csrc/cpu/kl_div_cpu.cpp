// CPU implementations of the kl_fused ops: argument checks, output allocation, and the choice of
// the AVX2 or the portable row kernels (row_kernels.h has the math and the byte count).
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "cpu_ops.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kl_fused::cpu {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  // ATen's answer ("DEFAULT", "AVX2", "AVX512", ...) honours ATEN_CPU_CAPABILITY=default, as
  // ATen's own kernels do; the compiler's check guards against a capability name we do not know.
  static const bool has = at::get_cpu_capability().rfind("AVX", 0) == 0 &&
                          __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// A fresh gradient buffer above glibc's mmap threshold arrives as untouched pages, and the first
// write to each 4 KiB page faults (about 25 ms for 64 MiB here, as much as the kernel's own work).
// Asking for transparent huge pages on the 2 MiB-aligned interior makes that 512 times fewer
// faults. It is advice only: where THP is off, or the memory was recycled, nothing changes.
// (PyTorch's allocator does the same for every allocation when THP_MEM_ALLOC_ENABLE=1.)
void advise_huge_pages(const at::Tensor& buffer) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (buffer.nbytes() < 4 * kHugePage) return;
  const auto begin = reinterpret_cast<uintptr_t>(buffer.const_data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + buffer.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}


// The fields of a KLRowsProblem that describe the rows to read.
KLRowsProblem rows_problem(const PreparedRows& in, double temperature, bool reverse) {
  KLRowsProblem problem{};
  problem.student = in.student.const_data_ptr();
  problem.teacher = in.teacher.const_data_ptr();
  problem.student_rows = in.student_rows;
  problem.teacher_rows = in.teacher_rows;
  problem.mask = in.mask.has_value() ? in.mask->const_data_ptr<bool>() : nullptr;
  problem.rows = in.rows;
  problem.vocab = in.vocab;
  problem.inv_temperature = 1.0 / temperature;
  problem.reverse = reverse;
  return problem;
}

RowLossOutputs run_rows_kernel(const PreparedRows& in, KLRowsProblem problem, bool student_grad, bool teacher_grad,
                               double grad_factor, const RowsKernels& kernels) {
  RowLossOutputs out{at::empty({in.rows}, in.student.options().dtype(in.acc_dtype)),
                     empty_row_gradient(in.student, student_grad), empty_row_gradient(in.teacher, teacher_grad)};
  advise_huge_pages(out.grad_student);
  advise_huge_pages(out.grad_teacher);
  if (in.rows > 0) {
    problem.row_loss = out.row_loss.mutable_data_ptr();
    problem.grad_student = student_grad ? out.grad_student.mutable_data_ptr() : nullptr;
    problem.grad_teacher = teacher_grad ? out.grad_teacher.mutable_data_ptr() : nullptr;
    problem.grad_factor = grad_factor;
    (cpu_has_avx2() ? kernels.avx2 : kernels.generic)(in.student.scalar_type(), problem);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_loss_cpu(const PreparedRows& in, c10::string_view reduction_name,
                                                         double temperature, KLRowsProblem problem,
                                                         bool student_grad, bool teacher_grad,
                                                         const RowsKernels& kernels) {
  const Reduction reduction = parse_reduction(reduction_name);
  const std::optional<at::Tensor> counted = counted_rows(in.mask);
  const double factor = make_grad_factor(reduction, temperature, in.vocab, in.rows, counted).value();
  RowLossOutputs out = run_rows_kernel(in, problem, student_grad, teacher_grad, factor, kernels);
  return {reduce_row_losses(out.row_loss, counted, reduction, in.leading(), in.vocab), out.grad_student,
          out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_logits_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& mask, double temperature, bool reverse,
    c10::string_view reduction, bool student_grad, bool teacher_grad) {
  const PreparedRows in = prepare_rows(student_logits, teacher_logits, mask, temperature, reduction);
  return row_loss_cpu(in, reduction, temperature, rows_problem(in, temperature, reverse), student_grad,
                      teacher_grad, {avx2::kl_rows, generic::kl_rows});
}

namespace {

at::Tensor kl_row_states_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                             const std::optional<at::Tensor>& mask, double temperature, bool reverse) {
  const PreparedRows in = prepare_rows(student_logits, teacher_logits, mask, temperature, "sum");
  at::Tensor states = at::empty({in.rows, 5}, in.student.options().dtype(in.acc_dtype));
  if (in.rows > 0) {
    KLRowsProblem problem = rows_problem(in, temperature, reverse);
    problem.row_states = states.mutable_data_ptr();
    (cpu_has_avx2() ? avx2::row_states : generic::row_states)(in.student.scalar_type(), problem);
  }
  return states;
}

std::tuple<at::Tensor, at::Tensor> kl_grad_from_stats_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& mask, const at::Tensor& stats, const at::Tensor& row_factor,
    double temperature, bool reverse, bool student_grad, bool teacher_grad) {
  const PreparedRows in = prepare_rows(student_logits, teacher_logits, mask, temperature, "sum");
  check_full_row_stats(in, stats, row_factor);
  at::Tensor grad_student = empty_row_gradient(in.student, student_grad);
  at::Tensor grad_teacher = empty_row_gradient(in.teacher, teacher_grad);
  advise_huge_pages(grad_student);
  advise_huge_pages(grad_teacher);
  if (in.rows > 0 && (student_grad || teacher_grad)) {
    KLRowsProblem problem = rows_problem(in, temperature, reverse);
    problem.grad_student = student_grad ? grad_student.mutable_data_ptr() : nullptr;
    problem.grad_teacher = teacher_grad ? grad_teacher.mutable_data_ptr() : nullptr;
    problem.global_stats = stats.const_data_ptr();
    problem.row_factor = row_factor.const_data_ptr();
    (cpu_has_avx2() ? avx2::grad_from_stats : generic::grad_from_stats)(in.student.scalar_type(), problem);
  }
  return {grad_student, grad_teacher};
}

void grad_scale_cpu(at::Tensor& grad, const at::Tensor& upstream) {
  check_grad_scale_inputs(grad, upstream);
  const int64_t vocab = grad.size(-1);
  const int64_t rows = vocab > 0 ? grad.numel() / vocab : 0;
  if (rows == 0) return;
  const at::Tensor factors =
      upstream.to(grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  GradScaleProblem problem{grad.mutable_data_ptr(), factors.const_data_ptr(),
                           factors.numel() != 1, rows, vocab};
  if (cpu_has_avx2()) avx2::grad_scale(grad.scalar_type(), problem);
  else generic::grad_scale(grad.scalar_type(), problem);
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_fused, CPU, m) {
  m.impl("kl_div_logits", &kl_div_logits_cpu);
  m.impl("grad_scale_", &grad_scale_cpu);
  m.impl("kl_row_states", &kl_row_states_cpu);
  m.impl("kl_grad_from_stats", &kl_grad_from_stats_cpu);
}

}  // namespace kl_fused::cpu
