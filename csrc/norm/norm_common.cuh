// Device and host helpers shared by the norm kernels (norm_fwd.cu, norm_bwd.cu); no torch
// headers. See norm.h for the maths and the contract.
//
// Rows are moved in chunks of kVec = 16 / sizeof(T) consecutive elements (8 halves or 4
// floats). The kernels are instantiated twice:
//   kAligned = true   every row start and row stride is 16-byte aligned, cols is a
//                     multiple of kVec and the parameters are aligned: a chunk is either
//                     full (one 128-bit access) or entirely past the row's end (skipped);
//   kAligned = false  anything else: element-by-element accesses.
// Keeping the element-wise path out of the aligned kernels is worth ~30-40 registers per
// thread (ptxas, sm_90a): with both paths in one kernel the 8192-wide bf16 forward needed
// 105 registers (one 512-thread block per SM), with the aligned path alone 63.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/device_info.h"
#include "common/element_io.cuh"
#include "norm.h"

namespace fast_attn {
namespace norm_detail {

using namespace element_io;  // to_float, from_float, Pack, chunk loads/stores

constexpr int kVecBytes = 16;  // one 128-bit global load/store
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Named barriers 1..15 are free for teams (0 is __syncthreads).
constexpr int kMaxNamedBarrierTeams = 15;

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__host__ __device__ constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

// Valid elements (0..kVec) of the chunk starting at column col0.
template <int kVec>
__device__ __forceinline__ int chunk_size(int64_t col0, int64_t cols) {
  return col0 < cols ? static_cast<int>(min64(kVec, cols - col0)) : 0;
}

// The n (0..kVec) elements of a row chunk at ptr, zeros after them (ptr is not read when
// n == 0). kAligned: n is kVec or 0 and ptr is 16-byte aligned.
template <bool kAligned, typename T, int kVec>
__device__ __forceinline__ void load_chunk(const T* ptr, int n, Pack<T, kVec>& dst) {
  if constexpr (kAligned) {
    if (n > 0) {
      dst = *reinterpret_cast<const Pack<T, kVec>*>(ptr);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) dst.v[i] = i < n ? ptr[i] : from_float<T>(0.0f);
}

template <bool kAligned, typename T, int kVec>
__device__ __forceinline__ void store_chunk(T* ptr, int n, const Pack<T, kVec>& src) {
  if constexpr (kAligned) {
    if (n > 0) *reinterpret_cast<Pack<T, kVec>*>(ptr) = src;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < n) ptr[i] = src.v[i];
    }
  }
}

// Stores the first n values of src at ptr, rounded to T.
template <bool kAligned, typename T, int kVec>
__device__ __forceinline__ void store_floats(T* ptr, int n, const float (&src)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int i = 0; i < kVec; ++i) pack.v[i] = from_float<T>(src[i]);
  store_chunk<kAligned>(ptr, n, pack);
}

template <typename T, int kVec>
__device__ __forceinline__ void to_floats(const Pack<T, kVec>& src, float (&dst)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) dst[i] = to_float(src.v[i]);
}

// weight / bias elements [col0, col0 + n) as fp32: the parameter is stored in the row type
// T, or (is_f32) in fp32. Aligned fp32 chunks of a 16-bit T are 32 bytes: two accesses.
template <bool kAligned, typename T, int kVec>
__device__ __forceinline__ void load_param(const void* ptr, bool is_f32, int64_t col0, int n, float (&dst)[kVec]) {
  if (is_f32 && !std::is_same_v<T, float>) {
    const float* src = static_cast<const float*>(ptr) + col0;
    constexpr int kPerAccess = vec_width<float>();
    if constexpr (kAligned && kVec % kPerAccess == 0) {
      if (n > 0) {
#pragma unroll
        for (int a = 0; a < kVec / kPerAccess; ++a) {
          const Pack<float, kPerAccess> pack = reinterpret_cast<const Pack<float, kPerAccess>*>(src)[a];
#pragma unroll
          for (int i = 0; i < kPerAccess; ++i) dst[a * kPerAccess + i] = pack.v[i];
        }
        return;
      }
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) dst[i] = i < n ? src[i] : 0.0f;
  } else {
    Pack<T, kVec> pack;
    load_chunk<kAligned>(static_cast<const T*>(ptr) + col0, n, pack);
    to_floats(pack, dst);
  }
}

