// Kernels that exercise the emulator itself: correct kernels whose results the tests check
// (barriers, every shuffle kind, shared memory, atomics, the order a schedule runs threads in, the
// block reductions of csrc/cuda), and one kernel per bug the sanitizer must report.
// Compiled like the kl_fused kernels (KL_FUSED_EMULATOR, -fsanitize=thread) and launched through
// the same launch.cuh, so a probe that passes here says the machinery the real kernels use works.
#include <ATen/ATen.h>

#include <string>

#include <climits>

#include "block_reduce.cuh"
#include "device_compat.cuh"
#include "launch.cuh"
#include "row_state.cuh"

namespace simt_probes {

using kl_fused::cuda::launch_kernel;

constexpr unsigned int kFull = 0xffffffffu;

// out[block] = sum of in[block, :] (blockDim.x values per block), by a warp butterfly (xor), a
// second reduction over the per-warp sums (down), and a broadcast from lane 0 (idx); out[blocks + i]
// gets thread i's inclusive prefix sum within its warp (up).
__global__ void probe_block_sum(const float* in, float* out, int blocks) {
  KL_FUSED_DYNAMIC_SHARED(float, partial);
  const unsigned int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  float s = v;
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(kFull, s, offset);
  float prefix = v;
  for (int delta = 1; delta < 32; delta *= 2) {
    const float up = __shfl_up_sync(kFull, prefix, delta);
    if (static_cast<int>(lane) >= delta) prefix += up;
  }
  out[blocks + blockIdx.x * blockDim.x + threadIdx.x] = prefix;
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (warp == 0) {
    float t = lane < warps ? partial[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) t += __shfl_down_sync(kFull, t, offset);
    t = __shfl_sync(kFull, t, 0);
    if (lane == 31) out[blockIdx.x] = t;
  }
}

__global__ void probe_shared_out_of_bounds(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(float, s);
  s[threadIdx.x] = in[threadIdx.x];  // launched with one float fewer than threads
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void probe_global_read_out_of_bounds(const float* in, float* out, int n) {
  out[threadIdx.x] = in[threadIdx.x + 1];  // the last thread reads in[n]
  (void)n;
}

__global__ void probe_global_write_out_of_bounds(const float* in, float* out) {
  out[threadIdx.x + 1] = in[threadIdx.x];
}

__global__ void probe_misaligned_vector_load(const float* in, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + 1));  // 4 bytes past a 16-byte boundary
  out[threadIdx.x] = static_cast<float>(v.x);
}

__global__ void probe_misaligned_shared(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(float, s);
  float4 v{in[0], in[1], in[2], in[3]};
  reinterpret_cast<float4*>(s + 1)[threadIdx.x] = v;
  __syncthreads();
  out[threadIdx.x] = s[1];
}

__global__ void probe_divergent_barrier(const float* in, float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = in[threadIdx.x];
}

__global__ void probe_exit_before_barrier(const float* in, float* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = in[threadIdx.x];
}

__global__ void probe_race_read_after_write(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(float, s);
  if (threadIdx.x == 0) s[0] = 0.0f;  // initialised, so that whichever thread comes first, the race is found
  __syncthreads();
  if (threadIdx.x == 0) s[0] = in[0];
  out[threadIdx.x] = s[0];  // no barrier between thread 0's write and the others' reads
}

__global__ void probe_race_write_after_read(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(float, s);
  s[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
  s[threadIdx.x] = 0.0f;  // the neighbour may not have read it yet
}

__global__ void probe_race_write_after_write(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(float, s);
  s[0] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = s[0];
}

__global__ void probe_uninitialised_shared(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(float, s);
  s[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + 1];  // the launch has one more float than threads
}

__global__ void probe_shuffle_after_exit(const float* in, float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, in[threadIdx.x], 1);
}

// ---- global memory

// Correct: thread 0 writes, and after a barrier thread 1 reads what it wrote; every thread of
// every block reads in[0]; each block writes its own elements.
__global__ void probe_global_ordered_by_barrier(const float* in, float* out) {
  float* mine = out + 2 * blockIdx.x;
  if (threadIdx.x == 0) mine[0] = in[0] + static_cast<float>(blockIdx.x);
  __syncthreads();
  if (threadIdx.x == 1) mine[1] = mine[0] * 2.0f;
}

