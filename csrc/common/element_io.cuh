// Element access shared by the row-wise kernels (csrc/ffn/, csrc/norm/): storage type <->
// fp32 conversions and 16-byte vector packs. No torch headers.
//
// The conversions use explicit intrinsics because torch's nvcc flags
// (__CUDA_NO_HALF_CONVERSIONS__, ...) disable the implicit __half / __nv_bfloat16 ones.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fast_attn {
namespace element_io {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// kVec elements moved as one aligned access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Loads n <= kVec elements at ptr as fp32 (missing ones as 0): a full chunk in one access.
template <int kVec, typename T>
__device__ __forceinline__ void load_chunk(const T* ptr, int n, float (&dst)[kVec]) {
  if (n == kVec) {
    const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(ptr);
#pragma unroll
    for (int i = 0; i < kVec; ++i) dst[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) dst[i] = i < n ? to_float(ptr[i]) : 0.0f;
  }
}

// Stores the first n <= kVec values of src at ptr, rounded to T.
template <int kVec, typename T>
__device__ __forceinline__ void store_chunk(T* ptr, int n, const float (&src)[kVec]) {
  if (n == kVec) {
    Pack<T, kVec> pack;
#pragma unroll
    for (int i = 0; i < kVec; ++i) pack.v[i] = from_float<T>(src[i]);
    *reinterpret_cast<Pack<T, kVec>*>(ptr) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < n) ptr[i] = from_float<T>(src[i]);
    }
  }
}

}  // namespace element_io
}  // namespace fast_attn
