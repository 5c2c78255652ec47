// The emulator as torch sees it.
//  - kl_fused_emulated::*  the kl_fused op schemas (csrc/op_schemas.h), implemented on CPU tensors by
//    the unchanged csrc/cuda/*.cu host and device code compiled with KL_FUSED_EMULATOR;
//  - simt::*  test control: the emulated device's limits, the schedule, call scopes, the check of
//    a call's outputs, the launch log, the list of launchable kernels, and the sanitizer probes.
// A CPU allocator wrapper registers every allocation made during a call (outputs, temporaries) as
// memory the call's launches may touch, with guard zones around it so that an access just past a
// tensor never lands in its neighbour, and fills it with a NaN pattern, so that an output no kernel
// wrote is neither a plausible value nor the zero of a fresh page.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "op_schemas.h"
#include "simt/host_control.h"

namespace simt {

at::Tensor run_probe(const std::string& name, const at::Tensor& input);  // probe_kernels.cpp

namespace {

constexpr std::size_t kGuardBytes = 256;

struct TrackedAllocation {
  c10::DataPtr inner;
  void* data;
};

class CallTrackingAllocator final : public c10::Allocator {
 public:
  explicit CallTrackingAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(std::size_t n) override {
    if (!in_call()) return inner_->allocate(n);
    c10::DataPtr raw = inner_->allocate(n + 2 * kGuardBytes);
    void* data = static_cast<char*>(raw.get()) + kGuardBytes;
    std::memset(data, kPoisonByte, n);
    register_global(data, n, "a tensor allocated by the call (" + std::to_string(n) + " bytes)", /*allocated=*/true);
    auto* tracked = new TrackedAllocation{std::move(raw), data};
    return {data, tracked, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // raw_allocate/raw_deallocate (oneDNN's scratch buffers in a bf16 matmul, say) need the deleter of
  // the memory allocate() returns outside a call, which is the inner allocator's; without it, the
  // first bf16 CPU matmul after the emulator was loaded aborted the process.
  c10::DeleterFnPtr raw_deleter() const override { return inner_->raw_deleter(); }

 private:
  static void release(void* context) {
    auto* tracked = static_cast<TrackedAllocation*>(context);
    unregister_global(tracked->data);
    delete tracked;
  }

  c10::Allocator* inner_;
};

CallTrackingAllocator& allocator() {
  static CallTrackingAllocator instance(c10::GetDefaultCPUAllocator());
  return instance;
}

const bool g_installed = [] {
  c10::SetCPUAllocator(&allocator(), /*priority=*/200);
  return true;
}();

std::vector<const void*> g_input_spans;

// The bytes a tensor's elements occupy (any strides).
void register_input(const at::Tensor& t, std::size_t index) {
  if (t.numel() == 0) return;
  int64_t low = 0, high = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? low : high) += reach;
  }
  const auto* data = static_cast<const char*>(t.const_data_ptr());
  const auto item = static_cast<int64_t>(t.element_size());
  std::ostringstream label;
  label << "input " << index << " (" << t.scalar_type() << " " << t.sizes() << ")";
  register_global(data + low * item, static_cast<std::size_t>((high - low + 1) * item), label.str());
  g_input_spans.push_back(data + low * item);
}

void begin(const std::vector<at::Tensor>& inputs) {
  begin_call();
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK(inputs[i].device().is_cpu(), "simt: emulated launches read CPU tensors, got ", inputs[i].device());
    register_input(inputs[i], i);
  }
}

void end() {
  for (const void* span : g_input_spans) unregister_global(span);
  g_input_spans.clear();
  end_call();
  const std::string host_error = take_host_error();
  TORCH_CHECK(host_error.empty(), host_error);
}

// No element of the call's outputs that lie in memory the call allocated is one that no kernel
// wrote. Host code writes are not tracked: an element counts as unwritten when every byte of it
// still holds the NaN pattern and no kernel wrote any, or when a kernel wrote some of its bytes and
// the others still hold the pattern. Called before end().
void check_outputs(const std::vector<at::Tensor>& outputs) {
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const at::Tensor& t = outputs[i];
    if (!t.defined() || t.numel() == 0 || !t.device().is_cpu()) continue;
    const auto* data = static_cast<const unsigned char*>(t.const_data_ptr());
    if (!allocated_by_call(data)) continue;
    const int64_t item = static_cast<int64_t>(t.element_size());
    int64_t unwritten = 0, first = -1;
    std::vector<int64_t> index(static_cast<std::size_t>(t.dim()), 0);
    for (int64_t e = 0; e < t.numel(); ++e) {
      int64_t offset = 0;
      for (int64_t d = 0; d < t.dim(); ++d) offset += index[d] * t.stride(d);
      int64_t by_kernel = 0, pattern = 0;
      for (int64_t b = 0; b < item; ++b) {
        const unsigned char* byte = data + offset * item + b;
        if (written_by_kernel(byte)) ++by_kernel;
        else if (*byte == kPoisonByte) ++pattern;
      }
      if (pattern == item || (by_kernel > 0 && pattern > 0)) {
        ++unwritten;
        if (first < 0) first = e;
      }
      for (int64_t d = t.dim() - 1; d >= 0 && ++index[d] == t.size(d); --d) index[d] = 0;
    }
    TORCH_CHECK(unwritten == 0, "simt: output ", i, " (", t.scalar_type(), " ", t.sizes(), ") has ", unwritten,
                " elements that no kernel wrote, the first at flat index ", first,
                ": they still hold the NaN pattern of fresh memory");
  }
}

