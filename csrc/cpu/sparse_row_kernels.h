// CPU row kernel of sparse_kl_div (math and row contract in ../sparse_kl_common.h), vectorised with
// at::vec. Like row_kernels.h, not a normal header: kernels_generic.cpp and kernels_avx2.cpp include it
// once per CPU capability after defining KL_FUSED_CPU_NAMESPACE.
//
// One row, b = s / T over V elements of e bytes, K teacher slots (index, log-prob l):
//   mark     the support: outside[i_k] = -inf (a per-thread row of 0s), which also finds indices out
//            of range and duplicates; sum_S p in double                              O(K)
//   bucket   the complement's softmax, chunk by chunk (kChunk elements, as in row_kernels.h): the
//            chunk's maximum, then Z_c = sum exp(b + outside - shift_c), the exponentials kept in a
//            per-thread row when a gradient is wanted; chunks merged into (m_r, Z_r) (rest_state).
//            Summing over the complement itself keeps q_r = Z_r e^(m_r) / Z exact to fp32 rounding
//            however little mass it holds (1 - sum_S q would cancel).    reads s once: e per element
//            The support's b_k (K gathers) give log Z = logaddexp(lse_S b, m_r + log Z_r) and
//   loss     sum_S p_k (l_k - b_k + log Z) + p_r (log p_r - log q_r)                 O(K), double
//   ds       f (P q_r - p_r) / Z_r * exp(b_j - m_r) over the row (0 on the support, from the kept
//            exponentials: no second exponential), then ds_{i_k} = f (P q_k - p_k)
//            (P = sum_S p + p_r, f = d loss / d row loss / T)                   writes e per element
//            (the row sweep with non-temporal stores where the row is 32-byte aligned)
//   dl_k     f_l p_k (l_k - log q_k + log q_r - log p_r), or + 1 where there is no bucket      O(K)
//   renormalize: the support alone: KL(p~ || q~) from the K gathers; ds is 0 off the support and
//            f (q~_k - p~_k) on it; dl_k = f_l p~_k (log p~_k - log q~_k - KL).   O(K) reads, e written
// One exponential per element, the student read once and its gradient written once: the byte floor.
// The hard term (kHard, HardTerm in cpu_kernels.h; hard_term_lanes.h) rides in the bucket's passes:
// the chunk sums add Z_1 = sum exp(s - m_1) over the whole row at T != 1 (at T = 1, log Z is its
// log-sum-exp) and sum (s - m_1) with label smoothing; the gradient sweep adds f_h (q_1 - eps / V)
// (from the kept exponentials at T = 1) and the label's pull. At an integer T = n in [2, 8]
// (IntegerPower, hard_term_lanes.h) no exponential is added at all: the complement's exp(s - shift_c)
// is the n-th power of its kept exp((s - shift_c) / T), summed and reused by the gradient sweep, and
// the support's K terms join Z_1 in double from the gathered logits. With the hard term, renormalize runs
// the bucket's passes too (the cross-entropy needs the whole row), and with no teacher at all
// (K = 0, the support empty) the bucket's soft term is exactly 0: the kernel is then a fused
// cross-entropy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../sparse_kl_common.h"
#include "cpu_kernels.h"
#include "hard_term_lanes.h"
#include "row_loop.h"
#include "vec_lanes.h"

namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE {
namespace {

// What marking a row's support found: the problems (SparseRowStatus bits), the used slots, and
// sum_S exp(l) in double.
struct SupportMarks {
  int32_t status;
  int64_t used;
  double mass;
};

// The complement's online softmax: b_j relative to the shift m (in units of b = s / T, in double:
// the log of the complement's largest chunk sum, or 0 when the complement is empty),
// Z = sum exp(b_j - m). `defined` is false for a NaN or +inf logit.
// With the hard term also m_1, the raw maximum of the whole row (support included), Z_1 = sum exp(s - m_1)
// (T != 1) and sum (s - m_1) (label smoothing). At an integer temperature m_1 is the largest chunk
// shift instead (the support's maximum may lie above it) and Z_1 sums over the complement only.
template <typename acc_t>
struct RestState {
  double m;
  acc_t z;
  bool defined;
  acc_t m_1, z_1, sum_s;
};

// One chunk's hard-term sums relative to its raw maximum `shift`.
template <typename acc_t>
struct HardChunk {
  acc_t shift, z_1, sum_s;
};

template <typename scalar_t, bool kHard>
struct SparseRowSolver {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using Exp = NonPositiveExp<acc_t>;
  static constexpr int64_t kStep = L::kStep;
  static constexpr int64_t kChunk = 1024;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  static constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

  const SparseRowsProblem& pr;
  acc_t* outside;       // (padded V): 0, and -inf on the current row's support (restored after the row)
  acc_t* exps;          // (padded V): exp(b + outside - chunk shift) of the current row, for the gradient
  acc_t* chunk_shift;   // per chunk: its shift (a raw logit), then (after the merge) its scale e^(shift / T - m)
  acc_t* chunk_z;       // per chunk: its sum relative to its shift

  static acc_t shift_of(acc_t m) { return m == kNegInf ? acc_t(0) : m; }

  const scalar_t* student_row(int64_t row) const {
    return static_cast<const scalar_t*>(pr.student) + pr.student_rows.offset(row);
  }
  scalar_t* grad_row(int64_t row) const {
    return pr.grad_student ? static_cast<scalar_t*>(pr.grad_student) + row * pr.vocab : nullptr;
  }
  acc_t* grad_logprobs_row(int64_t row) const {
    return pr.grad_logprobs ? static_cast<acc_t*>(pr.grad_logprobs) + row * pr.slots : nullptr;
  }
  static bool used(acc_t l) { return l != kNegInf; }  // NaN counts as used: it poisons the row

  // Marks the used, in-range slots' tokens in `outside`, reporting what is wrong with the support.
  SupportMarks mark(const int64_t* idx, const acc_t* lp) const {
    SupportMarks marks{0, 0, 0.0};
    double* support_p = support_scratch + pr.slots;
    for (int64_t k = 0; k < pr.slots; ++k) {
      support_p[k] = 0.0;
      if (!used(lp[k])) continue;
      ++marks.used;
      const int64_t i = idx[k];
      if (i < 0 || i >= pr.vocab) {
        marks.status |= kSlotOutOfRange;
        continue;
      }
      if (outside[i] == kNegInf) marks.status |= kDuplicateSlot;
      outside[i] = kNegInf;
      support_p[k] = std::exp(static_cast<double>(lp[k]));
      marks.mass += support_p[k];
    }
    if (!pr.renormalize && marks.mass > 1.0 + pr.mass_tolerance) marks.status |= kMassAboveOne;
    return marks;
  }

  void unmark(const int64_t* idx, const acc_t* lp) const {
    for (int64_t k = 0; k < pr.slots; ++k) {
      if (used(lp[k]) && idx[k] >= 0 && idx[k] < pr.vocab) outside[idx[k]] = acc_t(0);
    }
  }

  // Loss, gradients: a masked row (0) or an undefined one (NaN; the log-prob gradient only on used
  // slots unless `all_slots`).
  void fill_row(int64_t row, double value, const acc_t* lp, bool all_slots) const {
    static_cast<acc_t*>(pr.row_loss)[row] = static_cast<acc_t>(value);
    if constexpr (kHard) static_cast<acc_t*>(pr.hard.row_hard)[row] = static_cast<acc_t>(value);
    if (scalar_t* ds = grad_row(row)) std::fill_n(ds, pr.vocab, static_cast<scalar_t>(value));
    if (acc_t* dl = grad_logprobs_row(row)) {
      for (int64_t k = 0; k < pr.slots; ++k) dl[k] = all_slots || used(lp[k]) ? static_cast<acc_t>(value) : acc_t(0);
    }
  }

  // A chunk's maximum of the raw logits, with the support left out (`exact`) or not. The fast one
  // may drop a NaN (one instruction on AVX2): chunk_sums finds NaN itself.
  template <bool kExact>
  C10_ALWAYS_INLINE acc_t chunk_max(const scalar_t* sc, const acc_t* oc, int64_t len) const {
    Vec m_lo(kNegInf), m_hi(kNegInf);
    for_each_lane_step<kStep>(len, [&](int64_t i, auto n) {
      Vec lo, hi;
      L::load(sc + i, n, kNegInf, lo, hi);
      if constexpr (kExact) {
        m_lo = at::vec::maximum(m_lo, lo + Vec::loadu(oc + i));
        m_hi = at::vec::maximum(m_hi, hi + Vec::loadu(oc + i + L::kVec));
      } else {
        m_lo = running_max(m_lo, lo);
        m_hi = running_max(m_hi, hi);
      }
    });
    return at::vec::vec_reduce_all<acc_t>([](Vec x, Vec y) { return at::vec::maximum(x, y); },
                                          at::vec::maximum(m_lo, m_hi));
  }

  // sum exp((s - shift) / T + outside) over a chunk (the support's terms are exp(-inf) = 0), the
  // exponentials kept when `keep`; NaN when the chunk holds a NaN logit. The shift is a raw logit,
  // subtracted before scaling, so that the maximum's term is exactly exp(0) however large |s| / T is.
  // kHard: also the hard term's sums of the chunk relative to hard.shift (its raw maximum; at an
  // integer temperature the chunk's `shift`, and Z_1 over the complement only: the powers of e).
  // How the hard term's Z_1 is summed (a compile-time choice, so that the exponential's loop carries
  // only what it needs): not at all (T = 1, where log Z is its log-sum-exp, or no hard term), by an
  // exponential of its own, or as powers of the kept exponentials (an integer temperature).
  enum Z1Sum { kNoZ1, kExpZ1, kPowerZ1 };

  acc_t chunk_sums(const scalar_t* sc, const acc_t* oc, acc_t* kc, int64_t len, acc_t shift, bool keep,
                   HardChunk<acc_t>& hard) const {
    if (!kHard || pr.inv_temperature == 1.0) return chunk_sums_with<kNoZ1>(sc, oc, kc, len, shift, keep, hard);
    if (hard_power.n != 0) return chunk_sums_with<kPowerZ1>(sc, oc, kc, len, shift, keep, hard);
    return chunk_sums_with<kExpZ1>(sc, oc, kc, len, shift, keep, hard);
  }

  template <Z1Sum kZ1>
  C10_ALWAYS_INLINE acc_t chunk_sums_with(const scalar_t* sc, const acc_t* oc, acc_t* kc, int64_t len, acc_t shift,
                                          bool keep, HardChunk<acc_t>& hard) const {
    const Vec vinv_t(static_cast<acc_t>(pr.inv_temperature)), vshift(shift);
    Vec z_lo(0), z_hi(0), nan_probe(0);  // nan_probe sums the arguments, <= 0 or -inf unless one is NaN
    const bool hard_sum = kHard && pr.hard.smoothing != 0.0;
    const Vec vneg_s(-hard.shift);
    Vec z1(0), z1_hi(0), sum_s(0);  // z1_hi: a second chain for the powers (integer temperature)
    for_each_lane_step<kStep>(len, [&](int64_t i, auto n) {
      __builtin_prefetch(sc + i + kChunk);
      Vec lo, hi;
      L::load(sc + i, n, kNegInf, lo, hi);
      const Vec a_lo = (lo - vshift) * vinv_t + Vec::loadu(oc + i);
      const Vec a_hi = (hi - vshift) * vinv_t + Vec::loadu(oc + i + L::kVec);
      Vec live_lo, live_hi;
      const Vec e_lo = Exp::exp(a_lo, live_lo), e_hi = Exp::exp(a_hi, live_hi);
      z_lo += e_lo;
      z_hi += e_hi;
      nan_probe += a_lo + a_hi;
      if (keep) {
        e_lo.store(kc + i);
        e_hi.store(kc + i + L::kVec);
      }
      if constexpr (kHard) {
        if constexpr (kZ1 == kPowerZ1) {
          z1 = hard_power.accumulate(e_lo, z1);
          z1_hi = hard_power.accumulate(e_hi, z1_hi);
        } else if constexpr (kZ1 == kExpZ1) {
          z1 += Exp::exp(lo + vneg_s, live_lo) + Exp::exp(hi + vneg_s, live_hi);
        }
        if (hard_sum) {
          if (n != kStep) L::load(sc + i, n, hard.shift, lo, hi);  // the tail's padding adds 0, not -inf
          sum_s += (lo + vneg_s) + (hi + vneg_s);
        }
      }
    });
    if constexpr (kHard) {
      hard.z_1 = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), z1 + z1_hi);
      hard.sum_s = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), sum_s);
    }
    const acc_t z = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), z_lo + z_hi);
    return std::isnan(at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), nan_probe)) ? std::numeric_limits<acc_t>::quiet_NaN() : z;
  }

  // The complement's softmax over the row, chunk by chunk (see the file's comment). A chunk is
  // shifted by its maximum, support included (the fast maximum reads nothing but s); when a support
  // logit there dominates the rest so far that the rest's sum falls below e^-60 (its terms may have
  // passed the exponential's e^-87 floor), the chunk is done again with the support left out of the
  // maximum. The chunks then merge in the log domain, M = max_c (shift_c / T + log Z_c), in double
  // (shift_c / T is exact there for float logits), so that the row's shift is the complement's and
  // chunk_shift[c] becomes e^(shift_c / T - M) (at most e^60).
  RestState<acc_t> rest_state(const scalar_t* s, bool keep) const {
    const int64_t V = pr.vocab;
    const double inv_t = static_cast<double>(static_cast<acc_t>(pr.inv_temperature));
    constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
    const acc_t kTiny = std::exp(acc_t(-60));
    RestState<acc_t> st{-INFINITY, acc_t(0), false, kNegInf, acc_t(0), acc_t(0)};
    const int64_t n_chunks = (V + kChunk - 1) / kChunk;
    double row_log = -INFINITY;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t begin = c * kChunk, len = std::min(kChunk, V - begin);
      const scalar_t* sc = s + begin;
      const acc_t* oc = outside + begin;
      acc_t* kc = keep ? exps + begin : nullptr;
      // Past the check every b + outside - shift lies in [-inf, 0] (or is NaN), NonPositiveExp's range.
      const acc_t raw_max = chunk_max<false>(sc, oc, len);  // support included: the hard term's shift
      acc_t cm = raw_max;
      if (!(cm < kInf)) return st;  // +inf
      HardChunk<acc_t> hard{shift_of(raw_max), acc_t(0), acc_t(0)};
      acc_t z = chunk_sums(sc, oc, kc, len, shift_of(cm), keep, hard);
      if (z < kTiny) {
        cm = chunk_max<true>(sc, oc, len);
        if (!(cm < kInf)) return st;
        // The powers are relative to the soft shift (a chunk with no complement element keeps its
        // raw maximum: its Z_1 is 0 either way).
        if (hard_power.n != 0 && cm != kNegInf) hard.shift = cm;
        z = chunk_sums(sc, oc, kc, len, shift_of(cm), keep, hard);
      }
      if (std::isnan(z)) return st;
      if constexpr (kHard) merge_hard_chunk(st, hard, raw_max == kNegInf, begin, len);
      chunk_shift[c] = shift_of(cm);
      chunk_z[c] = z;
      if (z > 0) row_log = std::max(row_log, static_cast<double>(chunk_shift[c]) * inv_t + std::log(static_cast<double>(z)));
    }
    const double shift = row_log == -INFINITY ? 0.0 : row_log;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const acc_t scale =
          chunk_z[c] > 0 ? static_cast<acc_t>(std::exp(static_cast<double>(chunk_shift[c]) * inv_t - shift)) : acc_t(0);
      st.z += chunk_z[c] * scale;
      chunk_shift[c] = scale;
    }
    st.m = shift;
    st.defined = true;
    return st;
  }

  // Folds one chunk's hard-term sums into the row's, relative to the largest chunk shift so far
  // (`begin` elements came before the chunk; m_1 starts at -inf). A chunk whose logits are all -inf
  // (`empty`, its shift a stand-in 0) adds nothing to Z_1 and leaves the shift alone, or a row of logits
  // near -200 after it would have its Z_1 rescaled by e^-200 to 0; its sum of s is -inf (0 when label
  // smoothing is off and the sum unused), which no later rescaling changes.
  static void merge_hard_chunk(RestState<acc_t>& st, const HardChunk<acc_t>& c, bool empty, int64_t begin,
                               int64_t len) {
    if (empty) {
      st.sum_s += c.sum_s;
      return;
    }
    if (st.m_1 == kNegInf) {  // the first chunk with a logit above -inf
      st.m_1 = c.shift;
      st.z_1 = c.z_1;
      st.sum_s += c.sum_s;
      return;
    }
    if (c.shift > st.m_1) {
      st.z_1 *= std::exp(st.m_1 - c.shift);
      st.sum_s += (st.m_1 - c.shift) * static_cast<acc_t>(begin);
      st.m_1 = c.shift;
    }
    st.z_1 += c.z_1 * std::exp(c.shift - st.m_1);
    st.sum_s += c.sum_s + (c.shift - st.m_1) * static_cast<acc_t>(len);
  }

  void solve(int64_t row) const {
    const int64_t K = pr.slots;
    const int64_t* idx = pr.indices + row * K;
    const acc_t* lp = static_cast<const acc_t*>(pr.logprobs) + row * K;
    pr.status[row] = 0;
    if (pr.mask != nullptr && !pr.mask[row]) return fill_row(row, 0.0, lp, true);
    int64_t label = -1;
    if constexpr (kHard) {
      label = pr.hard.labels[row];
      if (label < 0 || label >= pr.vocab) {  // never read out of bounds
        pr.status[row] = kLabelOutOfRange;
        return fill_row(row, kNaN, lp, true);
      }
    }
    const SupportMarks marks = mark(idx, lp);
    pr.status[row] = marks.status;
    if (marks.status != 0) {
      unmark(idx, lp);
      return fill_row(row, kNaN, lp, true);
    }
    // Renormalized, the soft term reads the support alone; the hard term needs the whole row.
    if (pr.renormalize && !kHard) solve_renormalized(row, idx, lp, marks);
    else solve_bucket(row, idx, lp, marks, label);
    unmark(idx, lp);
  }

  // log(e^a + e^b), -inf when both are.
  static double log_add_exp(double a, double b) {
    const double hi = std::max(a, b), lo = std::min(a, b);
    return hi == -INFINITY ? hi : hi + std::log1p(std::exp(lo - hi));
  }

  // log-sum-exp of the support's b_k (and of l_k for renormalize), in double; -inf for no slot.
  double support_lse(const double* values, const acc_t* lp) const {
    double m = -INFINITY, z = 0.0;
    for (int64_t k = 0; k < pr.slots; ++k) {
      if (used(lp[k])) m = std::max(m, values[k]);
    }
    if (std::isnan(m)) return m;
    if (m == -INFINITY || m == INFINITY) return m;
    for (int64_t k = 0; k < pr.slots; ++k) {
      if (used(lp[k])) z += std::exp(values[k] - m);
    }
    return m + std::log(z);
  }

  // b_k = s[i_k] / T of the used slots (double), NaN when any is NaN; unused slots get -inf. The
  // product with the acc_t 1/T is exact in double, and so the same b as the complement's pass uses.
  void gather_support(const scalar_t* s, const int64_t* idx, const acc_t* lp, double* b) const {
    const double inv_t = static_cast<double>(static_cast<acc_t>(pr.inv_temperature));
    for (int64_t k = 0; k < pr.slots; ++k) {
      b[k] = used(lp[k]) ? static_cast<double>(static_cast<acc_t>(s[idx[k]])) * inv_t : -INFINITY;
    }
  }

  // The hard term of a defined row: writes CE, returns what the gradient needs (with q_1 in double at
  // the support's slots: exp(b_k - log_z1) at T = 1, exp(s_k - log_z1) otherwise).
  // CE = (log Z_1 - m_1) + (1 - eps)(m_1 - s_y) + eps (m_1 - mean s), differences before sums.
  // At an integer temperature rest.z_1 is the complement's: the support's exp(s_k - m_1) join it here.
  HardGradient<acc_t> hard_term(int64_t row, const scalar_t* s, const int64_t* idx, const acc_t* lp, int64_t y,
                                const RestState<acc_t>& rest, double log_z, double& log_z1) const {
    const bool unit = pr.inv_temperature == 1.0;
    const double eps = pr.hard.smoothing, V = static_cast<double>(pr.vocab), m_1 = rest.m_1;
    log_z1 = unit ? log_z : m_1 + std::log(static_cast<double>(rest.z_1));
    if (!unit && hard_power.n != 0) {
      double* raw = support_scratch + 2 * pr.slots;  // the support's raw logits s_k
      for (int64_t k = 0; k < pr.slots; ++k) {
        raw[k] = used(lp[k]) ? static_cast<double>(static_cast<acc_t>(s[idx[k]])) : -INFINITY;
      }
      log_z1 = log_add_exp(support_lse(raw, lp), log_z1);
    }
    double ce = (log_z1 - m_1) + (1.0 - eps) * (m_1 - static_cast<double>(static_cast<acc_t>(s[y])));
    if (eps != 0.0) ce -= eps * static_cast<double>(rest.sum_s) / V;
    static_cast<acc_t*>(pr.hard.row_hard)[row] = static_cast<acc_t>(ce);
    const double f_h = pr.hard.grad_factor;
    return {static_cast<acc_t>(unit ? 0.0 : f_h / static_cast<double>(rest.z_1)), rest.m_1,
            static_cast<acc_t>(f_h * eps / V), static_cast<acc_t>(f_h * (1.0 - eps)), y, unit || hard_power.n != 0};
  }

  // The renormalized soft term's statistics from the support: lse of b_k and of l_k, and KL(p~ || q~).
  struct Renormalized {
    double lse_q, lse_p, kl;
  };

  Renormalized renormalized(const double* b, const double* l, const acc_t* lp) const {
    Renormalized r{support_lse(b, lp), support_lse(l, lp), 0.0};
    if (!std::isfinite(r.lse_q) || !std::isfinite(r.lse_p)) {
      r.kl = kNaN;
      return r;
    }
    for (int64_t k = 0; k < pr.slots; ++k) {
      if (!used(lp[k])) continue;
      const double log_pt = l[k] - r.lse_p, pt = std::exp(log_pt);
      if (pt != 0.0) r.kl += pt * (log_pt - (b[k] - r.lse_q));
    }
    return r;
  }

  // ds_{i_k} = f (q~_k - p~_k) and dl_k = f_l p~_k (log p~_k - log q~_k - KL) of the renormalized term.
  double renormalized_ds(const Renormalized& r, double b, double l) const {
    return pr.student_factor * (std::exp(b - r.lse_q) - std::exp(l - r.lse_p));
  }
  double renormalized_dl(const Renormalized& r, double b, double l, bool live) const {
    const double log_pt = l - r.lse_p, pt = live ? std::exp(log_pt) : 0.0;
    return pt != 0.0 ? pr.logprobs_factor * pt * (log_pt - (b - r.lse_q) - r.kl) : 0.0;
  }

  // The bucket, and with the hard term any soft term (bucket, renormalized, or none: K = 0): the
  // complement's streaming pass, then the loss, the gradient sweep and the support's slots.
  void solve_bucket(int64_t row, const int64_t* idx, const acc_t* lp, const SupportMarks& marks, int64_t label) const {
    const int64_t K = pr.slots;
    const scalar_t* s = student_row(row);
    scalar_t* ds = grad_row(row);
    const RestState<acc_t> rest = rest_state(s, ds != nullptr);
    double* b = support_scratch;
    gather_support(s, idx, lp, b);
    const double lse_support = support_lse(b, lp);
    const double log_rest = rest.z > 0 ? rest.m + std::log(static_cast<double>(rest.z)) : -INFINITY;
    const double log_z = log_add_exp(lse_support, log_rest);
    // A NaN or +inf logit, or every logit -inf, leaves the softmax undefined.
    if (!rest.defined || !std::isfinite(log_z)) return fill_row(row, kNaN, lp, false);

    const double log_qr = log_rest - log_z;
    // No bucket when the support covers the vocabulary (its mass deficit is rounding) or holds all
    // of the teacher's mass (up to the tolerance that mark() enforced).
    const double p_r = marks.used == pr.vocab ? 0.0 : std::max(1.0 - marks.mass, 0.0);
    // exp(l_k) of the used slots (bucket), or l_k (renormalized), from mark(); the renormalized stats.
    double* p = support_scratch + K;
    Renormalized renorm{};
    if (pr.renormalize) {
      for (int64_t k = 0; k < K; ++k) p[k] = static_cast<double>(lp[k]);
      renorm = renormalized(b, p, lp);
      if (marks.used != 0 && std::isnan(renorm.kl)) return fill_row(row, kNaN, lp, false);
      static_cast<acc_t*>(pr.row_loss)[row] = static_cast<acc_t>(marks.used == 0 ? 0.0 : renorm.kl);
    } else {
      double loss = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        if (used(lp[k]) && p[k] != 0.0) loss += p[k] * (static_cast<double>(lp[k]) - (b[k] - log_z));
      }
      if (p_r != 0.0) loss += p_r * (std::log(p_r) - log_qr);
      static_cast<acc_t*>(pr.row_loss)[row] = static_cast<acc_t>(loss);
    }
    HardGradient<acc_t> hard{};
    double log_z1 = log_z;
    if constexpr (kHard) hard = hard_term(row, s, idx, lp, label, rest, log_z, log_z1);

    const double total = marks.mass + p_r;  // P
    if (ds != nullptr) {
      const double f = pr.student_factor;
      // Off the support ds_j = f (P q_r - p_r) q_j / q_r, and q_j / q_r = exp(b_j - m_r) / Z_r
      // (renormalized: 0); with the hard term f_h q_1_j = f_h exp(b_j - m_r) e^(m_r - log Z) at T = 1,
      // and at an integer T = n f_h exp(b_j - m_r)^n e^(n m_r - log Z_1) (the chunk's scale to the n-th
      // power too; e^(n m_r - log Z_1) <= 1024^n, the product <= 1).
      const double rest_coef =
          rest.z > 0 && !pr.renormalize ? f * (total * std::exp(log_qr) - p_r) / static_cast<double>(rest.z) : 0.0;
      const int power = pr.inv_temperature == 1.0 ? 1 : hard_power.n;
      const double q1_coef = kHard ? pr.hard.grad_factor * std::exp(power * static_cast<double>(rest.m) - log_z1) : 0.0;
      const int64_t n_chunks = (pr.vocab + kChunk - 1) / kChunk;
      const bool streaming = L::streaming_ok(ds);
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t begin = c * kChunk, len = std::min(kChunk, pr.vocab - begin);
        const Vec coef(static_cast<acc_t>(rest_coef * chunk_shift[c]));
        double scale_power = 1.0;  // a loop, not std::pow: one call per chunk of every row adds up
        for (int k = 0; k < power; ++k) scale_power *= static_cast<double>(chunk_shift[c]);
        const Vec q1_f(static_cast<acc_t>(q1_coef * scale_power));
        const acc_t* kc = exps + begin;
        for_each_lane_step<kStep>(len, [&](int64_t i, auto n) {
          const Vec e_lo = Vec::loadu(kc + i), e_hi = Vec::loadu(kc + i + L::kVec);
          Vec h_lo(acc_t(0)), h_hi(acc_t(0));
          if constexpr (kHard) {
            if (power > 1) {  // f_h q_1 = e (e^(n - 1) q1_f) lane by lane
              hard_gradient_step(hard, s, begin + i, n, e_lo, e_hi, hard_power.times_power(e_lo, q1_f),
                                 hard_power.times_power(e_hi, q1_f), h_lo, h_hi);
            } else {
              hard_gradient_step(hard, s, begin + i, n, e_lo, e_hi, q1_f, q1_f, h_lo, h_hi);
            }
          }
          L::store_step(ds + begin + i, n, at::vec::fmadd(e_lo, coef, h_lo), at::vec::fmadd(e_hi, coef, h_hi), streaming);
        });
      }
      if (streaming) stream_fence();
      for (int64_t k = 0; k < K; ++k) {
        if (!used(lp[k])) continue;
        double g = pr.renormalize ? renormalized_ds(renorm, b[k], p[k]) : f * (total * std::exp(b[k] - log_z) - p[k]);
        if constexpr (kHard) {
          const double x = pr.inv_temperature == 1.0 ? b[k] : static_cast<double>(static_cast<acc_t>(s[idx[k]]));
          g += pr.hard.grad_factor * (std::exp(x - log_z1) - pr.hard.smoothing / static_cast<double>(pr.vocab));
          if (idx[k] == label) g -= pr.hard.grad_factor * (1.0 - pr.hard.smoothing);
        }
        ds[idx[k]] = static_cast<scalar_t>(g);
      }
    }
    if (acc_t* dl = grad_logprobs_row(row)) {
      const double c_tail = p_r != 0.0 ? log_qr - std::log(p_r) : 1.0;
      for (int64_t k = 0; k < K; ++k) {
        const bool live = used(lp[k]) && p[k] != 0.0;
        if (pr.renormalize) {
          dl[k] = static_cast<acc_t>(renormalized_dl(renorm, b[k], p[k], used(lp[k])));
        } else {
          dl[k] = static_cast<acc_t>(live ? pr.logprobs_factor * p[k] * (static_cast<double>(lp[k]) - (b[k] - log_z) + c_tail) : 0.0);
        }
      }
    }
  }

  void solve_renormalized(int64_t row, const int64_t* idx, const acc_t* lp, const SupportMarks& marks) const {
    const int64_t K = pr.slots;
    const scalar_t* s = student_row(row);
    scalar_t* ds = grad_row(row);
    if (ds != nullptr) std::fill_n(ds, pr.vocab, scalar_t(0));
    if (marks.used == 0) return fill_row(row, 0.0, lp, true);  // no support: nothing to match
    double* b = support_scratch;
    double* l = support_scratch + K;
    gather_support(s, idx, lp, b);
    for (int64_t k = 0; k < K; ++k) l[k] = static_cast<double>(lp[k]);
    const Renormalized r = renormalized(b, l, lp);
    if (std::isnan(r.kl)) return fill_row(row, kNaN, lp, false);  // +inf is a true value
    static_cast<acc_t*>(pr.row_loss)[row] = static_cast<acc_t>(r.kl);
    if (ds != nullptr) {
      for (int64_t k = 0; k < K; ++k) {
        if (used(lp[k])) ds[idx[k]] = static_cast<scalar_t>(renormalized_ds(r, b[k], l[k]));
      }
    }
    if (acc_t* dl = grad_logprobs_row(row)) {
      for (int64_t k = 0; k < K; ++k) dl[k] = static_cast<acc_t>(renormalized_dl(r, b[k], l[k], used(lp[k])));
    }
  }

  double* support_scratch;  // 3 K doubles: the support's b_k, then exp(l_k) (bucket) or l_k (renormalize),
                            // then (the hard term at an integer temperature) its raw logits s_k
  // kHard at an integer T = n in [2, 8]: x -> x^n, exp(s - shift) from the kept exp((s - shift) / T).
  const IntegerPower<acc_t> hard_power{kHard ? integer_temperature(pr.inv_temperature) : 0};
};