__global__ void probe_global_write_write(const float* in, float* out) {
  out[0] = in[threadIdx.x];  // every thread writes out[0]: fill_row written by every thread, in small
}

__global__ void probe_global_read_after_write(const float* in, float* out) {
  if (threadIdx.x == 0) out[0] = in[0];
  out[1 + threadIdx.x] = out[0];  // no barrier between thread 0's write and the others' reads
}

__global__ void probe_global_race_between_blocks(const float* in, float* out) {
  if (threadIdx.x == 0) out[0] = in[blockIdx.x];  // thread 0 of every block writes out[0]
}

__global__ void probe_global_read_of_another_block(const float* in, float* out) {
  if (threadIdx.x != 0) return;
  out[blockIdx.x] = in[blockIdx.x];
  out[gridDim.x + blockIdx.x] = out[(blockIdx.x + 1) % gridDim.x];  // the next block's element
}

// Writes half of its output: the other half keeps the NaN pattern of fresh memory.
__global__ void probe_output_left_unwritten(const float* in, float* out) {
  if (threadIdx.x % 2 == 0) out[threadIdx.x] = in[threadIdx.x];
}

// ---- atomics

// Correct: atomics of every thread on one word need no barrier between them.
__global__ void probe_atomics_without_race(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(unsigned int, word);
  if (threadIdx.x == 0) word[0] = 0;
  __syncthreads();
  atomicOr(&word[0], 1u << (threadIdx.x % 32));
  atomicAnd(&word[0], ~0u);
  __syncthreads();
  out[threadIdx.x] = static_cast<float>(word[0] == 0xFFFFFFFFu) + in[threadIdx.x] * 0.0f;
}

__global__ void probe_atomic_then_plain_read(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(unsigned int, word);
  if (threadIdx.x == 0) word[0] = 0;
  __syncthreads();
  atomicOr(&word[0], 1u << (threadIdx.x % 32));
  out[threadIdx.x] = static_cast<float>(word[0]) + in[0];  // no barrier between the atomics and the reads
}

__global__ void probe_plain_write_then_atomic(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(unsigned int, word);
  if (threadIdx.x == 0) word[0] = 0;
  __syncthreads();
  if (threadIdx.x == 0) word[0] = 1;  // no barrier between this write and the others' atomics
  atomicOr(&word[0], 1u << (threadIdx.x % 32));
  out[threadIdx.x] = in[threadIdx.x];
}

// ---- schedules

// The order the schedule ran things in, with no race: thread 0 of each block takes a ticket from a
// global counter (out[0]), each thread four tickets from a shared one within one barrier interval.
// out[1 + b] = block b's ticket, out[1 + blocks + 4 (b blockDim.x + t) + i] = thread t's i-th ticket.
__global__ void probe_execution_order(const float* in, float* out, int blocks) {
  KL_FUSED_DYNAMIC_SHARED(unsigned int, counter);
  if (threadIdx.x == 0) {
    counter[0] = 0;
    out[1 + blockIdx.x] = static_cast<float>(atomicAdd(reinterpret_cast<unsigned int*>(out), 1u)) + in[0] * 0.0f;
  }
  __syncthreads();
  float* tickets = out + 1 + blocks + 4 * (blockIdx.x * blockDim.x + threadIdx.x);
  for (int i = 0; i < 4; ++i) tickets[i] = static_cast<float>(atomicAdd(&counter[0], 1u));
}

// ---- the block reductions of csrc/cuda (block_reduce.cuh, row_state.cuh)

// A combine that is commutative in exact arithmetic, whose rounding depends on the order of its
// operands once a*b + c is contracted: fma(a.p, a.q, b.p * b.q) is not fma(b.p, b.q, a.p * a.q).
struct ProbeProducts {
  float p, q;
};

struct AddProducts {
  __device__ __forceinline__ ProbeProducts operator()(const ProbeProducts& a, const ProbeProducts& b) const {
    return {a.p * a.q + b.p * b.q, a.q * b.q};
  }
};

__device__ __forceinline__ ProbeProducts probe_products(const float* in) {
  const float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  return {v, 1.0f + 0.01f * v};
}

__device__ __forceinline__ void probe_write_products(float* out, const ProbeProducts& r) {
  float* o = out + 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  o[0] = r.p;
  o[1] = r.q;
}

