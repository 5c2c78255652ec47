// CUDA implementation of sparse_kl_div (same contract as cpu/sparse_kl_cpu.cpp; math and row status
// in ../sparse_kl_common.h): argument checks, outputs, and two row kernels built from the shared
// pipeline (row_pipeline.cuh), reductions (block_reduce.cuh) and row statistics (row_state.cuh).
//
// Both kernels mark a row's support in a shared-memory bitmap of V bits (atomicOr: an index already
// set is a duplicate, found for free), which the bucket kernel's streaming pass uses to leave the
// support out of its sums: q_r is summed over the complement itself, never as 1 - sum_S q.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../sparse_kl_common.h"
#include "block_reduce.cuh"
#include "distill_cuda.h"
#include "device_math.cuh"
#include "hard_term.cuh"
#include "kl_row_math.cuh"
#include "launch.cuh"
#include "packs.cuh"
#include "row_pipeline.cuh"
#include "row_state.cuh"

namespace kl_fused::cuda {
namespace {

template <typename scalar_t>
struct SparseRowsArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* student;      // (..., V) through student_rows
  RowLayout student_rows;
  const int64_t* indices;       // (rows, K)
  const acc_t* logprobs;        // (rows, K)
  const bool* mask;             // (rows,) or nullptr: rows where it is false are never read
  acc_t* row_loss;              // (rows,)
  int32_t* status;              // (rows,) SparseRowStatus bits
  scalar_t* grad_student;       // (rows, V) contiguous, or nullptr
  acc_t* grad_logprobs;         // (rows, K), or nullptr
  int64_t rows;
  int64_t vocab;
  int64_t slots;
  acc_t k;                      // log2(e) / T
  double inv_temperature;
  double temperature;
  double mass_tolerance;
  GradFactor student_factor;    // d(loss)/d(row loss) / T; its count lives on the device
  GradFactor logprobs_factor;   // d(loss)/d(row loss)
  int64_t cached_units;         // leading packs of the student row kept in shared memory
  int scratch_bytes;            // per-warp states, then the bitmap (bitmap_offset)
  int bitmap_offset;
  int64_t bitmap_words;         // ceil(V / 32)
  // distillation_loss: the hard term riding in the bucket kernel's passes (hard_term.cuh), or none; with
  // it the bucket kernel serves renormalize too (the cross-entropy needs the whole row) and K may be 0
  // (no teacher: the bucket's soft term is then exactly 0).
  HardTermArgs<acc_t> hard;
  bool renormalize;
};

// ---------------------------------------------------------------------------------------------
// The support: marking, unmarking, and reading a support logit.

__device__ __forceinline__ uint32_t token_bit(int64_t i) { return 1u << (i & 31); }

// Every bit 0, once per block: rows leave the bitmap as they found it (unmark).
__device__ __forceinline__ void clear_bitmap(uint32_t* bitmap, int64_t words) {
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) bitmap[w] = 0;
}

// The status of one used slot, marking its token (an index out of range is neither marked nor read).
__device__ __forceinline__ int32_t mark_slot(uint32_t* bitmap, int64_t i, int64_t vocab) {
  if (i < 0 || i >= vocab) return kSlotOutOfRange;
  const uint32_t old = atomicOr(&bitmap[i >> 5], token_bit(i));
  return (old & token_bit(i)) != 0 ? kDuplicateSlot : 0;
}

__device__ __forceinline__ void unmark_slot(uint32_t* bitmap, int64_t i, int64_t vocab) {
  if (i >= 0 && i < vocab) atomicAnd(&bitmap[i >> 5], ~token_bit(i));
}

// The support bits of the N elements of pack `unit` (N divides 32).
template <int N>
__device__ __forceinline__ uint32_t support_bits(const uint32_t* bitmap, int64_t unit) {
  const int64_t first = unit * N;
  if constexpr (N == 32) {
    return bitmap[first >> 5];
  } else {
    return (bitmap[first >> 5] >> (first & 31)) & ((1u << N) - 1u);
  }
}

// Element i of a student row: from the row cache when its pack is there, else from global memory.
template <typename P>
__device__ __forceinline__ typename P::value_type student_at(const P* row, const P* cache, int64_t cached, int64_t i) {
  const int64_t unit = i / P::kSize;
  if (unit < cached) return cache[unit].v[i % P::kSize];
  return reinterpret_cast<const typename P::value_type*>(row)[i];
}

