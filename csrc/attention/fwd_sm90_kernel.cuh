// Flash attention forward for Hopper (sm_90a): TMA + wgmma, warp-specialised, in CuTe.
//
// Algorithm: FlashAttention-3's forward (Shah et al., 2024, arXiv 2407.08608, Alg. 1 and 2),
// written from the paper and ../shared/KERNEL_NOTES.md. One CTA computes one BLOCK_M = 128
// query rows of one (batch, head), with three warpgroups (384 threads):
//   * warpgroup 0 is the producer: it gives its registers away (setmaxnreg 24) and one
//     thread issues every TMA load: Q once (one 64-row box per consumer), then K and V
//     tiles of BLOCK_N keys, last key block first, into two 2-stage smem ring buffers
//     guarded by mbarriers ("full": TMA transaction bytes landed; "empty": all 8
//     consumer warps finished reading the stage);
//   * warpgroups 1 and 2 are the consumers (setmaxnreg 240), each owning 64 query rows
//     (the wgmma M): S = Q K^T by an SS wgmma (both operands in smem), online softmax in
//     fp32 registers with exp2 (scores scaled by softmax_scale * log2(e), one FFMA + one
//     EX2 per element), then O += P V by an RS wgmma (P converted to 16 bits in registers,
//     reusing the accumulator layout as the A fragment; V read as an MN-major B operand).
//     Intra-warpgroup overlap (FA3 Alg. 2): S(j+1) = Q K(j+1)^T and O += P(j) V(j) are
//     issued back to back, and the softmax of S(j+1) runs while the PV wgmma is in flight
//     (kIntraWarpgroupOverlap; false gives the plain serial loop, kept for debugging).
//   * Epilogue: O / rowsum is written by each consumer into its own 64 rows of the Q
//     buffer (Q is dead by then, and the two consumers' rows are disjoint, so no CTA-wide
//     sync), then one thread per consumer TMA-stores it; TMA clips rows past seqlen_q.
//     lse (natural log, fp32) is written straight from registers.
// Masking: TMA zero-fills key/query rows past the sequence ends (the tensor maps carry the
// real lengths). Key blocks wholly outside the causal/window band of the CTA's rows are
// never loaded; blocks that straddle the band edge or the seqlen_k tail get an
// element-wise mask (MaskRule from sm80_primitives.cuh); the rest run mask-free. A row
// with no visible key gets out 0 and lse -inf (rowsum 0; the running max stays -inf and a
// 0 reference max is used so that no inf - inf appears). softcap is applied to the scaled
// scores before masking.
//
// Limits (attention_fwd_sm90 in fwd_sm90.cu returns cudaErrorNotSupported otherwise, and
// the dispatcher falls back to the sm_80 kernels): dense batches only (no cu_seqlens, no
// seqlens_k, no split-KV); head_dim 64/128/256; fp16/bf16; softmax_scale > 0; 16-byte
// aligned base pointers; positive row/head/batch strides that are multiples of 8 elements
// (TMA); heads_q and batch <= 65535 (grid y/z).
// Not done (yet): pingpong scheduling between the two consumers, persistent/causal-balanced
// tile scheduling, K/V multicast across a cluster, stmatrix for the O staging.
//
// Everything CuTe/Hopper-specific sits behind FAST_ATTN_HAVE_SM90 (set by the build when
// the arch list has 9.0a and the CuTe headers are installed); kernel bodies compile only in
// the sm_90a device pass (wgmma/setmaxnreg exist only there), and are empty elsewhere.
#pragma once

#include "attention_params.h"

#if defined(FAST_ATTN_HAVE_SM90)

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "sm80_primitives.cuh"

// True only in nvcc's sm_90a device pass: the one place wgmma, setmaxnreg and TMA exist.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FAST_ATTN_SM90A_DEVICE_PASS 1
#endif

