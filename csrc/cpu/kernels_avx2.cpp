// The CPU row kernels built for AVX2 + FMA (+ F16C for half conversions), chosen at run time by
// kl_div_cpu.cpp only when ATen reports an AVX2-capable CPU. The target pragma comes before every
// include so that the intrinsics at::vec uses are enabled here and nowhere else in the library.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c")
// The pragma enables the instructions but not the feature macros that sleef.h and at::vec test.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define KL_FUSED_CPU_NAMESPACE avx2
#include "row_kernels.h"
#include "jsd_row_kernels.h"
#include "sparse_row_kernels.h"
#else
// Not an x86-64 build: the AVX2 entry points forward to the portable kernels.
#include "cpu_kernels.h"
namespace kl_fused::cpu::avx2 {
void kl_rows(c10::ScalarType dtype, const KLRowsProblem& p) { generic::kl_rows(dtype, p); }
void jsd_rows(c10::ScalarType dtype, const KLRowsProblem& p) { generic::jsd_rows(dtype, p); }
void row_states(c10::ScalarType dtype, const KLRowsProblem& p) { generic::row_states(dtype, p); }
void grad_from_stats(c10::ScalarType dtype, const KLRowsProblem& p) { generic::grad_from_stats(dtype, p); }
void grad_scale(c10::ScalarType dtype, const GradScaleProblem& p) { generic::grad_scale(dtype, p); }
void sparse_kl_rows(c10::ScalarType dtype, const SparseRowsProblem& p) { generic::sparse_kl_rows(dtype, p); }
}  // namespace kl_fused::cpu::avx2
#endif