// A row that does not count (masked): loss 0, status 0, gradients 0 (fill_student zeroes the
// student's row), inputs never read.
template <typename acc_t, typename Fill>
__device__ __forceinline__ void write_skipped_row(int64_t row, acc_t* row_loss, int32_t* status, acc_t* grad_logprobs,
                                                  int64_t slots, const Fill& fill_student) {
  if (threadIdx.x == 0) {
    row_loss[row] = acc_t(0);
    status[row] = 0;
  }
  fill_student();
  if (grad_logprobs != nullptr) {
    for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) grad_logprobs[s] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Bucket.
//
// Per row (b = s / T, p_k = e^(l_k), f = d loss / d row loss / T, f_l = d loss / d row loss):
//   mark      the used slots' tokens in the bitmap; the support's online softmax of s_k, and in
//             double sum p, sum p l, sum p b (K gathers)                                    O(K)
//   pass      the complement's online softmax (m_r, Z_r): every element of the row once, support
//             lanes left out by their bit; with a gradient the row parked in the shared cache
//   reduce    one block reduction of all of it; log Z = logaddexp(lse_S b, m_r + log Z_r),
//             loss = sum p l - sum p b + P_S log Z + p_r (log p_r - log q_r)
//   gradient  ds_j = f (P q_r - p_r) 2^((s_j - m_r) k) / Z_r over the row (cache, then L2), then, after
//             a barrier, ds_{i_k} = f (P q_k - p_k) and dl_k = f_l p_k (l_k - log q_k + c) over the
//             support (c = log q_r - log p_r, or 1 without a bucket)
// Bytes per row: the student read once (V e, the uncached packs once more from L2 with a gradient),
// ds written once (V e), O(K) for the slots: the floor of the design notes, against dense KL's 3 V e.
// One exponential per element in the pass and one in the gradient pass.
// The hard term on a support slot: f_h (q_1 - eps / V), less f_h (1 - eps) on the label's; q_1 from the
// raw logit x and log Z_1 (in double: both may be ~1e4).
template <typename acc_t>
__device__ __forceinline__ acc_t hard_on_slot(const HardRow<acc_t>& h, acc_t x, double log_z1, bool is_label) {
  return h.f * static_cast<acc_t>(::exp(static_cast<double>(x) - log_z1)) - h.uniform - (is_label ? h.pull : acc_t(0));
}

// The label's element of a student gradient row, written once more with its final value.
template <typename P, typename acc_t>
__device__ __forceinline__ void ds_label_fixup(P* ds, int64_t label, acc_t value) {
  reinterpret_cast<typename P::value_type*>(ds)[label] = static_cast<typename P::value_type>(value);
}

template <typename acc_t>
struct BucketState {
  acc_t m_rest, z_rest;         // the complement
  acc_t m_support, z_support;   // the support's student logits
  double mass, pl, pb;          // sum_S p, sum_S p l, sum_S p b
  int32_t status;
  int32_t used;
};

template <typename acc_t>
struct MergeBucketStates {
  acc_t k;
  __device__ __forceinline__ BucketState<acc_t> operator()(BucketState<acc_t> a, const BucketState<acc_t>& b) const {
    merge_softmax(a.m_rest, a.z_rest, b.m_rest, b.z_rest, k);
    merge_softmax(a.m_support, a.z_support, b.m_support, b.z_support, k);
    a.mass += b.mass;
    a.pl += b.pl;
    a.pb += b.pb;
    a.status |= b.status;
    a.used += b.used;
    return a;
  }
};

template <typename acc_t>
__device__ __forceinline__ BucketState<acc_t> empty_bucket_state() {
  return {neg_inf<acc_t>(), acc_t(0), neg_inf<acc_t>(), acc_t(0), 0.0, 0.0, 0.0, 0, 0};
}

// One step of the pass: folds the complement's elements among packs into (m, z).
template <typename acc_t, typename P, int U>
__device__ __forceinline__ void rest_statistics_step(acc_t& m, acc_t& z, const P (&packs)[1][U], const bool (&valid)[U],
                                                     int64_t first, const uint32_t* bitmap, acc_t k) {
  constexpr int N = P::kSize;
  uint32_t support[U];
  acc_t step_m = neg_inf<acc_t>();
#pragma unroll
  for (int i = 0; i < U; ++i) {
    support[i] = valid[i] ? support_bits<N>(bitmap, step_unit(first, i)) : 0u;
    if (!valid[i]) continue;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (!((support[i] >> j) & 1u)) step_m = max_acc(step_m, to_acc(packs[0][i].v[j]));
    }
  }
  // One rescale per step at most; a NaN element keeps m finite and turns z into NaN below.
  if (step_m > m) {
    z = m == neg_inf<acc_t>() ? acc_t(0) : z * exp2_acc((m - step_m) * k);
    m = step_m;
  }
  const acc_t shift = finite_shift(m);
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!valid[i]) continue;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (!((support[i] >> j) & 1u)) z += exp2_acc((to_acc(packs[0][i].v[j]) - shift) * k);
    }
  }
}

template <typename acc_t, bool kHard = false>
struct RestStatistics {
  acc_t m, z;
  const uint32_t* bitmap;
  acc_t k;
  HardSums<acc_t> h;         // kHard: the hard term's sums over the whole row, support included
  bool need_z1, need_sum;
  template <typename P, int U>
  __device__ __forceinline__ void operator()(const P (&packs)[1][U], const bool (&valid)[U], int64_t first) {
    rest_statistics_step(m, z, packs, valid, first, bitmap, k);
    if constexpr (kHard) hard_sums_step(h, packs[0], valid, need_z1, need_sum);
  }
};