namespace fast_attn {
namespace sm90 {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;  // 1 / ln(2)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)
constexpr int kSmemAlignment = 1024;           // the 128B swizzle repeats every 1024 bytes
constexpr int kThreadsPerWarpgroup = 128;
constexpr int kWarpSize = 32;

// The CuTe element type of an AttentionDtype.
template <AttentionDtype kDtype>
struct ElementOf;
template <>
struct ElementOf<AttentionDtype::kFloat16> {
  using type = cutlass::half_t;
};
template <>
struct ElementOf<AttentionDtype::kBFloat16> {
  using type = cutlass::bfloat16_t;
};

// Tile shapes, layouts and TMA/MMA types of one (element type, head_dim) instantiation.
template <typename Element_, int kHeadDim_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNumMmaWarpgroups = 2;
  static constexpr int kWarpgroupRows = 64;  // wgmma's M: the query rows of one consumer
  static constexpr int kBlockM = kNumMmaWarpgroups * kWarpgroupRows;
  // 128 keys per block for head dims <= 128 (FA3's causal tile); 64 for 256 so that Q (64 KB)
  // plus two stages each of K and V (4 x 32 KB) fit in the 227 KB of smem.
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 64;
  static constexpr int kStages = 2;  // FA3 uses 2; a third stage was slower in its App. B.3
  static constexpr int kNumThreads = (kNumMmaWarpgroups + 1) * kThreadsPerWarpgroup;
  static constexpr int kNumMmaWarps = kNumMmaWarpgroups * kThreadsPerWarpgroup / kWarpSize;
  // setmaxnreg targets for 1 producer + 2 consumer warpgroups (FA3, KERNEL_NOTES.md 1). The
  // CTA launches with 384 x 168 registers (__launch_bounds__(384, 1)), so what the producer
  // gives back must cover what the consumers take: P + 2 C <= 3 * 168, i.e. 24/240.
  static constexpr uint32_t kProducerRegs = 24;
  static constexpr uint32_t kConsumerRegs = 240;
  static_assert(kProducerRegs + kNumMmaWarpgroups * kConsumerRegs <= 3 * 168, "setmaxnreg budget");
  // Issue S(j+1) and PV(j) together and overlap the softmax with the PV wgmma. (ptxas,
  // nvcc 13.0: no spills at head_dim 64/128; 4 bytes at 256, none with the serial loop.)
  static constexpr bool kIntraWarpgroupOverlap = true;

  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head_dim must be 64, 128 or 256");
  static_assert(sizeof(Element) == 2, "16-bit elements only");

  using TileShapeQK = Shape<Int<kWarpgroupRows>, Int<kBlockN>, Int<kHeadDim>>;  // (M, N, K) of S = Q K^T
  using TileShapePV = Shape<Int<kWarpgroupRows>, Int<kHeadDim>, Int<kBlockN>>;  // (M, N, K) of O = P V
  using TiledMmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileShapeQK>()));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TileShapePV, GMMA::Major::K, GMMA::Major::MN>()));

  // Shared-memory tiles, 128-byte swizzled as wgmma wants them (every head dim is a multiple
  // of 64 elements = 128 bytes). Q: (64 rows, D, consumer); K: (N keys, D, stage), both
  // K-major; V is stored as V^T: (D, N keys, stage), MN-major, the B operand of P V.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kWarpgroupRows>, Int<kHeadDim>, Int<kNumMmaWarpgroups>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}));

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, kSmemAlignment> q;  // also stages O
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, kSmemAlignment> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutVt>, kSmemAlignment> v;
    uint64_t q_full;
    uint64_t k_full[kStages];
    uint64_t k_empty[kStages];
    uint64_t v_full[kStages];
    uint64_t v_empty[kStages];
  };
  // + alignment slack: the dynamic smem base is rounded up to kSmemAlignment in the kernel.
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage)) + kSmemAlignment;
  static_assert(kSmemBytes <= 227 * 1024, "exceeds the 227 KB of smem a Hopper CTA may use");

  static constexpr uint32_t kQBoxBytes = kWarpgroupRows * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVTileBytes = kBlockN * kHeadDim * sizeof(Element);

  // Global tensors as TMA sees them: q/k/out as (seq, D, head, batch), v as (D, seq, head,
  // batch); strides in elements, D contiguous.
  using GmemLayout = Layout<Shape<int, int, int, int>, Stride<int64_t, _1, int64_t, int64_t>>;
  using GmemLayoutT = Layout<Shape<int, int, int, int>, Stride<_1, int64_t, int64_t, int64_t>>;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
                                      take<0, 2>(SmemLayoutQ{}), Shape<Int<kWarpgroupRows>, Int<kHeadDim>>{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
                                      take<0, 2>(SmemLayoutK{}), Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayoutT{}),
                                      take<0, 2>(SmemLayoutVt{}), Shape<Int<kHeadDim>, Int<kBlockN>>{}, _1{}));
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{},
                                      make_tensor(make_gmem_ptr(static_cast<Element*>(nullptr)), GmemLayout{}),
                                      take<0, 2>(SmemLayoutQ{}), Shape<Int<kWarpgroupRows>, Int<kHeadDim>>{}, _1{}));
};

