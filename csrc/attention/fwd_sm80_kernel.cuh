// The sm_80 flash attention forward kernel (FlashAttention-2, Dao 2023, arXiv 2307.08691)
// and its launcher template; included only by the fwd_sm80_<dtype>_hdim<D>.cu files, each
// of which instantiates one (dtype, head dim). Runs on sm_80 and newer (mma.sync, ldmatrix,
// cp.async; no Hopper-only instruction).
//
// Algorithm. One CTA per (query block of BLOCK_M rows, KV split, head, batch) on a 1-D
// grid; kNWarps warps, warp w owning kMTiles consecutive 16-row mma tiles of the block
// (tiles per head dim in fwd_sm80.h).
//   1. Q (BLOCK_M x D) -> shared memory by cp.async (rows past the sequence zero-filled),
//      then, where FwdTile::kQInRegs, into registers as mma A fragments once (ldmatrix);
//      otherwise its A fragments are re-read from shared memory for every key block.
//   2. Loop over the key blocks [n_begin, n_end) of the query block's band (blocks wholly
//      outside the causal/window range or past the key count are never visited), with a
//      2-stage cp.async pipeline: block n+1's K and V are loaded into the other stage while
//      block n is computed.
//        S = Q K^T                                  mma.sync m16n8k16, fp32 accumulators
//        softcap: S = tanh(S * scale / softcap)     (in units where logit * log2 e = S * k2)
//        mask (only on blocks touching a boundary: the key tail, the causal diagonal, the
//             window edges): S = -inf where MaskRule forbids (i, j)
//        online softmax in base 2: m = max(m, rowmax S), P = exp2(S k2 - m k2),
//             l = l alpha + rowsum P, O = O alpha with alpha = exp2((m_old - m) k2)
//        O += P V                                   P rounded to T and reused in registers
//                                                   as the A operand (C -> A fragment
//                                                   layouts coincide); V by ldmatrix.trans
//   3. Epilogue: O / l (0 for a row that saw no key), staged through shared memory for
//      coalesced 16-byte stores; lse = (m k2 + log2 l) ln 2 in natural log, -inf for a row
//      that saw no key. Rows past the sequence end are not written. With num_splits > 1
//      the split's normalised O and its lse go to the fp32 workspaces instead (layout in
//      attention_params.h) and fwd_sm80.cu's combine kernel merges them.
//
// A row that has seen only masked keys keeps m = -inf; the exponent shift then uses 0
// instead of m ("safe max"), so exp2(-inf - 0) = 0 and no -inf - (-inf) = NaN appears.
//
// Shared memory: tiles of rows of D 16-bit elements, each row D/8 16-byte chunks, chunk c
// of row r stored at chunk position c ^ (r % 8) (XOR swizzle). ldmatrix reads 8 rows of one
// logical chunk per 8x8 matrix; with the swizzle they land in 8 different 16-byte bank
// groups (every row is a multiple of 128 bytes long), so ldmatrix, cp.async and the
// epilogue's 4-byte stores are free of bank conflicts. Needs D/8 >= 8, i.e. D >= 64.
//
// Limits: T is __half or __nv_bfloat16; D in {64, 128, 256} (FwdTile); every row/head/batch
// stride a multiple of 8 elements and 16-byte aligned base pointers (the op layer's
// contract); softmax_scale >= 0 (the op layer's check; the row max is taken on unscaled
// scores, which needs a non-negative scale).
#pragma once

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdint>

#include <cuda_runtime.h>

#include "attention_params.h"
#include "fwd_sm80.h"
#include "sm80_primitives.cuh"

