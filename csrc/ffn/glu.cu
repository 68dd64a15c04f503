// SwiGLU / GeGLU forward and backward CUDA kernels (no torch headers).
//
// See glu.h for the maths and the contract. One elementwise kernel template,
// glu_kernel<T, kVec, kAct, kBwd>: T the storage type, kVec the elements one thread
// moves per access, kAct the activation, kBwd forward or backward. The activation
// formulas are torch's (GeluCUDAKernelImpl, GeluBackwardCUDAKernelImpl, silu_kernel,
// silu_backward_kernel), in the same operation order, so the fp32 results agree with the
// reference to the last bit or so and the single rounding to T matches it.
//
// Work split: a 2-D grid over (column chunks, rows). A block is bx * by = kThreads
// threads: bx, a power of two in [32, kThreads], covers a row's chunks of kVec columns
// (a narrow row leaves room for several rows in one block), by rows. Each thread handles
// one (row, chunk); the two loops around that only take a second trip beyond the grid
// limits (2^31 - 1 blocks in x, 65535 in y). No integer division per element and nothing
// sized from occupancy: the hardware scheduler balances the many small blocks.
// When every input is contiguous (the usual case) the (rows, cols) tensor is walked as one
// row of rows * cols elements: only the very last chunk can then be partial.
//
// Memory traffic is the whole cost, so each thread moves 16 bytes per access (kVec = 8
// halves or 4 floats) when every row start of every tensor is 16-byte aligned; a row's
// last, partial chunk is then done element by element. Otherwise (e.g. a view starting
// one element into a tensor) kVec = 1: correct, coalesced, but more instructions.
// Offsets are int64; the maths is fp32 whatever the storage type.
//
// Known slow case (correct, just not tuned): a row-strided input (not collapsible into
// one row) with fewer than 32 chunks per row leaves most threads of each warp idle.
#include "common/element_io.cuh"
#include "glu.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fast_attn {
namespace {

using namespace element_io;  // to_float, from_float, Pack, chunk loads/stores

constexpr float kInvSqrt2 = 0.70710678118654752f;     // 1/sqrt(2): erf argument of the exact GELU
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1/sqrt(2*pi): the standard normal density's scale
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2/pi): the tanh GELU's scale
constexpr float kGeluTanhCubic = 0.044715f;           // the tanh GELU's cubic coefficient

constexpr int kVecBytes = 16;  // one 128-bit global load/store
constexpr int kThreads = 256;  // threads per block
constexpr int kWarp = 32;      // the narrowest block row: one warp
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1, the gridDim.x limit
constexpr int64_t kMaxGridY = 65535;       // the gridDim.y limit

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

// ---------------------------------------------------------------------------------------
// Activations in fp32. fwd(g) = act(g); bwd(g, grad) gives act(g) and torch's
// <act>_backward(grad, g) = grad * act'(g), both from one exp/erf/tanh. The operation
// order follows torch's kernels (see the top of file); missing chunk elements are 0,
// for which every formula is finite.

template <GluActivation kAct>
struct Act;

template <>
struct Act<GluActivation::kSilu> {
  static __device__ __forceinline__ float fwd(float g) { return g / (1.0f + expf(-g)); }

  static __device__ __forceinline__ void bwd(float g, float grad, float& act, float& dg) {
    // expf(-g) = inf for g < -88: denom = inf, s = 0, act = -0, dg = 0 (no NaN)
    const float denom = 1.0f + expf(-g);
    const float s = 1.0f / denom;  // sigmoid(g)
    act = g / denom;
    dg = grad * s * (1.0f + g * (1.0f - s));
  }
};

template <>
struct Act<GluActivation::kGelu> {
  static __device__ __forceinline__ float fwd(float g) { return g * 0.5f * (1.0f + erff(g * kInvSqrt2)); }

  static __device__ __forceinline__ void bwd(float g, float grad, float& act, float& dg) {
    // gelu'(g) = Phi(g) + g * phi(g), Phi/phi the standard normal CDF/PDF
    const float cdf = 0.5f * (1.0f + erff(g * kInvSqrt2));
    const float pdf = expf(-0.5f * g * g) * kInvSqrt2Pi;
    act = g * cdf;  // = g * 0.5 * (1 + erf): scaling by 0.5 is exact
    dg = grad * (cdf + g * pdf);
  }
};

template <>
struct Act<GluActivation::kGeluTanh> {
  static __device__ __forceinline__ float fwd(float g) {
    const float inner = kSqrt2OverPi * (g + kGeluTanhCubic * (g * g * g));
    return 0.5f * g * (1.0f + tanhf(inner));
  }

  static __device__ __forceinline__ void bwd(float g, float grad, float& act, float& dg) {
    // d/dg [0.5 g (1 + t)] with dt/dg = (1 - t^2) * sqrt(2/pi) * (1 + 3 c g^2)
    const float g_sq = g * g;
    const float inner = kSqrt2OverPi * (g + kGeluTanhCubic * (g_sq * g));
    const float t = tanhf(inner);
    const float left = 0.5f * g;
    const float right = 1.0f + t;
    const float left_derivative = 0.5f * right;
    const float right_derivative = (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * g_sq);
    act = left * right;
    dg = grad * (left_derivative + left * right_derivative);
  }
};

// ---------------------------------------------------------------------------------------
// Kernel