// Each lane's result of the butterfly alone (warp_reduce): in the fma build, lanes part.
__global__ void probe_warp_products(const float* in, float* out) {
  probe_write_products(out, kl_fused::cuda::warp_reduce(probe_products(in), AddProducts{}));
}

// Each thread's result of block_reduce: the same bits in every thread of the block, in every build.
__global__ void probe_block_products(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(ProbeProducts, scratch);
  probe_write_products(out, kl_fused::cuda::block_reduce(probe_products(in), AddProducts{}, ProbeProducts{0.0f, 1.0f}, scratch));
}

// Each thread's result of block_merge (row_state.cuh), from a state made of in[thread]: the same
// bits in every thread of the block, in every build.
__global__ void probe_block_merge(const float* in, float* out) {
  using namespace kl_fused::cuda;
  KL_FUSED_DYNAMIC_SHARED(RowState<float>, scratch);
  const float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  const RowState<float> st = block_merge(RowState<float>{v, 0.5f * v, 1.0f + v * v, 2.0f - 0.25f * v, 0.75f * v}, 1.3f, scratch);
  float* o = out + 5 * (blockIdx.x * blockDim.x + threadIdx.x);
  o[0] = st.mx;
  o[1] = st.my;
  o[2] = st.zx;
  o[3] = st.zy;
  o[4] = st.w;
}

// ---- undefined behaviour and barrier identity

__global__ void probe_signed_overflow(const float* in, float* out, int big) {
  const int sum = big + static_cast<int>(threadIdx.x);  // big = INT_MAX: overflows in thread 1
  out[threadIdx.x] = static_cast<float>(sum) + in[0];
}

__global__ void probe_shift_out_of_bounds(const float* in, float* out, int shift) {
  out[threadIdx.x] = static_cast<float>(1u << (shift + static_cast<int>(threadIdx.x))) + in[0];  // shift = 31
}

__global__ void probe_index_out_of_bounds(const float* in, float* out) {
  float local[4];
  for (int i = 0; i < 4; ++i) local[i] = in[i];
  out[threadIdx.x] = local[threadIdx.x % 8];  // index 4 in thread 4
}

// One __syncthreads line inside a helper, reached from two call sites by two halves of the block:
// two different barriers on the device.
template <int kTag>
__device__ __forceinline__ void probe_helper_with_barrier(float* s, const float* in, float* out) {
  s[threadIdx.x] = in[threadIdx.x] * static_cast<float>(kTag);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x ^ 1u] + static_cast<float>(kTag);
}

__global__ void probe_barrier_call_sites(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(float, s);
  if (threadIdx.x < 16) {
    probe_helper_with_barrier<1>(s, in, out);
  } else {
    probe_helper_with_barrier<2>(s, in, out);
  }
}

// A correct kernel, one instantiation per launch-configuration probe (opt-in is per kernel).
template <int kProbe>
__global__ void probe_plain(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x];
}

// Known traffic for the emulator's counters, per thread: global loads of 4 bytes (the second a
// re-read of the first's bytes, after a barrier), one 4-byte global store, 4 shared bytes stored and
// 4 loaded, one ex2 and one lg2; per block one barrier.
__global__ void probe_traffic(const float* in, float* out) {
  KL_FUSED_DYNAMIC_SHARED(float, s);
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = kl_fused::cuda::ex2_approx_ftz(in[i]);
  __syncthreads();
  const float w = s[(threadIdx.x + 1) % blockDim.x] + in[i];
  out[i] = kl_fused::cuda::log2_f32(w > 0.0f ? w : 1.0f);
}

// ---- thread-block clusters (two blocks per cluster unless the launch says otherwise)

// The block's sum of in[block, :] in partial[blockDim.x] (every thread's value in partial[thread]).
__device__ void block_sum_to_shared(const float* in, float* partial) {
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (unsigned int i = 0; i < blockDim.x; ++i) s += partial[i];
    partial[blockDim.x] = s;
  }
}

