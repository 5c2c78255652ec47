// CPU row kernels of kl_fused, vectorised with at::vec. Not a normal header: each file that
// includes it (kernels_generic.cpp, kernels_avx2.cpp) first defines KL_FUSED_CPU_NAMESPACE and,
// for AVX2, the CPU_CAPABILITY macros, so that at::vec compiles for that instruction set.
//
// One row (math in kl_div_common.h), V elements of e bytes each, acc = float (double for float64),
// in chunks of kChunk elements (each chunk is one mergeable partial state, as in the design notes):
//   pass 1  chunk maxima: m_s, m_t                 reads s, t of the chunk (2e per element, the
//                                                  only read from memory: prefetched during the
//                                                  previous chunk's pass 2)
//   pass 2  chunk sums:   Z_a, Z_b, W relative to the chunk's maxima; keeps exp(a'), exp(b') in a
//                         per-thread scratch row when a gradient is wanted    reads s, t from L1
//   merge   the chunk states, rescaled to the row maxima -> KL     O(V / kChunk) scalars
//   pass 3  gradient, forward direction, student:  ds = (q - p) * f     reads scratch, writes ds (e)
//                    teacher: dt = p (log p - log q - KL) * f          reads s, t again, writes dt
//                    reverse direction swaps the roles: ds = q (log q - log p - KL) f, dt = (p - q) f
// with f = d(loss)/d(row loss) / T. The gradients are written with non-temporal stores where a row is
// 32-byte aligned (Lanes::store_step): no read-for-ownership of lines never read back.
// The hard term (kHard, HardTerm in cpu_kernels.h) rides in the same passes: at T = 1 its log-sum-exp
// is the student's Z_b (nothing more per element); at T != 1 pass 2 adds Z_1 = sum exp(s - m_s) (one
// exponential, m_s = m_b the raw student maximum), keeping exp(s - chunk shift) in a third scratch row
// when ds is wanted, and with label smoothing sum (s - m_s); pass 3 adds f_h (q_1 - eps / V) to ds
// (q_1 from the kept exponentials: q at T = 1, the third row at T != 1) and -f_h (1 - eps) at the label,
// in the same store. At an integer T = n in [2, 8] (IntegerPower in hard_term_lanes.h) the hard term
// takes exp(s - shift) as the n-th power of the student's exp((s - shift) / T), kept in scratch_b
// anyway: no exponential and no scratch row of its own. Two exponentials per element in all (the
// floor on a CPU), three with the hard term at a T != 1 that is not such an integer;
// memory traffic is the 2e of the inputs plus e per gradient written. Rows run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "cpu_kernels.h"
#include "hard_term_lanes.h"
#include "row_loop.h"
#include "vec_lanes.h"

namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE {
namespace {

using at::vec::Vectorized;

// One chunk's partial state: its shifts (the chunk's maxima of the raw logits t and s, or 0 for a
// side that is all -inf there) and, relative to them, Z_a = sum exp(a'), Z_b = sum exp(b'),
// W = sum exp(x')(x' - y'), with a' = (t - shift_a) / T, b' = (s - shift_b) / T. With the hard term
// also, relative to the same raw student shift, Z_1 = sum exp(s - shift_b) (T != 1 only) and
// sum (s - shift_b) (label smoothing only).
template <typename acc_t>
struct ChunkState {
  acc_t shift_a, shift_b, z_a, z_b, w;
  acc_t z_1, sum_s;
};

// A row's (or a shard of a row's) merged partial state; see RowSolver::gather. m_a, m_b are maxima
// of the raw logits (t, s), not of a = t / T and b = s / T. z_1, sum_s: the hard term's statistics
// of the raw student logits relative to m_b (kHard only).
template <typename acc_t>
struct RowState {
  acc_t m_a, m_b, z_a, z_b, w;
  bool defined;
  acc_t z_1, sum_s;
};


// One row's solution. kReverse picks the direction at compile time: the expectation is over
// x = a (teacher) for forward KL and x = b (student) for reverse KL. kHard adds the hard term.
template <typename scalar_t, bool kReverse, bool kHard = false>
struct RowSolver {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using Exp = NonPositiveExp<acc_t>;
  static constexpr int64_t kVec = L::kVec;
  static constexpr int64_t kStep = L::kStep;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Rows are processed in chunks of kChunk elements (a multiple of kStep; 2 KiB of bfloat16 per
  // input, so a chunk's maxima pass reads what the previous chunk's prefetches brought to L1).
  static constexpr int64_t kChunk = 1024;

  const KLRowsProblem& pr;
  acc_t* scratch_a;              // exp(a - chunk shift) of the current row, padded to a multiple of kStep
  acc_t* scratch_b;              // exp(b - chunk shift)
  ChunkState<acc_t>* chunks;     // one per chunk of the current row
  acc_t* chunk_scales;           // two per chunk: e^((shift_a - m_a) / T), e^((shift_b - m_b) / T)
  // kHard at T != 1 with a student gradient: exp(s - chunk shift_b), the hard term's exponentials,
  // kept by pass 2 so that pass 3 needs none of its own (3 exponentials per element, not 4). Not
  // used at an integer temperature, whose hard term takes powers of scratch_b instead.
  acc_t* scratch_1 = nullptr;
  // kHard at an integer T = n in [2, 8]: x -> x^n, exp(s - shift) from the student's exp((s - shift) / T).
  const IntegerPower<acc_t> hard_power{kHard ? integer_temperature(pr.inv_temperature) : 0};

  static Vec max_reduce(Vec x, Vec y) { return at::vec::maximum(x, y); }

  // The shift of a side whose maximum is m: m itself, or 0 where the side is all -inf (its
  // exponentials are then 0 whatever the shift, and -inf - (-inf) would be NaN).
  static acc_t shift_of(acc_t m) { return m == kNegInf ? acc_t(0) : m; }

  // running_max (vec_lanes.h) may drop a NaN: pass 2 finds NaN itself.

  // body(i, n) over the row in steps of this solver's kStep (vec_lanes.h).
  template <typename Body>
  C10_ALWAYS_INLINE static void for_each_step(int64_t V, const Body& body) {
    for_each_lane_step<kStep>(V, body);
  }

  void fill_gradients(int64_t row, scalar_t value) const {
    const int64_t V = pr.vocab;
    if (pr.grad_student) std::fill_n(static_cast<scalar_t*>(pr.grad_student) + row * V, V, value);
    if (pr.grad_teacher) std::fill_n(static_cast<scalar_t*>(pr.grad_teacher) + row * V, V, value);
  }

  // A row that does not count: loss 0, gradient 0, logits (and label) never read.
  void skip(int64_t row) const {
    static_cast<acc_t*>(pr.row_loss)[row] = acc_t(0);
    if constexpr (kHard) {
      static_cast<acc_t*>(pr.hard.row_hard)[row] = acc_t(0);
      pr.hard.status[row] = 0;
    }
    fill_gradients(row, scalar_t(0));
  }

  // A row whose softmax is undefined (a NaN logit, a +inf one, or every logit -inf), or whose label
  // is out of range: the row's loss and gradient are NaN, as the reference's are.
  void undefined(int64_t row) const {
    static_cast<acc_t*>(pr.row_loss)[row] = std::numeric_limits<acc_t>::quiet_NaN();
    if constexpr (kHard) static_cast<acc_t*>(pr.hard.row_hard)[row] = std::numeric_limits<acc_t>::quiet_NaN();
    fill_gradients(row, std::numeric_limits<scalar_t>::quiet_NaN());
  }

  // The hard term's label of a counted row, or -1 (status kLabelOutOfRange, the row undefined) when
  // it lies outside [0, V). Rows of a kernel without the hard term have no label (0).
  int64_t label_of(int64_t row) const {
    if constexpr (!kHard) {
      return 0;
    } else {
      const int64_t y = pr.hard.labels[row];
      const bool inside = y >= 0 && y < pr.vocab;
      pr.hard.status[row] = inside ? 0 : kLabelOutOfRange;
      return inside ? y : -1;
    }
  }

  // The hard term of a defined row from its merged state: writes CE and returns what the gradient
  // pass adds. CE = log Z_1 + (1 - eps)(m_s - s_y) + eps (m_s - mean s), each difference taken
  // before the sum, so that logits of +-1e4 keep their digits.
  HardGradient<acc_t> hard_term(int64_t row, const scalar_t* s, int64_t y, const RowState<acc_t>& st) const {
    const acc_t inv_t = static_cast<acc_t>(pr.inv_temperature);
    const bool unit = inv_t == acc_t(1);
    const acc_t eps = static_cast<acc_t>(pr.hard.smoothing), V = static_cast<acc_t>(pr.vocab);
    // m_s = m_b, the raw student maximum; at T = 1 the student's Z_b is the hard term's Z_1.
    const acc_t m_s = st.m_b, z_1 = unit ? st.z_b : st.z_1;
    acc_t ce = std::log(z_1) + (acc_t(1) - eps) * (m_s - static_cast<acc_t>(s[y]));
    if (eps != acc_t(0)) ce -= eps * st.sum_s / V;  // sum_s = sum (s - m_s)
    static_cast<acc_t*>(pr.hard.row_hard)[row] = ce;
    const acc_t f_h = static_cast<acc_t>(pr.hard.grad_factor);
    return {f_h / z_1, m_s, f_h * eps / V, f_h * (acc_t(1) - eps), y,
            unit || scratch_1 != nullptr || hard_power.n != 0};
  }

  // f_h q_1 per kept exponential in chunk k (kHard): f_h / Z_b times the chunk's scale (T = 1, where
  // q_1 = q and the exponentials are scratch_b's), or f_h / Z_1 e^(shift_b - m_b) (scratch_1's, or
  // the n-th powers of scratch_b's at an integer temperature).
  acc_t hard_factor(int64_t k, const RowState<acc_t>& st) const {
    const acc_t f_h = static_cast<acc_t>(pr.hard.grad_factor);
    if (scratch_1 == nullptr && hard_power.n == 0) return f_h / st.z_b * chunk_scales[2 * k + 1];
    const ChunkState<acc_t>& c = chunks[k];
    return c.z_1 > 0 ? f_h / st.z_1 * std::exp(c.shift_b - shift_of(st.m_b)) : acc_t(0);
  }

  // The hard term's share of ds over the step at row element i (hard_term_lanes.h), from the kept
  // exponentials (scratch_1; else scratch_b, to the n-th power at an integer temperature) times
  // `factor` = hard_factor(k) of the step's chunk.
  C10_ALWAYS_INLINE void hard_step(const HardGradient<acc_t>& hard, const scalar_t* s, int64_t i, int64_t n,
                                   const Vec& factor, Vec& lo, Vec& hi) const {
    const acc_t* kept = scratch_1 != nullptr ? scratch_1 : scratch_b;
    const Vec kept_lo = Vec::loadu(kept + i), kept_hi = Vec::loadu(kept + i + kVec);
    if (hard_power.n != 0) {  // f_h q_1 = x (x^(n - 1) factor) lane by lane
      hard_gradient_step(hard, s, i, n, kept_lo, kept_hi, hard_power.times_power(kept_lo, factor),
                         hard_power.times_power(kept_hi, factor), lo, hi);
    } else {
      hard_gradient_step(hard, s, i, n, kept_lo, kept_hi, factor, factor, lo, hi);
    }
  }

  // Pass 2 over one chunk [begin, begin + len): the sums of one ChunkState, with shifts that are
  // the chunk's own maxima of the raw logits (0 for a side whose chunk is all -inf: its exponentials
  // are then 0). The raw maximum is subtracted before scaling by 1/T, so that the shifted logit is
  // exactly 0 at the maximum however large |logit| / T is (a shift rounded after scaling leaves up
  // to half an ulp of max / T above 0, which overflows the exponential from |logit| / T ~ 1e9).
  // Keeps exp(a'), exp(b') in the scratch row when a gradient is wanted, and prefetches the next
  // chunk, so that the next maxima pass reads from L1 while this one computes.
  C10_ALWAYS_INLINE ChunkState<acc_t> chunk_sums(const scalar_t* s, const scalar_t* t, int64_t begin, int64_t len,
                                                 acc_t shift_a, acc_t shift_b, bool keep, Vec& nan_probe) const {
    const Vec vinv_t(static_cast<acc_t>(pr.inv_temperature)), vshift_a(shift_a), vshift_b(shift_b);
    Vec za(0), zb(0), w(0);
    // The hard term's sums (kHard): Z_1 at T != 1, sum (s - shift_b) with label smoothing.
    const bool hard_z1 = kHard && pr.inv_temperature != 1.0, hard_sum = kHard && pr.hard.smoothing != 0.0;
    const Vec vneg_s(-shift_b);
    Vec z1(0), z1_hi(0), sum_s(0);  // z1_hi: a second chain for the powers (integer temperature)
    s += begin;
    t += begin;
    acc_t* ka = keep ? scratch_a + begin : nullptr;
    acc_t* kb = keep ? scratch_b + begin : nullptr;
    acc_t* k1 = keep && scratch_1 != nullptr ? scratch_1 + begin : nullptr;
    for_each_step(len, [&](int64_t i, auto n) {
      __builtin_prefetch(s + i + kChunk);
      __builtin_prefetch(t + i + kChunk);
      Vec s_lo, s_hi, t_lo, t_hi;
      L::load(s + i, n, kNegInf, s_lo, s_hi);
      L::load(t + i, n, kNegInf, t_lo, t_hi);
      const Vec a_lo = (t_lo - vshift_a) * vinv_t, a_hi = (t_hi - vshift_a) * vinv_t;
      const Vec b_lo = (s_lo - vshift_b) * vinv_t, b_hi = (s_hi - vshift_b) * vinv_t;
      Vec live_a_lo, live_a_hi, live_b_lo, live_b_hi;
      const Vec ea_lo = Exp::exp(a_lo, live_a_lo), ea_hi = Exp::exp(a_hi, live_a_hi);
      const Vec eb_lo = Exp::exp(b_lo, live_b_lo), eb_hi = Exp::exp(b_hi, live_b_hi);
      za += ea_lo + ea_hi;
      zb += eb_lo + eb_hi;
      nan_probe += (a_lo + b_lo) + (a_hi + b_hi);
      if constexpr (kReverse) {
        w += ((eb_lo * (b_lo - a_lo)) & live_b_lo) + ((eb_hi * (b_hi - a_hi)) & live_b_hi);
      } else {
        w += ((ea_lo * (a_lo - b_lo)) & live_a_lo) + ((ea_hi * (a_hi - b_hi)) & live_a_hi);
      }
      if (keep) {
        ea_lo.store(ka + i);
        ea_hi.store(ka + i + kVec);
        eb_lo.store(kb + i);
        eb_hi.store(kb + i + kVec);
      }
      if constexpr (kHard) {
        if (hard_z1 && hard_power.n != 0) {  // exp(s - shift_b) = exp(b')^n
          z1 = hard_power.accumulate(eb_lo, z1);
          z1_hi = hard_power.accumulate(eb_hi, z1_hi);
        } else if (hard_z1) {
          Vec live_lo, live_hi;
          const Vec e1_lo = Exp::exp(s_lo + vneg_s, live_lo), e1_hi = Exp::exp(s_hi + vneg_s, live_hi);
          z1 += e1_lo + e1_hi;
          if (k1 != nullptr) {
            e1_lo.store(k1 + i);
            e1_hi.store(k1 + i + kVec);
          }
        }
        if (hard_sum) {
          if (n == kStep) {
            sum_s += (s_lo + vneg_s) + (s_hi + vneg_s);
          } else {  // the tail, whose padding lanes must add 0, not -inf
            Vec r_lo, r_hi;
            L::load(s + i, n, shift_b, r_lo, r_hi);
            sum_s += (r_lo + vneg_s) + (r_hi + vneg_s);
          }
        }
      }
    });
    const auto total = [](const Vec& x) { return at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), x); };
    return {shift_a, shift_b, total(za), total(zb), total(w), total(z1 + z1_hi), total(sum_s)};
  }

  // Passes 1 and 2 and the merge over row elements [0, V): the row's partial state. m_a, m_b are
  // the maxima of the raw logits t and s (-inf for a side that is all -inf); Z_a, Z_b and W are
  // relative to the shifts m (0 where m is -inf): a' = (t - m_a) / T, b' = (s - m_b) / T. `defined` is false when the row holds a NaN or a +inf, which
  // leave the softmax undefined. With `keep`, the scratch rows hold exp(a - chunk shift) and
  // exp(b - chunk shift) and chunk_scales the factors that rescale them to the row's shifts.
  RowState<acc_t> gather(const scalar_t* s, const scalar_t* t, bool keep) const {
    const int64_t V = pr.vocab;
    const acc_t inv_t = static_cast<acc_t>(pr.inv_temperature);
    constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
    RowState<acc_t> st{kNegInf, kNegInf, 0, 0, 0, false, 0, 0};

    // Chunk by chunk: the chunk's maxima of the raw logits (multiplying by 1/T > 0 keeps the
    // order), then its sums. nan_probe sums a' + b' over the row: <= 0 or -inf, and NaN exactly
    // when the row holds a NaN (which running_max may have dropped).
    Vec nan_probe(0);
    const int64_t n_chunks = (V + kChunk - 1) / kChunk;
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t begin = k * kChunk, len = std::min(kChunk, V - begin);
      Vec ms_lo(kNegInf), ms_hi(kNegInf), mt_lo(kNegInf), mt_hi(kNegInf);
      for_each_step(len, [&](int64_t i, auto n) {
        Vec lo, hi;
        L::load(s + begin + i, n, kNegInf, lo, hi);
        ms_lo = running_max(ms_lo, lo);
        ms_hi = running_max(ms_hi, hi);
        L::load(t + begin + i, n, kNegInf, lo, hi);
        mt_lo = running_max(mt_lo, lo);
        mt_hi = running_max(mt_hi, hi);
      });
      const acc_t cm_b = at::vec::vec_reduce_all<acc_t>(max_reduce, at::vec::maximum(ms_lo, ms_hi));
      const acc_t cm_a = at::vec::vec_reduce_all<acc_t>(max_reduce, at::vec::maximum(mt_lo, mt_hi));
      // Past this check every shifted logit lies in [-inf, 0] (or is NaN), the range
      // NonPositiveExp serves.
      if (!(cm_a < kInf) || !(cm_b < kInf)) return st;
      st.m_a = std::max(st.m_a, cm_a);
      st.m_b = std::max(st.m_b, cm_b);
      chunks[k] = chunk_sums(s, t, begin, len, shift_of(cm_a), shift_of(cm_b), keep, nan_probe);
    }
    if (std::isnan(at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), nan_probe))) return st;

    // Merge the chunks (the design notes' merge of partial states): rescale each chunk's sums
    // from its shifts to the row's. A chunk whose side is all -inf (Z = 0) contributes nothing,
    // and is skipped so that 0 * e^(0 - m) cannot overflow into NaN. So does a chunk whose scale
    // underflows to 0 (its terms have weight 0 in the row, as the exponential floor gives them
    // within a chunk): its shift difference times Z may overflow (a logit of 1e37 elsewhere in
    // the row), and 0 * inf would be NaN.
    const acc_t sa = shift_of(st.m_a), sb = shift_of(st.m_b);
    for (int64_t k = 0; k < n_chunks; ++k) {
      const ChunkState<acc_t>& c = chunks[k];
      const acc_t scale_a = c.z_a > 0 ? std::exp((c.shift_a - sa) * inv_t) : acc_t(0);
      const acc_t scale_b = c.z_b > 0 ? std::exp((c.shift_b - sb) * inv_t) : acc_t(0);
      st.z_a += c.z_a * scale_a;
      st.z_b += c.z_b * scale_b;
      // x' - y' against the row's shifts = against the chunk's - (s_x - shift_x) / T + (s_y - shift_y) / T.
      if constexpr (kReverse) {
        if (scale_b > 0) st.w += scale_b * (c.w + ((sa - c.shift_a) - (sb - c.shift_b)) * inv_t * c.z_b);
      } else {
        if (scale_a > 0) st.w += scale_a * (c.w + ((sb - c.shift_b) - (sa - c.shift_a)) * inv_t * c.z_a);
      }
      chunk_scales[2 * k] = scale_a;
      chunk_scales[2 * k + 1] = scale_b;
      if constexpr (kHard) {  // the hard term's sums, to the row's student shift likewise
        if (c.z_1 > 0) st.z_1 += c.z_1 * std::exp(c.shift_b - sb);
        st.sum_s += c.sum_s + (c.shift_b - sb) * static_cast<acc_t>(std::min(kChunk, V - k * kChunk));
      }
    }
    st.defined = true;
    return st;
  }

  // kl_row_states: the row's partial state for a vocab-parallel merge across ranks, as
  // (m_a, m_b, Z_a, Z_b, W), m_a and m_b the maxima of the raw logits. A row that does not count is the empty state (-inf, -inf, 0, 0, 0);
  // an undefined one (-inf, -inf, NaN, NaN, NaN), which poisons any merge it enters.
  void write_state(int64_t row) const {
    acc_t* out = static_cast<acc_t*>(pr.row_states) + 5 * row;
    RowState<acc_t> st{kNegInf, kNegInf, 0, 0, 0, true, 0, 0};
    if (pr.mask == nullptr || pr.mask[row]) {
      st = gather(static_cast<const scalar_t*>(pr.student) + pr.student_rows.offset(row),
                  static_cast<const scalar_t*>(pr.teacher) + pr.teacher_rows.offset(row), false);
    }
    if (!st.defined) {
      constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
      st = {kNegInf, kNegInf, kNaN, kNaN, kNaN, false, 0, 0};
    }
    out[0] = st.m_a;
    out[1] = st.m_b;
    out[2] = st.z_a;
    out[3] = st.z_b;
    out[4] = st.w;
  }

  void solve(int64_t row) const {
    const int64_t V = pr.vocab;
    const scalar_t* s = static_cast<const scalar_t*>(pr.student) + pr.student_rows.offset(row);
    const scalar_t* t = static_cast<const scalar_t*>(pr.teacher) + pr.teacher_rows.offset(row);
    const bool keep = pr.grad_student != nullptr || pr.grad_teacher != nullptr;
    const acc_t inv_t = static_cast<acc_t>(pr.inv_temperature);
    const int64_t y = label_of(row);
    if (y < 0) return undefined(row);  // never read out of bounds
    const RowState<acc_t> st = gather(s, t, keep);
    // A NaN or +inf logit, or every logit -inf on one side, leaves the softmax undefined.
    if (!st.defined || st.m_a == kNegInf || st.m_b == kNegInf) return undefined(row);
    HardGradient<acc_t> hard{};
    if constexpr (kHard) hard = hard_term(row, s, y, st);
    const acc_t m_a = st.m_a, m_b = st.m_b, Z_a = st.z_a, Z_b = st.z_b, W = st.w;
    const int64_t n_chunks = (V + kChunk - 1) / kChunk;
    const acc_t log_za = std::log(Z_a), log_zb = std::log(Z_b);
    // KL >= 0 (Gibbs); what rounding leaves below 0 (1e-16 when a row is its own maximum,
    // V = 1 with T != 1) is clamped. std::max keeps NaN: NaN < 0 is false.
    const acc_t kl = std::max(kReverse ? W / Z_b - log_zb + log_za : W / Z_a - log_za + log_zb, acc_t(0));
    static_cast<acc_t*>(pr.row_loss)[row] = kl;
    if (!keep) return;

    // Pass 3: gradients. p = exp(a') / Z_a = scratch_a * (chunk scale) / Z_a, likewise q;
    // log p - log q = a' - b' + c with a' = (t - m_a) / T, b' = (s - m_b) / T (raw maxima).
    const acc_t f = static_cast<acc_t>(pr.grad_factor);
    const Vec vinv_t(inv_t), vm_a(m_a), vm_b(m_b), zero(acc_t(0));
    const Vec c(kReverse ? log_za - log_zb - kl : log_zb - log_za - kl);
    scalar_t* ds = pr.grad_student ? static_cast<scalar_t*>(pr.grad_student) + row * V : nullptr;
    scalar_t* dt = pr.grad_teacher ? static_cast<scalar_t*>(pr.grad_teacher) + row * V : nullptr;
    // The "difference of probabilities" gradient only needs the scratch row; the other one needs
    // log p - log q and so the logits again (still in cache).
    scalar_t* diff_grad = kReverse ? dt : ds;       // forward: ds = (q - p) f; reverse: dt = (p - q) f
    scalar_t* weighted_grad = kReverse ? ds : dt;   // forward: dt = p (log p/q - KL) f; reverse: ds = q (log q/p - KL) f
    // Written once, never read back here: streamed past the caches where the row is aligned.
    const bool diff_streaming = L::streaming_ok(diff_grad), weighted_streaming = L::streaming_ok(weighted_grad);
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t begin = k * kChunk, len = std::min(kChunk, V - begin);
      const Vec fp(f / Z_a * chunk_scales[2 * k]), fq(f / Z_b * chunk_scales[2 * k + 1]);
      const Vec q1_f(kHard ? hard_factor(k, st) : acc_t(0));
      for_each_step(len, [&](int64_t j, auto n) {
        const int64_t i = begin + j;
        const Vec ea_lo = Vec::loadu(scratch_a + i), ea_hi = Vec::loadu(scratch_a + i + kVec);
        const Vec eb_lo = Vec::loadu(scratch_b + i), eb_hi = Vec::loadu(scratch_b + i + kVec);
        const Vec p_lo = ea_lo * fp, p_hi = ea_hi * fp;   // p * f
        const Vec q_lo = eb_lo * fq, q_hi = eb_hi * fq;   // q * f
        // The hard term's share of ds (kHard), added to the soft term's before the one store.
        Vec h_lo(acc_t(0)), h_hi(acc_t(0));
        if constexpr (kHard) {
          if (ds) hard_step(hard, s, i, n, q1_f, h_lo, h_hi);
        }
        if (diff_grad) {
          if constexpr (kReverse) L::store_step(diff_grad + i, n, p_lo - q_lo, p_hi - q_hi, diff_streaming);
          else L::store_step(diff_grad + i, n, q_lo - p_lo + h_lo, q_hi - p_hi + h_hi, diff_streaming);
        }
        if (weighted_grad) {
          Vec s_lo, s_hi, t_lo, t_hi;
          L::load(s + i, n, acc_t(0), s_lo, s_hi);
          L::load(t + i, n, acc_t(0), t_lo, t_hi);
          const Vec a_lo = (t_lo - vm_a) * vinv_t, a_hi = (t_hi - vm_a) * vinv_t;
          const Vec b_lo = (s_lo - vm_b) * vinv_t, b_hi = (s_hi - vm_b) * vinv_t;
          Vec g_lo, g_hi;
          if constexpr (kReverse) {  // q (b' - a' + c), zero where q = 0
            g_lo = Vec::blendv(zero, q_lo * (b_lo - a_lo + c), eb_lo > zero) + h_lo;
            g_hi = Vec::blendv(zero, q_hi * (b_hi - a_hi + c), eb_hi > zero) + h_hi;
          } else {                   // p (a' - b' + c), zero where p = 0
            g_lo = Vec::blendv(zero, p_lo * (a_lo - b_lo + c), ea_lo > zero);
            g_hi = Vec::blendv(zero, p_hi * (a_hi - b_hi + c), ea_hi > zero);
          }
          L::store_step(weighted_grad + i, n, g_lo, g_hi, weighted_streaming);
        }
      });
    }
    if (diff_streaming || weighted_streaming) stream_fence();
  }

  // kl_grad_from_stats: the gradient of one shard of a row, given the statistics of the full row
  // (m_a, m_b, log Z_a, log Z_b, KL; m_a, m_b the raw logits' maxima) and f = d(loss)/d(row KL) / T.
  // One pass over the shard, two exponentials per element (the shard's own exponentials are not kept
  // across the collective): la = (t - m_a) / T - log Z_a = log p <= 0, lb likewise = log q <= 0, and
  //   forward: ds = (q - p) f,                 dt = p (la - lb - KL) f   (0 where p = 0)
  //   reverse: ds = q (lb - la - KL) f  (0 where q = 0),    dt = (p - q) f
  // reads s, t (2e per element), writes e per gradient.
  void gradient_from_stats(int64_t row) const {
    if (pr.mask != nullptr && !pr.mask[row]) return fill_gradients(row, scalar_t(0));
    const acc_t* stats = static_cast<const acc_t*>(pr.global_stats) + 5 * row;
    const acc_t m_a = stats[0], m_b = stats[1], log_za = stats[2], log_zb = stats[3], kl = stats[4];
    // An undefined row (NaN KL, or no finite maximum) has a NaN gradient, as in kl_div_logits.
    if (std::isnan(kl) || !std::isfinite(m_a) || !std::isfinite(m_b) || !std::isfinite(log_za) ||
        !std::isfinite(log_zb)) {
      return fill_gradients(row, std::numeric_limits<scalar_t>::quiet_NaN());
    }
    const int64_t V = pr.vocab;
    const scalar_t* s = static_cast<const scalar_t*>(pr.student) + pr.student_rows.offset(row);
    const scalar_t* t = static_cast<const scalar_t*>(pr.teacher) + pr.teacher_rows.offset(row);
    scalar_t* ds = pr.grad_student ? static_cast<scalar_t*>(pr.grad_student) + row * V : nullptr;
    scalar_t* dt = pr.grad_teacher ? static_cast<scalar_t*>(pr.grad_teacher) + row * V : nullptr;
    const Vec vinv_t(static_cast<acc_t>(pr.inv_temperature)), vm_a(m_a), vm_b(m_b);
    const Vec vlog_za(log_za), vlog_zb(log_zb), vkl(kl), vf(static_cast<const acc_t*>(pr.row_factor)[row]);
    auto log_prob = [&](const Vec& x, const Vec& m, const Vec& log_z) { return (x - m) * vinv_t - log_z; };
    for_each_step(V, [&](int64_t i, auto n) {
      Vec s_lo, s_hi, t_lo, t_hi;
      L::load(s + i, n, kNegInf, s_lo, s_hi);
      L::load(t + i, n, kNegInf, t_lo, t_hi);
      const Vec la_lo = log_prob(t_lo, vm_a, vlog_za), la_hi = log_prob(t_hi, vm_a, vlog_za);
      const Vec lb_lo = log_prob(s_lo, vm_b, vlog_zb), lb_hi = log_prob(s_hi, vm_b, vlog_zb);
      Vec live_a_lo, live_a_hi, live_b_lo, live_b_hi;
      const Vec p_lo = Exp::exp(la_lo, live_a_lo), p_hi = Exp::exp(la_hi, live_a_hi);
      const Vec q_lo = Exp::exp(lb_lo, live_b_lo), q_hi = Exp::exp(lb_hi, live_b_hi);
      if constexpr (kReverse) {
        if (ds) {
          L::store(ds + i, n, ((q_lo * (lb_lo - la_lo - vkl)) & live_b_lo) * vf,
                   ((q_hi * (lb_hi - la_hi - vkl)) & live_b_hi) * vf);
        }
        if (dt) L::store(dt + i, n, (p_lo - q_lo) * vf, (p_hi - q_hi) * vf);
      } else {
        if (ds) L::store(ds + i, n, (q_lo - p_lo) * vf, (q_hi - p_hi) * vf);
        if (dt) {
          L::store(dt + i, n, ((p_lo * (la_lo - lb_lo - vkl)) & live_a_lo) * vf,
                   ((p_hi * (la_hi - lb_hi - vkl)) & live_a_hi) * vf);
        }
      }
    });
  }
};

