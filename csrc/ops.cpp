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

  // csrc/ffn/glu_ops.cpp: y = act(gate) * up with act "silu" (SwiGLU), "gelu" (exact,
  // GeGLU) or "gelu_tanh"; the backward returns (dgate, dup).
  m.def("cuda_glu_fwd(Tensor gate, Tensor up, str activation) -> Tensor");
  m.def("cuda_glu_bwd(Tensor dy, Tensor gate, Tensor up, str activation) -> (Tensor dgate, Tensor dup)");

  // csrc/norm/norm_ops.cpp: LayerNorm (rms=False) or RMSNorm (rms=True) over the last dim,
  // with the fused residual add h = x + residual. Returns (y, h (empty without residual),
  // mean (rows,) fp32 (empty for RMSNorm), rstd (rows,) fp32). The backward takes the
  // normalised input `inp` (h, or x without residual), dh the gradient flowing into h, and
  // returns (dx (includes dh), dweight (empty without weight), dbias (empty unless want_dbias)).
  m.def(
      "cuda_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def(
      "cuda_norm_bwd(Tensor dy, Tensor? dh, Tensor inp, Tensor? weight, Tensor mean, Tensor rstd, "
      "bool rms, bool want_dbias) -> (Tensor dx, Tensor dweight, Tensor dbias)");

  // csrc/attention/attention_ops.cpp: flash attention, dense (q (B, Sq, Hq, D)), varlen
  // (cu_seqlens_q/k given, q (total_q, Hq, D)) or kv-cache (seqlens_k given: valid keys per
  // batch). Returns out and lse fp32 ((B, Hq, Sq), varlen (Hq, total_q)). arch: 0 auto,
  // 1 force the sm_80 kernels, 2 force the sm_90a kernels (see attention_params.h).
  m.def(
      "cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, "
      "int window_left, int window_right, float softcap, int arch) -> (Tensor out, Tensor lse)");
  m.def(
      "cuda_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
      "bool deterministic, int arch) -> (Tensor dq, Tensor dk, Tensor dv)");
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
