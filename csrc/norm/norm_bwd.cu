// LayerNorm / RMSNorm backward: CUDA kernels, the workspace size query and the norm_bwd
// launcher (no torch headers). See norm.h for the maths and the contract, and
// norm_common.cuh for the chunked row access (kAligned) and the team reductions.
//
// With xhat = (h - mean) * rstd (h * rstd for RMSNorm) from the saved statistics and
// g = dy * weight:  dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) + dh,
// dweight = sum over rows of dy * xhat, dbias = sum over rows of dy. Kernels:
//
//   norm_bwd_kernel           rows up to kMaxRegChunks chunks. A persistent grid of one
//                             512-thread block per SM, split into teams (a warp or more)
//                             that each own one row at a time: a team walks rows with a
//                             stride, loading the next row's inp/dy while it reduces and
//                             writes the current one (so ~2 rows per team are in flight
//                             with only 1 block per SM), and keeps fp32 sums of dy * xhat
//                             and dy for its columns in registers. At the end the block's
//                             teams add theirs in a fixed order (shared memory) into one
//                             workspace row: one partial row per SM, 2% of the traffic at
//                             16384 rows. Traffic: inp, dy (+ dh) read once, dx written once.
//   norm_bwd_row_sums_kernel  wider rows, step 1: mean(g * xhat), mean(g) per row.
//   norm_bwd_cols_kernel      wider rows, step 2: a (column tile, row slab) grid writes dx
//                             and the slab's column sums (inp and dy are read twice).
//   param_grad_reduce_kernel  dweight / dbias = the workspace's partial rows added in a
//                             fixed order, rounded once to the parameters' dtype.
//
// No atomics: dx, dweight and dbias are bitwise reproducible for a given shape and GPU.
// fp32 arithmetic, int64 offsets. Unmeasured (no GPU where this was written; check on the
// H100): the team shapes were sized from register counts (ptxas -v, sm_90a), not timings.
#include <algorithm>

#include "norm_common.cuh"

namespace fast_attn {
namespace {

using namespace norm_detail;

// Widest row (in chunks) of the register path: 1024 chunks = 8192 halves / 4096 floats,
// 2 chunks per thread. It holds ~4.5 registers per 16-bit element (this row's and the
// next row's raw inp/dy, dh, two fp32 accumulators).
constexpr int64_t kMaxRegChunks = 1024;
// Register path: 512-thread blocks (up to 128 registers per thread), one per SM.
constexpr int kBlockThreads = 512;
constexpr int kBlocksPerSm = 1;
// Dynamic shared memory a kernel may use without opting in.
constexpr size_t kDefaultMaxDynamicSmem = 48 * 1024;

// Wide rows. Step 1: one block per row. Step 2: kColThreadsX chunks across by
// kColThreadsY rows down per block, about kColBlocksPerSm blocks per SM, slabs of at least
// kMinRowsPerSlab rows (a shorter slab spends more on its partial row than on its rows).
constexpr int kRowSumThreads = 512;
constexpr int kRowSumBlocksPerSm = 2;
constexpr int kWideUnroll = 4;  // chunks each thread of step 1 loads before using any
constexpr int kColThreadsX = 32;
constexpr int kColThreadsY = 8;
constexpr int kColBlocksPerSm = 4;
constexpr int64_t kMinRowsPerSlab = 64;

// Partial-row reduction: kReduceCols columns by kReduceRows partial rows per block, so a
// thread loads 1/kReduceRows of the partial rows (latency, not bandwidth, bounds it).
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 16;

// Where the backward kernels put their fp32 partial column sums: planes of
// (partial rows, cols), nullptr for a gradient that is not wanted.
struct PartialSums {
  float* dweight = nullptr;
  float* dbias = nullptr;
};

// Shared memory of norm_bwd_kernel: the fp32 column sums of dy * xhat, then of dy, one slot
// per element each thread owns (kChunks * kVec slots per thread).
template <typename T, int kChunks>
constexpr size_t reg_smem_bytes() {
  return 2 * sizeof(float) * static_cast<size_t>(kChunks) * vec_width<T>() * kBlockThreads;
}

// Rows of at most kTeamThreads * kChunks chunks. Block = kTeams teams of kTeamThreads;
// team `team` of block b takes rows b * kTeams + team + i * gridDim.x * kTeams, i = 0, 1,
// ..., and the block writes row b of the partial sums.
//
// The column sums live in shared memory (reg_smem_bytes), not registers: each thread
// adds into its own slots (slot s of thread t at s * kBlockThreads + t, conflict-free),
// so no barrier is needed until the end. In registers they cost 2 per element, and the
// 8192-wide bf16 config then spilled (128 registers, ~600 bytes of spills).
template <typename T, int kTeamThreads, int kTeams, int kChunks, bool kAligned>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSm)
    norm_bwd_kernel(const NormBwdParams p, const bool weight_f32, const PartialSums partial) {
  static_assert(kTeamThreads * kTeams == kBlockThreads, "teams fill the block");
  constexpr int kVec = vec_width<T>();
  constexpr int kSlots = kChunks * kVec;
  __shared__ float red[team_sum_smem<kTeamThreads, kTeams, 2>()];
  extern __shared__ float column_sums[];  // [2][kSlots][kBlockThreads]
  float* acc_dw = column_sums;                          // sum over the thread's rows of dy * xhat
  float* acc_db = column_sums + kSlots * kBlockThreads;  // sum over the thread's rows of dy

  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ dh = static_cast<const T*>(p.dh);
  const T* __restrict__ inp = static_cast<const T*>(p.inp);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  const bool has_weight = p.weight != nullptr;
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
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    acc_dw[s * kBlockThreads + threadIdx.x] = 0.0f;
    acc_db[s * kBlockThreads + threadIdx.x] = 0.0f;
  }