// Whether a row solver keeps the hard term's exponentials exp(s - shift) in a scratch row of its own
// (RowSolver::scratch_1): with the hard term at T != 1 when the student's gradient is written, unless
// T is an integer whose powers of the student's exponentials serve instead.
template <bool kHard>
bool keep_hard_exponentials(const KLRowsProblem& pr, bool keep) {
  return kHard && keep && pr.inv_temperature != 1.0 && pr.grad_student != nullptr &&
         integer_temperature(pr.inv_temperature) == 0;
}

// Runs visit(solver, row) over every row in parallel, each task with its own solver and scratch
// (the exponentials of one row when `keep`, and the chunk states).
template <typename scalar_t, bool kReverse, typename Visit, bool kHard = false>
void for_each_row(const KLRowsProblem& pr, bool keep, const Visit& visit) {
  using Solver = RowSolver<scalar_t, kReverse, kHard>;
  using acc_t = typename Solver::acc_t;
  const int64_t padded = (pr.vocab + Solver::kStep - 1) / Solver::kStep * Solver::kStep;
  const int64_t n_chunks = (pr.vocab + Solver::kChunk - 1) / Solver::kChunk;
  const bool keep_1 = keep_hard_exponentials<kHard>(pr, keep);
  const int64_t rows_scratch = keep ? (keep_1 ? 3 : 2) * padded : 0;
  parallel_rows<acc_t>(pr.rows, pr.vocab, rows_scratch + 2 * n_chunks, [&](acc_t* scratch, int64_t begin, int64_t end) {
    std::unique_ptr<ChunkState<acc_t>[]> chunks(new ChunkState<acc_t>[n_chunks]);
    const Solver solver{pr, scratch, scratch + (keep ? padded : 0), chunks.get(), scratch + rows_scratch,
                        keep_1 ? scratch + 2 * padded : nullptr};
    for (int64_t row = begin; row < end; ++row) visit(solver, row);
  });
}