namespace fast_attn {
namespace fwd_sm80 {

constexpr float kLog2e = 1.4426950408889634f;  // 1 / ln 2
constexpr float kLn2 = 0.6931471805599453f;    // ln 2
constexpr int kWarpSize = 32;
constexpr int kRowsPerWarp = 16;  // the M of mma.m16n8k16
constexpr int kMmaN = 8;          // the N of mma.m16n8k16 (one S or O column tile)
constexpr int kMmaK = 16;         // the K of mma.m16n8k16
constexpr int kChunkBytes = 16;   // one cp.async / ldmatrix row / uint4 store
constexpr int kSwizzleRows = 8;   // rows per swizzle period: 8 chunks cover all 32 banks
constexpr int kStages = 2;        // K/V pipeline depth
constexpr int kSmemAlign = 1024;  // >= every tile's row length in bytes (see the kernel)
// Above this much dynamic shared memory a kernel must opt in (cudaFuncSetAttribute).
constexpr int kDefaultSmemLimit = 48 * 1024;

// 2^x by the MUFU unit (what exp2f becomes under --use_fast_math; the extension builds
// without it): relative error ~2^-22, exp2(-inf) = 0, denormal results flushed to 0.
FA_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
FA_DEVICE float neg_inf() { return __int_as_float(0xff800000); }

// Everything the kernel derives on the host from AttentionFwdParams.
struct FwdSm80Args {
  int num_m_blocks;         // ceil(seqlen_q / kBlockM) (varlen: of max_seqlen_q)
  float score_scale_log2;   // k2: the logit in log2 units is S * k2 (S after softcap)
  float softcap_inv_scale;  // softmax_scale / softcap (softcap on)
};

template <typename T, int kHeadDim>
struct FwdKernelTraits {
  using Tile = FwdTile<kHeadDim>;
  static constexpr int kD = kHeadDim;
  static constexpr int kBlockM = Tile::kBlockM;
  static constexpr int kBlockN = Tile::kBlockN;
  static constexpr int kNWarps = Tile::kNWarps;
  static constexpr int kMTiles = Tile::kMTiles;  // 16-row mma tiles per warp
  static constexpr bool kQInRegs = Tile::kQInRegs;
  static constexpr int kWarpRows = kMTiles * kRowsPerWarp;
  static constexpr int kNThreads = kNWarps * kWarpSize;
  static constexpr int kElemsPerChunk = kChunkBytes / static_cast<int>(sizeof(T));
  static constexpr int kChunksPerRow = kHeadDim / kElemsPerChunk;
  static constexpr int kRowBytes = kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;  // one stage of K (or of V)
  static constexpr int kSmemBytes = (kQElems + 2 * kStages * kKVElems) * static_cast<int>(sizeof(T));
  static constexpr int kSTiles = kBlockN / kMmaN;    // S column tiles per row tile
  static constexpr int kOTiles = kHeadDim / kMmaN;   // O column tiles per row tile
  static constexpr int kQKSteps = kHeadDim / kMmaK;  // k-steps of S = Q K^T
  static constexpr int kPVSteps = kBlockN / kMmaK;   // k-steps of O += P V

  static_assert(sizeof(T) == 2, "16-bit element types only");
  static_assert(kBlockM == kNWarps * kWarpRows, "the warps' row tiles cover the query block");
  static_assert(kChunksPerRow >= kSwizzleRows, "the XOR swizzle needs rows of >= 8 chunks (D >= 64)");
  static_assert(kBlockN % (2 * kMmaN) == 0 && kHeadDim % (2 * kMmaN) == 0, "ldmatrix.x4 loads two n-tiles");
  static_assert((kBlockM * kChunksPerRow) % kNThreads == 0, "Q tile chunks spread evenly over threads");
  static_assert((kBlockN * kChunksPerRow) % kNThreads == 0, "K/V tile chunks spread evenly over threads");
};

// Element offset of logical chunk `chunk` (of kElems elements) of row `row` in a swizzled
// tile whose rows hold kHeadDim elements.
template <int kHeadDim, int kElems>
FA_DEVICE int swizzled(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row % kSwizzleRows)) * kElems);
}

