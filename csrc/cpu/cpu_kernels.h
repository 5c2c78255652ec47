// The type-erased entry points of the CPU row kernels. row_kernels.h is compiled once per CPU
// capability (kernels_generic.cpp, kernels_avx2.cpp); kl_div_cpu.cpp picks one at run time.
#pragma once

#include <c10/core/ScalarType.h>

#include "../kl_div_common.h"

namespace kl_fused::cpu {

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
};

struct GradScaleProblem {
  void* grad;                 // (rows, V) contiguous, scaled in place
  const void* upstream;       // float (double for float64 grad): 1 value, or one per row
  bool per_row;
  int64_t rows;
  int64_t vocab;
};

#define KL_FUSED_DECLARE_CPU_KERNELS(capability)                          \
  namespace capability {                                                  \
  void kl_rows(c10::ScalarType dtype, const KLRowsProblem& problem);      \
  void jsd_rows(c10::ScalarType dtype, const KLRowsProblem& problem);     \
  void row_states(c10::ScalarType dtype, const KLRowsProblem& problem);   \
  void grad_from_stats(c10::ScalarType dtype, const KLRowsProblem& problem); \
  void grad_scale(c10::ScalarType dtype, const GradScaleProblem& problem); \
  }

KL_FUSED_DECLARE_CPU_KERNELS(generic)
KL_FUSED_DECLARE_CPU_KERNELS(avx2)

#undef KL_FUSED_DECLARE_CPU_KERNELS

}  // namespace kl_fused::cpu