void schedule(const std::string& kind, int64_t seed) {
  if (kind == "forward") set_schedule(ScheduleKind::Forward, static_cast<uint64_t>(seed));
  else if (kind == "reverse") set_schedule(ScheduleKind::Reverse, static_cast<uint64_t>(seed));
  else if (kind == "random") set_schedule(ScheduleKind::Random, static_cast<uint64_t>(seed));
  else TORCH_CHECK(false, "simt: unknown schedule '", kind, "' (forward, reverse or random)");
}

void set_limits(int64_t sm_count, int64_t max_shared_optin, int64_t max_grid_x, bool cluster_launch) {
  configure(DeviceProperties{static_cast<int>(sm_count), static_cast<int>(max_shared_optin), max_grid_x, cluster_launch});
}

// ex2.approx.ftz.f32 as the emulated kernels see it, elementwise (for its own tests).
at::Tensor ex2(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "simt::ex2 takes float32");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) dst[i] = ex2_approx_ftz(src[i]);
  return out;
}

std::vector<std::string> properties() {
  const DeviceProperties p = device_properties();
  return {std::to_string(p.sm_count), std::to_string(p.max_shared_optin), std::to_string(p.max_grid_x),
          std::to_string(p.cluster_launch)};
}

}  // namespace
}  // namespace simt

TORCH_LIBRARY(kl_fused_emulated, m) { kl_fused::define_op_schemas(m); }

TORCH_LIBRARY(simt, m) {
  m.def("configure(int sm_count, int max_shared_optin, int max_grid_x, bool cluster_launch) -> ()", &simt::set_limits);
  m.def("device_properties() -> str[]", &simt::properties);
  m.def("begin_call(Tensor[] inputs) -> ()", &simt::begin);
  m.def("end_call() -> ()", &simt::end);
  m.def("check_outputs(Tensor[] outputs) -> ()", &simt::check_outputs);
  m.def("set_schedule(str kind, int seed) -> ()", &simt::schedule);
  m.def("take_launch_log() -> str[]", &simt::take_launch_log);
  m.def("take_traffic() -> str[]", &simt::take_traffic);
  m.def("configure_l2_model(int l2_bytes, int resident_blocks) -> ()", &simt::configure_l2_model);
  m.def("launchable_kernels() -> str[]", &simt::launchable_kernels);
  m.def("run_probe(str name, Tensor input) -> Tensor", &simt::run_probe);
  m.def("ex2_approx_ftz(Tensor x) -> Tensor", &simt::ex2);
}