// ---------------------------------------------------------------------------------------
// Team reductions. Every thread of a team ends with the same bits: the xor butterfly adds
// a + b in one lane and b + a in its partner (equal in IEEE arithmetic), and the
// cross-warp step reads the per-warp sums in one fixed order.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Barrier over the kTeamThreads threads of team `team` (the whole block when kTeams == 1).
template <int kTeamThreads, int kTeams>
__device__ __forceinline__ void team_sync(int team) {
  if constexpr (kTeams == 1) {
    __syncthreads();
  } else {
    static_assert(kTeams <= kMaxNamedBarrierTeams, "one named barrier per team");
    // bar.sync orders the shared-memory accesses of the participating threads.
    asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "n"(kTeamThreads) : "memory");
  }
}

// Shared floats team_sum needs per block (at least 1: no zero-size arrays).
template <int kTeamThreads, int kTeams, int kN>
__host__ __device__ constexpr int team_sum_smem() {
  return kTeamThreads > kWarpSize ? 2 * kTeams * (kTeamThreads / kWarpSize) * kN : 1;
}

// v[k] = the sum of v[k] over the team, in every thread of the team; the whole team must
// call it. Teams wider than a warp go through `red` (team_sum_smem floats): alternating
// halves (`parity`) make one barrier per call enough, since a warp can only overwrite a
// half after every warp of its team has passed the next call's barrier, i.e. after they
// all finished reading that half.
template <int kTeamThreads, int kTeams, int kN>
__device__ __forceinline__ void team_sum(float (&v)[kN], float* red, int team, int& parity) {
  static_assert(kTeamThreads % kWarpSize == 0, "teams are whole warps");
#pragma unroll
  for (int k = 0; k < kN; ++k) v[k] = warp_sum(v[k]);
  if constexpr (kTeamThreads > kWarpSize) {
    constexpr int kWarps = kTeamThreads / kWarpSize;
    const int warp = (threadIdx.x % kTeamThreads) / kWarpSize;
    float* buf = red + ((parity * kTeams + team) * kWarps) * kN;
    if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
      for (int k = 0; k < kN; ++k) buf[warp * kN + k] = v[k];
    }
    team_sync<kTeamThreads, kTeams>(team);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += buf[w * kN + k];
      v[k] = total;
    }
    parity ^= 1;
  }
}

// ---------------------------------------------------------------------------------------
// Host side

inline bool aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0; }

// True when ptr is absent or every row of a (rows, cols) tensor there starts 16-byte aligned.
inline bool rows_aligned(const void* ptr, int64_t row_stride, int64_t rows, int64_t elem_size) {
  return ptr == nullptr || (aligned(ptr) && (rows <= 1 || (row_stride * elem_size) % kVecBytes == 0));
}

// weight / bias must be stored in the row dtype or in fp32 (the caller converts others).
inline bool param_dtype_ok(const void* ptr, NormDtype param, NormDtype row) {
  return ptr == nullptr || param == row || param == NormDtype::kFloat32;
}

// Calls f(T{}) with T the row storage type named by `dtype` (fp64 rows are not supported).
template <typename F>
cudaError_t row_dtype_switch(NormDtype dtype, F&& f) {
  switch (dtype) {
    case NormDtype::kFloat32:
      return f(float{});
    case NormDtype::kFloat16:
      return f(__half{});
    case NormDtype::kBFloat16:
      return f(__nv_bfloat16{});
    case NormDtype::kFloat64:
      break;
  }
  return cudaErrorInvalidValue;
}

// Calls f(std::integral_constant<bool, flag>) so `flag` becomes a template parameter.
template <typename F>
cudaError_t bool_switch(bool flag, F&& f) {
  if (flag) return f(std::true_type{});
  return f(std::false_type{});
}

}  // namespace norm_detail
}  // namespace fast_attn
