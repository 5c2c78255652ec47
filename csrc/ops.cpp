// The kl_fused library (its schemas are in op_schemas.h) and the Python module that registers it
// on import.
// Device implementations live in cpu/kl_div_cpu.cpp and cuda/kl_div_cuda.cu.
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

// The GPU code the CUDA kernels were compiled to, as setup.py passes it ("sm_80,sm_90,compute_90";
// compute_XY is PTX), or "" for a build without CUDA kernels.
#define KL_FUSED_STRING(...) #__VA_ARGS__
#define KL_FUSED_EXPANDED_STRING(...) KL_FUSED_STRING(__VA_ARGS__)
#ifdef KL_FUSED_CUDA_ARCHS
static const char* const kCudaArchs = KL_FUSED_EXPANDED_STRING(KL_FUSED_CUDA_ARCHS);
#else
static const char* const kCudaArchs = "";
#endif

extern "C" {
// `import kl_fused._C` loads this library, which runs the TORCH_LIBRARY registrations below.
// The module holds one string, cuda_archs (the build's GPU code, read by kl_fused/_cuda_archs.py);
// the ops are reached through torch.ops.kl_fused.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "cuda_archs", kCudaArchs) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(kl_fused, m) { kl_fused::define_op_schemas(m); }
