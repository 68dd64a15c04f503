// The fast_attn operator library: every op schema of the CUDA extension, and the (empty)
// Python module fast_attn._C.
//
// This is the only TORCH_LIBRARY(fast_attn, ...) block in csrc/: a new op adds its schema
// line here and its CUDA kernel with TORCH_LIBRARY_IMPL(fast_attn, CUDA, ...) beside the
// kernel (csrc/<op>/<op>_ops.cpp). Loading the shared library runs the registrations:
// `import fast_attn._C` for the ahead-of-time build (torch must be imported first, it
// provides libtorch), torch.ops.load_library for the JIT build. The Python op layer in
// fast_attn/ops/ calls these as torch.ops.fast_attn.<name>.
//
// No pybind11 and no torch/extension.h: the module init uses only the stable Python C
// API, so setup.py can build this file with py_limited_api.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(fast_attn, m) {
  // csrc/ffn/bias_gelu_ops.cpp: y = gelu(x + bias); dx, dbias of it (dbias is an empty
  // tensor when bias is None). GELU exact (erf) or, with approximate_tanh, the tanh form.
  m.def("cuda_bias_gelu_fwd(Tensor x, Tensor? bias, bool approximate_tanh) -> Tensor");
  m.def(
      "cuda_bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool approximate_tanh) "
      "-> (Tensor dx, Tensor dbias)");
}

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "fast_attn._C",
    "fast_attn CUDA kernels; importing this module registers the torch.ops.fast_attn ops.",
    -1,  // no per-module state; the op registrations are process-global
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
