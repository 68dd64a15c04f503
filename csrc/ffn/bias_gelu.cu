// Fused bias + GELU activation, forward and backward CUDA kernels (no torch headers).
//
// See bias_gelu.h for the maths and the contract. Three kernels:
//
//   bias_gelu_elementwise_kernel   fwd, and bwd without bias: one pass over a 2-D grid,
//                                  threads in x own chunks of kVec consecutive columns
//                                  (and load their bias chunk once), threads in y walk
//                                  about kRowsPerThread rows each
//   bias_gelu_bwd_partial_kernel   bwd with bias: dx, plus fp32 partial column sums of
//                                  dx over one slab of rows, written to a workspace; the
//                                  grid is at most one wave of resident blocks
//   dbias_reduce_kernel            dbias[c] = the slabs' partials summed in a fixed order
//
// Memory traffic is the whole cost, so each thread moves 16 bytes per access when every
// row start is 16-byte aligned (kVec = 16 / sizeof(T): 8 halves or 4 floats); a row's
// last, partial chunk is then done element by element. Otherwise kVec = 1. Without a
// bias, contiguous tensors are walked as one row of rows * cols elements.
// Offsets are int64; the maths is fp32 whatever the storage type.
//
// Speed notes (reasoned from the code and ptxas register counts, not yet measured): an
// earlier version grid-strided the elementwise kernel over 8 blocks per SM, but at 40-52
// registers per thread only 4-6 blocks of 256 fit, so the grid ran as ~1.3-2 waves with
// a part-empty last one, and each chunk paid a 64-bit division for its row; it also
// sized the bwd-with-bias grid with a ceiling division that could spill a few blocks into
// a second, nearly empty wave (16384 bf16 columns: 576 blocks for 528 slots), and summed
// the slabs with one serial thread per column (16 blocks for 4096 columns).
#include "common/element_io.cuh"
#include "bias_gelu.h"
#include "common/device_info.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fast_attn {
namespace {

using namespace element_io;  // to_float, from_float, Pack, chunk loads/stores

constexpr float kInvSqrt2 = 0.70710678118654752f;    // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1/sqrt(2*pi)
constexpr float kAlpha = 0.79788456080286536f;       // sqrt(2/pi)
constexpr float kBeta = 0.044715f;                   // cubic term of the tanh approximation

constexpr int kVecBytes = 16;  // one 128-bit global load/store
constexpr int kThreads = 256;  // elementwise kernel block size
constexpr int kWarp = 32;      // the narrowest elementwise block row: one warp
// Rows each elementwise thread walks, so that its bias chunk is loaded once for several
// rows; small inputs use fewer, to keep at least kMinBlocksPerSm blocks per SM.
constexpr int64_t kRowsPerThread = 4;
constexpr int64_t kMinBlocksPerSm = 8;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1, the gridDim.x limit
constexpr int64_t kMaxGridY = 65535;       // the gridDim.y limit

// Backward tile: a warp across kBwdThreadsX * kVec columns, kBwdThreadsY warps down rows.
constexpr int kBwdThreadsX = 32;
constexpr int kBwdThreadsY = 8;
// Resident blocks per SM the bwd-with-bias grid is sized for; __launch_bounds__ holds the
// kernel to 65536 / (kBwdBlocksPerSm * 256) = 64 registers so that they really fit.
constexpr int kBwdBlocksPerSm = 4;
// A slab shorter than this spends more on writing its partial sums than on its rows.
constexpr int64_t kMinRowsPerSlab = 64;
// Reduce tile: kReduceThreadsX columns, each summed by kReduceThreadsY threads.
constexpr int kReduceThreadsX = 32;
constexpr int kReduceThreadsY = 8;


__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

// ---------------------------------------------------------------------------------------
// GELU and its derivative in fp32, the same formulas as torch's GeluKernel.

template <bool kTanh>
__device__ __forceinline__ float gelu(float u) {
  if constexpr (kTanh) {
    const float t = tanhf(kAlpha * (u + kBeta * u * u * u));
    return 0.5f * u * (1.0f + t);
  } else {
    return 0.5f * u * (1.0f + erff(u * kInvSqrt2));
  }
}

template <bool kTanh>
__device__ __forceinline__ float gelu_grad(float u) {
  if constexpr (kTanh) {
    const float t = tanhf(kAlpha * (u + kBeta * u * u * u));
    // d/du [0.5 u (1 + t)] with dt/du = (1 - t^2) * alpha * (1 + 3 beta u^2)
    return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kAlpha * (1.0f + 3.0f * kBeta * u * u);
  } else {
    // Phi(u) + u * phi(u), Phi/phi the standard normal CDF/PDF
    return 0.5f * (1.0f + erff(u * kInvSqrt2)) + u * kInvSqrt2Pi * expf(-0.5f * u * u);
  }
}

// ---------------------------------------------------------------------------------------
// Kernels

// fwd: out = gelu(x + bias); bwd (kBwd): out = dy * gelu'(x + bias). Thread (x, y) of
// block (bx, by) owns column chunk bx * blockDim.x + x and rows by * blockDim.y + y,
// + gridDim.y * blockDim.y, ...; the chunk loop only takes a second trip past the grid's
// x limit.
template <typename T, int kVec, bool kTanh, bool kBwd>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_elementwise_kernel(const BiasGeluParams p, const int64_t chunks_per_row) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  T* __restrict__ out = static_cast<T*>(p.out);