// fwd: y = act(gate) * up. bwd (kBwd): dgate = (dy * up) * act'(gate), dup = dy * act(gate)
// (autograd's order through the reference: mul's backward, then act's). Thread (x, y)
// of block (bx, by) handles column chunk bx * blockDim.x + x of row by * blockDim.y + y.
template <typename T, int kVec, GluActivation kAct, bool kBwd>
__global__ void __launch_bounds__(kThreads) glu_kernel(const GluParams p, const int64_t chunks_per_row) {
  const T* __restrict__ gate = static_cast<const T*>(p.gate);
  const T* __restrict__ up = static_cast<const T*>(p.up);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  T* __restrict__ y = static_cast<T*>(p.y);
  T* __restrict__ dgate = static_cast<T*>(p.dgate);
  T* __restrict__ dup = static_cast<T*>(p.dup);

  const int64_t chunk_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; chunk < chunks_per_row;
       chunk += chunk_step) {
    const int64_t col0 = chunk * kVec;
    const int n = static_cast<int>(min64(kVec, p.cols - col0));
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
         row += row_step) {
      float g[kVec];
      float u[kVec];
      load_chunk<kVec>(gate + row * p.gate_row_stride + col0, n, g);
      load_chunk<kVec>(up + row * p.up_row_stride + col0, n, u);
      const int64_t out_offset = row * p.cols + col0;  // outputs are contiguous
      if constexpr (kBwd) {
        float d[kVec];
        load_chunk<kVec>(dy + row * p.dy_row_stride + col0, n, d);
        float dg[kVec];
        float du[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          float act;
          Act<kAct>::bwd(g[i], d[i] * u[i], act, dg[i]);
          du[i] = d[i] * act;
        }
        store_chunk<kVec>(dgate + out_offset, n, dg);
        store_chunk<kVec>(dup + out_offset, n, du);
      } else {
        float out[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[i] = Act<kAct>::fwd(g[i]) * u[i];
        store_chunk<kVec>(y + out_offset, n, out);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when every row of a (rows, cols) tensor of T at ptr starts on a 16-byte boundary.
template <typename T>
bool rows_aligned(const void* ptr, int64_t row_stride, int64_t rows) {
  const bool base = reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0;
  return base && (rows <= 1 || (row_stride * static_cast<int64_t>(sizeof(T))) % kVecBytes == 0);
}

template <typename T>
bool can_vectorize(const GluParams& p, bool bwd) {
  const bool inputs = rows_aligned<T>(p.gate, p.gate_row_stride, p.rows) &&
                      rows_aligned<T>(p.up, p.up_row_stride, p.rows) &&
                      (!bwd || rows_aligned<T>(p.dy, p.dy_row_stride, p.rows));
  const bool outputs = bwd ? rows_aligned<T>(p.dgate, p.cols, p.rows) && rows_aligned<T>(p.dup, p.cols, p.rows)
                           : rows_aligned<T>(p.y, p.cols, p.rows);
  return inputs && outputs;
}

// Calls f(std::integral_constant<GluActivation, act>) so `act` becomes a template parameter.
template <typename F>
cudaError_t activation_switch(GluActivation act, F&& f) {
  switch (act) {
    case GluActivation::kSilu:
      return f(std::integral_constant<GluActivation, GluActivation::kSilu>{});
    case GluActivation::kGelu:
      return f(std::integral_constant<GluActivation, GluActivation::kGelu>{});
    case GluActivation::kGeluTanh:
      return f(std::integral_constant<GluActivation, GluActivation::kGeluTanh>{});
  }
  return cudaErrorInvalidValue;
}

template <typename T, int kVec>
cudaError_t launch(const GluParams& p, bool bwd, cudaStream_t stream) {
  const int64_t chunks_per_row = ceil_div(p.cols, kVec);
  int64_t block_x = kWarp;  // the power of two in [32, kThreads] covering a row's chunks
  while (block_x < kThreads && block_x < chunks_per_row) block_x *= 2;
  const int64_t block_y = kThreads / block_x;
  const dim3 block(static_cast<unsigned>(block_x), static_cast<unsigned>(block_y));
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(chunks_per_row, block_x), kMaxGridX)),
                  static_cast<unsigned>(std::min(ceil_div(p.rows, block_y), kMaxGridY)));
  return activation_switch(p.activation, [&](auto act_constant) {
    constexpr GluActivation kAct = decltype(act_constant)::value;
    if (bwd) {
      glu_kernel<T, kVec, kAct, true><<<grid, block, 0, stream>>>(p, chunks_per_row);
    } else {
      glu_kernel<T, kVec, kAct, false><<<grid, block, 0, stream>>>(p, chunks_per_row);
    }
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t run(GluParams p, bool bwd, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  // Inputs laid out like the (contiguous) outputs: one row of rows * cols elements.
  const bool contiguous = p.gate_row_stride == p.cols && p.up_row_stride == p.cols &&
                          (!bwd || p.dy_row_stride == p.cols);
  if (p.rows > 1 && contiguous) {
    p.cols *= p.rows;
    p.rows = 1;
    p.gate_row_stride = p.up_row_stride = p.dy_row_stride = p.cols;
  }
  if (can_vectorize<T>(p, bwd)) return launch<T, vec_width<T>()>(p, bwd, stream);
  return launch<T, 1>(p, bwd, stream);
}

// Calls f(T{}) with T the storage type named by `kind`.
template <typename F>
cudaError_t dtype_switch(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return f(float{});
    case ScalarKind::kFloat16:
      return f(__half{});
    case ScalarKind::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t glu_fwd(const GluParams& params, cudaStream_t stream) {
  return dtype_switch(params.dtype, [&](auto zero) {
    using T = decltype(zero);
    return run<T>(params, /*bwd=*/false, stream);
  });
}

cudaError_t glu_bwd(const GluParams& params, cudaStream_t stream) {
  return dtype_switch(params.dtype, [&](auto zero) {
    using T = decltype(zero);
    return run<T>(params, /*bwd=*/true, stream);
  });
}

}  // namespace fast_attn
