// Fused bias + GELU activation, forward and backward: launchers (no torch headers).
//
//   fwd: y  = gelu(x + bias)
//   bwd: dx = dy * gelu'(x + bias),  dbias = sum over rows of dx
//
// GELU is either exact, 0.5 u (1 + erf(u / sqrt 2)), or the tanh approximation,
// 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) (Hendrycks & Gimpel, 2016); both
// match torch.nn.functional.gelu(approximate="none" / "tanh"). All maths is fp32.
//
// Tensors are 2-D (rows, cols) with a unit column stride and any row stride; bias and
// dbias are (cols,) contiguous, in the dtype of x. dbias is reduced deterministically:
// each block writes fp32 partial column sums of its row slab to a workspace, and a
// second kernel adds the slabs in a fixed order (no atomics), so repeated calls with
// the same shapes on the same GPU give bitwise-equal results.
//
// The launchers enqueue on `stream` and never synchronize; they return the launch
// status (cudaGetLastError) for the caller to check.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fast_attn {

// Element type of x, dy, y, dx, bias and dbias.
enum class ScalarKind : int { kFloat32, kFloat16, kBFloat16 };

struct BiasGeluParams {
  const void* x = nullptr;     // (rows, cols), row stride x_row_stride
  const void* bias = nullptr;  // (cols,) or nullptr: no bias (and no dbias)
  const void* dy = nullptr;    // bwd only: (rows, cols), row stride dy_row_stride
  void* out = nullptr;         // fwd: y, bwd: dx; (rows, cols), row stride out_row_stride
  void* dbias = nullptr;       // bwd with bias: (cols,)
  float* workspace = nullptr;  // bwd with bias: bias_gelu_bwd_workspace_numel() fp32 values

  int64_t rows = 0;
  int64_t cols = 0;
  int64_t x_row_stride = 0;    // in elements
  int64_t dy_row_stride = 0;   // in elements
  int64_t out_row_stride = 0;  // in elements

  ScalarKind dtype = ScalarKind::kFloat32;
  bool approximate_tanh = false;
  int device = 0;  // CUDA device of every pointer: its SM count sizes the grids
};

// y = gelu(x + bias) into params.out.
cudaError_t bias_gelu_fwd(const BiasGeluParams& params, cudaStream_t stream);

// Number of fp32 workspace elements bias_gelu_bwd needs for these shapes when a bias is
// given (0 without bias); -1 when the device's SM count cannot be queried. Depends only
// on rows, cols, dtype and the device's SM count.
int64_t bias_gelu_bwd_workspace_numel(const BiasGeluParams& params);

// dx = dy * gelu'(x + bias) into params.out; with a bias also dbias (see the top of file).
cudaError_t bias_gelu_bwd(const BiasGeluParams& params, cudaStream_t stream);

}  // namespace fast_attn