  const int64_t chunk_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; chunk < chunks_per_row;
       chunk += chunk_step) {
    const int64_t col0 = chunk * kVec;
    const int n = static_cast<int>(min64(kVec, p.cols - col0));
    float b[kVec];
    if (bias != nullptr) {
      load_chunk<kVec>(bias + col0, n, b);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) b[i] = 0.0f;
    }

    for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
         row += row_step) {
      // u = x + bias (without a bias u = x exactly, -0 included)
      float u[kVec];
      load_chunk<kVec>(x + row * p.x_row_stride + col0, n, u);
      if (bias != nullptr) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) u[i] += b[i];
      }

      float result[kVec];
      if constexpr (kBwd) {
        float g[kVec];
        load_chunk<kVec>(dy + row * p.dy_row_stride + col0, n, g);
#pragma unroll
        for (int i = 0; i < kVec; ++i) result[i] = g[i] * gelu_grad<kTanh>(u[i]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) result[i] = gelu<kTanh>(u[i]);
      }
      store_chunk<kVec>(out + row * p.out_row_stride + col0, n, result);
    }
  }
}

// bwd with bias. Block (blockIdx.x, blockIdx.y) owns columns
// [blockIdx.x * kBwdThreadsX * kVec, +kBwdThreadsX * kVec) of rows
// [blockIdx.y * rows_per_slab, +rows_per_slab): it writes dx there and the fp32 column
// sums of dx over its rows to workspace[blockIdx.y, col] (workspace is (slabs, cols)).
template <typename T, int kVec, bool kTanh>
__global__ void __launch_bounds__(kBwdThreadsX* kBwdThreadsY, kBwdBlocksPerSm)
    bias_gelu_bwd_partial_kernel(const BiasGeluParams p, const int64_t rows_per_slab) {
  // partial[ty][i][tx]: the sum of thread (tx, ty)'s rows for its column i of kVec
  __shared__ float partial[kBwdThreadsY][kVec][kBwdThreadsX];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  T* __restrict__ dx = static_cast<T*>(p.out);

  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * kBwdThreadsX + threadIdx.x) * kVec;
  const int n = col0 < p.cols ? static_cast<int>(min64(kVec, p.cols - col0)) : 0;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_slab;
  const int64_t row_end = min64(row_begin + rows_per_slab, p.rows);

  float acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;

  if (n > 0) {
    float b[kVec];
    load_chunk<kVec>(bias + col0, n, b);
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kBwdThreadsY) {
      float u[kVec];
      float g[kVec];
      load_chunk<kVec>(x + row * p.x_row_stride + col0, n, u);
      load_chunk<kVec>(dy + row * p.dy_row_stride + col0, n, g);
      float d[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        d[i] = g[i] * gelu_grad<kTanh>(u[i] + b[i]);
        // dbias sums the unrounded fp32 dx; missing columns hold g = 0, so d = 0
        acc[i] += d[i];
      }
      store_chunk<kVec>(dx + row * p.out_row_stride + col0, n, d);
    }
  }

  // Sum the kBwdThreadsY row groups of each column in a fixed order (deterministic).
#pragma unroll
  for (int i = 0; i < kVec; ++i) partial[threadIdx.y][i][threadIdx.x] = acc[i];
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int i = 0; i < n; ++i) {
      float sum = 0.0f;
#pragma unroll
      for (int ty = 0; ty < kBwdThreadsY; ++ty) sum += partial[ty][i][threadIdx.x];
      p.workspace[static_cast<int64_t>(blockIdx.y) * p.cols + col0 + i] = sum;
    }
  }
}

