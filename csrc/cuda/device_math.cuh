// Scalar math of the kl_fused CUDA kernels, in the accumulation type (float for 16-bit and float32
// inputs, double for float64): base-2 exponentials and logarithms (ex2 is one MUFU instruction for
// fp32, so kernels keep shifted logits in log2 units), NaN-ignoring maxima, and the conversions.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "device_compat.cuh"

namespace kl_fused::cuda {

constexpr double kLog2E = 1.4426950408889634;  // log2(e)
constexpr double kLn2 = 0.6931471805599453;     // ln(2)

// <= 2 ulp; -inf -> +0, NaN -> NaN. Results below 2^-126 flush to 0: such terms are below fp32
// resolution of a sum that contains the row's maximum (which contributes about 1).
__device__ __forceinline__ float exp2_acc(float x) { return ex2_approx_ftz(x); }
__device__ __forceinline__ double exp2_acc(double x) { return ::exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2_f32(x); }
__device__ __forceinline__ double log2_acc(double x) { return ::log2(x); }
// fmax ignores NaN on purpose: a NaN element keeps the running maximum finite and instead turns
// its exponential, hence the row's sums, into NaN, which every later rescale and merge preserves.
__device__ __forceinline__ float max_acc(float a, float b) { return ::fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return ::fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// The shift actually subtracted from raw logits: the running maximum, or 0 while every value seen
// is -inf (so that -inf - shift stays -inf instead of becoming NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t finite_shift(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Neither infinite nor NaN (x - x is NaN exactly for those).
template <typename acc_t>
__device__ __forceinline__ bool finite_acc(acc_t x) {
  return x - x == acc_t(0);
}

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> to_acc(scalar_t v) {
  return static_cast<at::opmath_type<scalar_t>>(v);
}

}  // namespace kl_fused::cuda