// Kernel arguments (passed as a __grid_constant__ so the TMA descriptors stay in param space).
template <class Traits>
struct FwdKernelParams {
  typename Traits::TmaQ tma_q;
  typename Traits::TmaK tma_k;
  typename Traits::TmaV tma_v;
  typename Traits::TmaO tma_o;
  float* lse;  // (batch, heads_q, seqlen_q) contiguous
  int seqlen_q;
  int seqlen_k;
  int heads_q;
  int heads_kv;
  int batch;
  int kv_group;      // heads_q / heads_kv: query head h reads kv head h / kv_group
  float scale_log2;  // raw (or softcapped) score -> log2 units: softmax_scale*log2e, or log2e with softcap
  float softcap;     // 0: off
  float softcap_in_scale;  // softmax_scale / softcap
  bool causal;
  int window_left;   // -1: unbounded
  int window_right;  // -1: unbounded
};

// ----------------------------------------------------------------------------- helpers

// 2^x by the MUFU unit (ex2.approx, ~2 ulp; -inf -> +0); denormal results flush to 0.
CUTE_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A wgmma accumulator layout ((2, 2, V), MMA_M, MMA_N) viewed as (rows, cols): per thread,
// the values are (column pair, row / row + 8, column group of 8) (CLayout_64xN in CuTe's
// mma_traits_sm90_gmma.hpp), so rows = (2, MMA_M) and cols = (2, V, MMA_N).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol_layout(Layout const& acc) {
  static_assert(decltype(rank(acc))::value == 3 && decltype(rank<0>(acc))::value == 3);
  static_assert(decltype(size<0, 0>(acc))::value == 2 && decltype(size<0, 1>(acc))::value == 2);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The same accumulator registers as the A operand of an RS wgmma with 16-bit inputs: the
// A fragment of a 64x16 k-block holds (k pair, row / row + 8, k / k + 8) (ALayout_64x16 ==
// CLayout_64x16), i.e. two consecutive column groups of the accumulator. So
// ((2, 2, V), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, (V / 2, MMA_N)).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_to_a_layout(Layout const& acc) {
  static_assert(decltype(rank(acc))::value == 3 && decltype(rank<0>(acc))::value == 3);
  static_assert(decltype(size<0, 2>(acc))::value % 2 == 0);
  auto groups = logical_divide(get<0, 2>(acc), Tile<_2>{});  // ((2, V / 2))
  return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), get<0, 0>(groups)), get<1>(acc),
                     coalesce(make_layout(get<0, 1>(groups), get<2>(acc))));
}

// out = in, element by element in storage order, rounded to out's type (paired cvt).
template <class EngineIn, class LayoutIn, class EngineOut, class LayoutOut>
CUTE_DEVICE void convert_fragment(Tensor<EngineIn, LayoutIn> const& in, Tensor<EngineOut, LayoutOut>& out) {
  using From = typename EngineIn::value_type;
  using To = typename EngineOut::value_type;
  constexpr int kNumel = decltype(size(in))::value;
  static_assert(kNumel == decltype(size(out))::value);
  cutlass::NumericArrayConverter<To, From, kNumel> convert;
  *reinterpret_cast<cutlass::Array<To, kNumel>*>(raw_pointer_cast(out.data())) =
      convert(*reinterpret_cast<cutlass::Array<From, kNumel> const*>(raw_pointer_cast(in.data())));
}