// out[block] = sum over the cluster's ranks r of (r + 1) * (block sum of rank r), read through
// distributed shared memory by every block; out[grid + block] = the block's rank. The second
// cluster barrier keeps every block's shared memory alive until the others have read it.
__global__ void probe_cluster_sum(const float* in, float* out) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  KL_FUSED_DYNAMIC_SHARED(float, partial);
  block_sum_to_shared(in, partial);
  cluster.sync();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (unsigned int r = 0; r < cluster.num_blocks(); ++r) {
      total += static_cast<float>(r + 1) * *cluster.map_shared_rank(partial + blockDim.x, r);
    }
    out[blockIdx.x] = total;
    out[gridDim.x + blockIdx.x] = static_cast<float>(cluster.block_rank());
  }
  cluster.sync();
}

// A block barrier where a cluster barrier belongs: the peer's sum may not be written yet.
__global__ void probe_cluster_block_barrier_only(const float* in, float* out) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  KL_FUSED_DYNAMIC_SHARED(float, partial);
  block_sum_to_shared(in, partial);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = *cluster.map_shared_rank(partial + blockDim.x, cluster.block_rank() ^ 1u);
  cluster.sync();
}

// Two rounds through one slot with one cluster barrier each: the second round's write races with
// the peer's read of the first (write after read).
__global__ void probe_cluster_slot_reused(const float* in, float* out) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  KL_FUSED_DYNAMIC_SHARED(float, partial);
  for (int round = 0; round < 2; ++round) {
    if (threadIdx.x == 0) partial[0] = in[blockIdx.x * blockDim.x + round];
    cluster.sync();
    if (threadIdx.x == 0) out[2 * blockIdx.x + round] = *cluster.map_shared_rank(partial, cluster.block_rank() ^ 1u);
  }
  cluster.sync();
}

// The peer's shared memory read after the peer may have exited (no cluster barrier at the end).
__global__ void probe_cluster_exit_before_peer_reads(const float* in, float* out) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  KL_FUSED_DYNAMIC_SHARED(float, partial);
  block_sum_to_shared(in, partial);
  cluster.sync();
  if (threadIdx.x == 0) out[blockIdx.x] = *cluster.map_shared_rank(partial + blockDim.x, cluster.block_rank() ^ 1u);
}

__global__ void probe_cluster_rank_out_of_range(const float* in, float* out) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  KL_FUSED_DYNAMIC_SHARED(float, partial);
  partial[threadIdx.x] = in[threadIdx.x];
  cluster.sync();
  out[threadIdx.x] = *cluster.map_shared_rank(partial, cluster.num_blocks());
  cluster.sync();
}

// Reads the peer's shared memory one float past the launch's size.
__global__ void probe_cluster_shared_out_of_bounds(const float* in, float* out) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  KL_FUSED_DYNAMIC_SHARED(float, partial);
  partial[threadIdx.x] = in[threadIdx.x];
  cluster.sync();
  out[blockIdx.x * blockDim.x + threadIdx.x] = cluster.map_shared_rank(partial, cluster.block_rank() ^ 1u)[threadIdx.x + 1];
  cluster.sync();
}

// Rank 0 waits at one cluster barrier, rank 1 at another.
__global__ void probe_cluster_divergent_barrier(const float* in, float* out) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  out[blockIdx.x * blockDim.x + threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  if (cluster.block_rank() == 0) {
    cluster.sync();
  } else {
    cluster.sync();
  }
}

// One thread waits at the cluster barrier while the rest of its block waits at __syncthreads.
__global__ void probe_cluster_barrier_beside_block_barrier(const float* in, float* out) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  out[blockIdx.x * blockDim.x + threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  if (threadIdx.x == 5) {
    cluster.sync();
  } else {
    __syncthreads();
  }
}

}  // namespace simt_probes

