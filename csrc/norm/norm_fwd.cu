// LayerNorm / RMSNorm forward with the fused residual add: CUDA kernels and the norm_fwd
// launcher (no torch headers). See norm.h for the maths and the contract, and
// norm_common.cuh for the chunked row access (kAligned) and the team reductions.
//
// A "team" of threads (one warp, or a whole block) owns one row at a time; thread t of the
// team owns chunks t, t + team, t + 2 team, ... of the row, so consecutive threads touch
// consecutive 16 bytes. Two kernels:
//
//   norm_fwd_kernel       rows up to kMaxRegChunks chunks: the row stays in registers in
//                         its storage type (h after the residual add is exactly that type);
//                         mean, then the centred sum of squares (two passes over registers,
//                         exact whatever |mean| / std), then y. One read of x (+ residual),
//                         one write of y (+ h).
//   norm_fwd_wide_kernel  wider rows: one block per row, two passes over global memory,
//                         the second mostly from L2: per-thread moments merged with Chan
//                         et al.'s parallel update, then y.
//
// Statistics are fp32 for every storage type; offsets int64. Unmeasured (no GPU where this
// was written; check on the H100): the team shapes below come from register arithmetic and
// ptxas -v (sm_90a), not timings.
#include "norm_common.cuh"

namespace fast_attn {
namespace {

using namespace norm_detail;

// Widest row (in chunks) kept in registers: 2048 chunks = 16384 halves / 8192 floats,
// 4 chunks per thread at 512 threads.
constexpr int64_t kMaxRegChunks = 2048;
// Wide rows: one block per row; two resident blocks per SM keep the rows that pass 2
// re-reads within L2 (132 SMs x 2 x 128 KiB = 33 MiB at 65536 halves).
constexpr int kWideThreads = 512;
constexpr int kWideBlocksPerSm = 2;
// Chunks each thread of the wide kernel loads before using any of them.
constexpr int kWideUnroll = 4;
// Register path: resident threads per SM the aligned kernels are compiled for
// (__launch_bounds__ min blocks): 1024 caps them at 64 registers. Without it the bf16
// 8192-wide config took 66 registers, 3 blocks of 256 threads per SM instead of 4. (The
// element-wise kernels would spill at 64; they keep the compiler's choice.)
constexpr int kMinResidentThreads = 1024;
// Cap on the register-path grid (a grid-stride loop covers more rows).
constexpr int64_t kMaxGrid = int64_t{1} << 20;

// Count, mean and sum of squared deviations (M2) of a set of values.
struct Moments {
  float count;
  float mean;
  float m2;
};

// The moments of the union of two sets (Chan, Golub & LeVeque 1979): exact up to
// rounding whatever |mean| / std, unlike E[x^2] - E[x]^2. Either set may be empty.
__device__ __forceinline__ Moments merge_moments(const Moments& a, const Moments& b) {
  const float count = a.count + b.count;
  if (count == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float b_share = b.count / count;
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

// The moments of the n valid values of one chunk (entries past n are ignored).
template <int kVec>
__device__ __forceinline__ Moments chunk_moments(const float (&v)[kVec], int n) {
  if (n == 0) return {0.0f, 0.0f, 0.0f};
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) sum += i < n ? v[i] : 0.0f;
  const float mean = sum / static_cast<float>(n);
  float m2 = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float d = i < n ? v[i] - mean : 0.0f;
    m2 += d * d;
  }
  return {static_cast<float>(n), mean, m2};
}

// The block's moments, in every thread (one call per row, by the whole block). The
// butterfly merges in canonical order (lower lane first), so both partners compute the
// same bits; the trailing barrier frees `red` (3 floats per warp) for the next call.
template <int kThreads>
__device__ __forceinline__ Moments block_moments(Moments m, float* red) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const Moments other = {__shfl_xor_sync(kFullMask, m.count, offset), __shfl_xor_sync(kFullMask, m.mean, offset),
                           __shfl_xor_sync(kFullMask, m.m2, offset)};
    m = (lane & offset) ? merge_moments(other, m) : merge_moments(m, other);
  }
  constexpr int kWarps = kThreads / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    red[3 * warp] = m.count;
    red[3 * warp + 1] = m.mean;
    red[3 * warp + 2] = m.m2;
  }
  __syncthreads();
  Moments total = {0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total = merge_moments(total, {red[3 * w], red[3 * w + 1], red[3 * w + 2]});
  __syncthreads();
  return total;
}