// Issue C (+)= A B as one batch of wgmmas over the k-blocks of A/B, without waiting.
// kZeroInit: C = A B (the accumulator's old values are ignored). kRegisterA: A is a
// register fragment (RS wgmma), fenced so the compiler keeps it live and unchanged.
template <bool kZeroInit, bool kRegisterA, class TiledMma, class TensorA, class TensorB, class TensorC>
CUTE_DEVICE void wgmma_issue(TiledMma& tiled_mma, TensorA& tCrA, TensorB const& tCrB, TensorC& tCrC) {
  if constexpr (kRegisterA) warpgroup_fence_operand(tCrA);
  warpgroup_fence_operand(tCrC);
  warpgroup_arrive();
  tiled_mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
    cute::gemm(tiled_mma, tCrA(_, _, k_block), tCrB(_, _, k_block), tCrC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(tCrC);
  if constexpr (kRegisterA) warpgroup_fence_operand(tCrA);
}

// Wait until at most kPending wgmma batches of this warp are in flight, then fence the
// registers the finished batch wrote so the compiler does not read them early.
template <int kPending, class TensorC>
CUTE_DEVICE void wgmma_wait(TensorC& tCrC) {
  warpgroup_wait<kPending>();
  warpgroup_fence_operand(tCrC);
}

// mbarrier waits/arrivals on raw smem words.
using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
using EmptyBarrier = cutlass::arch::ClusterBarrier;

// Every consumer warp tells the producer it is done with a stage (the empty barriers count
// kNumMmaWarps arrivals). Called after the warp's wgmma reading the stage has completed.
CUTE_DEVICE void release_stage(uint64_t* empty_barrier) {
  if (threadIdx.x % kWarpSize == 0) EmptyBarrier::arrive(empty_barrier);
}

// ------------------------------------------------------------------- softmax (one block)

// Online-softmax update of one consumer's S block, in place (S becomes P = exp2(...)):
// softcap, mask, new row max, P, rescale factor of the old O / rowsum. Each thread owns
// 2 rows (r = 0, 1) of the 64-row tile; the 4 threads of a quad share a row, so row
// max is reduced across the quad here while the row sum stays a per-thread partial sum
// (all partials are rescaled by the same factor) reduced once in the epilogue.
//   s_rc / c_rc: S and its (row, col) coordinates within the (64, BLOCK_N) tile, as
//   (rows, cols) views; row0 / col0: the tile's first query row / key.
template <class Traits, class TensorS, class TensorC>
CUTE_DEVICE void softmax_block(TensorS& s_rc, TensorC const& c_rc, FwdKernelParams<Traits> const& params,
                               MaskRule const& rule, int row0, int col0, bool need_mask, float (&row_max)[2],
                               float (&row_sum)[2], float (&o_scale)[2]) {
  constexpr int kRows = decltype(size<0>(s_rc))::value;
  constexpr int kCols = decltype(size<1>(s_rc))::value;
  static_assert(kRows == 2);
  if (params.softcap > 0.f) {
    CUTE_UNROLL
    for (int i = 0; i < size(s_rc); ++i) s_rc(i) = params.softcap * tanhf(s_rc(i) * params.softcap_in_scale);
  }
  if (need_mask) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int row = row0 + get<0>(c_rc(r, 0));
      const int lo = rule.key_lo(row);
      const int hi = rule.key_hi(row);
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const int col = col0 + get<1>(c_rc(r, c));
        if (col < lo || col > hi) s_rc(r, c) = -INFINITY;
      }
    }
  }
  const float scale_log2 = params.scale_log2;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    float block_max = row_max[r];
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) block_max = fmaxf(block_max, s_rc(r, c));
    block_max = sm80::quad_max(block_max);
    // A row with no visible key yet keeps max -inf; exponentiate against 0 then (p = 0).
    const float max_scaled = block_max == -INFINITY ? 0.f : block_max * scale_log2;
    o_scale[r] = exp2_approx(row_max[r] * scale_log2 - max_scaled);  // old max -inf -> 0
    row_max[r] = block_max;
    float sum = 0.f;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const float p = exp2_approx(fmaf(s_rc(r, c), scale_log2, -max_scaled));
      s_rc(r, c) = p;
      sum += p;
    }
    row_sum[r] = row_sum[r] * o_scale[r] + sum;
  }
}

// O rows *= scale (o_rc: the O accumulator as (rows, cols)).
template <class TensorO>
CUTE_DEVICE void scale_rows(TensorO& o_rc, float const (&scale)[2]) {
  CUTE_UNROLL
  for (int r = 0; r < decltype(size<0>(o_rc))::value; ++r) {
    CUTE_UNROLL
    for (int c = 0; c < decltype(size<1>(o_rc))::value; ++c) o_rc(r, c) *= scale[r];
  }
}

// -------------------------------------------------------------------------------- kernel

