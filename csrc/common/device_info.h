// Host-side queries the launchers share (no torch headers): the SM count of a device,
// which sizes persistent grids, split counts and reduction slabs.
#pragma once

#include <atomic>

#include <cuda_runtime_api.h>

namespace fast_attn {

// SM count of `device`, queried once per device and cached (the attribute query costs
// about 1 us, a launch budget of its own for the small ops). Thread-safe; inline so every
// translation unit shares one cache.
inline cudaError_t sm_count(int device, int* count) {
  constexpr int kMaxCachedDevices = 64;
  static std::atomic<int> cache[kMaxCachedDevices];
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    *count = cache[device].load(std::memory_order_relaxed);
    if (*count > 0) return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (cacheable) cache[device].store(*count, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace fast_attn