// cp.async of rows [0, kRows) of a (rows, kHeadDim) global tile into the swizzled shared
// tile at byte address smem_tile; rows at or past valid_rows are zero-filled and not read.
// Consecutive threads take consecutive 16-byte chunks of a row, so a warp reads whole
// 128-byte lines; each thread keeps one chunk column and steps down kRowsPerIter rows.
template <typename Tr, int kRows, typename T>
FA_DEVICE void load_tile_async(uint32_t smem_tile, const T* gmem, int64_t row_stride, int valid_rows, int tid) {
  constexpr int kRowsPerIter = Tr::kNThreads / Tr::kChunksPerRow;
  static_assert(Tr::kNThreads % Tr::kChunksPerRow == 0 && kRows % kRowsPerIter == 0, "whole rows per pass");
  const int row0 = tid / Tr::kChunksPerRow;
  const int chunk = tid % Tr::kChunksPerRow;
  const T* src = gmem + row0 * row_stride + chunk * Tr::kElemsPerChunk;
#pragma unroll
  for (int it = 0; it < kRows / kRowsPerIter; ++it) {
    const int row = row0 + it * kRowsPerIter;
    const bool valid = row < valid_rows;
    const uint32_t dst = smem_tile + row * Tr::kRowBytes + ((chunk ^ (row % kSwizzleRows)) * kChunkBytes);
    // An invalid row's source is never read (src-size 0); point it at the tile start anyway.
    sm80::cp_async_16(dst, valid ? src : gmem, valid);
    src += kRowsPerIter * row_stride;
  }
}