// Which parameters are stored in fp32 while the rows are 16-bit (host-computed).
struct ParamFlags {
  bool weight_f32 = false;
  bool bias_f32 = false;
};

// h chunk = x chunk (in xr), or x + residual added in fp32, rounded to T (the stored h).
template <bool kAligned, typename T, int kVec>
__device__ __forceinline__ void add_residual_chunk(Pack<T, kVec>& xr, const Pack<T, kVec>& rr, T* h_ptr, int n) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) xr.v[i] = from_float<T>(to_float(xr.v[i]) + to_float(rr.v[i]));
  store_chunk<kAligned>(h_ptr, n, xr);
}

// y chunk = (h - mean) * rstd * weight + bias (rms: mean = 0).
template <bool kAligned, typename T, int kVec>
__device__ __forceinline__ void store_y_chunk(const NormFwdParams& p, const ParamFlags& f, const Pack<T, kVec>& hr,
                                              float mean, float rstd, int64_t row, int64_t col0, int n) {
  float out[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = (to_float(hr.v[i]) - mean) * rstd;
  if (p.weight != nullptr) {
    float w[kVec];
    load_param<kAligned, T>(p.weight, f.weight_f32, col0, n, w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] *= w[i];
  }
  if (p.bias != nullptr) {
    float b[kVec];
    load_param<kAligned, T>(p.bias, f.bias_f32, col0, n, b);
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] += b[i];
  }
  store_floats<kAligned>(static_cast<T*>(p.y) + row * p.cols + col0, n, out);
}

// Rows of at most kTeamThreads * kChunks chunks, kept in registers. Block = kTeams teams;
// team `team` of block b takes rows (b + i * gridDim.x) * kTeams + team, i = 0, 1, ...
template <typename T, int kTeamThreads, int kTeams, int kChunks, bool kAligned>
__global__ void __launch_bounds__(kTeamThreads* kTeams, kAligned ? kMinResidentThreads / (kTeamThreads * kTeams) : 1)
    norm_fwd_kernel(const NormFwdParams p, const ParamFlags f) {
  static_assert(kTeams == 1 || kTeamThreads == kWarpSize, "multi-team blocks use warp teams (no barriers)");
  constexpr int kVec = vec_width<T>();
  __shared__ float red[team_sum_smem<kTeamThreads, kTeams, 1>()];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ residual = static_cast<const T*>(p.residual);
  T* __restrict__ h = static_cast<T*>(p.h);
  const int team = threadIdx.x / kTeamThreads;
  const int lane = threadIdx.x % kTeamThreads;
  const float cols_f = static_cast<float>(p.cols);

  int64_t col0[kChunks];
  int n[kChunks];
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    col0[k] = static_cast<int64_t>(lane + k * kTeamThreads) * kVec;
    n[k] = chunk_size<kVec>(col0[k], p.cols);
  }

  int parity = 0;
  const int64_t num_groups = ceil_div(p.rows, kTeams);
  for (int64_t group = blockIdx.x; group < num_groups; group += gridDim.x) {
    const int64_t row = group * kTeams + team;
    if (row >= p.rows) break;  // only in the last group; a whole (warp) team leaves

    // The row's h in its storage type: every load issued before any is used.
    Pack<T, kVec> hr[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) load_chunk<kAligned>(x + row * p.x_row_stride + col0[k], n[k], hr[k]);
    if (residual != nullptr) {
      Pack<T, kVec> rr[kChunks];
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        load_chunk<kAligned>(residual + row * p.residual_row_stride + col0[k], n[k], rr[k]);
      }
#pragma unroll
      for (int k = 0; k < kChunks; ++k) add_residual_chunk<kAligned>(hr[k], rr[k], h + row * p.cols + col0[k], n[k]);
    }

    // mean (padding holds 0), then the centred sum of squares (of h itself for RMSNorm).
    float mean = 0.0f;
    if (!p.rms) {
      float sum[1] = {0.0f};
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum[0] += to_float(hr[k].v[i]);
      }
      team_sum<kTeamThreads, kTeams, 1>(sum, red, team, parity);
      mean = sum[0] / cols_f;
    }
    float squares[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float d = i < n[k] ? to_float(hr[k].v[i]) - mean : 0.0f;
        squares[0] += d * d;
      }
    }
    team_sum<kTeamThreads, kTeams, 1>(squares, red, team, parity);
    const float rstd = 1.0f / sqrtf(squares[0] / cols_f + p.eps);
    if (lane == 0) {
      if (!p.rms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }

#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (n[k] > 0) store_y_chunk<kAligned>(p, f, hr[k], mean, rstd, row, col0[k], n[k]);
    }
  }
}