// The gradient pass: coef 2^((s - shift) k) on every element (the support's are overwritten later),
// plus the hard term's f_h (q_1 - eps / V) (Hard: NoHardTerm or HardTermShare with the student as y).
template <typename P, typename acc_t, typename Hard = NoHardTerm>
struct RestGradient {
  P* grad;
  acc_t shift, k, coef;
  Hard hard;
  __device__ __forceinline__ acc_t element(acc_t s) const {
    const acc_t e = exp2_acc((s - shift) * k);
    acc_t g = coef * e, unused = acc_t(0);
    hard.template add<false, true>(acc_t(0), s, acc_t(0), e, unused, g);
    return g;
  }
  template <int U>
  __device__ __forceinline__ void operator()(const P (&packs)[1][U], const bool (&valid)[U], int64_t first) const {
    using scalar_t = typename P::value_type;
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!valid[i]) continue;
      P g;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) g.v[j] = static_cast<scalar_t>(element(to_acc(packs[0][i].v[j])));
      store_pack(grad, step_unit(first, i), g);
    }
  }
};

// The bucket kernel's merged state with the hard term's sums (kHard).
template <typename acc_t>
struct BucketHardState {
  BucketState<acc_t> b;
  HardSums<acc_t> h;
};

template <typename acc_t>
struct MergeBucketHardStates {
  acc_t k;
  __device__ __forceinline__ BucketHardState<acc_t> operator()(BucketHardState<acc_t> a,
                                                               const BucketHardState<acc_t>& b) const {
    merge_hard_sums(a.h, b.h);
    return {MergeBucketStates<acc_t>{k}(a.b, b.b), a.h};
  }
};

