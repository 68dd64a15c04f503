// Flash attention backward for sm_80 and newer (mma.sync + ldmatrix + cp.async): the kernel
// templates, their tile configurations and the per-(dtype, head_dim) launcher. Included only
// by csrc/attention/bwd_sm80_<dtype>_hdim<D>.cu (one instantiation each, to keep every file's
// compile time short); csrc/attention/bwd_sm80.cu holds the entry point and the preprocessing.
//
// Algorithm: FlashAttention-2's backward (Dao 2023, arXiv 2307.08691, Alg. 2), split into two
// kernels that both recompute P so that no atomics and no fp32 dQ/dK/dV workspace exist:
//
//   dK/dV kernel, one CTA per (key block of kBlockN keys, kv head, batch). K_j, V_j stay in
//     shared memory; the CTA walks, for each query head of its GQA group in a fixed order, the
//     query blocks that can attend the key block (Q_i, dO_i, lse_i, D_i double-buffered by
//     cp.async) and per block
//       phase A  S^T = K Q^T, dP^T = V dO^T                 (warps tile keys x queries)
//                P^T = exp2(S^T log2e - lse log2e)           (0 where masked / lse = -inf)
//                dS^T = P^T * (dP^T - D) [* (1 - tanh^2)]    -> both to shared memory (T)
//       phase B  dV += P^T dO, dK += dS^T Q                  (warps tile keys x head_dim)
//     dK (times softmax_scale) and dV leave once, in T, through shared memory (16-byte stores).
//     The GQA group's sum is a fixed-order fp32 register sum: deterministic.
//   dQ kernel, one CTA per (query block of kBlockM rows, query head, batch); warp w owns rows
//     16w..16w+15. Q_i, dO_i stay in shared memory; K_j, V_j of the key blocks it can attend
//     are double-buffered; per block S = Q K^T, dP = dO V^T, dS as above (all in registers),
//     then dQ += dS K with dS re-used from the accumulators as the A operand. dQ (times
//     softmax_scale) leaves once, in T.
//   D = rowsum(dO * O) (fp32, natural units) comes from the preprocessing kernel in
//   bwd_sm80.cu, in a workspace laid out exactly like lse: dense (B, Hq, Sq), varlen
//   (Hq, total_q), contiguous, no padding.
//
// Scores follow attention_params.h: s = scale q.k, softcap s = c tanh(s / c), bottom-right
// causal / window band through MaskRule, keys past seqlen_k masked. Inside the kernels the
// softmax runs in base 2: P = exp2(s log2e - lse log2e); a row with lse = -inf uses +inf
// instead so that P = 0 exactly (zero gradients, never NaN). Rows past the end of a query
// tile (zero-filled Q/dO) get lse = +inf and D = 0, so they contribute nothing; keys past the
// end of a key tile are zero-filled and masked. Blocks outside the band are never visited,
// and the position mask is evaluated only on blocks that cut the band or a sequence end.
//
// Shared-memory tiles are row-major with each row padded by kSmemPad elements (16 bytes), so
// the 8 rows an ldmatrix or a fragment store touches fall in 8 different 4-bank groups: no
// bank conflicts, no swizzle arithmetic. All global offsets are int64.
//
// Limits: T = __half or __nv_bfloat16; head_dim 64, 128 or 256 (the op layer pads); every
// row/head/batch stride a multiple of 8 elements and the last dimension contiguous (16-byte
// cp.async / stores). Two tile configurations per head dim: "large" for devices that give a
// block >= ~140 KB of shared memory (A100, H100) and "small" (<= 99 KB, sm_86/sm_89); the
// launcher picks by the device's opt-in limit. Dropout, ALiBi and additive masks are not
// supported here (the op layer routes those calls elsewhere).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention/attention_params.h"
#include "attention/sm80_primitives.cuh"

namespace fast_attn {
namespace sm80_bwd {

using sm80::cp_async_16;
using sm80::cp_async_commit;
using sm80::cp_async_wait;
using sm80::ldmatrix_x4;
using sm80::ldmatrix_x4_trans;
using sm80::mma_16816;
using sm80::pack_floats;
using sm80::smem_u32;

constexpr float kLog2e = 1.4426950408889634f;  // log2(e): exp(x) = exp2(x * log2e)
constexpr float kInf = __builtin_huge_valf();
constexpr int kWarpSize = 32;
constexpr int kMmaM = 16;     // mma.m16n8k16 tile: rows of A / C
constexpr int kMmaN = 8;      // columns of B / C
constexpr int kMmaK = 16;     // the contraction step
constexpr int kChunk = 8;     // 16-bit elements in 16 bytes: one cp.async, one ldmatrix row
constexpr int kSmemPad = 8;   // elements appended to every shared-memory row (see the top)

// ------------------------------------------------------------------------ tile configs

// dK/dV kernel: kBlockN keys per CTA, kBlockM queries per step, kWarps warps, kStages
// buffers (1 or 2) of the per-step operands Q, dO, lse, D.
template <int kHeadDim_, int kBlockN_, int kBlockM_, int kWarps_, int kStages_>
struct DkdvConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = kWarps * kWarpSize;
  // Warp grid: kWarpsN warps along the keys (16 keys each) times kWarpsD warps, which split
  // the queries in phase A and head_dim in phase B.
  static constexpr int kWarpsN = kBlockN / kMmaM;
  static constexpr int kWarpsD = kWarps / kWarpsN;
  static constexpr int kMPerWarp = kBlockM / kWarpsD;   // phase A: queries per warp
  static constexpr int kDPerWarp = kHeadDim / kWarpsD;  // phase B: head_dim columns per warp
  static_assert(kBlockN % kMmaM == 0 && kWarpsN * kWarpsD == kWarps, "warp grid must tile the CTA");
  static_assert(kMPerWarp % 16 == 0 && kDPerWarp % 16 == 0, "x4 ldmatrix loads B in 16-column pairs");
  static_assert(kBlockM % kMmaK == 0 && kStages >= 1 && kStages <= 2, "bad tile");

