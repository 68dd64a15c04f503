// Warp-level building blocks of the sm_80 attention kernels (also used on sm_90): the
// tensor-core MMA, ldmatrix, cp.async, type conversions and the attention mask rule.
//
// Everything is a thin, force-inlined wrapper over one PTX instruction or a few lines of
// arithmetic, so the kernels read as the algorithm. Fragment layouts follow the PTX ISA
// ("Matrix Fragments for mma.m16n8k16"): for a warp's lane l, group g = l / 4 and
// thread-in-group t = l % 4,
//   A (16x16, row-major): a[0..3] hold rows {g, g+8} x cols {2t, 2t+1, 2t+8, 2t+9} as
//     a0 = (g, 2t..2t+1), a1 = (g+8, 2t..2t+1), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..);
//   B (16x8, "col"):     b0 = rows (k) 2t..2t+1 of col g, b1 = rows 2t+8..2t+9 of col g;
//   C/D (16x8, fp32):    c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define FA_DEVICE __device__ __forceinline__

namespace fast_attn {
namespace sm80 {

// ------------------------------------------------------------------------- conversions

template <typename T>
struct PackedPair;  // two T values in one 32-bit register
template <>
struct PackedPair<__half> {
  using type = __half2;
};
template <>
struct PackedPair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

// Two fp32 values rounded (to nearest even) into one packed 32-bit register of T.
template <typename T>
FA_DEVICE uint32_t pack_floats(float lo, float hi);
template <>
FA_DEVICE uint32_t pack_floats<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
FA_DEVICE uint32_t pack_floats<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
FA_DEVICE float to_float(T x);
template <>
FA_DEVICE float to_float<__half>(__half x) { return __half2float(x); }
template <>
FA_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
FA_DEVICE T from_float(float x);
template <>
FA_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
FA_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ------------------------------------------------------------------------------- mma

// d = a * b + c for one 16x8x16 tile: A 16x16 (4 regs), B 16x8 (2 regs), C/D fp32 (4 regs).
template <typename T>
FA_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
FA_DEVICE void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
FA_DEVICE void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// --------------------------------------------------------------------------- ldmatrix

// Shared-memory address as the 32-bit value PTX's .shared state space wants.
FA_DEVICE uint32_t smem_u32(const void* ptr) { return static_cast<uint32_t>(__cvta_generic_to_shared(ptr)); }

// Four 8x8 b16 matrices; lane l supplies the row address of row l % 8 of matrix l / 8.
FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// The same, each 8x8 matrix transposed on the way (B operands stored k-major, e.g. V).
FA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
FA_DEVICE void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
FA_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// ---------------------------------------------------------------------------- cp.async

// 16-byte global -> shared copy that bypasses L1; when `valid` is false the 16 shared bytes
// are zero-filled instead (src-size 0), which is how tile tails are padded.
FA_DEVICE void cp_async_16(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes));
}
FA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N committed groups are still in flight.
template <int N>
FA_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------- warp reductions

FA_DEVICE float quad_max(float x) {  // over the 4 lanes of an mma row group (same g)
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
FA_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace sm80

// --------------------------------------------------------------------------- mask rule

// Which keys query row `i` may attend, for one sequence with sq queries and sk keys (see
// attention_params.h): the diagonal is i + sk - sq (bottom-right aligned).
struct MaskRule {
  int diag_offset;  // sk - sq
  int seqlen_k;     // keys at or past it are padding
  bool causal;
  int window_left;   // -1: unbounded
  int window_right;  // -1: unbounded

  // Inclusive key range [lo, hi] row i may attend, before the seqlen_k bound; lo > hi: none.
  FA_DEVICE int key_lo(int i) const { return window_left >= 0 ? i + diag_offset - window_left : 0; }
  FA_DEVICE int key_hi(int i) const {
    int hi = seqlen_k - 1;
    if (causal) hi = min(hi, i + diag_offset);
    if (window_right >= 0) hi = min(hi, i + diag_offset + window_right);
    return hi;
  }
  FA_DEVICE bool allows(int i, int j) const { return j >= key_lo(i) && j <= key_hi(i) && j >= 0; }
};

// s -> softcap * tanh(s / softcap) when softcap > 0 (applied after softmax_scale).
FA_DEVICE float apply_softcap(float s, float softcap) { return softcap > 0.f ? softcap * tanhf(s / softcap) : s; }

}  // namespace fast_attn