// kHard (sparse_bucket_hard_kernel): the distillation step's cross-entropy rides along (hard_term.cuh):
// its sums over the whole row in the pass, CE per row, f_h (q_1 - eps / V) in the gradient sweep and on
// the support's slots, the label's pull on its slot or (off the support) rewritten once by thread 0.
// There the kernel also serves renormalize (args.renormalize: the soft term from the support's sums,
// nothing off the support) and K = 0 (no teacher: the bucket term is exactly 0).
template <typename scalar_t, int N, bool kGrad, bool kHard>
__device__ __forceinline__ void sparse_bucket_rows(const SparseRowsArgs<scalar_t>& args) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  using State = std::conditional_t<kHard, BucketHardState<acc_t>, BucketState<acc_t>>;
  KL_FUSED_DYNAMIC_SHARED(unsigned char, shared);
  auto* scratch = reinterpret_cast<State*>(shared);
  auto* bitmap = reinterpret_cast<uint32_t*>(shared + args.bitmap_offset);
  P* const cache[1] = {reinterpret_cast<P*>(shared + args.scratch_bytes)};
  const int64_t units = args.vocab / N, K = args.slots, V = args.vocab;
  const int64_t cached = kGrad ? args.cached_units : 0;
  const acc_t k = args.k;
  const double inv_t = args.inv_temperature;
  clear_bitmap(bitmap, args.bitmap_words);
  __syncthreads();

  for (const int64_t row : block_rows(args.rows)) {
    const int64_t* idx = args.indices + row * K;
    const acc_t* lp = args.logprobs + row * K;
    acc_t* dl = args.grad_logprobs != nullptr ? args.grad_logprobs + row * K : nullptr;
    P* const ds = args.grad_student != nullptr ? reinterpret_cast<P*>(args.grad_student + row * V) : nullptr;
    if (row_masked(args.mask, row)) {  // block-uniform
      write_skipped_row(row, args.row_loss, args.status, dl, K, [&] {
        if (ds != nullptr) fill_row(ds, units, scalar_t(0));
      });
      if constexpr (kHard) {
        if (threadIdx.x == 0) args.hard.row_hard[row] = acc_t(0);
      }
      continue;
    }
    int64_t label = 0;
    if constexpr (kHard) {
      label = args.hard.labels[row];
      if (label < 0 || label >= V) {  // block-uniform: the row is undefined and never read
        if (threadIdx.x == 0) {
          args.row_loss[row] = args.hard.row_hard[row] = static_cast<acc_t>(NAN);
          args.status[row] = kLabelOutOfRange;
        }
        if (ds != nullptr) fill_row(ds, units, static_cast<scalar_t>(NAN));
        if (dl != nullptr) {
          for (int64_t s = threadIdx.x; s < K; s += blockDim.x) dl[s] = static_cast<acc_t>(NAN);
        }
        continue;
      }
    }
    const P* const in[1] = {reinterpret_cast<const P*>(args.student + args.student_rows.offset(row))};
    const scalar_t* srow = args.student + args.student_rows.offset(row);

    // Mark the support; only the problems and the count stay in registers through the pass.
    BucketState<acc_t> mine = empty_bucket_state<acc_t>();
    for (int64_t s = threadIdx.x; s < K; s += blockDim.x) {
      if (lp[s] == neg_inf<acc_t>()) continue;
      ++mine.used;
      mine.status |= mark_slot(bitmap, idx[s], V);
    }
    __syncthreads();  // the bitmap is complete before the pass reads it

    const bool unit_t = args.inv_temperature == 1.0;
    RestStatistics<acc_t, kHard> rest{neg_inf<acc_t>(), acc_t(0), bitmap, k, empty_hard_sums<acc_t>(), !unit_t,
                                      kHard && args.hard.smoothing != acc_t(0)};
    if constexpr (kGrad) {
      first_pass<kUnroll<N>>(in, cache, cached, units, rest);
    } else {
      only_pass<kUnroll<N>>(in, units, rest);
    }
    mine.m_rest = rest.m;
    mine.z_rest = rest.z;
    // Whether the label's token is on the support (then the support's step writes its gradient);
    // block-uniform, read while the bitmap is stable.
    const bool label_on_support = kHard && (bitmap[label >> 5] & token_bit(label)) != 0;
    // The support's slots, gathered from global memory (L2: the block has just streamed the row; the
    // row cache may not be read before a barrier).
    for (int64_t s = threadIdx.x; s < K; s += blockDim.x) {
      const acc_t l = lp[s];
      const int64_t i = idx[s];
      if (l == neg_inf<acc_t>() || i < 0 || i >= V) continue;
      const acc_t x = to_acc(srow[i]);
      merge_softmax(mine.m_support, mine.z_support, x, acc_t(1), k);
      const double p = ::exp(static_cast<double>(l));
      mine.mass += p;
      if (p != 0.0) {
        mine.pl += p * static_cast<double>(l);
        mine.pb += p * (static_cast<double>(x) * inv_t);
      }
    }
    // The reduction's barrier also ends every read of the bitmap and orders the cache's writes
    // before the gradient pass reads them.
    BucketState<acc_t> st;
    HardSums<acc_t> hs{};
    if constexpr (kHard) {
      const BucketHardState<acc_t> merged =
          block_reduce(BucketHardState<acc_t>{mine, rest.h}, MergeBucketHardStates<acc_t>{k},
                       BucketHardState<acc_t>{empty_bucket_state<acc_t>(), empty_hard_sums<acc_t>()}, scratch);
      st = merged.b;
      hs = merged.h;
    } else {
      st = block_reduce(mine, MergeBucketStates<acc_t>{k}, empty_bucket_state<acc_t>(), scratch);
    }

    const double log_rest = st.z_rest > acc_t(0)
                                ? static_cast<double>(st.m_rest) * inv_t + kLn2 * static_cast<double>(log2_acc(st.z_rest))
                                : -INFINITY;
    const double lse_support = st.z_support > acc_t(0)
                                   ? static_cast<double>(st.m_support) * inv_t +
                                         kLn2 * static_cast<double>(log2_acc(st.z_support))
                                   : (st.z_support == acc_t(0) ? -INFINITY : static_cast<double>(NAN));
    const double hi = ::fmax(lse_support, log_rest), lo = ::fmin(lse_support, log_rest);
    double log_z = hi == -INFINITY ? -INFINITY : hi + ::log1p(::exp(lo - hi));
    // A NaN or +inf logit (z NaN), or every logit -inf, leaves the softmax undefined.
    if (st.z_rest != st.z_rest || st.z_support != st.z_support) log_z = NAN;
    const bool defined = log_z - log_z == 0.0;
    const bool bad = st.status != 0 || (st.mass > 1.0 + args.mass_tolerance);
    const int32_t status = st.status | (st.mass > 1.0 + args.mass_tolerance ? kMassAboveOne : 0);

    const double log_qr = log_rest - log_z;
    // No bucket when the support covers the vocabulary (its mass deficit is rounding) or holds all
    // of the teacher's mass (up to the tolerance); a NaN mass stays NaN.
    const double p_r = st.used == V ? 0.0 : (st.mass != st.mass ? st.mass : ::fmax(1.0 - st.mass, 0.0));
    const double total = st.mass + p_r;
    // Renormalized (kHard only): KL(p~ || q~) = sum p~ (l - log P) - sum p~ b + lse_S b, P = sum_S p;
    // no support: 0; a support whose logits are all -inf leaves q~ undefined.
    const bool renormalize = kHard && args.renormalize;
    const double renorm_kl = st.used == 0 ? 0.0 : (st.pl - st.pb) / st.mass - ::log(st.mass) + lse_support;
    const bool soft_defined = defined && (!renormalize || st.used == 0 || lse_support - lse_support == 0.0);
    double log_z1 = log_z;
    if (threadIdx.x == 0) {
      double loss = st.pl - st.pb + st.mass * log_z;
      if (p_r != 0.0) loss += p_r * (::log(p_r) - log_qr);
      if (renormalize) loss = renorm_kl;
      args.row_loss[row] = static_cast<acc_t>(bad || !soft_defined ? NAN : loss);
      args.status[row] = status;
    }
    HardRow<acc_t> hard{};
    if constexpr (kHard) {
      // log Z_1 of the student at T = 1: the soft term's log Z at T = 1, else the hard sums'.
      log_z1 = unit_t ? log_z : static_cast<double>(hs.m) + kLn2 * static_cast<double>(log2_acc(hs.z1));
      if (threadIdx.x == 0) {
        const double s_y = static_cast<double>(to_acc(srow[label]));
        double ce = log_z1 - (1.0 - static_cast<double>(args.hard.smoothing)) * s_y;
        if (args.hard.smoothing != acc_t(0)) {
          ce -= static_cast<double>(args.hard.smoothing) * static_cast<double>(hs.sum) / static_cast<double>(V);
        }
        args.hard.row_hard[row] = static_cast<acc_t>(bad || !soft_defined ? NAN : ce);
      }
      if constexpr (kGrad) {
        const acc_t f_h = static_cast<acc_t>(args.hard.factor.value());
        // Off the support at T = 1: f_h q_j = f_h 2^((s_j - m_r) k) q_r / Z_r.
        hard = {static_cast<acc_t>(st.z_rest > acc_t(0) ? f_h * ::exp(log_qr) / static_cast<double>(st.z_rest) : 0.0),
                f_h / hs.z1, hs.m, f_h * args.hard.smoothing / static_cast<acc_t>(V),
                f_h * (acc_t(1) - args.hard.smoothing), unit_t, f_h};
      }
    }

    if constexpr (kGrad) {
      // What the support's step needs, in few registers: the pass in between holds its own.
      const double f = args.student_factor.value();
      const acc_t total_f = static_cast<acc_t>(total);
      const acc_t c_tail = static_cast<acc_t>(p_r != 0.0 ? log_qr - ::log(p_r) : 1.0);
      const int row_state = bad ? 2 : (soft_defined ? 0 : 1);  // 2: NaN everywhere, 1: NaN on used slots
      const double coef = st.z_rest > acc_t(0) && !renormalize
                              ? f * (total * ::exp(log_qr) - p_r) / static_cast<double>(st.z_rest)
                              : 0.0;
      const acc_t shift = finite_shift(st.m_rest);
      if (ds != nullptr) {
        if (row_state != 0) {
          fill_row(ds, units, static_cast<scalar_t>(NAN));
        } else if constexpr (kHard) {
          const RestGradient<P, acc_t, HardTermShare<acc_t>> sweep{ds, shift, k, static_cast<acc_t>(coef),
                                                                   HardTermShare<acc_t>{hard, false}};
          later_pass<kGradUnroll<N>, true>(in, cache, cached, units, sweep);
          if (!label_on_support) {
            __syncthreads();  // the sweep's write of the label's element comes first
            if (threadIdx.x == 0) {
              ds_label_fixup(ds, label, sweep.element(to_acc(student_at(in[0], cache[0], cached, label))) - hard.pull);
            }
          }
        } else {
          later_pass<kGradUnroll<N>, true>(in, cache, cached, units,
                                           RestGradient<P, acc_t>{ds, shift, k, static_cast<acc_t>(coef), {}});
        }
      }
      __syncthreads();  // the pass's writes before the support's overwrite them
      const acc_t f_s = static_cast<acc_t>(f);
      const acc_t f_l = static_cast<acc_t>(args.logprobs_factor.value());
      scalar_t* ds_row = args.grad_student != nullptr ? args.grad_student + row * V : nullptr;
      for (int64_t s = threadIdx.x; s < K; s += blockDim.x) {
        const acc_t l = lp[s];
        const bool used = l != neg_inf<acc_t>();
        const int64_t i = idx[s];
        if (used) unmark_slot(bitmap, i, V);
        if (row_state == 2 || (used && row_state == 1)) {
          if (dl != nullptr) dl[s] = static_cast<acc_t>(NAN);
          continue;
        }
        if (!used) {
          if (dl != nullptr) dl[s] = acc_t(0);
          continue;
        }
        // log q_k = b_k - log Z, exact in double (both may be ~1e4), then the rest in acc_t.
        const acc_t x = to_acc(student_at(in[0], cache[0], cached, i));
        const acc_t log_q = static_cast<acc_t>(static_cast<double>(x) * inv_t - log_z);
        const acc_t p = exp2_acc(l * static_cast<acc_t>(kLog2E));
        if (renormalize) {  // p~ = p / P, log q~ = b - lse_S
          const acc_t log_pt = l - static_cast<acc_t>(::log(st.mass));
          const acc_t log_qt = static_cast<acc_t>(static_cast<double>(x) * inv_t - lse_support);
          const acc_t pt = exp2_acc(log_pt * static_cast<acc_t>(kLog2E));
          if (ds_row != nullptr) {
            ds_row[i] = static_cast<scalar_t>(f_s * (exp2_acc(log_qt * static_cast<acc_t>(kLog2E)) - pt) +
                                              hard_on_slot(hard, x, log_z1, i == label));
          }
          if (dl != nullptr) dl[s] = pt > acc_t(0) ? f_l * pt * (log_pt - log_qt - static_cast<acc_t>(renorm_kl)) : acc_t(0);
          continue;
        }
        if (ds_row != nullptr) {
          acc_t g = f_s * (total_f * exp2_acc(log_q * static_cast<acc_t>(kLog2E)) - p);
          if constexpr (kHard) g += hard_on_slot(hard, x, log_z1, i == label);
          ds_row[i] = static_cast<scalar_t>(g);
        }
        if (dl != nullptr) dl[s] = p > acc_t(0) ? f_l * p * (l - log_q + c_tail) : acc_t(0);
      }
    } else {
      for (int64_t s = threadIdx.x; s < K; s += blockDim.x) {
        if (lp[s] != neg_inf<acc_t>()) unmark_slot(bitmap, idx[s], V);
      }
    }
  }
}