  static constexpr int kLdD = kHeadDim + kSmemPad;  // row stride of K, V, Q, dO (elements)
  static constexpr int kLdM = kBlockM + kSmemPad;   // row stride of P^T, dS^T
  // Shared memory, in elements of T: K | V | Q[kStages] | dO[kStages] | P^T | dS^T, then fp32
  // lse2[kStages][kBlockM] | D[kStages][kBlockM]. The epilogue reuses K for dK and V for dV.
  static constexpr int kKvElems = kBlockN * kLdD;
  static constexpr int kQElems = kBlockM * kLdD;
  static constexpr int kPElems = kBlockN * kLdM;
  static constexpr int kOffV = kKvElems;
  static constexpr int kOffQ = 2 * kKvElems;
  static constexpr int kOffDo = kOffQ + kStages * kQElems;
  static constexpr int kOffP = kOffDo + kStages * kQElems;
  static constexpr int kOffDs = kOffP + kPElems;
  static constexpr int kElems = kOffDs + kPElems;
  static constexpr int kSmemBytes = kElems * 2 + 2 * kStages * kBlockM * static_cast<int>(sizeof(float));
};

// dQ kernel: kBlockM query rows per CTA (16 per warp), kBlockN keys per step, kStages
// buffers (1 or 2) of K and V.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_>
struct DqConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = kBlockM / kMmaM;
  static constexpr int kThreads = kWarps * kWarpSize;
  static_assert(kBlockM % kMmaM == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0, "bad tile");
  static_assert(kStages >= 1 && kStages <= 2, "bad tile");

  static constexpr int kLdD = kHeadDim + kSmemPad;
  // Shared memory, in elements of T: Q | dO | K[kStages] | V[kStages]; the epilogue reuses Q.
  static constexpr int kQElems = kBlockM * kLdD;
  static constexpr int kKvElems = kBlockN * kLdD;
  static constexpr int kOffDo = kQElems;
  static constexpr int kOffK = 2 * kQElems;
  static constexpr int kOffV = kOffK + kStages * kKvElems;
  static constexpr int kElems = kOffV + kStages * kKvElems;
  static constexpr int kSmemBytes = kElems * 2;
};

// Tiles per head dim. "Large" fits the 163 KB a block may use on A100 (and H100's 227 KB);
// "small" fits the 99 KB of sm_86/sm_89. Register budget: the dK/dV accumulators are
// 2 * kDPerWarp / 2 fp32 per thread (<= 128), the dQ ones kHeadDim / 2 (<= 128).
//   hdim  kernel  large (smem)                         small (smem)
//   64    dK/dV   N128 M64 8 warps 2 stages (109 KB)   N128 M32 8 warps 2 stages (74.5 KB)
//   64    dQ      M128 N64 8 warps 2 stages (72 KB)    same
//   128   dK/dV   N64  M64 8 warps 2 stages (121 KB)   N64  M32 8 warps 2 stages (78.5 KB)
//   128   dQ      M128 N64 8 warps 2 stages (136 KB)   M64  N32 4 warps 2 stages (68 KB)
//   256   dK/dV   N64  M32 8 warps 2 stages (142.5 KB) N32  M32 4 warps 1 stage  (71.5 KB)
//   256   dQ      M64  N32 4 warps 2 stages (132 KB)   M64  N16 4 warps 1 stage  (82.5 KB)
// These are first choices made for correctness and occupancy, not yet tuned on a GPU.
template <int kHeadDim>
struct BwdTiles;
constexpr int kSmemLargeLimit = 163 * 1024;  // A100's opt-in limit per block (H100: 227 KB)
constexpr int kSmemSmallLimit = 99 * 1024;   // sm_86 / sm_89 opt-in limit per block
template <class Tiles>
constexpr bool tiles_fit() {
  return Tiles::DkdvLarge::kSmemBytes <= kSmemLargeLimit && Tiles::DqLarge::kSmemBytes <= kSmemLargeLimit &&
         Tiles::DkdvSmall::kSmemBytes <= kSmemSmallLimit && Tiles::DqSmall::kSmemBytes <= kSmemSmallLimit;
}
template <>
struct BwdTiles<64> {
  using DkdvLarge = DkdvConfig<64, 128, 64, 8, 2>;
  using DkdvSmall = DkdvConfig<64, 128, 32, 8, 2>;
  using DqLarge = DqConfig<64, 128, 64, 2>;
  using DqSmall = DqConfig<64, 128, 64, 2>;
};
template <>
struct BwdTiles<128> {
  using DkdvLarge = DkdvConfig<128, 64, 64, 8, 2>;
  using DkdvSmall = DkdvConfig<128, 64, 32, 8, 2>;
  using DqLarge = DqConfig<128, 128, 64, 2>;
  using DqSmall = DqConfig<128, 64, 32, 2>;
};
template <>
struct BwdTiles<256> {
  using DkdvLarge = DkdvConfig<256, 64, 32, 8, 2>;
  using DkdvSmall = DkdvConfig<256, 32, 32, 4, 1>;
  using DqLarge = DqConfig<256, 64, 32, 2>;
  using DqSmall = DqConfig<256, 64, 16, 1>;
};
static_assert(tiles_fit<BwdTiles<64>>() && tiles_fit<BwdTiles<128>>() && tiles_fit<BwdTiles<256>>(),
              "a backward tile config exceeds its shared-memory budget");