// dbias[c] = the sum over slabs of workspace[s, c], rounded to T once. Thread (x, y) of
// block bx sums slabs y, y + kReduceThreadsY, ... of column bx * kReduceThreadsX + x in
// that order; thread (x, 0) then adds the kReduceThreadsY sums in order of y. The order
// depends only on num_slabs: the result is deterministic.
template <typename T>
__global__ void __launch_bounds__(kReduceThreadsX* kReduceThreadsY)
    dbias_reduce_kernel(const float* __restrict__ workspace, const int64_t num_slabs, const int64_t cols,
                        T* __restrict__ dbias) {
  __shared__ float partial[kReduceThreadsY][kReduceThreadsX];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceThreadsX + threadIdx.x;
  float sum = 0.0f;
  if (col < cols) {
    for (int64_t slab = threadIdx.y; slab < num_slabs; slab += kReduceThreadsY) sum += workspace[slab * cols + col];
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
#pragma unroll
    for (int ty = 0; ty < kReduceThreadsY; ++ty) total += partial[ty][threadIdx.x];
    dbias[col] = from_float<T>(total);
  }
}

// ---------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0; }

// True when every row of a (rows, cols) tensor at ptr starts on a 16-byte boundary.
bool rows_aligned(const void* ptr, int64_t row_stride, int64_t rows, int64_t elem_size) {
  return aligned(ptr) && (rows <= 1 || (row_stride * elem_size) % kVecBytes == 0);
}

template <typename T>
bool can_vectorize(const BiasGeluParams& p, bool bwd) {
  constexpr int64_t kSize = sizeof(T);
  return rows_aligned(p.x, p.x_row_stride, p.rows, kSize) && rows_aligned(p.out, p.out_row_stride, p.rows, kSize) &&
         (!bwd || rows_aligned(p.dy, p.dy_row_stride, p.rows, kSize)) && (p.bias == nullptr || aligned(p.bias));
}