namespace simt {

// The probe `name` on a (blocks, threads) float input; the output is allocated here (during the
// call, so launches may write it). Throws what the emulator reports.
at::Tensor run_probe(const std::string& name, const at::Tensor& input) {
  using namespace simt_probes;
  using kl_fused::cuda::allow_dynamic_shared;
  using kl_fused::cuda::launch_cluster_kernel;
  using kl_fused::cuda::Stream;
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous() && input.scalar_type() == at::kFloat,
              "probe input must be a contiguous (blocks, threads) float tensor");
  const auto blocks = static_cast<unsigned int>(input.size(0));
  const int threads = static_cast<int>(input.size(1));
  const float* in = input.const_data_ptr<float>();
  at::Tensor out = at::zeros({input.numel() + input.size(0)}, input.options());
  float* o = out.mutable_data_ptr<float>();
  const Stream stream{};
  const int64_t f = sizeof(float);
  if (name == "block_sum") {
    launch_kernel<probe_block_sum>(blocks, threads, threads / 32 * f, stream, in, o, static_cast<int>(blocks));
  } else if (name == "shared_out_of_bounds") {
    launch_kernel<probe_shared_out_of_bounds>(1, threads, (threads - 1) * f, stream, in, o);
  } else if (name == "global_read_out_of_bounds") {
    launch_kernel<probe_global_read_out_of_bounds>(1, threads, 0, stream, in, o, threads);
  } else if (name == "global_write_out_of_bounds") {
    at::Tensor small = at::empty({threads}, input.options());
    launch_kernel<probe_global_write_out_of_bounds>(1, threads, 0, stream, in, small.mutable_data_ptr<float>());
  } else if (name == "misaligned_vector_load") {
    launch_kernel<probe_misaligned_vector_load>(1, threads, 0, stream, in, o);
  } else if (name == "misaligned_shared") {
    launch_kernel<probe_misaligned_shared>(1, threads, (4 * threads + 4) * f, stream, in, o);
  } else if (name == "divergent_barrier") {
    launch_kernel<probe_divergent_barrier>(1, threads, 0, stream, in, o);
  } else if (name == "exit_before_barrier") {
    launch_kernel<probe_exit_before_barrier>(1, threads, 0, stream, in, o);
  } else if (name == "race_read_after_write") {
    launch_kernel<probe_race_read_after_write>(1, threads, f, stream, in, o);
  } else if (name == "race_write_after_read") {
    launch_kernel<probe_race_write_after_read>(1, threads, threads * f, stream, in, o);
  } else if (name == "race_write_after_write") {
    launch_kernel<probe_race_write_after_write>(1, threads, f, stream, in, o);
  } else if (name == "uninitialised_shared") {
    launch_kernel<probe_uninitialised_shared>(1, threads, (threads + 1) * f, stream, in, o);
  } else if (name == "shuffle_after_exit") {
    launch_kernel<probe_shuffle_after_exit>(1, threads, 0, stream, in, o);
  } else if (name == "global_ordered_by_barrier") {
    launch_kernel<probe_global_ordered_by_barrier>(blocks, threads, 0, stream, in, o);
  } else if (name == "global_write_write") {
    launch_kernel<probe_global_write_write>(1, threads, 0, stream, in, o);
  } else if (name == "global_read_after_write") {
    launch_kernel<probe_global_read_after_write>(1, threads, 0, stream, in, o);
  } else if (name == "global_race_between_blocks") {
    launch_kernel<probe_global_race_between_blocks>(blocks, threads, 0, stream, in, o);
  } else if (name == "global_read_of_another_block") {
    launch_kernel<probe_global_read_of_another_block>(blocks, threads, 0, stream, in, o);
  } else if (name == "output_left_unwritten") {
    at::Tensor fresh = at::empty({threads}, input.options());
    launch_kernel<probe_output_left_unwritten>(1, threads, 0, stream, in, fresh.mutable_data_ptr<float>());
    return fresh;
  } else if (name == "atomics_without_race") {
    launch_kernel<probe_atomics_without_race>(1, threads, 4, stream, in, o);
  } else if (name == "atomic_then_plain_read") {
    launch_kernel<probe_atomic_then_plain_read>(1, threads, 4, stream, in, o);
  } else if (name == "plain_write_then_atomic") {
    launch_kernel<probe_plain_write_then_atomic>(1, threads, 4, stream, in, o);
  } else if (name == "execution_order") {  // (blocks, 4 threads + 1) input
    launch_kernel<probe_execution_order>(blocks, (threads - 1) / 4, 4, stream, in, o, static_cast<int>(blocks));
  } else if (name == "warp_products") {  // (blocks, 2 threads) input
    launch_kernel<probe_warp_products>(blocks, threads / 2, 0, stream, in, o);
  } else if (name == "block_products") {  // (blocks, 2 threads) input
    launch_kernel<probe_block_products>(blocks, threads / 2, threads / 2 / 32 * 8, stream, in, o);
  } else if (name == "block_merge") {  // (blocks, 5 threads) input
    const int64_t scratch = threads / 5 / 32 * static_cast<int64_t>(sizeof(kl_fused::cuda::RowState<float>));
    launch_kernel<probe_block_merge>(blocks, threads / 5, scratch, stream, in, o);
  } else if (name == "signed_overflow") {
    launch_kernel<probe_signed_overflow>(1, threads, 0, stream, in, o, INT_MAX);
  } else if (name == "shift_out_of_bounds") {
    launch_kernel<probe_shift_out_of_bounds>(1, threads, 0, stream, in, o, 31);
  } else if (name == "index_out_of_bounds") {
    launch_kernel<probe_index_out_of_bounds>(1, threads, 0, stream, in, o);
  } else if (name == "barrier_call_sites") {
    launch_kernel<probe_barrier_call_sites>(1, threads, threads * f, stream, in, o);
  } else if (name == "too_many_threads") {
    launch_kernel<probe_plain<0>>(1, 2048, 0, stream, in, o);
  } else if (name == "traffic") {
    launch_kernel<probe_traffic>(blocks, threads, threads * f, stream, in, o);
  } else if (name == "shared_above_default_without_opt_in") {
    launch_kernel<probe_plain<1>>(1, threads, 48 * 1024 + 16, stream, in, o);
  } else if (name == "shared_above_opt_in") {
    allow_dynamic_shared<probe_plain<2>>(64 * 1024);
    launch_kernel<probe_plain<2>>(1, threads, 64 * 1024 + 16, stream, in, o);
  } else if (name == "opt_in_above_device_limit") {
    allow_dynamic_shared<probe_plain<3>>(device_properties().max_shared_optin + 16);
  } else if (name == "grid_above_device_limit") {
    launch_kernel<probe_plain<4>>(static_cast<unsigned int>(device_properties().max_grid_x + 1), threads, 0, stream, in, o);
  } else if (name == "cluster_sum" || name == "cluster_sum_of_4") {
    launch_cluster_kernel<probe_cluster_sum>(blocks, name == "cluster_sum" ? 2 : 4, threads, (threads + 1) * f, stream, in, o);
  } else if (name == "cluster_block_barrier_only") {
    launch_cluster_kernel<probe_cluster_block_barrier_only>(blocks, 2, threads, (threads + 1) * f, stream, in, o);
  } else if (name == "cluster_slot_reused") {
    launch_cluster_kernel<probe_cluster_slot_reused>(blocks, 2, threads, f, stream, in, o);
  } else if (name == "cluster_exit_before_peer_reads") {
    launch_cluster_kernel<probe_cluster_exit_before_peer_reads>(blocks, 2, threads, (threads + 1) * f, stream, in, o);
  } else if (name == "cluster_rank_out_of_range") {
    launch_cluster_kernel<probe_cluster_rank_out_of_range>(blocks, 2, threads, threads * f, stream, in, o);
  } else if (name == "cluster_shared_out_of_bounds") {
    launch_cluster_kernel<probe_cluster_shared_out_of_bounds>(blocks, 2, threads, threads * f, stream, in, o);
  } else if (name == "cluster_divergent_barrier") {
    launch_cluster_kernel<probe_cluster_divergent_barrier>(blocks, 2, threads, 0, stream, in, o);
  } else if (name == "cluster_barrier_beside_block_barrier") {
    launch_cluster_kernel<probe_cluster_barrier_beside_block_barrier>(blocks, 2, threads, 0, stream, in, o);
  } else if (name == "cluster_not_dividing_grid") {
    launch_cluster_kernel<probe_cluster_sum>(3, 2, threads, (threads + 1) * f, stream, in, o);
  } else if (name == "cluster_above_portable_limit") {
    launch_cluster_kernel<probe_cluster_sum>(16, 16, threads, (threads + 1) * f, stream, in, o);
  } else if (name == "opted_in_large_shared") {
    allow_dynamic_shared<probe_plain<5>>(device_properties().max_shared_optin);
    launch_kernel<probe_plain<5>>(1, threads, device_properties().max_shared_optin, stream, in, o);
  } else {
    TORCH_CHECK(false, "unknown probe '", name, "'");
  }
  return out;
}

}  // namespace simt