// Rows of any width: one block per row (grid-strided), two passes over the row.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kWideThreads) norm_fwd_wide_kernel(const NormFwdParams p, const ParamFlags f) {
  constexpr int kVec = vec_width<T>();
  constexpr int kWarps = kWideThreads / kWarpSize;
  constexpr int64_t kStep = static_cast<int64_t>(kWideThreads) * kWideUnroll;  // chunks per loop trip
  __shared__ float red_moments[3 * kWarps];
  __shared__ float red_sum[team_sum_smem<kWideThreads, 1, 1>()];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ residual = static_cast<const T*>(p.residual);
  T* __restrict__ h = static_cast<T*>(p.h);
  const int64_t chunks = ceil_div(p.cols, kVec);
  int parity = 0;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x_row = x + row * p.x_row_stride;
    T* h_row = h + row * p.cols;

    // Pass 1: h (stored when there is a residual) and its moments (RMSNorm: sum of squares).
    Moments moments = {0.0f, 0.0f, 0.0f};
    float squares[1] = {0.0f};
    for (int64_t base = threadIdx.x; base < chunks; base += kStep) {
      Pack<T, kVec> hr[kWideUnroll];
      int n[kWideUnroll];
#pragma unroll
      for (int u = 0; u < kWideUnroll; ++u) {
        const int64_t col0 = (base + u * kWideThreads) * kVec;
        n[u] = chunk_size<kVec>(col0, p.cols);
        load_chunk<kAligned>(x_row + col0, n[u], hr[u]);
      }
      if (residual != nullptr) {
        Pack<T, kVec> rr[kWideUnroll];
#pragma unroll
        for (int u = 0; u < kWideUnroll; ++u) {
          const int64_t col0 = (base + u * kWideThreads) * kVec;
          load_chunk<kAligned>(residual + row * p.residual_row_stride + col0, n[u], rr[u]);
        }
#pragma unroll
        for (int u = 0; u < kWideUnroll; ++u) {
          add_residual_chunk<kAligned>(hr[u], rr[u], h_row + (base + u * kWideThreads) * kVec, n[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kWideUnroll; ++u) {
        float v[kVec];
        to_floats(hr[u], v);  // 0 past n
        if (p.rms) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) squares[0] += v[i] * v[i];
        } else {
          moments = merge_moments(moments, chunk_moments(v, n[u]));
        }
      }
    }
    float mean = 0.0f;
    float m2 = 0.0f;
    if (p.rms) {
      team_sum<kWideThreads, 1, 1>(squares, red_sum, 0, parity);
      m2 = squares[0];
    } else {
      const Moments total = block_moments<kWideThreads>(moments, red_moments);
      mean = total.mean;
      m2 = total.m2;
    }
    const float rstd = 1.0f / sqrtf(m2 / static_cast<float>(p.cols) + p.eps);
    if (threadIdx.x == 0) {
      if (!p.rms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }

    // Pass 2: y. Each thread re-reads the chunks it handled in pass 1, so the h it stored
    // there is visible to it without a barrier; the row is mostly still in L2.
    const T* src = residual != nullptr ? h_row : x_row;
    for (int64_t base = threadIdx.x; base < chunks; base += kStep) {
      Pack<T, kVec> hr[kWideUnroll];
      int n[kWideUnroll];
#pragma unroll
      for (int u = 0; u < kWideUnroll; ++u) {
        const int64_t col0 = (base + u * kWideThreads) * kVec;
        n[u] = chunk_size<kVec>(col0, p.cols);
        load_chunk<kAligned>(src + col0, n[u], hr[u]);
      }
#pragma unroll
      for (int u = 0; u < kWideUnroll; ++u) {
        if (n[u] > 0) store_y_chunk<kAligned>(p, f, hr[u], mean, rstd, row, (base + u * kWideThreads) * kVec, n[u]);
      }
    }
  }
}

