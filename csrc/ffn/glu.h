// Gated linear units SwiGLU and GeGLU, forward and backward: launchers (no torch headers).
//
//   fwd: y     = act(gate) * up
//   bwd: dgate = dy * up * act'(gate),  dup = dy * act(gate)
//
// act is SiLU, u * sigmoid(u) (SwiGLU), or GELU (GeGLU), exact, 0.5 u (1 + erf(u / sqrt 2)),
// or the tanh approximation, 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))): the GLU
// variants of Shazeer 2020, "GLU Variants Improve Transformer" (arXiv:2002.05202). All
// maths is fp32 with torch's formulas (accurate expf/erff/tanhf, no fast-math) and each
// output is rounded once to the storage type, as fast_attn/reference/ffn.py does.
//
// Tensors are 2-D (rows, cols) with a unit column stride. The inputs gate, up and dy may
// each have any row stride (0 too: a broadcast row); the outputs are contiguous
// (row stride cols). Inputs are only read, so they may alias one another.
//
// The launchers enqueue on `stream` and never synchronize; they return the launch status
// (cudaGetLastError) for the caller to check.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "bias_gelu.h"  // ScalarKind, the element type shared by the ffn kernels

namespace fast_attn {

enum class GluActivation : int {
  kSilu,      // SwiGLU
  kGelu,      // GeGLU, exact (erf) GELU
  kGeluTanh,  // GeGLU, tanh-approximated GELU
};

struct GluParams {
  const void* gate = nullptr;  // (rows, cols), row stride gate_row_stride
  const void* up = nullptr;    // (rows, cols), row stride up_row_stride
  const void* dy = nullptr;    // bwd only: (rows, cols), row stride dy_row_stride
  void* y = nullptr;           // fwd: (rows, cols) contiguous
  void* dgate = nullptr;       // bwd: (rows, cols) contiguous
  void* dup = nullptr;         // bwd: (rows, cols) contiguous

  int64_t rows = 0;
  int64_t cols = 0;
  int64_t gate_row_stride = 0;  // in elements
  int64_t up_row_stride = 0;    // in elements
  int64_t dy_row_stride = 0;    // in elements

  ScalarKind dtype = ScalarKind::kFloat32;
  GluActivation activation = GluActivation::kSilu;
};

// y = act(gate) * up into params.y.
cudaError_t glu_fwd(const GluParams& params, cudaStream_t stream);

// dgate = dy * up * act'(gate) into params.dgate, dup = dy * act(gate) into params.dup.
cudaError_t glu_bwd(const GluParams& params, cudaStream_t stream);

}  // namespace fast_attn
