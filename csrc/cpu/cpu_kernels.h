// The type-erased entry points of the CPU row kernels. row_kernels.h is compiled once per CPU
// capability (kernels_generic.cpp, kernels_avx2.cpp); kl_div_cpu.cpp picks one at run time.
#pragma once

#include <c10/core/ScalarType.h>

#include "../kl_div_common.h"

namespace kl_fused::cpu {

// The hard term a row kernel adds in its own passes (distill_common.h): CE = LSE(s) - (1 - eps) s_y -
// eps mean(s) per counted row, at temperature 1, and f_h (softmax(s) - (1 - eps) onehot(y) - eps / V)
// added to the student's gradient. labels == nullptr: no hard term.
struct HardTerm {
  const int64_t* labels;      // (rows,) targets; only counted rows' are read
  void* row_hard;             // (rows,) CE per row, float (double for float64 input)
  int32_t* status;            // (rows,) kLabelOutOfRange where a counted row's label is outside [0, V)
  double smoothing;           // eps in [0, 1]
  double grad_factor;         // f_h = hard_weight * d(loss)/d(row loss), resolved on the host
};

struct KLRowsProblem {
  const void* student;        // (..., V) rows addressed through student_rows, unit stride along V
  const void* teacher;        // (..., V) rows addressed through teacher_rows
  RowLayout student_rows;
  RowLayout teacher_rows;
  const bool* mask;           // (rows,) or nullptr: rows where it is false are never read
  void* row_loss;             // (rows,) float (double for float64 input)
  void* grad_student;         // (rows, V) contiguous, or nullptr when not needed
  void* grad_teacher;         // (rows, V) contiguous, or nullptr when not needed
  int64_t rows;
  int64_t vocab;
  double inv_temperature;
  bool reverse;               // KL(student || teacher) instead of KL(teacher || student)
  double beta;                // jsd_rows: the teacher's weight in the mixture, 0 < beta < 1
  double grad_factor;         // d(loss)/d(row loss) / T, already resolved on the host
  // The vocab-parallel entry points, where each rank holds a shard of every row:
  void* row_states;           // row_states: (rows, 5) partial state m_a, m_b, Z_a, Z_b, W (acc type)
  const void* global_stats;   // grad_from_stats: (rows, 5) m_a, m_b, log Z_a, log Z_b, KL of full rows
  const void* row_factor;     // grad_from_stats: (rows,) d(loss)/d(row KL) / T
  HardTerm hard;              // kl_rows, jsd_rows: the distillation step's cross-entropy, or none
};

struct GradScaleProblem {
  void* grad;                 // (rows, V) contiguous, scaled in place
  const void* upstream;       // float (double for float64 grad): 1 value, or one per row
  bool per_row;
  int64_t rows;
  int64_t vocab;
};

// sparse_kl_div's rows (sparse_row_kernels.h; math in ../sparse_kl_common.h).
struct SparseRowsProblem {
  const void* student;        // (..., V) rows addressed through student_rows, unit stride along V
  RowLayout student_rows;
  const int64_t* indices;     // (rows, K) token ids
  const void* logprobs;       // (rows, K) teacher log-probs, float (double for float64 logits)
  const bool* mask;           // (rows,) or nullptr: rows where it is false are never read
  void* row_loss;             // (rows,) float (double for float64 logits)
  int32_t* status;            // (rows,) SparseRowStatus bits
  void* grad_student;         // (rows, V) contiguous, or nullptr when not needed
  void* grad_logprobs;        // (rows, K) float (double), or nullptr when not needed
  int64_t rows;
  int64_t vocab;
  int64_t slots;
  double inv_temperature;
  bool renormalize;           // tail="renormalize" instead of the bucket
  double mass_tolerance;      // bucket: sum_S p may exceed 1 by this much (then p_r = 0)
  double student_factor;      // d(loss)/d(row loss) / T, resolved on the host
  double logprobs_factor;     // d(loss)/d(row loss)
  HardTerm hard;              // the distillation step's cross-entropy, or none (slots may then be 0)
};

#define KL_FUSED_DECLARE_CPU_KERNELS(capability)                          \
  namespace capability {                                                  \
  void kl_rows(c10::ScalarType dtype, const KLRowsProblem& problem);      \
  void jsd_rows(c10::ScalarType dtype, const KLRowsProblem& problem);     \
  void row_states(c10::ScalarType dtype, const KLRowsProblem& problem);   \
  void grad_from_stats(c10::ScalarType dtype, const KLRowsProblem& problem); \
  void grad_scale(c10::ScalarType dtype, const GradScaleProblem& problem); \
  void sparse_kl_rows(c10::ScalarType dtype, const SparseRowsProblem& problem); \
  }

KL_FUSED_DECLARE_CPU_KERNELS(generic)
KL_FUSED_DECLARE_CPU_KERNELS(avx2)

#undef KL_FUSED_DECLARE_CPU_KERNELS

// Whether the AVX2 build of the kernels may run here (kl_div_cpu.cpp), and the huge-page advice for
// a large gradient buffer.
bool cpu_has_avx2();
void advise_huge_pages(const at::Tensor& buffer);

}  // namespace kl_fused::cpu