template <typename T, int kHeadDim, bool kSoftcap>
__global__ void __launch_bounds__(FwdKernelTraits<T, kHeadDim>::kNThreads, 1)
    attn_fwd_sm80_kernel(const AttentionFwdParams p, const FwdSm80Args args) {
  using Tr = FwdKernelTraits<T, kHeadDim>;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kE = Tr::kElemsPerChunk;

  // Tiles start at multiples of kRowBytes (<= 512) from a 1024-aligned base; the ldmatrix
  // addressing below relies on it (see "ldmatrix addressing").
  extern __shared__ __align__(kSmemAlign) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);  // (kBlockM, D); reused as the output tile
  const uint32_t s_q_addr = sm80::smem_u32(smem_raw);
  const uint32_t s_k_addr = s_q_addr + Tr::kQElems * sizeof(T);              // kStages x (kBlockN, D)
  const uint32_t s_v_addr = s_k_addr + kStages * Tr::kKVElems * sizeof(T);  // kStages x (kBlockN, D)
  constexpr uint32_t kStageBytes = Tr::kKVElems * sizeof(T);

  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int g = lane / 4;  // mma row group: C rows g and g + 8
  const int t = lane % 4;  // thread in group: C columns 2t, 2t + 1

  // ---- which (query block, split, head, batch): query blocks fastest, so the blocks of one
  // (batch, head) run together and share K/V in L2; the last (heaviest, for causal) first.
  int bid = blockIdx.x;
  const int m_block = args.num_m_blocks - 1 - bid % args.num_m_blocks;
  bid /= args.num_m_blocks;
  const int split = bid % p.num_splits;
  bid /= p.num_splits;
  const int h = bid % p.heads_q;
  const int b = bid / p.heads_q;
  const int h_kv = h / (p.heads_q / p.heads_kv);

  // ---- this sequence's rows and lengths
  int64_t q_row0 = 0;  // first q/out row of the sequence (varlen: packed row index)
  int64_t k_row0 = 0;
  int seqlen_q = p.seqlen_q;
  int seqlen_k = p.seqlen_k;  // rows of k/v this sequence may read
  if (p.cu_seqlens_q != nullptr) {
    q_row0 = p.cu_seqlens_q[b];
    seqlen_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
  }
  if (p.cu_seqlens_k != nullptr) {
    k_row0 = p.cu_seqlens_k[b];
    seqlen_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  }
  // kv-cache: the diagonal follows the valid key count (even a bad one, as the reference
  // does), while reads stay within the cache; keys past the count are zero-filled on load,
  // so unwritten cache rows (possibly NaN) never reach P V.
  int sk_diag = seqlen_k;
  int sk_bound = seqlen_k;
  if (p.seqlens_k != nullptr) {
    sk_diag = p.seqlens_k[b];
    sk_bound = min(max(sk_diag, 0), seqlen_k);
  }
  const int m0 = m_block * kBlockM;
  if (m0 >= seqlen_q) return;  // a block past a short (varlen) sequence; uniform per CTA
  const int rows_valid = min(kBlockM, seqlen_q - m0);

  const T* q_ptr = static_cast<const T*>(p.q) + (p.cu_seqlens_q ? 0 : b * p.q_strides.batch) +
                   (q_row0 + m0) * p.q_strides.row + h * p.q_strides.head;
  const T* k_ptr = static_cast<const T*>(p.k) + (p.cu_seqlens_k ? 0 : b * p.k_strides.batch) +
                   k_row0 * p.k_strides.row + h_kv * p.k_strides.head;
  const T* v_ptr = static_cast<const T*>(p.v) + (p.cu_seqlens_k ? 0 : b * p.v_strides.batch) +
                   k_row0 * p.v_strides.row + h_kv * p.v_strides.head;

  // ---- the key blocks of this query block's band (and of this split's share of it)
  const MaskRule rule{sk_diag - seqlen_q, sk_bound, p.causal, p.window_left, p.window_right};
  const int key_begin = max(rule.key_lo(m0), 0);
  const int key_end = rule.key_hi(m0 + rows_valid - 1) + 1;  // exclusive; includes sk_bound
  int n_begin = key_begin / kBlockN;
  int n_end = key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN : n_begin;
  if (p.num_splits > 1) {
    // contiguous, near-equal shares in split order; a split past the band gets none
    const int per_split = (n_end - n_begin + p.num_splits - 1) / p.num_splits;
    const int lo = min(n_begin + split * per_split, n_end);
    n_end = min(lo + per_split, n_end);
    n_begin = lo;
  }
  // A key block needs the per-element mask unless every row of the query block may attend
  // every key of it: no key tail, below the right edge for the first row, above the left
  // edge for the last row (rows past the sequence only make this conservative).
  // As key-block indices: blocks from full_hi on cross the first row's right edge or the
  // key tail; blocks before full_lo cross the last row's left edge.
  const int diag = sk_diag - seqlen_q;
  const bool has_right = p.causal || p.window_right >= 0;
  const int right = p.causal ? 0 : p.window_right;  // causal + any window_right >= 0: edge 0
  // n0 + kBlockN <= min(sk_bound, m0 + diag + right + 1)  <=>  n_block < full_hi
  const int full_key_end = has_right ? min(sk_bound, m0 + diag + right + 1) : sk_bound;
  const int full_hi = full_key_end >= kBlockN ? full_key_end / kBlockN : 0;
  // n0 >= m0 + kBlockM - 1 + diag - window_left  <=>  n_block >= full_lo
  const int left_edge = m0 + kBlockM - 1 + diag - p.window_left;
  const int full_lo = p.window_left >= 0 && left_edge > 0 ? (left_edge + kBlockN - 1) / kBlockN : 0;

  // ---- prologue: Q and the first K/V block, one cp.async group
  load_tile_async<Tr, kBlockM>(s_q_addr, q_ptr, p.q_strides.row, rows_valid, tid);
  if (n_begin < n_end) {
    const int n0 = n_begin * kBlockN;
    load_tile_async<Tr, kBlockN>(s_k_addr, k_ptr + n0 * p.k_strides.row, p.k_strides.row, sk_bound - n0, tid);
    load_tile_async<Tr, kBlockN>(s_v_addr, v_ptr + n0 * p.v_strides.row, p.v_strides.row, sk_bound - n0, tid);
  }
  sm80::cp_async_commit();

  // ---- ldmatrix addressing. Lane l gives the address of row l % 8 of 8x8 matrix l / 8.
  // Every row read below is (multiple of 8) + l % 8, so its swizzle key is l % 8, and every
  // logical chunk is c0 + 2c (c0 in {0, 1} per lane, 2c even, unrolled), whose swizzled
  // position is (c0 + 2c) ^ (l % 8) = (c0 ^ (l % 8)) ^ 2c. Row starts are multiples of
  // kRowBytes, so the byte address is lane_base ^ (2c * 16): one XOR with an immediate
  // per ldmatrix instead of a register per (lane, chunk) pair held across the key loop.
  const int ld_row = lane % 8;
  const int ld_mat = lane / 8;
  const int warp_row0 = warp * Tr::kWarpRows;  // this warp's first row in the block
  // Q as A (x4): lanes 0-15 address rows 0-15 of a row tile at chunk 2kk, lanes 16-31 the
  // same rows at chunk 2kk + 1: a0..a3 = (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
  const uint32_t q_lane = s_q_addr + (warp_row0 + lane % 16) * Tr::kRowBytes + (((lane / 16) ^ ld_row) * kChunkBytes);
  // K as B (x4, two n-tiles): matrices (keys 0-7, chunk 2kk), (keys 0-7, 2kk+1),
  // (keys 8-15, 2kk), (keys 8-15, 2kk+1) of a 16-key group -> b0, b1 of n-tile 0, then of 1.
  const uint32_t k_lane = ((ld_mat / 2) * kMmaN + ld_row) * Tr::kRowBytes + (((ld_mat % 2) ^ ld_row) * kChunkBytes);
  // V as B (x4.trans, two d-tiles): matrices (keys 0-7, chunk 2dt2), (keys 8-15, 2dt2),
  // (keys 0-7, 2dt2+1), (keys 8-15, 2dt2+1) of a 16-key k-step -> b0, b1 of d-tile 0, then of 1.
  const uint32_t v_lane = ((ld_mat % 2) * kMmaN + ld_row) * Tr::kRowBytes + (((ld_mat / 2) ^ ld_row) * kChunkBytes);
  constexpr uint32_t kTileRowsBytes = kRowsPerWarp * Tr::kRowBytes;  // 16 rows

  uint32_t q_frag[Tr::kMTiles][Tr::kQInRegs ? Tr::kQKSteps : 1][4];
  float o_acc[Tr::kMTiles][Tr::kOTiles][4];
