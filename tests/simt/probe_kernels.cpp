// Kernels that exercise the emulator itself: one correct kernel whose result the tests check
// (barriers, every shuffle kind, shared memory), and one kernel per bug the sanitizer must report.
// Compiled like the kl_fused kernels (KL_FUSED_EMULATOR, -fsanitize=thread) and launched through
// the same launch.cuh, so a probe that passes here says the machinery the real kernels use works.
#include <ATen/ATen.h>

#include <string>

#include "device_compat.cuh"
#include "launch.cuh"

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

// A correct kernel, one instantiation per launch-configuration probe (opt-in is per kernel).
template <int kProbe>
__global__ void probe_plain(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x];
}

}  // namespace simt_probes

namespace simt {

// The probe `name` on a (blocks, threads) float input; the output is allocated here (during the
// call, so launches may write it). Throws what the emulator reports.
at::Tensor run_probe(const std::string& name, const at::Tensor& input) {
  using namespace simt_probes;
  using kl_fused::cuda::allow_dynamic_shared;
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
  } else if (name == "too_many_threads") {
    launch_kernel<probe_plain<0>>(1, 2048, 0, stream, in, o);
  } else if (name == "shared_above_default_without_opt_in") {
    launch_kernel<probe_plain<1>>(1, threads, 48 * 1024 + 16, stream, in, o);
  } else if (name == "shared_above_opt_in") {
    allow_dynamic_shared<probe_plain<2>>(64 * 1024);
    launch_kernel<probe_plain<2>>(1, threads, 64 * 1024 + 16, stream, in, o);
  } else if (name == "opt_in_above_device_limit") {
    allow_dynamic_shared<probe_plain<3>>(device_properties().max_shared_optin + 16);
  } else if (name == "grid_above_device_limit") {
    launch_kernel<probe_plain<4>>(static_cast<unsigned int>(device_properties().max_grid_x + 1), threads, 0, stream, in, o);
  } else if (name == "opted_in_large_shared") {
    allow_dynamic_shared<probe_plain<5>>(device_properties().max_shared_optin);
    launch_kernel<probe_plain<5>>(1, threads, device_properties().max_shared_optin, stream, in, o);
  } else {
    TORCH_CHECK(false, "unknown probe '", name, "'");
  }
  return out;
}

}  // namespace simt