// Calls run(std::integral_constant<bool, kReverse>) with the problem's direction.
template <typename Run>
void with_direction(const KLRowsProblem& pr, const Run& run) {
  with_flag(pr.reverse, run);
}

template <typename scalar_t>
void kl_rows_typed(const KLRowsProblem& pr) {
  const bool keep = pr.grad_student != nullptr || pr.grad_teacher != nullptr;
  const auto visit = [&](const auto& solver, int64_t row) {
    if (pr.mask != nullptr && !pr.mask[row]) solver.skip(row);
    else solver.solve(row);
  };
  with_direction(pr, [&](auto reverse) {
    with_flag(pr.hard.labels != nullptr, [&](auto hard) {
      for_each_row<scalar_t, decltype(reverse)::value, decltype(visit), decltype(hard)::value>(pr, keep, visit);
    });
  });
}

template <typename scalar_t>
void row_states_typed(const KLRowsProblem& pr) {
  with_direction(pr, [&](auto reverse) {
    for_each_row<scalar_t, decltype(reverse)::value>(
        pr, false, [](const auto& solver, int64_t row) { solver.write_state(row); });
  });
}

template <typename scalar_t>
void grad_from_stats_typed(const KLRowsProblem& pr) {
  with_direction(pr, [&](auto reverse) {
    for_each_row<scalar_t, decltype(reverse)::value>(
        pr, false, [](const auto& solver, int64_t row) { solver.gradient_from_stats(row); });
  });
}

