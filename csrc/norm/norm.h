// LayerNorm / RMSNorm over the last dimension with the fused residual add, forward and
// backward: parameter structs and launchers (no torch headers).
//
//   h    = x + residual           added in fp32, rounded to x's dtype (h = x without residual)
//   LayerNorm: mean = sum(h) / N,  rstd = 1 / sqrt(sum((h - mean)^2) / N + eps)
//              y = (h - mean) * rstd * weight + bias
//   RMSNorm:   rstd = 1 / sqrt(sum(h^2) / N + eps),  y = h * rstd * weight
//
// The statistics are those of the ROUNDED h (the tensor the backward receives), so the
// saved mean/rstd match the backward's input exactly. With xhat = (h - mean) * rstd
// (h * rstd for RMSNorm) and g = dy * weight (dy without weight), the backward is
//
//   dx      = rstd * (g - xhat * mean(g * xhat) - mean(g)) + dh   (no mean(g) for RMSNorm)
//   dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy
//
// All arithmetic is fp32. dweight/dbias are reduced deterministically: each block of the
// backward writes fp32 column sums over its rows into a workspace, and a second kernel
// adds those partial rows in a fixed order (no atomics): repeated calls with the same
// shapes on the same GPU give bitwise-equal results.
//
// Layout: x, residual, dy, dh and inp are (rows, cols) with a unit column stride and any
// row stride (0 included: a broadcast row); y, h and dx are contiguous (rows, cols);
// weight, bias, dweight, dbias are contiguous (cols,). x, residual, y, h, dy, dh, inp
// and dx share one dtype (`dtype`: fp16, bf16 or fp32); weight and bias are each stored
// in that dtype or in fp32 (the caller converts other dtypes), dweight and dbias in any
// of fp16, bf16, fp32, fp64 (`param_dtype`). Any rows >= 0, any cols >= 1. A launcher
// given anything else returns cudaErrorInvalidValue.
//
// The launchers enqueue on `stream` and never synchronize; they return the launch status
// (cudaGetLastError) for the caller to check.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fast_attn {

// Storage type of a tensor the norm kernels read or write.
enum class NormDtype : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

struct NormFwdParams {
  const void* x = nullptr;         // (rows, cols), row stride x_row_stride
  const void* residual = nullptr;  // (rows, cols), row stride residual_row_stride, or nullptr
  const void* weight = nullptr;    // (cols,) or nullptr
  const void* bias = nullptr;      // (cols,) or nullptr
  void* y = nullptr;               // (rows, cols) contiguous
  void* h = nullptr;               // (rows, cols) contiguous; written iff residual != nullptr
  float* mean = nullptr;           // (rows,); LayerNorm only (nullptr for RMSNorm)
  float* rstd = nullptr;           // (rows,)

  int64_t rows = 0;
  int64_t cols = 0;
  int64_t x_row_stride = 0;         // in elements
  int64_t residual_row_stride = 0;  // in elements

  float eps = 0.0f;
  bool rms = false;
  NormDtype dtype = NormDtype::kFloat32;  // x, residual, y, h
  NormDtype weight_dtype = NormDtype::kFloat32;  // `dtype` or kFloat32
  NormDtype bias_dtype = NormDtype::kFloat32;    // `dtype` or kFloat32
  int device = 0;  // CUDA device of every pointer: its SM count sizes the grids
};

struct NormBwdParams {
  const void* dy = nullptr;      // (rows, cols), row stride dy_row_stride
  const void* dh = nullptr;      // (rows, cols), row stride dh_row_stride, or nullptr
  const void* inp = nullptr;     // (rows, cols), row stride inp_row_stride: the normalised h
  const void* weight = nullptr;  // (cols,) or nullptr
  const float* mean = nullptr;   // (rows,); LayerNorm only (unused for RMSNorm)
  const float* rstd = nullptr;   // (rows,)
  void* dx = nullptr;            // (rows, cols) contiguous
  void* dweight = nullptr;       // (cols,) in param_dtype, or nullptr (not wanted)
  void* dbias = nullptr;         // (cols,) in param_dtype, or nullptr (not wanted)
  float* workspace = nullptr;    // norm_bwd_workspace_numel() fp32 values (when > 0)

  int64_t rows = 0;
  int64_t cols = 0;
  int64_t dy_row_stride = 0;   // in elements
  int64_t dh_row_stride = 0;   // in elements
  int64_t inp_row_stride = 0;  // in elements

  bool rms = false;
  NormDtype dtype = NormDtype::kFloat32;         // dy, dh, inp, dx
  NormDtype weight_dtype = NormDtype::kFloat32;  // weight: `dtype` or kFloat32
  NormDtype param_dtype = NormDtype::kFloat32;   // dweight and dbias: any
  int device = 0;
};

// y, h (with residual), mean (LayerNorm) and rstd.
cudaError_t norm_fwd(const NormFwdParams& params, cudaStream_t stream);

// fp32 workspace elements norm_bwd needs for these shapes (0 when none); -1 when the
// device's SM count cannot be queried. Depends only on rows, cols, dtype, whether
// dweight/dbias are wanted and the device's SM count.
int64_t norm_bwd_workspace_numel(const NormBwdParams& params);

// dx, and dweight / dbias where their pointers are set.
cudaError_t norm_bwd(const NormBwdParams& params, cudaStream_t stream);

}  // namespace fast_attn