// Grid: (ceil(seqlen_q / BLOCK_M), heads_q, batch); query blocks run last to first, so the
// longest causal rows start first.
template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    attention_fwd_sm90_kernel(CUTE_GRID_CONSTANT FwdKernelParams<Traits> const params) {
#if defined(FAST_ATTN_SM90A_DEVICE_PASS)
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  constexpr int kRowsWG = Traits::kWarpgroupRows;
  using SharedStorage = typename Traits::SharedStorage;

  extern __shared__ unsigned char smem_raw[];
  // Round the dynamic smem base up to the swizzle period (TMA and wgmma address the
  // 128B-swizzled tiles by absolute smem address bits).
  const uint32_t smem_raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t smem_pad = (kSmemAlignment - smem_raw_addr % kSmemAlignment) % kSmemAlignment;
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw + smem_pad);

  const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);
  const int head = static_cast<int>(blockIdx.y);
  const int batch = static_cast<int>(blockIdx.z);
  const int head_kv = head / params.kv_group;

  // The key blocks [n_block_min, n_block_max) some row of this CTA may see; key_lo/key_hi
  // grow with the row, so the first row bounds the low end and the last valid row the high.
  const MaskRule rule{params.seqlen_k - params.seqlen_q, params.seqlen_k, params.causal, params.window_left,
                      params.window_right};
  const int row_first = m_block * kBlockM;
  const int row_last = (row_first + kBlockM < params.seqlen_q ? row_first + kBlockM : params.seqlen_q) - 1;
  const int key_lo = rule.key_lo(row_first) > 0 ? rule.key_lo(row_first) : 0;
  const int key_hi = rule.key_hi(row_last);
  const int n_block_min = key_lo / kBlockN;
  const int n_block_max = key_hi < key_lo ? n_block_min : key_hi / kBlockN + 1;
  const int n_blocks = n_block_max - n_block_min;  // 0: every row is fully masked

  if (threadIdx.x == 0) {
    FullBarrier::init(&smem.q_full, 1);
    CUTE_UNROLL
    for (int s = 0; s < kStages; ++s) {
      FullBarrier::init(&smem.k_full[s], 1);
      FullBarrier::init(&smem.v_full[s], 1);
      EmptyBarrier::init(&smem.k_empty[s], Traits::kNumMmaWarps);
      EmptyBarrier::init(&smem.v_empty[s], Traits::kNumMmaWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});    // (64, D, 2)
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});    // (N, D, stage)
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});  // (D, N, stage)

  const int warpgroup = cutlass::canonical_warp_group_idx();
  if (warpgroup == 0) {
    // ------------------------------------------------------------------ producer
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0 && n_blocks > 0) {
      cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
      Tensor mQ = params.tma_q.get_tma_tensor(make_shape(params.seqlen_q, kHeadDim, params.heads_q, params.batch));
      Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.seqlen_k, kHeadDim, params.heads_kv, params.batch));
      Tensor mVt = params.tma_v.get_tma_tensor(make_shape(kHeadDim, params.seqlen_k, params.heads_kv, params.batch));
      Tensor gQ = local_tile(mQ(_, _, head, batch), Shape<Int<kRowsWG>, Int<kHeadDim>>{},
                             make_coord(_, _0{}));  // (64, D, seqlen_q / 64)
      Tensor gK = local_tile(mK(_, _, head_kv, batch), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                             make_coord(_, _0{}));  // (N, D, n_block)
      Tensor gVt = local_tile(mVt(_, _, head_kv, batch), Shape<Int<kHeadDim>, Int<kBlockN>>{},
                              make_coord(_0{}, _));  // (D, N, n_block)
      auto [tQgQ, tQsQ] = tma_partition(params.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                        group_modes<0, 2>(gQ));  // (TMA, 64-row tile), (TMA, consumer)
      auto [tKgK, tKsK] = tma_partition(params.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                        group_modes<0, 2>(gK));  // (TMA, n_block), (TMA, stage)
      auto [tVgV, tVsV] = tma_partition(params.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sVt),
                                        group_modes<0, 2>(gVt));  // (TMA, n_block), (TMA, stage)

      // Q: one box per consumer whose rows start inside the sequence (a box wholly past
      // seqlen_q is not loaded; that consumer computes on stale smem and stores nothing).
      uint32_t q_bytes = 0;
      CUTE_UNROLL
      for (int w = 0; w < Traits::kNumMmaWarpgroups; ++w) {
        if (row_first + w * kRowsWG < params.seqlen_q) q_bytes += Traits::kQBoxBytes;
      }
      FullBarrier::arrive_and_expect_tx(&smem.q_full, q_bytes);
      CUTE_UNROLL
      for (int w = 0; w < Traits::kNumMmaWarpgroups; ++w) {
        if (row_first + w * kRowsWG < params.seqlen_q) {
          copy(params.tma_q.with(smem.q_full), tQgQ(_, m_block * Traits::kNumMmaWarpgroups + w), tQsQ(_, w));
        }
      }
      // K and V blocks, last first, through the stage rings. Iteration i uses stage
      // i % kStages; the producer waits for the consumers to have emptied that stage
      // (parity of the previous round; a fresh barrier passes parity 1 at once).
      for (int i = 0; i < n_blocks; ++i) {
        const int n_block = n_block_max - 1 - i;
        const int stage = i % kStages;
        const uint32_t empty_phase = ((i / kStages) & 1) ^ 1;
        EmptyBarrier::wait(&smem.k_empty[stage], empty_phase);
        FullBarrier::arrive_and_expect_tx(&smem.k_full[stage], Traits::kKVTileBytes);
        copy(params.tma_k.with(smem.k_full[stage]), tKgK(_, n_block), tKsK(_, stage));
        EmptyBarrier::wait(&smem.v_empty[stage], empty_phase);
        FullBarrier::arrive_and_expect_tx(&smem.v_full[stage], Traits::kKVTileBytes);
        copy(params.tma_v.with(smem.v_full[stage]), tVgV(_, n_block), tVsV(_, stage));
      }
    }
    return;
  }

  // -------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int wg = warpgroup - 1;                                       // which 64 query rows
  const int wg_thread = static_cast<int>(threadIdx.x) - warpgroup * kThreadsPerWarpgroup;  // 0..127
  const int wg_row0 = row_first + wg * kRowsWG;                       // first query row of this consumer

  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(wg_thread);
  auto thr_pv = mma_pv.get_thread_slice(wg_thread);
  Tensor sQw = sQ(_, _, wg);                          // (64, D)
  Tensor tSrQ = thr_qk.partition_fragment_A(sQw);     // (MMA, MMA_M, MMA_K) smem descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);      // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);     // (MMA, MMA_N, MMA_K, stage)

  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kRowsWG>, Int<kHeadDim>>{});  // fp32 O
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kRowsWG>, Int<kBlockN>>{});   // fp32 S / P
  Tensor tOrP = make_tensor<Element>(acc_to_a_layout(tSrS.layout()));                // P as the A operand
  Tensor o_rc = make_tensor(tOrO.data(), acc_rowcol_layout(tOrO.layout()));
  Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol_layout(tSrS.layout()));
  // (row, key) coordinates of this thread's S elements within the (64, N) tile.
  Tensor cS = make_identity_tensor(Shape<Int<kRowsWG>, Int<kBlockN>>{});
  Tensor tScS = thr_qk.partition_C(cS);
  Tensor c_rc = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));

  clear(tOrO);
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // per-thread partial sums (see softmax_block)
  float o_scale[2];

  // Does key block n straddle the band edge or the seqlen_k tail for some row of this
  // consumer? (Rows past seqlen_q are included: harmless, they are never stored.)
  auto block_needs_mask = [&](int n_block) {
    const int col0 = n_block * kBlockN;
    return col0 + kBlockN - 1 > rule.key_hi(wg_row0) || col0 < rule.key_lo(wg_row0 + kRowsWG - 1);
  };

  if (n_blocks > 0) {
    FullBarrier::wait(&smem.q_full, 0);
    if constexpr (Traits::kIntraWarpgroupOverlap) {
      // First block: S, softmax, P (O is still 0, so its rescale factor is unused).
      {
        const int n_block = n_block_max - 1;
        FullBarrier::wait(&smem.k_full[0], 0);
        wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, 0), tSrS);
        wgmma_wait<0>(tSrS);
        release_stage(&smem.k_empty[0]);
        softmax_block(s_rc, c_rc, params, rule, wg_row0, n_block * kBlockN, block_needs_mask(n_block), row_max,
                      row_sum, o_scale);
        convert_fragment(tSrS, tOrP);
      }
      // Steady state: S(i) = Q K(i)^T and O += P(i-1) V(i-1) in flight together; the
      // softmax of S(i) runs while the PV wgmma is still going.
      for (int i = 1; i < n_blocks; ++i) {
        const int n_block = n_block_max - 1 - i;
        const int stage = i % kStages;
        const uint32_t phase = (i / kStages) & 1;
        const int prev_stage = (i - 1) % kStages;
        const uint32_t prev_phase = ((i - 1) / kStages) & 1;
        FullBarrier::wait(&smem.k_full[stage], phase);
        wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
        FullBarrier::wait(&smem.v_full[prev_stage], prev_phase);
        wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, prev_stage), tOrO);
        wgmma_wait<1>(tSrS);  // batches retire in order: S(i) is done, PV may still run
        release_stage(&smem.k_empty[stage]);
        softmax_block(s_rc, c_rc, params, rule, wg_row0, n_block * kBlockN, block_needs_mask(n_block), row_max,
                      row_sum, o_scale);
        wgmma_wait<0>(tOrO);
        warpgroup_fence_operand(tOrP);
        release_stage(&smem.v_empty[prev_stage]);
        scale_rows(o_rc, o_scale);
        convert_fragment(tSrS, tOrP);
      }
      // Last PV.
      {
        const int last = n_blocks - 1;
        const int stage = last % kStages;
        FullBarrier::wait(&smem.v_full[stage], (last / kStages) & 1);
        wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
        wgmma_wait<0>(tOrO);
        release_stage(&smem.v_empty[stage]);
      }
    } else {
      // Serial loop: S, softmax, PV, one block at a time.
      for (int i = 0; i < n_blocks; ++i) {
        const int n_block = n_block_max - 1 - i;
        const int stage = i % kStages;
        const uint32_t phase = (i / kStages) & 1;
        FullBarrier::wait(&smem.k_full[stage], phase);
        wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
        wgmma_wait<0>(tSrS);
        release_stage(&smem.k_empty[stage]);
        softmax_block(s_rc, c_rc, params, rule, wg_row0, n_block * kBlockN, block_needs_mask(n_block), row_max,
                      row_sum, o_scale);
        scale_rows(o_rc, o_scale);
        convert_fragment(tSrS, tOrP);
        FullBarrier::wait(&smem.v_full[stage], phase);
        wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
        wgmma_wait<0>(tOrO);
        release_stage(&smem.v_empty[stage]);
      }
    }
  }

  // ------------------------------------------------------------------- epilogue
  // O /= rowsum; lse = ln(sum_j exp(s_j)) = ln2 * (max * scale_log2 + log2(rowsum)).
  // A row that saw no key has rowsum 0: out 0, lse -inf.
  float lse[2];
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float sum = sm80::quad_sum(row_sum[r]);
    const bool empty = sum == 0.f;
    o_scale[r] = empty ? 0.f : 1.f / sum;
    lse[r] = empty ? -INFINITY : (row_max[r] * params.scale_log2 + log2f(sum)) * kLn2;
  }
  scale_rows(o_rc, o_scale);

  if (wg_thread % 4 == 0) {  // one thread of each quad holds its two rows' statistics
    float* lse_rows = params.lse + (static_cast<int64_t>(batch) * params.heads_q + head) * params.seqlen_q;
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = wg_row0 + get<0>(c_rc(r, 0));
      if (row < params.seqlen_q) lse_rows[row] = lse[r];
    }
  }

  // O -> this consumer's 64 rows of the Q buffer (its own Q rows: its last wgmma reading
  // them has completed, and the other consumer never touches them) -> TMA store.
  Tensor rO = make_tensor<Element>(tOrO.layout());
  convert_fragment(tOrO, rO);
  Tensor tOsO = thr_pv.partition_C(sQw);
  copy(rO, tOsO);
  cutlass::arch::fence_view_async_shared();  // make the generic-proxy writes visible to TMA
  cutlass::arch::NamedBarrier::sync(kThreadsPerWarpgroup, static_cast<uint32_t>(wg));
  if (wg_thread == 0 && wg_row0 < params.seqlen_q) {
    Tensor mO = params.tma_o.get_tma_tensor(make_shape(params.seqlen_q, kHeadDim, params.heads_q, params.batch));
    Tensor gO = local_tile(mO(_, _, head, batch), Shape<Int<kRowsWG>, Int<kHeadDim>>{},
                           make_coord(m_block * Traits::kNumMmaWarpgroups + wg, _0{}));  // (64, D)
    auto [tOgO_tma, tOsO_tma] =
        tma_partition(params.tma_o, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQw), group_modes<0, 2>(gO));
    copy(params.tma_o, tOsO_tma, tOgO_tma);
    tma_store_arrive();
    tma_store_wait<0>();  // the smem must outlive the store's reads
  }