#pragma unroll
  for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
    for (int dt = 0; dt < Tr::kOTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[mi][dt][e] = 0.f;
    }
  }
  // Softmax state of this lane's rows (row tile mi, rows g and g + 8): the running max in
  // S units (before k2), and this lane's partial row sum (quad-reduced in the epilogue).
  float row_max[Tr::kMTiles][2];
  float row_sum[Tr::kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[mi][r] = neg_inf();
      row_sum[mi][r] = 0.f;
    }
  }
  const float k2 = args.score_scale_log2;

  for (int n_block = n_begin; n_block < n_end; ++n_block) {
    const int stage = (n_block - n_begin) % kStages;
    const uint32_t k_base = s_k_addr + stage * kStageBytes + k_lane;
    const uint32_t v_base = s_v_addr + stage * kStageBytes + v_lane;

    // ---- prefetch block n+1 into the other stage (freed by the barrier that ended the
    // previous iteration); always commit a group so the wait count below stays fixed.
    if (n_block + 1 < n_end) {
      const int n0 = (n_block + 1) * kBlockN;
      const int other = (stage + 1) % kStages;
      load_tile_async<Tr, kBlockN>(s_k_addr + other * kStageBytes, k_ptr + n0 * p.k_strides.row, p.k_strides.row,
                                   sk_bound - n0, tid);
      load_tile_async<Tr, kBlockN>(s_v_addr + other * kStageBytes, v_ptr + n0 * p.v_strides.row, p.v_strides.row,
                                   sk_bound - n0, tid);
    }
    sm80::cp_async_commit();
    sm80::cp_async_wait<1>();  // everything but the prefetch just issued: Q and block n
    __syncthreads();

    if constexpr (Tr::kQInRegs) {
      if (n_block == n_begin) {
#pragma unroll
        for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
          for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
            sm80::ldmatrix_x4(q_frag[mi][kk], (q_lane ^ (2 * kk * kChunkBytes)) + mi * kTileRowsBytes);
          }
        }
      }
    }

    // ---- S = Q K^T: this warp's kWarpRows rows x kBlockN keys; each K fragment feeds
    // every row tile of the warp
    float s[Tr::kMTiles][Tr::kSTiles][4];