template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(kMaxRowThreads<scalar_t>, kMinRowBlocksPerSM)
    sparse_bucket_kernel(const SparseRowsArgs<scalar_t> args) {
  sparse_bucket_rows<scalar_t, N, kGrad, false>(args);
}

// The hard term's sums and constants: at most 512 threads per block (128 registers).
template <typename scalar_t, int N, bool kGrad>
__global__ void __launch_bounds__(512, kMinRowBlocksPerSM)
    sparse_bucket_hard_kernel(const SparseRowsArgs<scalar_t> args) {
  sparse_bucket_rows<scalar_t, N, kGrad, true>(args);
}

// ---------------------------------------------------------------------------------------------
// Renormalize: KL(p~ || q~) over the support alone, which is KL's row statistics (row_state.cuh) on
// the K slots with x = l T (so that x k = l log2 e) and y = s_{i_k}: unused slots are (-inf, -inf)
// and contribute nothing.
//   loss      KL = (W / Z_x - log2 Z_x + log2 Z_y) ln 2
//   gradient  ds = 0 off the support (the zero fill: V e written), then ds_{i_k} = f (q~_k - p~_k)
//             and dl_k = f_l p~_k (log p~_k - log q~_k - KL)
// Bytes per row: O(K) read, V e written with a gradient. No pass over the student: renormalized,
// the loss does not depend on the logits off the support.
template <typename acc_t>
struct RenormState {
  RowState<acc_t> st;
  int32_t status;
  int32_t used;
};