  // The next row's inputs, loaded one iteration ahead.
  Pack<T, kVec> next_x[kChunks];
  Pack<T, kVec> next_dy[kChunks];
  float next_mean = 0.0f;
  float next_rstd = 0.0f;
  auto prefetch = [&](int64_t r) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      load_chunk<kAligned>(inp + r * p.inp_row_stride + col0[k], n[k], next_x[k]);
      load_chunk<kAligned>(dy + r * p.dy_row_stride + col0[k], n[k], next_dy[k]);
    }
    next_rstd = p.rstd[r];
    next_mean = p.rms ? 0.0f : p.mean[r];
  };

  int parity = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTeams;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kTeams + team;
  if (row < p.rows) prefetch(row);
  for (; row < p.rows; row += stride) {  // team-uniform: the team's barriers stay matched
    Pack<T, kVec> cur_x[kChunks];
    Pack<T, kVec> cur_dy[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      cur_x[k] = next_x[k];
      cur_dy[k] = next_dy[k];
    }
    const float mean = next_mean;
    const float rstd = next_rstd;
    if (row + stride < p.rows) prefetch(row + stride);
    Pack<T, kVec> cur_dh[kChunks];
    if (dh != nullptr) {
#pragma unroll
      for (int k = 0; k < kChunks; ++k) load_chunk<kAligned>(dh + row * p.dh_row_stride + col0[k], n[k], cur_dh[k]);
    }

    // xhat and g; the row sums of g * xhat and g; the column sums (padding: dy = xhat = 0).
    float xhat[kChunks][kVec];
    float g[kChunks][kVec];
    float sums[2] = {0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      float w[kVec];
      if (has_weight) load_param<kAligned, T>(p.weight, weight_f32, col0[k], n[k], w);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float dyv = to_float(cur_dy[k].v[i]);
        xhat[k][i] = i < n[k] ? (to_float(cur_x[k].v[i]) - mean) * rstd : 0.0f;
        g[k][i] = has_weight ? dyv * w[i] : dyv;
        sums[0] += g[k][i] * xhat[k][i];
        sums[1] += g[k][i];
        const int slot = (k * kVec + i) * kBlockThreads + threadIdx.x;
        acc_dw[slot] += dyv * xhat[k][i];
        acc_db[slot] += dyv;
      }
    }
    team_sum<kTeamThreads, kTeams, 2>(sums, red, team, parity);
    const float c1 = sums[0] / cols_f;
    const float c2 = p.rms ? 0.0f : sums[1] / cols_f;

    // dx = rstd * (g - xhat * c1 - c2) + dh
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      float out[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        out[i] = (g[k][i] - xhat[k][i] * c1 - c2) * rstd;
        if (dh != nullptr) out[i] += to_float(cur_dh[k].v[i]);
      }
      store_floats<kAligned>(dx + row * p.cols + col0[k], n[k], out);
    }
  }

  // The block's partial row: column c's sums of teams 0, 1, ... added in that order.
  if (partial.dweight == nullptr && partial.dbias == nullptr) return;  // block-uniform
  __syncthreads();
  const int64_t out_row = static_cast<int64_t>(blockIdx.x) * p.cols;
  for (int64_t c = threadIdx.x; c < p.cols; c += kBlockThreads) {
    // Column c is element c % kVec of chunk c / kVec, which is chunk k of team lane l.
    const int64_t chunk = c / kVec;
    const int l = static_cast<int>(chunk % kTeamThreads);
    const int k = static_cast<int>(chunk / kTeamThreads);
    const int slot = (k * kVec + static_cast<int>(c % kVec)) * kBlockThreads + l;
    float sum_dw = 0.0f;
    float sum_db = 0.0f;
#pragma unroll
    for (int t = 0; t < kTeams; ++t) {
      sum_dw += acc_dw[slot + t * kTeamThreads];
      sum_db += acc_db[slot + t * kTeamThreads];
    }
    if (partial.dweight != nullptr) partial.dweight[out_row + c] = sum_dw;
    if (partial.dbias != nullptr) partial.dbias[out_row + c] = sum_db;
  }
}

// Wide rows, step 1: row_sums[2 r] = mean(g * xhat), row_sums[2 r + 1] = mean(g) of row r
// (0 for RMSNorm). One block per row, grid-strided.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kRowSumThreads)
    norm_bwd_row_sums_kernel(const NormBwdParams p, const bool weight_f32, float* __restrict__ row_sums) {
  constexpr int kVec = vec_width<T>();
  constexpr int64_t kStep = static_cast<int64_t>(kRowSumThreads) * kWideUnroll;  // chunks per loop trip
  __shared__ float red[team_sum_smem<kRowSumThreads, 1, 2>()];
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ inp = static_cast<const T*>(p.inp);
  const bool has_weight = p.weight != nullptr;
  const int64_t chunks = ceil_div(p.cols, kVec);
  int parity = 0;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float rstd = p.rstd[row];
    const float mean = p.rms ? 0.0f : p.mean[row];
    float sums[2] = {0.0f, 0.0f};
    for (int64_t base = threadIdx.x; base < chunks; base += kStep) {
      Pack<T, kVec> xr[kWideUnroll];
      Pack<T, kVec> dyr[kWideUnroll];
      int n[kWideUnroll];
#pragma unroll
      for (int u = 0; u < kWideUnroll; ++u) {
        const int64_t col0 = (base + u * kRowSumThreads) * kVec;
        n[u] = chunk_size<kVec>(col0, p.cols);
        load_chunk<kAligned>(inp + row * p.inp_row_stride + col0, n[u], xr[u]);
        load_chunk<kAligned>(dy + row * p.dy_row_stride + col0, n[u], dyr[u]);
      }
#pragma unroll
      for (int u = 0; u < kWideUnroll; ++u) {
        const int64_t col0 = (base + u * kRowSumThreads) * kVec;
        float w[kVec];
        if (has_weight) load_param<kAligned, T>(p.weight, weight_f32, col0, n[u], w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float xhat = i < n[u] ? (to_float(xr[u].v[i]) - mean) * rstd : 0.0f;
          const float dyv = to_float(dyr[u].v[i]);
          const float g = has_weight ? dyv * w[i] : dyv;
          sums[0] += g * xhat;
          sums[1] += g;
        }
      }
    }
    team_sum<kRowSumThreads, 1, 2>(sums, red, 0, parity);
    if (threadIdx.x == 0) {
      row_sums[2 * row] = sums[0] / static_cast<float>(p.cols);
      row_sums[2 * row + 1] = p.rms ? 0.0f : sums[1] / static_cast<float>(p.cols);
    }
  }
}

// Wide rows, step 2. Block (blockIdx.x, blockIdx.y) owns chunks
// [blockIdx.x * kColThreadsX, +kColThreadsX) of rows [blockIdx.y * rows_per_slab,
// +rows_per_slab): it writes dx there, and row blockIdx.y of the partial sums.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kColThreadsX* kColThreadsY)
    norm_bwd_cols_kernel(const NormBwdParams p, const bool weight_f32, const float* __restrict__ row_sums,
                         const PartialSums partial, const int64_t rows_per_slab) {
  constexpr int kVec = vec_width<T>();
  // [0]: dweight, [1]: dbias; [ty][i][tx]: the sum over thread (tx, ty)'s rows, element i.
  __shared__ float slab_sums[2][kColThreadsY][kVec][kColThreadsX];

  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ dh = static_cast<const T*>(p.dh);
  const T* __restrict__ inp = static_cast<const T*>(p.inp);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  const bool has_weight = p.weight != nullptr;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * kColThreadsX + threadIdx.x) * kVec;
  const int n = chunk_size<kVec>(col0, p.cols);
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_slab;
  const int64_t row_end = min64(row_begin + rows_per_slab, p.rows);

  float acc_dw[kVec];
  float acc_db[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    acc_dw[i] = 0.0f;
    acc_db[i] = 0.0f;
  }
  if (n > 0) {
    float w[kVec];
    if (has_weight) load_param<kAligned, T>(p.weight, weight_f32, col0, n, w);
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kColThreadsY) {
      Pack<T, kVec> xr;
      Pack<T, kVec> dyr;
      Pack<T, kVec> dhr;
      load_chunk<kAligned>(inp + row * p.inp_row_stride + col0, n, xr);
      load_chunk<kAligned>(dy + row * p.dy_row_stride + col0, n, dyr);
      if (dh != nullptr) load_chunk<kAligned>(dh + row * p.dh_row_stride + col0, n, dhr);
      const float rstd = p.rstd[row];
      const float mean = p.rms ? 0.0f : p.mean[row];
      const float c1 = row_sums[2 * row];
      const float c2 = row_sums[2 * row + 1];
      float out[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float xhat = i < n ? (to_float(xr.v[i]) - mean) * rstd : 0.0f;
        const float dyv = to_float(dyr.v[i]);
        const float g = has_weight ? dyv * w[i] : dyv;
        out[i] = (g - xhat * c1 - c2) * rstd;
        if (dh != nullptr) out[i] += to_float(dhr.v[i]);
        acc_dw[i] += dyv * xhat;
        acc_db[i] += dyv;
      }
      store_floats<kAligned>(dx + row * p.cols + col0, n, out);
    }
  }

  // Add the kColThreadsY row groups of each column in a fixed order.
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    slab_sums[0][threadIdx.y][i][threadIdx.x] = acc_dw[i];
    slab_sums[1][threadIdx.y][i][threadIdx.x] = acc_db[i];
  }
  __syncthreads();
  if (threadIdx.y == 0) {
    const int64_t out_row = static_cast<int64_t>(blockIdx.y) * p.cols;
    for (int i = 0; i < n; ++i) {
      float sum_dw = 0.0f;
      float sum_db = 0.0f;
#pragma unroll
      for (int ty = 0; ty < kColThreadsY; ++ty) {
        sum_dw += slab_sums[0][ty][i][threadIdx.x];
        sum_db += slab_sums[1][ty][i][threadIdx.x];
      }
      if (partial.dweight != nullptr) partial.dweight[out_row + col0 + i] = sum_dw;
      if (partial.dbias != nullptr) partial.dbias[out_row + col0 + i] = sum_db;
    }
  }
}

__device__ __forceinline__ void store_param(void* ptr, NormDtype dtype, int64_t col, float value) {
  switch (dtype) {
    case NormDtype::kFloat32:
      static_cast<float*>(ptr)[col] = value;
      break;
    case NormDtype::kFloat16:
      static_cast<__half*>(ptr)[col] = from_float<__half>(value);
      break;
    case NormDtype::kBFloat16:
      static_cast<__nv_bfloat16*>(ptr)[col] = from_float<__nv_bfloat16>(value);
      break;
    case NormDtype::kFloat64:
      static_cast<double*>(ptr)[col] = static_cast<double>(value);
      break;
  }
}

// out[c] = sum over r = 0, 1, ... of partial[r, c], rounded once to out_dtype. Block
// (blockIdx.x, blockIdx.y): columns [blockIdx.x * kReduceCols, +kReduceCols) of plane
// blockIdx.y (0: dweight, 1: dbias; a plane not wanted returns at once). With
// num_partials == 0 (no rows) it writes zeros.
__global__ void __launch_bounds__(kReduceCols* kReduceRows)
    param_grad_reduce_kernel(const PartialSums partial, const int64_t num_partials, const int64_t cols,
                             void* dweight, void* dbias, const NormDtype out_dtype) {
  __shared__ float column_sums[kReduceRows][kReduceCols];
  const float* src = blockIdx.y == 0 ? partial.dweight : partial.dbias;
  void* out = blockIdx.y == 0 ? dweight : dbias;
  if (out == nullptr) return;  // block-uniform

  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  float sum = 0.0f;
  if (col < cols) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < num_partials; r += kReduceRows) sum += src[r * cols + col];
  }
  column_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