// ------------------------------------------------------------------------ small helpers

// The rows of one sequence: where its queries and keys start in the (packed) row dimension,
// their counts, and the batch index that dense tensors use (0 for packed varlen tensors,
// whose batch stride is unused).
struct Sequence {
  int64_t q_start;
  int64_t k_start;
  int seqlen_q;
  int seqlen_k;
  int q_batch;
  int k_batch;
};

FA_DEVICE Sequence sequence_of(const AttentionBwdParams& p, int b) {
  Sequence s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.seqlen_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.q_batch = 0;
  } else {
    s.q_start = 0;
    s.seqlen_q = p.seqlen_q;
    s.q_batch = b;
  }
  if (p.cu_seqlens_k != nullptr) {
    s.k_start = p.cu_seqlens_k[b];
    s.seqlen_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    s.k_batch = 0;
  } else {
    s.k_start = 0;
    s.seqlen_k = p.seqlens_k != nullptr ? p.seqlens_k[b] : p.seqlen_k;
    s.k_batch = b;
  }
  return s;
}

// Element offset of (batch, row, head, 0) in a (B, S, H, D) / packed (rows, H, D) tensor.
FA_DEVICE int64_t row_offset(const Strides4& st, int batch, int64_t row, int head) {
  return static_cast<int64_t>(batch) * st.batch + row * st.row + static_cast<int64_t>(head) * st.head;
}

// Offset of query row 0 of sequence `s`, head h, in lse and dsoftmax_sum: dense (B, Hq, Sq),
// varlen (Hq, total_q), both contiguous.
FA_DEVICE int64_t stats_offset(const AttentionBwdParams& p, const Sequence& s, int b, int h) {
  if (p.cu_seqlens_q != nullptr) return static_cast<int64_t>(h) * p.total_q + s.q_start;
  return (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q;
}

// The mask rule of one sequence. Window edges too wide to cut anything become unbounded
// (-1): that keeps i + diag -/+ window inside int range for any user value.
FA_DEVICE MaskRule mask_rule_of(const AttentionBwdParams& p, const Sequence& s) {
  MaskRule rule;
  rule.diag_offset = s.seqlen_k - s.seqlen_q;
  rule.seqlen_k = s.seqlen_k;
  rule.causal = p.causal;
  rule.window_left = p.window_left >= s.seqlen_k ? -1 : p.window_left;
  rule.window_right = p.window_right >= s.seqlen_q ? -1 : p.window_right;
  return rule;
}

// How far right of the diagonal a row may look: a value >= 0, or -1 for unbounded.
FA_DEVICE int right_extent(const MaskRule& rule) {
  if (rule.causal) return rule.window_right >= 0 ? min(0, rule.window_right) : 0;
  return rule.window_right;
}

// True when every (row, key) of rows [m0, m0 + rows) x keys [n0, n0 + cols) is allowed and
// in range, so the block needs no position mask (rows past seqlen_q are harmless either way).
FA_DEVICE bool block_is_full(const MaskRule& rule, int m0, int rows, int n0, int cols) {
  // key_lo grows with the row and key_hi too: the last row bounds the left edge, the first
  // row the right edge (key_hi includes the seqlen_k bound).
  return rule.key_lo(m0 + rows - 1) <= n0 && rule.key_hi(m0) >= n0 + cols - 1;
}

// Copies rows [0, kRows) x [0, kHeadDim) of a global tile (row stride `ld_g` elements) to a
// shared tile (row stride kLd) with cp.async; rows >= valid_rows are zero-filled and read
// nothing (their source address is `fallback`, any valid pointer).
template <int kRows, int kHeadDim, int kLd, int kThreads, typename T>
FA_DEVICE void load_tile(T* smem, const T* gmem, int64_t ld_g, int valid_rows, const T* fallback) {
  constexpr int kChunksPerRow = kHeadDim / kChunk;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * kChunk;
      const bool valid = row < valid_rows;
      const T* src = valid ? gmem + row * ld_g + col : fallback;
      cp_async_16(smem_u32(smem + row * kLd + col), src, valid);
    }
  }
}

// Copies rows [0, valid_rows) (at most kRows) of a shared tile to global memory, 16 bytes
// per thread and access.
template <int kRows, int kHeadDim, int kLd, int kThreads, typename T>
FA_DEVICE void store_tile(T* gmem, int64_t ld_g, const T* smem, int valid_rows) {
  constexpr int kChunksPerRow = kHeadDim / kChunk;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * kChunk;
      if (row < valid_rows) {
        *reinterpret_cast<uint4*>(gmem + row * ld_g + col) = *reinterpret_cast<const uint4*>(smem + row * kLd + col);
      }
    }
  }
}