template <typename T, int kTeamThreads, int kTeams, int kChunks, bool kAligned>
cudaError_t launch_reg(const NormFwdParams& p, const ParamFlags& f, cudaStream_t stream) {
  const int64_t grid = min64(ceil_div(p.rows, kTeams), kMaxGrid);
  norm_fwd_kernel<T, kTeamThreads, kTeams, kChunks, kAligned>
      <<<static_cast<unsigned>(grid), kTeamThreads * kTeams, 0, stream>>>(p, f);
  return cudaGetLastError();
}

template <typename T, bool kAligned>
cudaError_t fwd_impl(const NormFwdParams& p, const ParamFlags& f, cudaStream_t stream) {
  // (threads per team, teams per block, chunks per thread) by row width: a warp per row up
  // to 128 chunks (1024 halves), then a block per row with 4 chunks per thread: 4 loads in
  // flight per thread, and small blocks (64-72 registers per thread for 16-bit rows) so
  // that 4 or more rows are in flight per SM (8192 bf16: 4 x 256 threads; 512 threads x
  // 2 chunks would fit only 2 blocks, at 50 registers).
  const int64_t chunks = ceil_div(p.cols, vec_width<T>());
  if (chunks <= 32) return launch_reg<T, 32, 4, 1, kAligned>(p, f, stream);
  if (chunks <= 64) return launch_reg<T, 32, 4, 2, kAligned>(p, f, stream);
  if (chunks <= 128) return launch_reg<T, 32, 4, 4, kAligned>(p, f, stream);
  if (chunks <= 256) return launch_reg<T, 64, 1, 4, kAligned>(p, f, stream);
  if (chunks <= 512) return launch_reg<T, 128, 1, 4, kAligned>(p, f, stream);
  if (chunks <= 1024) return launch_reg<T, 256, 1, 4, kAligned>(p, f, stream);
  static_assert(kMaxRegChunks == 512 * 4, "the widest register config covers kMaxRegChunks");
  if (chunks <= kMaxRegChunks) return launch_reg<T, 512, 1, 4, kAligned>(p, f, stream);

  int sms = 0;
  const cudaError_t err = sm_count(p.device, &sms);
  if (err != cudaSuccess) return err;
  const int64_t grid = min64(p.rows, static_cast<int64_t>(sms) * kWideBlocksPerSm);
  norm_fwd_wide_kernel<T, kAligned><<<static_cast<unsigned>(grid), kWideThreads, 0, stream>>>(p, f);
  return cudaGetLastError();
}

}  // namespace

cudaError_t norm_fwd(const NormFwdParams& params, cudaStream_t stream) {
  const NormFwdParams& p = params;
  if (p.cols < 1 || p.rows < 0 || (!p.rms && p.rows > 0 && p.mean == nullptr) ||
      (p.residual != nullptr && p.h == nullptr) || !param_dtype_ok(p.weight, p.weight_dtype, p.dtype) ||
      !param_dtype_ok(p.bias, p.bias_dtype, p.dtype)) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  return row_dtype_switch(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int64_t kSize = sizeof(T);
    ParamFlags f;
    f.weight_f32 = p.weight_dtype == NormDtype::kFloat32;
    f.bias_f32 = p.bias_dtype == NormDtype::kFloat32;
    const bool all_aligned = p.cols % vec_width<T>() == 0 && rows_aligned(p.x, p.x_row_stride, p.rows, kSize) &&
                             rows_aligned(p.residual, p.residual_row_stride, p.rows, kSize) &&
                             rows_aligned(p.y, p.cols, p.rows, kSize) && rows_aligned(p.h, p.cols, p.rows, kSize) &&
                             rows_aligned(p.weight, 0, 1, kSize) && rows_aligned(p.bias, 0, 1, kSize);
    return bool_switch(all_aligned, [&](auto aligned_flag) {
      return fwd_impl<T, decltype(aligned_flag)::value>(p, f, stream);
    });
  });
}

}  // namespace fast_attn