#pragma unroll
    for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
      for (int nt = 0; nt < Tr::kSTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][nt][e] = 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < Tr::kQKSteps; ++kk) {
      uint32_t a_frag[Tr::kMTiles][4];
#pragma unroll
      for (int mi = 0; mi < Tr::kMTiles; ++mi) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a_frag[mi][e] = q_frag[mi][kk][e];
        } else {
          sm80::ldmatrix_x4(a_frag[mi], (q_lane ^ (2 * kk * kChunkBytes)) + mi * kTileRowsBytes);
        }
      }
#pragma unroll
      for (int nt2 = 0; nt2 < Tr::kSTiles / 2; ++nt2) {
        uint32_t kb[4];  // keys 16 nt2 .. 16 nt2 + 15, d chunks 2kk, 2kk + 1
        sm80::ldmatrix_x4(kb, (k_base ^ (2 * kk * kChunkBytes)) + nt2 * kTileRowsBytes);
        const uint32_t b0[2] = {kb[0], kb[1]};
        const uint32_t b1[2] = {kb[2], kb[3]};
#pragma unroll
        for (int mi = 0; mi < Tr::kMTiles; ++mi) {
          sm80::mma_16816<T>(s[mi][2 * nt2], a_frag[mi], b0);
          sm80::mma_16816<T>(s[mi][2 * nt2 + 1], a_frag[mi], b1);
        }
      }
    }

    // ---- softcap, then the mask on boundary blocks
    if constexpr (kSoftcap) {
#pragma unroll
      for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
        for (int nt = 0; nt < Tr::kSTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][nt][e] = tanhf(s[mi][nt][e] * args.softcap_inv_scale);
        }
      }
    }
    if (n_block < full_lo || n_block >= full_hi) {
      const int col0 = n_block * kBlockN + 2 * t;
#pragma unroll
      for (int mi = 0; mi < Tr::kMTiles; ++mi) {
        const int row0 = m0 + warp_row0 + mi * kRowsPerWarp + g;
#pragma unroll
        for (int nt = 0; nt < Tr::kSTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = row0 + (e / 2) * 8;        // C rows g, g, g+8, g+8
            const int j = col0 + nt * kMmaN + e % 2;  // C cols 2t, 2t+1
            if (!rule.allows(i, j)) s[mi][nt][e] = neg_inf();
          }
        }
      }
    }

    // ---- online softmax (base 2) and rescale of the output accumulator
#pragma unroll
    for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float block_max = neg_inf();
#pragma unroll
        for (int nt = 0; nt < Tr::kSTiles; ++nt) {
          block_max = fmaxf(block_max, fmaxf(s[mi][nt][2 * r], s[mi][nt][2 * r + 1]));
        }
        block_max = sm80::quad_max(block_max);
        const float new_max = fmaxf(row_max[mi][r], block_max);
        // safe max: a row with no key yet shifts by 0, so masked scores give exp2(-inf) = 0
        const float shift = new_max == neg_inf() ? 0.f : new_max * k2;
        const float alpha = fast_exp2(row_max[mi][r] * k2 - shift);  // 0 when row_max was -inf
        row_max[mi][r] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < Tr::kSTiles; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float prob = fast_exp2(fmaf(s[mi][nt][2 * r + c], k2, -shift));
            s[mi][nt][2 * r + c] = prob;
            sum += prob;
          }
        }
        row_sum[mi][r] = row_sum[mi][r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < Tr::kOTiles; ++dt) {
          o_acc[mi][dt][2 * r] *= alpha;
          o_acc[mi][dt][2 * r + 1] *= alpha;
        }
      }
    }

    // ---- O += P V: P's C fragments of n-tiles 2kk, 2kk+1 are the A fragment of k-step kk