#endif  // FAST_ATTN_SM90A_DEVICE_PASS
}

// ----------------------------------------------------------------------------- launcher

// Builds the TMA descriptors (real sequence lengths, so TMA zero-fills tails) and launches.
// The caller (attention_fwd_sm90) has checked that the call is supported.
template <AttentionDtype kDtype, int kHeadDim>
cudaError_t attention_fwd_sm90_launch(const AttentionFwdParams& p, cudaStream_t stream) {
  using Element = typename ElementOf<kDtype>::type;
  using Traits = FwdTraits<Element, kHeadDim>;
  using GmemLayout = typename Traits::GmemLayout;
  using GmemLayoutT = typename Traits::GmemLayoutT;

  // A stride of a size-1 mode is never used; give TMA any legal value (16 bytes) for it.
  constexpr int64_t kUnusedStride = 16 / sizeof(Element);
  auto stride_of = [&](int64_t stride, int size) { return size == 1 ? kUnusedStride : stride; };
  auto rows_layout = [&](const Strides4& st, int seqlen, int heads) {  // (seq, D, head, batch)
    return GmemLayout(make_shape(seqlen, kHeadDim, heads, p.batch),
                      make_stride(stride_of(st.row, seqlen), _1{}, stride_of(st.head, heads), stride_of(st.batch, p.batch)));
  };
  auto cols_layout = [&](const Strides4& st, int seqlen, int heads) {  // (D, seq, head, batch)
    return GmemLayoutT(make_shape(kHeadDim, seqlen, heads, p.batch),
                       make_stride(_1{}, stride_of(st.row, seqlen), stride_of(st.head, heads), stride_of(st.batch, p.batch)));
  };

  Tensor gQ = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.q)), rows_layout(p.q_strides, p.seqlen_q, p.heads_q));
  Tensor gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k)), rows_layout(p.k_strides, p.seqlen_k, p.heads_kv));
  Tensor gVt = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.v)), cols_layout(p.v_strides, p.seqlen_k, p.heads_kv));
  Tensor gO = make_tensor(make_gmem_ptr(static_cast<Element*>(p.out)), rows_layout(p.out_strides, p.seqlen_q, p.heads_q));

  FwdKernelParams<Traits> params{};
  params.tma_q = make_tma_copy(SM90_TMA_LOAD{}, gQ, take<0, 2>(typename Traits::SmemLayoutQ{}),
                               Shape<Int<Traits::kWarpgroupRows>, Int<kHeadDim>>{}, _1{});
  params.tma_k = make_tma_copy(SM90_TMA_LOAD{}, gK, take<0, 2>(typename Traits::SmemLayoutK{}),
                               Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
  params.tma_v = make_tma_copy(SM90_TMA_LOAD{}, gVt, take<0, 2>(typename Traits::SmemLayoutVt{}),
                               Shape<Int<kHeadDim>, Int<Traits::kBlockN>>{}, _1{});
  params.tma_o = make_tma_copy(SM90_TMA_STORE{}, gO, take<0, 2>(typename Traits::SmemLayoutQ{}),
                               Shape<Int<Traits::kWarpgroupRows>, Int<kHeadDim>>{}, _1{});
  params.lse = p.lse;
  params.seqlen_q = p.seqlen_q;
  params.seqlen_k = p.seqlen_k;
  params.heads_q = p.heads_q;
  params.heads_kv = p.heads_kv;
  params.batch = p.batch;
  params.kv_group = p.heads_q / p.heads_kv;
  const bool softcap = p.softcap > 0.f;
  params.scale_log2 = softcap ? kLog2e : p.softmax_scale * kLog2e;
  params.softcap = softcap ? p.softcap : 0.f;
  params.softcap_in_scale = softcap ? p.softmax_scale / p.softcap : 0.f;
  params.causal = p.causal;
  // A window edge too wide to cut any key is unbounded (-1): row i sees keys down to
  // i + sk - sq - left < 0 once left >= sk, and up to i + sk - sq + right >= sk - 1 once
  // right >= sq - 1. This also keeps MaskRule's int arithmetic far from overflow.
  params.window_left = p.window_left >= p.seqlen_k ? -1 : p.window_left;
  params.window_right = p.window_right >= p.seqlen_q ? -1 : p.window_right;

  auto kernel = &attention_fwd_sm90_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, p.heads_q, p.batch);
  kernel<<<grid, Traits::kNumThreads, Traits::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace fast_attn

#endif  // FAST_ATTN_HAVE_SM90