template <typename acc_t>
struct MergeRenormStates {
  acc_t k;
  __device__ __forceinline__ RenormState<acc_t> operator()(const RenormState<acc_t>& a, const RenormState<acc_t>& b) const {
    return {merge(a.st, b.st, k), a.status | b.status, a.used + b.used};
  }
};

template <typename scalar_t, bool kGrad>
__global__ void __launch_bounds__(kMaxRowThreads<scalar_t>, kMinRowBlocksPerSM)
    sparse_renorm_kernel(const SparseRowsArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPack = 16 / sizeof(scalar_t);
  KL_FUSED_DYNAMIC_SHARED(unsigned char, shared);
  auto* scratch = reinterpret_cast<RenormState<acc_t>*>(shared);
  auto* bitmap = reinterpret_cast<uint32_t*>(shared + args.bitmap_offset);
  const int64_t K = args.slots, V = args.vocab;
  const acc_t k = args.k;
  const acc_t temperature = static_cast<acc_t>(args.temperature);
  const auto zero_fill = [&](scalar_t* g, scalar_t value) {
    if (V % kPack == 0) fill_row(reinterpret_cast<Pack<scalar_t, kPack>*>(g), V / kPack, value);
    else fill_row(reinterpret_cast<Pack<scalar_t, 1>*>(g), V, value);
  };
  const RenormState<acc_t> identity{empty_row_state<acc_t>(), 0, 0};
  clear_bitmap(bitmap, args.bitmap_words);
  __syncthreads();

  for (const int64_t row : block_rows(args.rows)) {
    const int64_t* idx = args.indices + row * K;
    const acc_t* lp = args.logprobs + row * K;
    acc_t* dl = args.grad_logprobs != nullptr ? args.grad_logprobs + row * K : nullptr;
    scalar_t* ds = args.grad_student != nullptr ? args.grad_student + row * V : nullptr;
    if (row_masked(args.mask, row)) {  // block-uniform
      write_skipped_row(row, args.row_loss, args.status, dl, K, [&] {
        if (ds != nullptr) zero_fill(ds, scalar_t(0));
      });
      continue;
    }
    const scalar_t* srow = args.student + args.student_rows.offset(row);
    RenormState<acc_t> mine = identity;
    for (int64_t s = threadIdx.x; s < K; s += blockDim.x) {
      const acc_t l = lp[s];
      if (l == neg_inf<acc_t>()) continue;
      ++mine.used;
      const int64_t i = idx[s];
      const int32_t problem = mark_slot(bitmap, i, V);
      mine.status |= problem;
      if (problem & kSlotOutOfRange) continue;
      Pack<acc_t, 1> packs[2][1];
      packs[0][0].v[0] = l * temperature;
      packs[1][0].v[0] = to_acc(srow[i]);
      const bool valid[1] = {true};
      kl_statistics_step(mine.st, packs, valid, k);
    }
    const RenormState<acc_t> r = block_reduce(mine, MergeRenormStates<acc_t>{k}, identity, scratch);
    const RowState<acc_t>& st = r.st;
    const acc_t log_zx = log2_acc(st.zx), log_zy = log2_acc(st.zy);
    acc_t kl2 = st.w / st.zx - log_zx + log_zy;
    // Student support logits all -inf: q~ is 0 / 0.
    if (st.my == neg_inf<acc_t>()) kl2 = static_cast<acc_t>(NAN);
    const bool bad = r.status != 0;
    const bool empty = r.used == 0;  // no support: nothing to match, loss 0
    if (threadIdx.x == 0) {
      args.row_loss[row] = bad ? static_cast<acc_t>(NAN) : (empty ? acc_t(0) : kl2 * static_cast<acc_t>(kLn2));
      args.status[row] = r.status;
    }
    if constexpr (kGrad) {
      if (ds != nullptr) zero_fill(ds, bad ? static_cast<scalar_t>(NAN) : scalar_t(0));
      __syncthreads();  // the fill before the support's values
      const acc_t f = static_cast<acc_t>(args.student_factor.value());
      const acc_t f_l = static_cast<acc_t>(args.logprobs_factor.value());
      const acc_t c2 = log_zy - log_zx - kl2;
      for (int64_t s = threadIdx.x; s < K; s += blockDim.x) {
        const acc_t l = lp[s];
        const bool used = l != neg_inf<acc_t>();
        const int64_t i = idx[s];
        if (used) unmark_slot(bitmap, i, V);
        if (!used || bad) {
          if (dl != nullptr) dl[s] = bad ? static_cast<acc_t>(NAN) : acc_t(0);
          continue;
        }
        const acc_t xs = (l * temperature - st.mx) * k, ys = (to_acc(srow[i]) - st.my) * k;
        const acc_t pt = exp2_acc(xs) / st.zx;
        if (ds != nullptr) ds[i] = static_cast<scalar_t>(f * (exp2_acc(ys) / st.zy - pt));
        if (dl != nullptr) dl[s] = pt > acc_t(0) ? f_l * pt * (xs - ys + c2) * static_cast<acc_t>(kLn2) : acc_t(0);
      }
    } else {
      for (int64_t s = threadIdx.x; s < K; s += blockDim.x) {
        if (lp[s] != neg_inf<acc_t>()) unmark_slot(bitmap, idx[s], V);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side (launch.cuh: the same code runs on the GPU and under the SIMT emulator of the tests).

template <typename scalar_t>
int64_t bitmap_words(const SparseRowsArgs<scalar_t>& args) {
  return (args.vocab + 31) / 32;
}

template <typename scalar_t, int N>
void launch_bucket(SparseRowsArgs<scalar_t> args, bool grad, const DeviceLimits& limits, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t words = bitmap_words(args);
  const bool hard = args.hard.labels != nullptr;
  const int state_bytes = hard ? sizeof(BucketHardState<acc_t>) : sizeof(BucketState<acc_t>);
  const RowsLaunch plan =
      plan_rows_launch(args.rows, args.vocab / N, 2 * kUnroll<N>, hard ? 512 : kMaxRowThreads<scalar_t>, state_bytes,
                       sizeof(Pack<scalar_t, N>), args.grad_student != nullptr, limits, /*inputs=*/1,
                       static_cast<int>(4 * words));
  TORCH_CHECK_VALUE(plan.shared_bytes <= limits.max_shared_optin,
                    "sparse_kl_div on CUDA keeps a bit per vocabulary entry in shared memory; V = ", args.vocab,
                    " needs ", plan.shared_bytes, " bytes, above the device's ", limits.max_shared_optin);
  args.scratch_bytes = plan.scratch_bytes;
  args.bitmap_offset = (plan.threads / 32 * state_bytes + 15) / 16 * 16;
  args.bitmap_words = words;
  args.cached_units = plan.cached_units;
  if (hard) {
    if (grad) {
      if (plan.opt_in) allow_dynamic_shared<sparse_bucket_hard_kernel<scalar_t, N, true>>(limits.max_shared_optin);
      launch_kernel<sparse_bucket_hard_kernel<scalar_t, N, true>>(plan.grid, plan.threads, plan.shared_bytes, stream,
                                                                  args);
    } else {
      if (plan.opt_in) allow_dynamic_shared<sparse_bucket_hard_kernel<scalar_t, N, false>>(limits.max_shared_optin);
      launch_kernel<sparse_bucket_hard_kernel<scalar_t, N, false>>(plan.grid, plan.threads, plan.shared_bytes, stream,
                                                                   args);
    }
    return;
  }
  if (grad) {
    if (plan.opt_in) allow_dynamic_shared<sparse_bucket_kernel<scalar_t, N, true>>(limits.max_shared_optin);
    launch_kernel<sparse_bucket_kernel<scalar_t, N, true>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
  } else {
    if (plan.opt_in) allow_dynamic_shared<sparse_bucket_kernel<scalar_t, N, false>>(limits.max_shared_optin);
    launch_kernel<sparse_bucket_kernel<scalar_t, N, false>>(plan.grid, plan.threads, plan.shared_bytes, stream, args);
  }
}

template <typename scalar_t>
void launch_renorm(SparseRowsArgs<scalar_t> args, bool grad, const DeviceLimits& limits, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t words = bitmap_words(args);
  // Threads for the K slots, and with a gradient for the zero fill of the row (16-byte stores).
  const int64_t work = std::max<int64_t>(args.slots, grad ? args.vocab * static_cast<int64_t>(sizeof(scalar_t)) / 64 : 0);
  const int threads = block_threads(work, 1, kMaxRowThreads<scalar_t>);
  const int state_bytes = (threads / 32 * static_cast<int>(sizeof(RenormState<acc_t>)) + 15) / 16 * 16;
  const int64_t shared_bytes = state_bytes + (4 * words + 15) / 16 * 16;
  TORCH_CHECK_VALUE(shared_bytes <= limits.max_shared_optin,
                    "sparse_kl_div on CUDA keeps a bit per vocabulary entry in shared memory; V = ", args.vocab,
                    " needs ", shared_bytes, " bytes, above the device's ", limits.max_shared_optin);
  args.scratch_bytes = static_cast<int>(shared_bytes);
  args.bitmap_offset = state_bytes;
  args.bitmap_words = words;
  const unsigned int grid = grid_blocks(args.rows, limits);
  const bool opt_in = shared_bytes > kDefaultSharedBytes;
  if (grad) {
    if (opt_in) allow_dynamic_shared<sparse_renorm_kernel<scalar_t, true>>(limits.max_shared_optin);
    launch_kernel<sparse_renorm_kernel<scalar_t, true>>(grid, threads, shared_bytes, stream, args);
  } else {
    if (opt_in) allow_dynamic_shared<sparse_renorm_kernel<scalar_t, false>>(limits.max_shared_optin);
    launch_kernel<sparse_renorm_kernel<scalar_t, false>>(grid, threads, shared_bytes, stream, args);
  }
}

}  // namespace

void sparse_rows_cuda(const PreparedSparseRows& in, SparseOutputs& out, double temperature, bool renormalize,
                      double mass_tolerance, const GradFactor& student_factor, const GradFactor& logprobs_factor,
                      const HardTermInputs& hard) {
  if (in.rows == 0) return;
  const int device = in.student.get_device();
  const Stream stream = current_stream(device);
  const DeviceLimits limits = device_limits(device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student.scalar_type(), "kl_fused_cuda_sparse_kl", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SparseRowsArgs<scalar_t> args{};
    args.student = in.student.const_data_ptr<scalar_t>();
    args.student_rows = in.student_rows;
    args.indices = in.indices.const_data_ptr<int64_t>();
    args.logprobs = in.logprobs.const_data_ptr<acc_t>();
    args.mask = in.mask.has_value() ? in.mask->const_data_ptr<bool>() : nullptr;
    args.row_loss = out.row_loss.mutable_data_ptr<acc_t>();
    args.status = out.status.mutable_data_ptr<int32_t>();
    args.grad_student = out.grad_student.numel() > 0 ? out.grad_student.mutable_data_ptr<scalar_t>() : nullptr;
    args.grad_logprobs = out.grad_logprobs_acc.numel() > 0 ? out.grad_logprobs_acc.mutable_data_ptr<acc_t>() : nullptr;
    args.rows = in.rows;
    args.vocab = in.vocab;
    args.slots = in.slots;
    args.k = static_cast<acc_t>(kLog2E / temperature);
    args.inv_temperature = 1.0 / temperature;
    args.temperature = temperature;
    args.mass_tolerance = renormalize ? INFINITY : mass_tolerance;
    args.student_factor = student_factor;
    args.logprobs_factor = logprobs_factor;
    args.hard = hard_term_args<acc_t>(hard);
    args.renormalize = renormalize;
    const bool grad = args.grad_student != nullptr || args.grad_logprobs != nullptr;
    // Renormalized, the soft term reads the support alone; the hard term needs the whole row.
    if (renormalize && hard.labels == nullptr) {
      launch_renorm<scalar_t>(args, grad, limits, stream);
      return;
    }
    constexpr int kPack = 16 / sizeof(scalar_t);
    const bool vectorized = rows_vectorizable(args.student, args.student_rows, in.vocab, kPack) &&
                            (args.grad_student == nullptr || aligned16(args.grad_student));
    if (vectorized) launch_bucket<scalar_t, kPack>(args, grad, limits, stream);
    else launch_bucket<scalar_t, 1>(args, grad, limits, stream);
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kl_div_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_indices, const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& mask, double temperature, bool renormalize, c10::string_view reduction_name,
    double mass_tolerance, bool validate, bool student_grad, bool logprobs_grad) {
  const DeviceGuard guard(student_logits.device());
  const PreparedSparseRows in = prepare_sparse_rows(student_logits, teacher_indices, teacher_logprobs, mask,
                                                    temperature, reduction_name, mass_tolerance);
  const Reduction reduction = parse_reduction(reduction_name);
  SparseOutputs out = allocate_sparse_outputs(in, student_grad, logprobs_grad);
  const std::optional<at::Tensor> counted = counted_rows(in.mask);  // stays on the device
  sparse_rows_cuda(in, out, temperature, renormalize, mass_tolerance,
                   make_grad_factor(reduction, temperature, in.vocab, in.rows, counted),
                   make_grad_factor(reduction, 1.0, in.vocab, in.rows, counted), {});
  if (validate && in.rows > 0) raise_on_bad_support(in, out.status, mass_tolerance);
  return finish_sparse_outputs(in, out, counted, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(KL_FUSED_CUDA_LIBRARY, KL_FUSED_CUDA_DISPATCH_KEY, m) { m.impl("sparse_kl_div", &sparse_kl_div_cuda); }

}  // namespace kl_fused::cuda