#pragma unroll
    for (int kk = 0; kk < Tr::kPVSteps; ++kk) {
      uint32_t p_frag[Tr::kMTiles][4];
#pragma unroll
      for (int mi = 0; mi < Tr::kMTiles; ++mi) {
        p_frag[mi][0] = sm80::pack_floats<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);          // (g, 2t)
        p_frag[mi][1] = sm80::pack_floats<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);          // (g+8, 2t)
        p_frag[mi][2] = sm80::pack_floats<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);  // (g, 2t+8)
        p_frag[mi][3] = sm80::pack_floats<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);  // (g+8, 2t+8)
      }
#pragma unroll
      for (int dt2 = 0; dt2 < Tr::kOTiles / 2; ++dt2) {
        uint32_t vb[4];  // keys 16 kk .. 16 kk + 15, d chunks 2 dt2, 2 dt2 + 1
        sm80::ldmatrix_x4_trans(vb, (v_base ^ (2 * dt2 * kChunkBytes)) + kk * kTileRowsBytes);
        const uint32_t b0[2] = {vb[0], vb[1]};
        const uint32_t b1[2] = {vb[2], vb[3]};
#pragma unroll
        for (int mi = 0; mi < Tr::kMTiles; ++mi) {
          sm80::mma_16816<T>(o_acc[mi][2 * dt2], p_frag[mi], b0);
          sm80::mma_16816<T>(o_acc[mi][2 * dt2 + 1], p_frag[mi], b1);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // ---- epilogue: normalise, lse
  sm80::cp_async_wait<0>();  // with no key block the Q load may still be in flight
  __syncthreads();           // s_q is about to be overwritten with the output tile
  float inv_sum[Tr::kMTiles][2];
  float lse[Tr::kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = sm80::quad_sum(row_sum[mi][r]);
      const bool seen = total > 0.f;  // false: every key of the row was masked
      inv_sum[mi][r] = seen ? 1.f / total : 0.f;
      lse[mi][r] = seen ? (row_max[mi][r] * k2 + log2f(total)) * kLn2 : neg_inf();
    }
  }

  if (p.num_splits == 1) {
    // registers -> shared (swizzled, conflict-free 4-byte stores) -> 16-byte global stores
    T* s_o = s_q;
#pragma unroll
    for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_row0 + mi * kRowsPerWarp + g + 8 * r;
#pragma unroll
        for (int dt = 0; dt < Tr::kOTiles; ++dt) {
          *reinterpret_cast<uint32_t*>(s_o + swizzled<kHeadDim, kE>(row, dt) + 2 * t) = sm80::pack_floats<T>(
              o_acc[mi][dt][2 * r] * inv_sum[mi][r], o_acc[mi][dt][2 * r + 1] * inv_sum[mi][r]);
        }
      }
    }
    __syncthreads();
    T* out_ptr = static_cast<T*>(p.out) + (p.cu_seqlens_q ? 0 : b * p.out_strides.batch) +
                 (q_row0 + m0) * p.out_strides.row + h * p.out_strides.head;
    constexpr int kIters = kBlockM * Tr::kChunksPerRow / Tr::kNThreads;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = tid + it * Tr::kNThreads;
      const int row = c / Tr::kChunksPerRow;
      const int chunk = c % Tr::kChunksPerRow;
      if (row < rows_valid) {
        *reinterpret_cast<uint4*>(out_ptr + row * p.out_strides.row + chunk * kE) =
            *reinterpret_cast<const uint4*>(s_o + swizzled<kHeadDim, kE>(row, chunk));
      }
    }
    // lse: dense (B, Hq, Sq), varlen (Hq, total_q)
    float* lse_ptr = p.cu_seqlens_q != nullptr
                         ? p.lse + static_cast<int64_t>(h) * p.total_q + q_row0 + m0
                         : p.lse + (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + m0;
    if (t == 0) {
#pragma unroll
      for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = warp_row0 + mi * kRowsPerWarp + g + 8 * r;
          if (row < rows_valid) lse_ptr[row] = lse[mi][r];
        }
      }
    }
  } else {
    // split-KV partials (dense only): out_accum (S, B, Hq, Sq, D), lse_accum (S, B, Hq, Sq)
    const int64_t row_base = ((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q + m0;
    float* oa_ptr = p.out_accum + row_base * kHeadDim;
#pragma unroll
    for (int mi = 0; mi < Tr::kMTiles; ++mi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_row0 + mi * kRowsPerWarp + g + 8 * r;
        if (row < rows_valid) {
#pragma unroll
          for (int dt = 0; dt < Tr::kOTiles; ++dt) {
            *reinterpret_cast<float2*>(oa_ptr + static_cast<int64_t>(row) * kHeadDim + dt * kMmaN + 2 * t) =
                make_float2(o_acc[mi][dt][2 * r] * inv_sum[mi][r], o_acc[mi][dt][2 * r + 1] * inv_sum[mi][r]);
          }
          if (t == 0) p.lse_accum[row_base + row] = lse[mi][r];
        }
      }
    }
  }
}