// ldmatrix lane addresses (see sm80_primitives.cuh for the fragment layouts).
// A operand, 16 rows x 16 k at (row0, k0) of a row-major [row][k] tile.
template <typename T>
FA_DEVICE uint32_t a_addr(const T* tile, int ld, int row0, int k0, int lane) {
  return smem_u32(tile + (row0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}
// B operands of two n8 tiles (columns n0..n0+15) x 16 k from a tile stored [n][k]:
// ldmatrix_x4 gives {b0, b1} of columns n0..n0+7 in r0, r1 and of n0+8..n0+15 in r2, r3.
template <typename T>
FA_DEVICE uint32_t b_addr_nk(const T* tile, int ld, int n0, int k0, int lane) {
  return smem_u32(tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + ((lane >> 3) & 1) * 8);
}
// The same from a tile stored [k][n], for ldmatrix_x4_trans.
template <typename T>
FA_DEVICE uint32_t b_addr_kn(const T* tile, int ld, int k0, int n0, int lane) {
  return smem_u32(tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// d0 += a * (columns 0..7 of b), d1 += a * (columns 8..15), b as loaded by the x4 helpers above.
template <typename T>
FA_DEVICE void mma_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  const uint32_t b_lo[2] = {b[0], b[1]};
  const uint32_t b_hi[2] = {b[2], b[3]};
  mma_16816<T>(d0, a, b_lo);
  mma_16816<T>(d1, a, b_hi);
}

// The log2-unit LSE a kernel subtracts: +inf for a fully masked row (lse = -inf) and for
// rows past the sequence end, so that exp2(s - lse2) = 0 there.
FA_DEVICE float lse_log2(float lse) { return lse == -kInf ? kInf : lse * kLog2e; }

// Scalars shared by both kernels: the score transform in log2 units.
struct ScoreScale {
  float scale_log2;     // softmax_scale * log2e (no softcap)
  float tanh_scale;     // softmax_scale / softcap (softcap)
  float softcap_log2;   // softcap * log2e (softcap)
  bool softcap;
};

FA_DEVICE ScoreScale score_scale_of(const AttentionBwdParams& p) {
  ScoreScale sc;
  sc.softcap = p.softcap > 0.f;
  sc.scale_log2 = p.softmax_scale * kLog2e;
  sc.tanh_scale = sc.softcap ? p.softmax_scale / p.softcap : 0.f;
  sc.softcap_log2 = p.softcap * kLog2e;
  return sc;
}

// From the raw q.k: the score in log2 units and the softcap derivative (1 - tanh^2, or 1).
FA_DEVICE float score_log2(float qk, const ScoreScale& sc, float& dcap) {
  if (sc.softcap) {
    const float t = tanhf(qk * sc.tanh_scale);
    dcap = 1.f - t * t;
    return t * sc.softcap_log2;
  }
  dcap = 1.f;
  return qk * sc.scale_log2;
}

// ----------------------------------------------------------------------- dK/dV kernel

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attn_bwd_dkdv_kernel(const AttentionBwdParams p) {
  constexpr int kHeadDim = Cfg::kHeadDim;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kStages = Cfg::kStages;
  constexpr int kLdD = Cfg::kLdD;
  constexpr int kLdM = Cfg::kLdM;
  constexpr int kTilesM = Cfg::kMPerWarp / kMmaN;  // phase A n8 tiles (queries) per warp
  constexpr int kTilesD = Cfg::kDPerWarp / kMmaN;  // phase B n8 tiles (head_dim) per warp

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const sK = smem;
  T* const sV = smem + Cfg::kOffV;
  T* const sQ = smem + Cfg::kOffQ;
  T* const sDo = smem + Cfg::kOffDo;
  T* const sP = smem + Cfg::kOffP;
  T* const sDs = smem + Cfg::kOffDs;
  float* const sLse = reinterpret_cast<float*>(smem + Cfg::kElems);  // [kStages][kBlockM], log2 units
  float* const sDsum = sLse + kStages * kBlockM;                     // [kStages][kBlockM]

  // Grid (key blocks x batch, kv heads), the batch folded into x (limit 2^31 - 1) with the
  // batch fastest: low key blocks, which see the most queries under a causal mask, go first.
  const int n_block = static_cast<int>(blockIdx.x / p.batch);
  const int b = static_cast<int>(blockIdx.x % p.batch);
  const int kv_head = blockIdx.y;
  const Sequence seq = sequence_of(p, b);
  const int n0 = n_block * kBlockN;
  // A block past this sequence's keys has nothing to write (in varlen those rows belong to
  // the next sequence).
  if (n0 >= seq.seqlen_k) return;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int warp_n = warp % Cfg::kWarpsN;  // keys 16 warp_n .. +15 in both phases
  const int warp_d = warp / Cfg::kWarpsN;  // phase A: query slice, phase B: head_dim slice
  const int g = lane / 4;                  // mma row group
  const int t = lane % 4;                  // thread in group

  const int group = p.heads_q / p.heads_kv;
  const MaskRule rule = mask_rule_of(p, seq);
  const ScoreScale sc = score_scale_of(p);
  const int valid_keys = min(kBlockN, seq.seqlen_k - n0);

  // Query rows that may attend some key of [n0, n_last]: key_hi(i) >= n0 and key_lo(i) <= n_last.
  const int n_last = n0 + valid_keys - 1;
  int64_t row_lo = 0;
  int64_t row_hi = static_cast<int64_t>(seq.seqlen_q) - 1;
  const int right = right_extent(rule);
  if (right >= 0) row_lo = max(row_lo, static_cast<int64_t>(n0) - rule.diag_offset - right);
  if (rule.window_left >= 0) {
    row_hi = min(row_hi, static_cast<int64_t>(n_last) - rule.diag_offset + rule.window_left);
  }
  const int m_first = static_cast<int>(row_lo / kBlockM);
  const int num_m = row_lo <= row_hi ? static_cast<int>(row_hi / kBlockM) + 1 - m_first : 0;
  const int num_steps = group * num_m;  // (query head, query block) pairs, head-major

  const T* const q_base = static_cast<const T*>(p.q);
  const T* const do_base = static_cast<const T*>(p.dout);

  // Issues the loads of step s (query head kv_head * group + s / num_m, query block
  // m_first + s % num_m) into buffer `stage`: Q and dO by cp.async, lse and D by plain loads.
  auto load_step = [&](int s, int stage) {
    const int h = kv_head * group + s / num_m;
    const int m0 = (m_first + s % num_m) * kBlockM;
    const int valid_rows = seq.seqlen_q - m0;
    load_tile<kBlockM, kHeadDim, kLdD, kThreads>(
        sQ + stage * Cfg::kQElems, q_base + row_offset(p.q_strides, seq.q_batch, seq.q_start + m0, h),
        p.q_strides.row, valid_rows, q_base);
    load_tile<kBlockM, kHeadDim, kLdD, kThreads>(
        sDo + stage * Cfg::kQElems, do_base + row_offset(p.dout_strides, seq.q_batch, seq.q_start + m0, h),
        p.dout_strides.row, valid_rows, do_base);
    const int64_t stats = stats_offset(p, seq, b, h) + m0;
    for (int i = tid; i < kBlockM; i += kThreads) {
      const bool valid = i < valid_rows;
      sLse[stage * kBlockM + i] = valid ? lse_log2(p.lse[stats + i]) : kInf;
      sDsum[stage * kBlockM + i] = valid ? p.dsoftmax_sum[stats + i] : 0.f;
    }
  };

  float acc_dk[kTilesD][4];
  float acc_dv[kTilesD][4];
#pragma unroll
  for (int j = 0; j < kTilesD; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_dk[j][e] = 0.f;
      acc_dv[j][e] = 0.f;
    }
  }

  if (num_steps > 0) {
    // K_j and V_j, resident for the whole CTA, travel with step 0's operands.
    const T* const k_base = static_cast<const T*>(p.k);
    const T* const v_base = static_cast<const T*>(p.v);
    load_tile<kBlockN, kHeadDim, kLdD, kThreads>(
        sK, k_base + row_offset(p.k_strides, seq.k_batch, seq.k_start + n0, kv_head), p.k_strides.row, valid_keys,
        k_base);
    load_tile<kBlockN, kHeadDim, kLdD, kThreads>(
        sV, v_base + row_offset(p.v_strides, seq.k_batch, seq.k_start + n0, kv_head), p.v_strides.row, valid_keys,
        v_base);
    load_step(0, 0);
    cp_async_commit();
  }

  const int key_row = warp_n * kMmaM;              // first key (tile row) of this warp
  const int q_col0 = warp_d * Cfg::kMPerWarp;      // phase A: first query of this warp
  const int d_col0 = warp_d * Cfg::kDPerWarp;      // phase B: first head_dim column

  for (int s = 0; s < num_steps; ++s) {
    const int stage = kStages == 2 ? (s & 1) : 0;
    // Prefetch step s + 1 into the other buffer (freed by the barrier that ended step s - 1),
    // then wait for step s's group.
    if (kStages == 2 && s + 1 < num_steps) {
      load_step(s + 1, (s + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const int m0 = (m_first + s % num_m) * kBlockM;
    const bool need_mask = !block_is_full(rule, m0, kBlockM, n0, kBlockN);
    const T* const sQs = sQ + stage * Cfg::kQElems;
    const T* const sDos = sDo + stage * Cfg::kQElems;
    const float* const sLses = sLse + stage * kBlockM;
    const float* const sDsums = sDsum + stage * kBlockM;

    // ---- phase A: S^T = K Q^T and dP^T = V dO^T for keys key_row.. x queries q_col0..
    float acc_s[kTilesM][4];
    float acc_dp[kTilesM][4];
#pragma unroll
    for (int j = 0; j < kTilesM; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc_s[j][e] = 0.f;
        acc_dp[j][e] = 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kHeadDim / kMmaK; ++kk) {
      uint32_t a_k[4];
      uint32_t a_v[4];
      ldmatrix_x4(a_k, a_addr(sK, kLdD, key_row, kk * kMmaK, lane));
      ldmatrix_x4(a_v, a_addr(sV, kLdD, key_row, kk * kMmaK, lane));
#pragma unroll
      for (int j2 = 0; j2 < kTilesM / 2; ++j2) {
        uint32_t b_q[4];
        uint32_t b_do[4];
        ldmatrix_x4(b_q, b_addr_nk(sQs, kLdD, q_col0 + j2 * 16, kk * kMmaK, lane));
        ldmatrix_x4(b_do, b_addr_nk(sDos, kLdD, q_col0 + j2 * 16, kk * kMmaK, lane));
        mma_pair<T>(acc_s[2 * j2], acc_s[2 * j2 + 1], a_k, b_q);
        mma_pair<T>(acc_dp[2 * j2], acc_dp[2 * j2 + 1], a_v, b_do);
      }
    }

    // P^T and dS^T, element (key r, query c); each thread stores its column pairs.
#pragma unroll
    for (int j = 0; j < kTilesM; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = key_row + g + half * 8;
        const int c = q_col0 + j * kMmaN + 2 * t;
        float pv[2];
        float dsv[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float dcap;
          float s2 = score_log2(acc_s[j][2 * half + e], sc, dcap);
          if (need_mask && !rule.allows(m0 + c + e, n0 + r)) s2 = -kInf;
          pv[e] = exp2f(s2 - sLses[c + e]);
          dsv[e] = pv[e] * (acc_dp[j][2 * half + e] - sDsums[c + e]) * dcap;
        }
        *reinterpret_cast<uint32_t*>(sP + r * kLdM + c) = pack_floats<T>(pv[0], pv[1]);
        *reinterpret_cast<uint32_t*>(sDs + r * kLdM + c) = pack_floats<T>(dsv[0], dsv[1]);
      }
    }
    __syncthreads();

    // ---- phase B: dV += P^T dO, dK += dS^T Q for keys key_row.. x head_dim d_col0..
#pragma unroll
    for (int kk = 0; kk < kBlockM / kMmaK; ++kk) {
      uint32_t a_p[4];
      uint32_t a_ds[4];
      ldmatrix_x4(a_p, a_addr(sP, kLdM, key_row, kk * kMmaK, lane));
      ldmatrix_x4(a_ds, a_addr(sDs, kLdM, key_row, kk * kMmaK, lane));
#pragma unroll
      for (int j2 = 0; j2 < kTilesD / 2; ++j2) {
        uint32_t b_do[4];
        uint32_t b_q[4];
        ldmatrix_x4_trans(b_do, b_addr_kn(sDos, kLdD, kk * kMmaK, d_col0 + j2 * 16, lane));
        ldmatrix_x4_trans(b_q, b_addr_kn(sQs, kLdD, kk * kMmaK, d_col0 + j2 * 16, lane));
        mma_pair<T>(acc_dv[2 * j2], acc_dv[2 * j2 + 1], a_p, b_do);
        mma_pair<T>(acc_dk[2 * j2], acc_dk[2 * j2 + 1], a_ds, b_q);
      }
    }
    // Everyone is done with this step's buffers, P^T and dS^T before they are overwritten.
    __syncthreads();
    if (kStages == 1 && s + 1 < num_steps) {
      load_step(s + 1, 0);
      cp_async_commit();
    }
  }

  // ---- epilogue: dK = scale * acc_dk, dV = acc_dv, in T, staged in the K and V tiles
  // (free: the loop ended with a barrier and no copy is in flight; with no step nothing was
  // loaded). Keys past seqlen_k are not written; keys no query attends get 0.
#pragma unroll
  for (int j = 0; j < kTilesD; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = key_row + g + half * 8;
      const int c = d_col0 + j * kMmaN + 2 * t;
      *reinterpret_cast<uint32_t*>(sK + r * kLdD + c) =
          pack_floats<T>(acc_dk[j][2 * half] * p.softmax_scale, acc_dk[j][2 * half + 1] * p.softmax_scale);
      *reinterpret_cast<uint32_t*>(sV + r * kLdD + c) = pack_floats<T>(acc_dv[j][2 * half], acc_dv[j][2 * half + 1]);
    }
  }
  __syncthreads();
  T* const dk = static_cast<T*>(p.dk) + row_offset(p.dk_strides, seq.k_batch, seq.k_start + n0, kv_head);
  T* const dv = static_cast<T*>(p.dv) + row_offset(p.dv_strides, seq.k_batch, seq.k_start + n0, kv_head);
  store_tile<kBlockN, kHeadDim, kLdD, kThreads>(dk, p.dk_strides.row, sK, valid_keys);
  store_tile<kBlockN, kHeadDim, kLdD, kThreads>(dv, p.dv_strides.row, sV, valid_keys);
}

// -------------------------------------------------------------------------- dQ kernel

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attn_bwd_dq_kernel(const AttentionBwdParams p) {
  constexpr int kHeadDim = Cfg::kHeadDim;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kStages = Cfg::kStages;
  constexpr int kLdD = Cfg::kLdD;
  constexpr int kTilesN = kBlockN / kMmaN;    // S / dP n8 tiles (keys) per warp
  constexpr int kTilesD = kHeadDim / kMmaN;   // dQ n8 tiles (head_dim) per warp

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const sQ = smem;
  T* const sDo = smem + Cfg::kOffDo;
  T* const sK = smem + Cfg::kOffK;
  T* const sV = smem + Cfg::kOffV;

  // Grid (query blocks x batch, query heads), the batch folded into x (limit 2^31 - 1) with
  // the batch fastest and the highest query blocks first: with a causal mask they see the
  // most keys, so the longest CTAs start in the first wave and the short ones fill the tail.
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x / p.batch);
  const int b = static_cast<int>(blockIdx.x % p.batch);
  const int h = blockIdx.y;
  const Sequence seq = sequence_of(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;  // rows past this sequence: not ours to write

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;
  const int kv_head = h / (p.heads_q / p.heads_kv);
  const MaskRule rule = mask_rule_of(p, seq);
  const ScoreScale sc = score_scale_of(p);
  const int valid_rows = min(kBlockM, seq.seqlen_q - m0);

  // Keys some row of [m0, m_last] may attend: [max(0, key_lo(m0)), min(sk - 1, key_hi(m_last))].
  const int m_last = m0 + valid_rows - 1;
  int64_t key_lo = 0;
  int64_t key_hi = static_cast<int64_t>(seq.seqlen_k) - 1;
  if (rule.window_left >= 0) {
    key_lo = max(key_lo, static_cast<int64_t>(m0) + rule.diag_offset - rule.window_left);
  }
  const int right = right_extent(rule);
  if (right >= 0) key_hi = min(key_hi, static_cast<int64_t>(m_last) + rule.diag_offset + right);
  const int n_first = static_cast<int>(key_lo / kBlockN);
  const int num_steps = key_lo <= key_hi ? static_cast<int>(key_hi / kBlockN) + 1 - n_first : 0;

  const T* const k_base = static_cast<const T*>(p.k);
  const T* const v_base = static_cast<const T*>(p.v);
  const T* const k_head = k_base + row_offset(p.k_strides, seq.k_batch, seq.k_start, kv_head);
  const T* const v_head = v_base + row_offset(p.v_strides, seq.k_batch, seq.k_start, kv_head);
  auto load_kv = [&](int s, int stage) {
    const int n0 = (n_first + s) * kBlockN;
    const int valid_keys = seq.seqlen_k - n0;
    load_tile<kBlockN, kHeadDim, kLdD, kThreads>(sK + stage * Cfg::kKvElems, k_head + n0 * p.k_strides.row,
                                                 p.k_strides.row, valid_keys, k_base);
    load_tile<kBlockN, kHeadDim, kLdD, kThreads>(sV + stage * Cfg::kKvElems, v_head + n0 * p.v_strides.row,
                                                 p.v_strides.row, valid_keys, v_base);
  };

  if (num_steps > 0) {
    const T* const q_base = static_cast<const T*>(p.q);
    const T* const do_base = static_cast<const T*>(p.dout);
    load_tile<kBlockM, kHeadDim, kLdD, kThreads>(
        sQ, q_base + row_offset(p.q_strides, seq.q_batch, seq.q_start + m0, h), p.q_strides.row, valid_rows, q_base);
    load_tile<kBlockM, kHeadDim, kLdD, kThreads>(
        sDo, do_base + row_offset(p.dout_strides, seq.q_batch, seq.q_start + m0, h), p.dout_strides.row, valid_rows,
        do_base);
    load_kv(0, 0);
    cp_async_commit();
  }

  // lse (log2 units) and D of this thread's two rows, 16 warp + g and + 8.
  const int row_a = warp * kMmaM + g;
  const int64_t stats = stats_offset(p, seq, b, h) + m0;
  float lse2[2];
  float dsum[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row_a + half * 8;
    const bool valid = r < valid_rows;
    lse2[half] = valid ? lse_log2(p.lse[stats + r]) : kInf;
    dsum[half] = valid ? p.dsoftmax_sum[stats + r] : 0.f;
  }

  float acc_dq[kTilesD][4];
#pragma unroll
  for (int j = 0; j < kTilesD; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[j][e] = 0.f;
  }

  const int q_row0 = warp * kMmaM;
  for (int s = 0; s < num_steps; ++s) {
    const int stage = kStages == 2 ? (s & 1) : 0;
    if (kStages == 2 && s + 1 < num_steps) {
      load_kv(s + 1, (s + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const int n0 = (n_first + s) * kBlockN;
    const bool need_mask = !block_is_full(rule, m0, kBlockM, n0, kBlockN);
    const T* const sKs = sK + stage * Cfg::kKvElems;
    const T* const sVs = sV + stage * Cfg::kKvElems;

    // S = Q K^T and dP = dO V^T for rows q_row0..+15 x the block's keys.
    float acc_s[kTilesN][4];
    float acc_dp[kTilesN][4];
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc_s[j][e] = 0.f;
        acc_dp[j][e] = 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kHeadDim / kMmaK; ++kk) {
      uint32_t a_q[4];
      uint32_t a_do[4];
      ldmatrix_x4(a_q, a_addr(sQ, kLdD, q_row0, kk * kMmaK, lane));
      ldmatrix_x4(a_do, a_addr(sDo, kLdD, q_row0, kk * kMmaK, lane));
#pragma unroll
      for (int j2 = 0; j2 < kTilesN / 2; ++j2) {
        uint32_t b_k[4];
        uint32_t b_v[4];
        ldmatrix_x4(b_k, b_addr_nk(sKs, kLdD, j2 * 16, kk * kMmaK, lane));
        ldmatrix_x4(b_v, b_addr_nk(sVs, kLdD, j2 * 16, kk * kMmaK, lane));
        mma_pair<T>(acc_s[2 * j2], acc_s[2 * j2 + 1], a_q, b_k);
        mma_pair<T>(acc_dp[2 * j2], acc_dp[2 * j2 + 1], a_do, b_v);
      }
    }

    // dS = P * (dP - D) [* (1 - tanh^2)], in place of S.
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2;
        const int r = row_a + half * 8;
        const int c = j * kMmaN + 2 * t + (e & 1);
        float dcap;
        float s2 = score_log2(acc_s[j][e], sc, dcap);
        if (need_mask && !rule.allows(m0 + r, n0 + c)) s2 = -kInf;
        const float pv = exp2f(s2 - lse2[half]);
        acc_s[j][e] = pv * (acc_dp[j][e] - dsum[half]) * dcap;
      }
    }

    // dQ += dS K: dS's accumulators are the A fragments (n8 tiles 2kk, 2kk+1 form k-step kk).
#pragma unroll
    for (int kk = 0; kk < kBlockN / kMmaK; ++kk) {
      const uint32_t a_ds[4] = {
          pack_floats<T>(acc_s[2 * kk][0], acc_s[2 * kk][1]),
          pack_floats<T>(acc_s[2 * kk][2], acc_s[2 * kk][3]),
          pack_floats<T>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
          pack_floats<T>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]),
      };
#pragma unroll
      for (int j2 = 0; j2 < kTilesD / 2; ++j2) {
        uint32_t b_k[4];
        ldmatrix_x4_trans(b_k, b_addr_kn(sKs, kLdD, kk * kMmaK, j2 * 16, lane));
        mma_pair<T>(acc_dq[2 * j2], acc_dq[2 * j2 + 1], a_ds, b_k);
      }
    }
    // Everyone is done with this stage's K and V before they are overwritten.
    __syncthreads();
    if (kStages == 1 && s + 1 < num_steps) {
      load_kv(s + 1, 0);
      cp_async_commit();
    }
  }

  // ---- epilogue: dQ = scale * acc_dq in T, staged in the Q tile (after the barrier at the
  // end of the loop no warp reads Q; with no step nothing was loaded), rows < seqlen_q only.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kTilesD; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = row_a + half * 8;
      const int c = j * kMmaN + 2 * t;
      *reinterpret_cast<uint32_t*>(sQ + r * kLdD + c) =
          pack_floats<T>(acc_dq[j][2 * half] * p.softmax_scale, acc_dq[j][2 * half + 1] * p.softmax_scale);
    }
  }
  __syncthreads();
  T* const dq = static_cast<T*>(p.dq) + row_offset(p.dq_strides, seq.q_batch, seq.q_start + m0, h);
  store_tile<kBlockM, kHeadDim, kLdD, kThreads>(dq, p.dq_strides.row, sQ, valid_rows);
}

