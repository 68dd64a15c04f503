// The sm_80 flash attention forward: tile sizes per head dim and the per-(dtype, head dim)
// launchers behind attention_fwd_sm80 (no torch headers; the kernel itself is in
// fwd_sm80_kernel.cuh, instantiated once per fwd_sm80_<dtype>_hdim<D>.cu file).
//
// The tiles live here, not in the kernel header, because the split-KV heuristic in
// fwd_sm80.cu needs BLOCK_M/BLOCK_N without compiling the kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "attention_params.h"

namespace fast_attn {
namespace fwd_sm80 {

// One CTA computes kBlockM query rows of one (batch, head) with kNWarps warps; each warp
// owns kMTiles 16-row mma tiles (kBlockM = 16 * kMTiles * kNWarps), so every K/V fragment
// it reads from shared memory feeds kMTiles mma's: with one tile per warp, the warps' B
// fragment reads (256 bytes per m16n8k16) would outrun shared-memory bandwidth (128 B/clk
// per SM) long before the tensor cores saturate. kBlockN keys per K/V block.
// kQInRegs keeps the warp's Q rows as mma A fragments in registers for the whole key loop;
// otherwise they are re-read from shared memory (ldmatrix) for every key block, which
// costs 1 ldmatrix per kBlockN/16 K ldmatrix's but frees registers for the accumulator.
// Shared memory per CTA: Q (kBlockM x D) + K and V, 2 stages each (kBlockN x D), 16-bit:
//   D=64: 16 + 32 = 48 KB; D=128: 32 + 32 = 64 KB; D=256: 32 + 64 = 96 KB, so two CTAs
//   (8 warps) fit per SM on sm_90 (227 KB) and, but for D=256, on sm_80 (163 KB).
// Registers (ptxas, CUDA 13.0): 255 per thread for every tile below, so two 128-thread CTAs
// fill the 64K register file; spills are 0-48 bytes depending on the arch and softcap.
// Rejected for larger spills (>= 50 bytes): 128x128 at D=64, 128x64 4-warp at D=128,
// 64x64 at D=256. Not yet timed on a GPU.
template <int kHeadDim>
struct FwdTile;
template <>
struct FwdTile<64> {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 64;
  static constexpr int kNWarps = 4;
  static constexpr int kMTiles = 2;
  static constexpr bool kQInRegs = true;
};
template <>
struct FwdTile<128> {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 32;
  static constexpr int kNWarps = 4;
  static constexpr int kMTiles = 2;
  static constexpr bool kQInRegs = false;
};
template <>
struct FwdTile<256> {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 32;
  static constexpr int kNWarps = 4;
  static constexpr int kMTiles = 1;
  static constexpr bool kQInRegs = false;
};

// The forward kernel for one element type T (__half or __nv_bfloat16) and head dim; with
// params.num_splits > 1 it writes only the fp32 partials (out_accum, lse_accum), and the
// caller runs run_attention_fwd_combine afterwards. Explicitly instantiated in the
// fwd_sm80_<dtype>_hdim<D>.cu files.
template <typename T, int kHeadDim>
cudaError_t run_attention_fwd_sm80(const AttentionFwdParams& params, cudaStream_t stream);

}  // namespace fwd_sm80
}  // namespace fast_attn
