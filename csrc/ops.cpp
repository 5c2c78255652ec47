// The kl_fused library (its schemas are in op_schemas.h) and the Python module that registers it
// on import.
// Device implementations live in cpu/kl_div_cpu.cpp and cuda/kl_div_cuda.cu.
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

extern "C" {
// `import kl_fused._C` loads this library, which runs the TORCH_LIBRARY registrations below.
// The module itself holds nothing: the ops are reached through torch.ops.kl_fused.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kl_fused, m) { kl_fused::define_op_schemas(m); }