// ---------------------------------------------------------------------------- launcher

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t kMaxGridX = 2147483647;  // CUDA's gridDim.x limit
constexpr int64_t kMaxGridY = 65535;       // CUDA's gridDim.y limit

template <typename T, class Cfg>
cudaError_t launch_dkdv(const AttentionBwdParams& p, cudaStream_t stream) {
  auto kernel = attn_bwd_dkdv_kernel<T, Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t blocks = ceil_div(p.seqlen_k, Cfg::kBlockN) * p.batch;
  if (blocks > kMaxGridX || p.heads_kv > kMaxGridY) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.heads_kv));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, class Cfg>
cudaError_t launch_dq(const AttentionBwdParams& p, cudaStream_t stream) {
  auto kernel = attn_bwd_dq_kernel<T, Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t blocks = ceil_div(p.seqlen_q, Cfg::kBlockM) * p.batch;
  if (blocks > kMaxGridX || p.heads_q > kMaxGridY) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.heads_q));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// dQ, dK, dV for one (dtype, head_dim), after the preprocessing kernel filled
// p.dsoftmax_sum. `max_smem_optin` is the device's per-block shared-memory limit; each kernel
// takes its large tiles when they fit. Declared again (without the body) in bwd_sm80.cu and
// explicitly instantiated in bwd_sm80_<dtype>_hdim<D>.cu.
template <typename T, int kHeadDim>
cudaError_t launch_attention_bwd(const AttentionBwdParams& p, int max_smem_optin, cudaStream_t stream) {
  using Tiles = BwdTiles<kHeadDim>;
  cudaError_t err = cudaSuccess;
  if (p.seqlen_q > 0) {
    err = Tiles::DqLarge::kSmemBytes <= max_smem_optin ? launch_dq<T, typename Tiles::DqLarge>(p, stream)
                                                         : launch_dq<T, typename Tiles::DqSmall>(p, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.seqlen_k > 0) {
    err = Tiles::DkdvLarge::kSmemBytes <= max_smem_optin ? launch_dkdv<T, typename Tiles::DkdvLarge>(p, stream)
                                                           : launch_dkdv<T, typename Tiles::DkdvSmall>(p, stream);
  }
  return err;
}

}  // namespace sm80_bwd
}  // namespace fast_attn