// Calls f(std::integral_constant<bool, flag>) so `flag` becomes a template parameter.
template <typename F>
void bool_switch(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Slab layout of the bwd-with-bias grid: as many blocks as fit on the GPU at once
// (kBwdBlocksPerSm per SM) but never more, so that no part-empty second wave doubles the
// time; no slab shorter than kMinRowsPerSlab rows and no empty slab. (With more column
// tiles than resident blocks there is one slab and the column tiles run in waves.)
// Depends only on (rows, cols, T, SMs), so the workspace size the binding allocates
// matches the launch, and results are reproducible on a given GPU.
template <typename T>
void bwd_slabs(int64_t rows, int64_t cols, int sms, int64_t* num_slabs, int64_t* rows_per_slab) {
  if (rows == 0 || cols == 0) {
    *num_slabs = 0;
    *rows_per_slab = 0;
    return;
  }
  const int64_t col_tiles = ceil_div(cols, static_cast<int64_t>(kBwdThreadsX) * vec_width<T>());
  const int64_t wanted = static_cast<int64_t>(sms) * kBwdBlocksPerSm / col_tiles;  // rounded down
  const int64_t slabs = std::max<int64_t>(1, std::min(wanted, ceil_div(rows, kMinRowsPerSlab)));
  *rows_per_slab = ceil_div(rows, slabs);
  *num_slabs = ceil_div(rows, *rows_per_slab);
}

template <typename T, int kVec>
cudaError_t launch_elementwise(const BiasGeluParams& p, bool bwd, cudaStream_t stream) {
  int sms = 0;
  const cudaError_t err = sm_count(p.device, &sms);
  if (err != cudaSuccess) return err;
  const int64_t chunks_per_row = ceil_div(p.cols, kVec);
  int64_t block_x = kWarp;  // the power of two in [32, kThreads] covering a row's chunks
  while (block_x < kThreads && block_x < chunks_per_row) block_x *= 2;
  const int64_t block_y = kThreads / block_x;
  const int64_t grid_x = std::min(ceil_div(chunks_per_row, block_x), kMaxGridX);
  // about kRowsPerThread rows per thread, or one when that gives too few blocks
  const int64_t row_groups = ceil_div(p.rows, block_y);
  const int64_t fill = std::min(row_groups, ceil_div(static_cast<int64_t>(sms) * kMinBlocksPerSm, grid_x));
  const int64_t grid_y = std::min(std::max(ceil_div(row_groups, kRowsPerThread), fill), kMaxGridY);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const dim3 block(static_cast<unsigned>(block_x), static_cast<unsigned>(block_y));
  bool_switch(p.approximate_tanh, [&](auto tanh_flag) {
    constexpr bool kTanh = decltype(tanh_flag)::value;
    bool_switch(bwd, [&](auto bwd_flag) {
      constexpr bool kBwd = decltype(bwd_flag)::value;
      bias_gelu_elementwise_kernel<T, kVec, kTanh, kBwd><<<grid, block, 0, stream>>>(p, chunks_per_row);
    });
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t elementwise(BiasGeluParams p, bool bwd, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  // Without a bias, tensors laid out like the contiguous output are one row of rows * cols.
  const bool contiguous = p.x_row_stride == p.cols && p.out_row_stride == p.cols &&
                          (!bwd || p.dy_row_stride == p.cols);
  if (p.bias == nullptr && p.rows > 1 && contiguous) {
    p.cols *= p.rows;
    p.rows = 1;
    p.x_row_stride = p.dy_row_stride = p.out_row_stride = p.cols;
  }
  if (can_vectorize<T>(p, bwd)) return launch_elementwise<T, vec_width<T>()>(p, bwd, stream);
  return launch_elementwise<T, 1>(p, bwd, stream);
}

template <typename T, int kVec>
void launch_bwd_partial(const BiasGeluParams& p, int64_t num_slabs, int64_t rows_per_slab, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.cols, static_cast<int64_t>(kBwdThreadsX) * kVec)),
                  static_cast<unsigned>(num_slabs));
  const dim3 block(kBwdThreadsX, kBwdThreadsY);
  bool_switch(p.approximate_tanh, [&](auto tanh_flag) {
    constexpr bool kTanh = decltype(tanh_flag)::value;
    bias_gelu_bwd_partial_kernel<T, kVec, kTanh><<<grid, block, 0, stream>>>(p, rows_per_slab);
  });
}

template <typename T>
cudaError_t bwd_with_bias(const BiasGeluParams& p, cudaStream_t stream) {
  if (p.cols == 0) return cudaSuccess;
  int sms = 0;
  const cudaError_t err = sm_count(p.device, &sms);
  if (err != cudaSuccess) return err;
  int64_t num_slabs = 0;
  int64_t rows_per_slab = 0;
  bwd_slabs<T>(p.rows, p.cols, sms, &num_slabs, &rows_per_slab);
  if (num_slabs > 0) {
    if (can_vectorize<T>(p, /*bwd=*/true)) {
      launch_bwd_partial<T, vec_width<T>()>(p, num_slabs, rows_per_slab, stream);
    } else {
      launch_bwd_partial<T, 1>(p, num_slabs, rows_per_slab, stream);
    }
  }
  // With rows == 0 this sums zero slabs: dbias = 0.
  const dim3 reduce_block(kReduceThreadsX, kReduceThreadsY);
  dbias_reduce_kernel<T><<<static_cast<unsigned>(ceil_div(p.cols, kReduceThreadsX)), reduce_block, 0, stream>>>(
      p.workspace, num_slabs, p.cols, static_cast<T*>(p.dbias));
  return cudaGetLastError();
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

cudaError_t bias_gelu_fwd(const BiasGeluParams& params, cudaStream_t stream) {
  return dtype_switch(params.dtype, [&](auto zero) {
    using T = decltype(zero);
    return elementwise<T>(params, /*bwd=*/false, stream);
  });
}

int64_t bias_gelu_bwd_workspace_numel(const BiasGeluParams& params) {
  if (params.bias == nullptr || params.rows == 0 || params.cols == 0) return 0;
  int sms = 0;
  if (sm_count(params.device, &sms) != cudaSuccess) return -1;
  int64_t num_slabs = 0;
  int64_t rows_per_slab = 0;
  dtype_switch(params.dtype, [&](auto zero) {
    using T = decltype(zero);
    bwd_slabs<T>(params.rows, params.cols, sms, &num_slabs, &rows_per_slab);
    return cudaSuccess;
  });
  return num_slabs * params.cols;
}

cudaError_t bias_gelu_bwd(const BiasGeluParams& params, cudaStream_t stream) {
  return dtype_switch(params.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (params.bias == nullptr) return elementwise<T>(params, /*bwd=*/true, stream);
    return bwd_with_bias<T>(params, stream);
  });
}

}  // namespace fast_attn