// The launcher every fwd_sm80_<dtype>_hdim<D>.cu instantiates (declared in fwd_sm80.h).
template <typename T, int kHeadDim>
cudaError_t run_attention_fwd_sm80(const AttentionFwdParams& params, cudaStream_t stream) {
  using Tr = FwdKernelTraits<T, kHeadDim>;
  if (params.batch <= 0 || params.heads_q <= 0 || params.seqlen_q <= 0) return cudaSuccess;
  if (params.heads_kv <= 0 || params.heads_q % params.heads_kv != 0 || params.num_splits < 1) {
    return cudaErrorInvalidValue;
  }

  AttentionFwdParams p = params;
  // A window wider than any sequence is no window; normalising it keeps the kernel's
  // `i + diag -/+ window` arithmetic far from int overflow (the op layer passes up to INT32_MAX).
  if (p.window_left >= p.seqlen_k) p.window_left = -1;
  if (p.window_right >= p.seqlen_q) p.window_right = -1;

  const bool softcap = p.softcap > 0.f;
  FwdSm80Args args;
  args.num_m_blocks = (p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  // k2 > 0 keeps -inf * k2 = -inf for masked scores; softmax_scale = 0 (all scores equal)
  // becomes the smallest normal float, whose products with finite scores round to ~0.
  args.score_scale_log2 = std::max((softcap ? p.softcap : p.softmax_scale) * kLog2e, FLT_MIN);
  args.softcap_inv_scale = softcap ? p.softmax_scale / p.softcap : 0.f;

  const int64_t num_ctas = static_cast<int64_t>(args.num_m_blocks) * p.num_splits * p.heads_q * p.batch;
  if (num_ctas > INT_MAX) return cudaErrorInvalidConfiguration;

  auto launch = [&](auto kernel) {
    if (Tr::kSmemBytes > kDefaultSmemLimit) {
      const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
      if (err != cudaSuccess) return err;
    }
    kernel<<<static_cast<unsigned>(num_ctas), Tr::kNThreads, Tr::kSmemBytes, stream>>>(p, args);
    return cudaGetLastError();
  };
  return softcap ? launch(attn_fwd_sm80_kernel<T, kHeadDim, true>) : launch(attn_fwd_sm80_kernel<T, kHeadDim, false>);
}

}  // namespace fwd_sm80
}  // namespace fast_attn