// grad[row, :] *= upstream[row or 0]; rows whose factor is exactly 1 are left untouched.
template <typename scalar_t>
void grad_scale_typed(const GradScaleProblem& pr) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  const acc_t* upstream = static_cast<const acc_t*>(pr.upstream);
  const int64_t V = pr.vocab;
  parallel_rows<acc_t>(pr.rows, V, 0, [&](acc_t*, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t factor = upstream[pr.per_row ? row : 0];
      if (factor == acc_t(1)) continue;
      scalar_t* g = static_cast<scalar_t*>(pr.grad) + row * V;
      const Vec vf(factor);
      for (int64_t i = 0; i < V; i += L::kStep) {
        const int64_t n = std::min(L::kStep, V - i);
        Vec lo, hi;
        L::load(g + i, n, acc_t(0), lo, hi);
        L::store(g + i, n, lo * vf, hi * vf);
      }
    }
  });
}

}  // namespace

void kl_rows(c10::ScalarType dtype, const KLRowsProblem& problem) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_fused_cpu_kl_rows",
                                  [&] { kl_rows_typed<scalar_t>(problem); });
}

void row_states(c10::ScalarType dtype, const KLRowsProblem& problem) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_fused_cpu_row_states",
                                  [&] { row_states_typed<scalar_t>(problem); });
}

void grad_from_stats(c10::ScalarType dtype, const KLRowsProblem& problem) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_fused_cpu_grad_from_stats",
                                  [&] { grad_from_stats_typed<scalar_t>(problem); });
}

void grad_scale(c10::ScalarType dtype, const GradScaleProblem& problem) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_fused_cpu_grad_scale",
                                  [&] { grad_scale_typed<scalar_t>(problem); });
}

}  // namespace kl_fused::cpu::KL_FUSED_CPU_NAMESPACE
