// The sm_80 flash attention forward's entry point: attention_fwd_sm80 picks the instantiated
// kernel for the call's dtype and head dim (fwd_sm80_<dtype>_hdim<D>.cu), runs the split-KV
// combine after it when the call is split, and attention_fwd_num_splits decides the split.
//
// Split-KV (Flash-Decoding, Dao et al. 2023): when the grid of (query block, head, batch)
// CTAs cannot fill the GPU (decode: one query block per head) and there are many key blocks,
// each CTA's key blocks are cut into num_splits contiguous shares run by separate CTAs.
// Split s writes its normalised partial output and natural-log lse to the fp32 workspaces
//   out_accum (num_splits, B, Hq, Sq, D)   lse_accum (num_splits, B, Hq, Sq)
// (contiguous; D the compiled head dim; a split that saw no key writes out 0, lse -inf), and
// the combine kernel below merges them in split order, so results are deterministic:
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s
// (out 0 and lse -inf when every split's lse is -inf). Dense and kv-cache calls only, not
// varlen.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_params.h"
#include "common/device_info.h"
#include "fwd_sm80.h"
#include "sm80_primitives.cuh"

namespace fast_attn {
namespace {

// ---- split heuristic (FlashAttention-2's, flash_api.cpp: fill the SMs with few splits)
constexpr int kMaxSplits = 64;
// No split when the unsplit grid already occupies this fraction of the SMs.
constexpr float kFullGpuFraction = 0.8f;
// A split needs enough key blocks to pay for the partial write and the combine kernel.
constexpr int kMinKeyBlocksToSplit = 4;
// The fewest splits whose wave efficiency is within this factor of the best one.
constexpr float kSplitEfficiency = 0.85f;

// ---- combine kernel: each thread owns kCombineVec consecutive features of one row.
constexpr int kCombineThreads = 128;
constexpr int kCombineVec = 4;  // one float4 of out_accum

constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Calls f(fwd_sm80::FwdTile<D>{}) for the call's head dim; false if it is not compiled.
template <typename F>
bool head_dim_switch(int head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      f(fwd_sm80::FwdTile<64>{});
      return true;
    case 128:
      f(fwd_sm80::FwdTile<128>{});
      return true;
    case 256:
      f(fwd_sm80::FwdTile<256>{});
      return true;
    default:
      return false;
  }
}

// One row r = (b * Hq + h) * Sq + i of the merged output per kThreadsPerRow threads:
// lse_r = logsumexp_s lse_accum[s, r], out[b, i, h, :] = sum_s exp(lse_s - lse_r) out_accum[s, r, :].
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kCombineThreads)
    attn_fwd_combine_kernel(const AttentionFwdParams p, const int64_t num_rows) {
  constexpr int kThreadsPerRow = kHeadDim / kCombineVec;
  constexpr int kRowsPerBlock = kCombineThreads / kThreadsPerRow;
  static_assert(kCombineThreads % kThreadsPerRow == 0, "whole rows per block");
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  if (row >= num_rows) return;
  const int col = (threadIdx.x % kThreadsPerRow) * kCombineVec;
  const int64_t split_stride = num_rows;  // rows per split in lse_accum

  // max over splits, then the sum of exp relative to it (a split with no key has -inf)
  float lse_max = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) lse_max = fmaxf(lse_max, p.lse_accum[s * split_stride + row]);
  float lse = -INFINITY;
  float acc[kCombineVec] = {0.f, 0.f, 0.f, 0.f};
  if (lse_max != -INFINITY) {
    float total = 0.f;
    for (int s = 0; s < p.num_splits; ++s) total += expf(p.lse_accum[s * split_stride + row] - lse_max);
    lse = lse_max + logf(total);
    for (int s = 0; s < p.num_splits; ++s) {
      const float lse_s = p.lse_accum[s * split_stride + row];
      if (lse_s == -INFINITY) continue;  // weight 0, and its partial is all zeros
      const float w = expf(lse_s - lse);
      const float4 part =
          *reinterpret_cast<const float4*>(p.out_accum + (s * split_stride + row) * kHeadDim + col);
      acc[0] += w * part.x;
      acc[1] += w * part.y;
      acc[2] += w * part.z;
      acc[3] += w * part.w;
    }
  }

  const int64_t i = row % p.seqlen_q;
  const int64_t bh = row / p.seqlen_q;
  const int64_t h = bh % p.heads_q;
  const int64_t b = bh / p.heads_q;
  T* out = static_cast<T*>(p.out) + b * p.out_strides.batch + i * p.out_strides.row + h * p.out_strides.head + col;
  // 4 elements = 8 bytes: aligned, as every stride is a multiple of 8 elements
  uint2 packed;
  packed.x = sm80::pack_floats<T>(acc[0], acc[1]);
  packed.y = sm80::pack_floats<T>(acc[2], acc[3]);
  *reinterpret_cast<uint2*>(out) = packed;
  if (col == 0) p.lse[row] = lse;  // dense lse (B, Hq, Sq): the same row index
}