template <typename scalar_t, bool kHard>
void sparse_kl_rows_typed(const SparseRowsProblem& pr) {
  using Solver = SparseRowSolver<scalar_t, kHard>;
  using acc_t = typename Solver::acc_t;
  const int64_t padded = (pr.vocab + Solver::kStep - 1) / Solver::kStep * Solver::kStep;
  const int64_t n_chunks = (pr.vocab + Solver::kChunk - 1) / Solver::kChunk;
  const bool keep = pr.grad_student != nullptr && (!pr.renormalize || kHard);
  // Per task: outside (padded V), the kept exponentials (padded V when a gradient is wanted), two
  // values per chunk, and 3 K doubles (as 6 K acc_t at most) for the support.
  const int64_t rows_scratch = padded + (keep ? padded : 0);
  const int64_t support_elems = 3 * pr.slots * static_cast<int64_t>(sizeof(double) / sizeof(acc_t) + 1);
  parallel_rows<acc_t>(pr.rows, pr.vocab, rows_scratch + 2 * n_chunks + support_elems,
                       [&](acc_t* scratch, int64_t begin, int64_t end) {
    std::fill_n(scratch, padded, acc_t(0));
    acc_t* tail = scratch + rows_scratch + 2 * n_chunks;
    // Doubles start on an 8-byte boundary (acc_t may be float).
    auto* support = reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(tail) + 7) & ~uintptr_t(7));
    const Solver solver{pr, scratch, keep ? scratch + padded : nullptr, scratch + rows_scratch,
                        scratch + rows_scratch + n_chunks, support};
    for (int64_t row = begin; row < end; ++row) solver.solve(row);
  });
}

}  // namespace

void sparse_kl_rows(c10::ScalarType dtype, const SparseRowsProblem& problem) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_fused_cpu_sparse_kl_rows", [&] {
    with_flag(problem.hard.labels != nullptr,
              [&](auto hard) { sparse_kl_rows_typed<scalar_t, decltype(hard)::value>(problem); });
  });
}

}  // namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE
