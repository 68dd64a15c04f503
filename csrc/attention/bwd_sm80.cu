// Flash attention backward, sm_80 family: the entry point attention_bwd_sm80, the workspace
// query attention_bwd_workspace, and the preprocessing kernel (no torch headers).
//
// attention_bwd_sm80 runs three kernels on `stream`, in order:
//   1. attn_bwd_preprocess_kernel (here): D[row] = sum_d dout[row, d] * out[row, d] in fp32,
//      one value per (batch, query head, query row), 0 for a fully masked row (lse = -inf).
//   2. the dQ kernel and 3. the dK/dV kernel (bwd_sm80_kernel.cuh, one instantiation per
//      (dtype, head_dim) in bwd_sm80_<dtype>_hdim<D>.cu); both read D and lse and recompute P.
// No atomics and no fp32 accumulators in global memory: every gradient is a fixed-order sum,
// so the backward is always bitwise reproducible (`deterministic` changes nothing).
//
// Workspace: only dsoftmax_sum (D), fp32, laid out exactly like lse, without padding:
//   dense  (B, Hq, Sq)      contiguous, element (b, h, i) at (b * Hq + h) * Sq + i
//   varlen (Hq, total_q)    contiguous, element (h, row) at h * total_q + row (packed rows)
// dq_accum, dk_accum and dv_accum are not used (size 0). The kernels never read D for rows
// past a sequence's end, so the workspace needs no zeroing.
//
// Limits: fp16/bf16, head_dim 64/128/256 (others: cudaErrorNotSupported); no dropout, ALiBi or
// attention mask (the parameter struct cannot express them; the op layer routes such calls to
// another backend).
#include <atomic>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/attention_params.h"

namespace fast_attn {

namespace sm80_bwd {
// Defined in bwd_sm80_kernel.cuh and explicitly instantiated for T in {__half,
// __nv_bfloat16} and kHeadDim in {64, 128, 256} by the bwd_sm80_<dtype>_hdim<D>.cu files
// (declared here so this file does not parse the kernel templates).
template <typename T, int kHeadDim>
cudaError_t launch_attention_bwd(const AttentionBwdParams& p, int max_smem_optin, cudaStream_t stream);
}  // namespace sm80_bwd

namespace {

constexpr int kPreThreads = 128;
// Query rows per preprocessing block: 64 rows x head_dim 128 x 2 tensors x 2 bytes = 32 KB
// of loads per block, enough to keep the memory system busy without a tiny grid.
constexpr int kPreRowsPerBlock = 64;
constexpr int kVecElems = 8;  // 16-bit elements per 16-byte load
constexpr int kMaxCachedDevices = 64;
constexpr int64_t kMaxGridX = 2147483647;  // CUDA's gridDim.x limit
constexpr int64_t kMaxGridY = 65535;       // CUDA's gridDim.y limit

constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ float2 unpack2(uint32_t bits, __half) {
  __half2 h;
  *reinterpret_cast<uint32_t*>(&h) = bits;
  return __half22float2(h);
}
__device__ __forceinline__ float2 unpack2(uint32_t bits, __nv_bfloat16) {
  __nv_bfloat162 h;
  *reinterpret_cast<uint32_t*>(&h) = bits;
  return __bfloat1622float2(h);
}

// D for rows [r * kPreRowsPerBlock, +kPreRowsPerBlock) of query head blockIdx.y of sequence
// b, where blockIdx.x = b * row_blocks + r (the batch folds into x, whose limit is 2^31 - 1).
// A row is read by head_dim / 8 consecutive lanes (8, 16 or 32: a power of two dividing the
// warp), each loading 16 bytes of out and of dout, and reduced with xor shuffles inside that
// lane group. Every thread runs the same number of passes so the full-warp shuffles are
// always convergent.
template <typename T>
__global__ void __launch_bounds__(kPreThreads) attn_bwd_preprocess_kernel(const AttentionBwdParams p) {
  const int row_blocks = (p.seqlen_q + kPreRowsPerBlock - 1) / kPreRowsPerBlock;
  const int b = blockIdx.x / row_blocks;
  const int h = blockIdx.y;
  int64_t q_start = 0;
  int seqlen_q = p.seqlen_q;
  int q_batch = b;
  if (p.cu_seqlens_q != nullptr) {
    q_start = p.cu_seqlens_q[b];
    seqlen_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    q_batch = 0;  // packed rows: the batch stride is unused
  }
  const int row_begin = static_cast<int>(blockIdx.x % row_blocks) * kPreRowsPerBlock;
  if (row_begin >= seqlen_q) return;
  const int row_end = min(row_begin + kPreRowsPerBlock, seqlen_q);

  const int lanes_per_row = p.head_dim / kVecElems;
  const int rows_per_pass = kPreThreads / lanes_per_row;
  const int lane_in_row = threadIdx.x % lanes_per_row;
  const int row_in_pass = threadIdx.x / lanes_per_row;
  const int64_t stats = p.cu_seqlens_q != nullptr ? static_cast<int64_t>(h) * p.total_q + q_start
                                                  : (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q;
  const T* const out = static_cast<const T*>(p.out) + static_cast<int64_t>(q_batch) * p.out_strides.batch +
                       q_start * p.out_strides.row + static_cast<int64_t>(h) * p.out_strides.head;
  const T* const dout = static_cast<const T*>(p.dout) + static_cast<int64_t>(q_batch) * p.dout_strides.batch +
                        q_start * p.dout_strides.row + static_cast<int64_t>(h) * p.dout_strides.head;

  for (int base = row_begin; base < row_end; base += rows_per_pass) {
    const int i = base + row_in_pass;
    const bool valid = i < row_end;
    float sum = 0.f;
    if (valid) {
      const int col = lane_in_row * kVecElems;
      const uint4 o = *reinterpret_cast<const uint4*>(out + i * p.out_strides.row + col);
      const uint4 d = *reinterpret_cast<const uint4*>(dout + i * p.dout_strides.row + col);
      const uint32_t ow[4] = {o.x, o.y, o.z, o.w};
      const uint32_t dw[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 of = unpack2(ow[w], T{});
        const float2 df = unpack2(dw[w], T{});
        sum += of.x * df.x + of.y * df.y;
      }
    }
    for (int offset = lanes_per_row / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (valid && lane_in_row == 0) {
      // A fully masked row has out = 0 anyway; writing 0 keeps dS = 0 even if dout is not finite.
      p.dsoftmax_sum[stats + i] = p.lse[stats + i] == kNegInf ? 0.f : sum;
    }
  }
}

// The per-block shared-memory limit (opt-in) of `device`, queried once per device.
cudaError_t max_smem_optin(int device, int* bytes) {
  static std::atomic<int> cache[kMaxCachedDevices];
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    *bytes = cache[device].load(std::memory_order_relaxed);
    if (*bytes > 0) return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (cacheable) cache[device].store(*bytes, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename T>
cudaError_t run_bwd(const AttentionBwdParams& p, int smem_limit, cudaStream_t stream) {
  const int64_t row_blocks = (p.seqlen_q + kPreRowsPerBlock - 1) / kPreRowsPerBlock;
  if (row_blocks * p.batch > kMaxGridX || p.heads_q > kMaxGridY) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_blocks * p.batch), static_cast<unsigned>(p.heads_q));
  if (p.seqlen_q > 0) {
    attn_bwd_preprocess_kernel<T><<<grid, kPreThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  switch (p.head_dim) {
    case 64:
      return sm80_bwd::launch_attention_bwd<T, 64>(p, smem_limit, stream);
    case 128:
      return sm80_bwd::launch_attention_bwd<T, 128>(p, smem_limit, stream);
    case 256:
      return sm80_bwd::launch_attention_bwd<T, 256>(p, smem_limit, stream);
    default:
      return cudaErrorNotSupported;
  }
}

}  // namespace

AttentionBwdWorkspace attention_bwd_workspace(const AttentionBwdParams& params) {
  AttentionBwdWorkspace ws;
  ws.dsoftmax_sum = params.cu_seqlens_q != nullptr
                        ? static_cast<int64_t>(params.heads_q) * params.total_q
                        : static_cast<int64_t>(params.batch) * params.heads_q * params.seqlen_q;
  return ws;
}

cudaError_t attention_bwd_sm80(const AttentionBwdParams& params, cudaStream_t stream) {
  if (params.head_dim != 64 && params.head_dim != 128 && params.head_dim != 256) return cudaErrorNotSupported;
  if (params.heads_kv <= 0 || params.heads_q % params.heads_kv != 0) return cudaErrorInvalidValue;
  if (params.batch == 0 || params.heads_q == 0) return cudaSuccess;
  int smem_limit = 0;
  const cudaError_t err = max_smem_optin(params.device, &smem_limit);
  if (err != cudaSuccess) return err;
  switch (params.dtype) {
    case AttentionDtype::kFloat16:
      return run_bwd<__half>(params, smem_limit, stream);
    case AttentionDtype::kBFloat16:
      return run_bwd<__nv_bfloat16>(params, smem_limit, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace fast_attn