template <typename T, int kHeadDim>
cudaError_t run_combine(const AttentionFwdParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kCombineThreads / (kHeadDim / kCombineVec);
  const int64_t num_rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  if (num_rows <= 0) return cudaSuccess;  // an empty grid is a launch error
  const int64_t blocks = (num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  attn_fwd_combine_kernel<T, kHeadDim><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(p, num_rows);
  return cudaGetLastError();
}

template <typename T, int kHeadDim>
cudaError_t run_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  const cudaError_t err = fwd_sm80::run_attention_fwd_sm80<T, kHeadDim>(p, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  return run_combine<T, kHeadDim>(p, stream);
}

template <typename T>
cudaError_t dispatch_head_dim(const AttentionFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return run_fwd<T, 64>(p, stream);
    case 128:
      return run_fwd<T, 128>(p, stream);
    case 256:
      return run_fwd<T, 256>(p, stream);
    default:
      return cudaErrorNotSupported;
  }
}

}  // namespace

int attention_fwd_num_splits(const AttentionFwdParams& params) {
  if (params.cu_seqlens_q != nullptr || params.cu_seqlens_k != nullptr) return 1;  // varlen: never
  if (params.batch <= 0 || params.heads_q <= 0 || params.seqlen_q <= 0 || params.seqlen_k <= 0) return 1;
  int block_m = 0;
  int block_n = 0;
  const bool compiled = head_dim_switch(params.head_dim, [&](auto tile) {
    block_m = decltype(tile)::kBlockM;
    block_n = decltype(tile)::kBlockN;
  });
  if (!compiled) return 1;
  int sms = 0;
  if (sm_count(params.device, &sms) != cudaSuccess || sms <= 0) return 1;

  const int64_t ctas = static_cast<int64_t>(params.batch) * params.heads_q * ceil_div(params.seqlen_q, block_m);
  const int key_blocks = ceil_div(params.seqlen_k, block_n);
  if (ctas >= kFullGpuFraction * sms || key_blocks < kMinKeyBlocksToSplit) return 1;

  // Wave efficiency of s splits: the fraction of the last wave's SM slots that do work.
  const int max_splits = std::min(kMaxSplits, key_blocks);
  auto efficiency = [&](int splits) {
    const float waves = static_cast<float>(ctas * splits) / static_cast<float>(sms);
    return waves / std::ceil(waves);
  };
  // Split counts that give the same key blocks per split as one split fewer do the same
  // work in more CTAs: skip them.
  auto distinct = [&](int splits) {
    return splits == 1 || ceil_div(key_blocks, splits) != ceil_div(key_blocks, splits - 1);
  };
  float best = 0.f;
  for (int s = 1; s <= max_splits; ++s) {
    if (distinct(s)) best = std::max(best, efficiency(s));
  }
  for (int s = 1; s <= max_splits; ++s) {
    if (distinct(s) && efficiency(s) >= kSplitEfficiency * best) return s;
  }
  return 1;
}

cudaError_t attention_fwd_sm80(const AttentionFwdParams& params, cudaStream_t stream) {
  if (params.num_splits > 1) {
    const bool varlen = params.cu_seqlens_q != nullptr || params.cu_seqlens_k != nullptr;
    if (varlen) return cudaErrorNotSupported;
    if (params.out_accum == nullptr || params.lse_accum == nullptr) return cudaErrorInvalidValue;
  }
  switch (params.dtype) {
    case AttentionDtype::kFloat16:
      return dispatch_head_dim<__half>(params, stream);
    case AttentionDtype::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(params, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace fast_attn