#pragma unroll
    for (int r = 0; r < kReduceRows; ++r) total += column_sums[r][threadIdx.x];
    store_param(out, out_dtype, col, total);
  }
}

// ---------------------------------------------------------------------------------------
// Host side

// Teams per block of the register path for a row of `chunks` chunks; 0: too wide for it.
// Teams are sized so each thread holds one chunk (two at the widest).
int reg_teams(int64_t chunks) {
  if (chunks <= 32) return 16;
  if (chunks <= 64) return 8;
  if (chunks <= 128) return 4;
  if (chunks <= 256) return 2;
  if (chunks <= kMaxRegChunks) return 1;
  return 0;
}

// Everything about a backward launch that sizes the workspace: a pure function of
// (rows, cols, T, wanted gradients, SM count), shared by the size query and the launch.
// Workspace layout: [row sums (wide path): 2 per row][dweight plane][dbias plane].
struct BwdPlan {
  bool wide = false;
  int64_t grid = 0;            // blocks that write a partial row: register path, or wide slabs
  int64_t rows_per_slab = 0;   // wide path, step 2
  int64_t row_sums_numel = 0;  // wide path
  int64_t planes = 0;          // partial-sum planes (dweight and/or dbias), each grid x cols
  int64_t plane_numel = 0;
  int64_t workspace_numel() const { return row_sums_numel + planes * plane_numel; }
};

template <typename T>
BwdPlan plan_bwd(int64_t rows, int64_t cols, bool want_dweight, bool want_dbias, int sms) {
  BwdPlan plan;
  if (rows == 0) return plan;  // no kernel but the reduction, which then writes zeros
  plan.planes = (want_dweight ? 1 : 0) + (want_dbias ? 1 : 0);
  const int64_t chunks = ceil_div(cols, vec_width<T>());
  const int teams = reg_teams(chunks);
  if (teams > 0) {
    plan.grid = min64(static_cast<int64_t>(sms) * kBlocksPerSm, ceil_div(rows, teams));
  } else {
    plan.wide = true;
    plan.row_sums_numel = 2 * rows;
    const int64_t col_tiles = ceil_div(chunks, kColThreadsX);
    const int64_t wanted = ceil_div(static_cast<int64_t>(sms) * kColBlocksPerSm, col_tiles);
    const int64_t slabs = std::max<int64_t>(1, min64(wanted, ceil_div(rows, kMinRowsPerSlab)));
    plan.rows_per_slab = ceil_div(rows, slabs);
    plan.grid = ceil_div(rows, plan.rows_per_slab);  // no empty slab
  }
  plan.grid = std::max<int64_t>(plan.grid, 1);
  plan.plane_numel = plan.grid * cols;
  return plan;
}

template <typename T, int kTeamThreads, int kTeams, int kChunks, bool kAligned>
cudaError_t launch_reg(const NormBwdParams& p, bool weight_f32, const PartialSums& partial, int64_t grid,
                       cudaStream_t stream) {
  constexpr size_t kSmem = reg_smem_bytes<T, kChunks>();
  auto kernel = norm_bwd_kernel<T, kTeamThreads, kTeams, kChunks, kAligned>;
  if constexpr (kSmem > kDefaultMaxDynamicSmem) {
    // 64 KiB for the widest 16-bit config: opt in (per device, so on every launch).
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(grid), kBlockThreads, kSmem, stream>>>(p, weight_f32, partial);
  return cudaGetLastError();
}

template <typename T, bool kAligned>
cudaError_t bwd_rows(const NormBwdParams& p, const BwdPlan& plan, bool weight_f32, const PartialSums& partial,
                     int sms, cudaStream_t stream) {
  if (!plan.wide) {
    // (threads per team, teams per block, chunks per thread), matching reg_teams().
    const int64_t chunks = ceil_div(p.cols, vec_width<T>());
    if (chunks <= 32) return launch_reg<T, 32, 16, 1, kAligned>(p, weight_f32, partial, plan.grid, stream);
    if (chunks <= 64) return launch_reg<T, 64, 8, 1, kAligned>(p, weight_f32, partial, plan.grid, stream);
    if (chunks <= 128) return launch_reg<T, 128, 4, 1, kAligned>(p, weight_f32, partial, plan.grid, stream);
    if (chunks <= 256) return launch_reg<T, 256, 2, 1, kAligned>(p, weight_f32, partial, plan.grid, stream);
    if (chunks <= 512) return launch_reg<T, 512, 1, 1, kAligned>(p, weight_f32, partial, plan.grid, stream);
    static_assert(kMaxRegChunks == 512 * 2, "the widest register config covers kMaxRegChunks");
    return launch_reg<T, 512, 1, 2, kAligned>(p, weight_f32, partial, plan.grid, stream);
  }
  float* row_sums = p.workspace;
  const int64_t row_grid = min64(p.rows, static_cast<int64_t>(sms) * kRowSumBlocksPerSm);
  norm_bwd_row_sums_kernel<T, kAligned>
      <<<static_cast<unsigned>(row_grid), kRowSumThreads, 0, stream>>>(p, weight_f32, row_sums);
  const dim3 grid(static_cast<unsigned>(ceil_div(ceil_div(p.cols, vec_width<T>()), kColThreadsX)),
                  static_cast<unsigned>(plan.grid));
  const dim3 block(kColThreadsX, kColThreadsY);
  norm_bwd_cols_kernel<T, kAligned><<<grid, block, 0, stream>>>(p, weight_f32, row_sums, partial, plan.rows_per_slab);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_impl(const NormBwdParams& p, cudaStream_t stream) {
  int sms = 0;
  cudaError_t err = sm_count(p.device, &sms);
  if (err != cudaSuccess) return err;
  const BwdPlan plan = plan_bwd<T>(p.rows, p.cols, p.dweight != nullptr, p.dbias != nullptr, sms);
  if (plan.workspace_numel() > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;

  PartialSums partial;
  float* next_plane = p.workspace + plan.row_sums_numel;
  if (plan.planes > 0 && p.dweight != nullptr) {
    partial.dweight = next_plane;
    next_plane += plan.plane_numel;
  }
  if (plan.planes > 0 && p.dbias != nullptr) partial.dbias = next_plane;

  if (p.rows > 0) {
    constexpr int64_t kSize = sizeof(T);
    const bool weight_f32 = p.weight_dtype == NormDtype::kFloat32;
    const bool all_aligned = p.cols % vec_width<T>() == 0 &&
                             rows_aligned(p.dy, p.dy_row_stride, p.rows, kSize) &&
                             rows_aligned(p.dh, p.dh_row_stride, p.rows, kSize) &&
                             rows_aligned(p.inp, p.inp_row_stride, p.rows, kSize) &&
                             rows_aligned(p.dx, p.cols, p.rows, kSize) && rows_aligned(p.weight, 0, 1, kSize);
    err = bool_switch(all_aligned, [&](auto aligned_flag) {
      return bwd_rows<T, decltype(aligned_flag)::value>(p, plan, weight_f32, partial, sms, stream);
    });
    if (err != cudaSuccess) return err;
  }

  if (p.dweight != nullptr || p.dbias != nullptr) {
    const dim3 grid(static_cast<unsigned>(ceil_div(p.cols, kReduceCols)), 2);
    const dim3 block(kReduceCols, kReduceRows);
    param_grad_reduce_kernel<<<grid, block, 0, stream>>>(partial, plan.planes > 0 ? plan.grid : 0, p.cols,
                                                         p.dweight, p.dbias, p.param_dtype);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t norm_bwd_workspace_numel(const NormBwdParams& params) {
  int sms = 0;
  if (sm_count(params.device, &sms) != cudaSuccess) return -1;
  int64_t numel = 0;
  const cudaError_t err = row_dtype_switch(params.dtype, [&](auto zero) {
    using T = decltype(zero);
    numel = plan_bwd<T>(params.rows, params.cols, params.dweight != nullptr, params.dbias != nullptr, sms)
                .workspace_numel();
    return cudaSuccess;
  });
  return err == cudaSuccess ? numel : -1;
}

cudaError_t norm_bwd(const NormBwdParams& params, cudaStream_t stream) {
  const NormBwdParams& p = params;
  if (p.cols < 1 || p.rows < 0 || (!p.rms && p.rows > 0 && p.mean == nullptr) ||
      !param_dtype_ok(p.weight, p.weight_dtype, p.dtype)) {
    return cudaErrorInvalidValue;
  }
  return row_dtype_switch(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    return bwd_impl<T>(p, stream);
  });
}

}  // namespace fast_attn
