// Which kernel family runs an attention call: the front door of csrc/attention/.
//
// attention_fwd runs the sm_90a (TMA + wgmma) forward on Hopper when it was built and handles
// the call, else the sm_80 (mma.sync + cp.async) forward, which runs on sm_80 and newer. The
// backward is the sm_80 family on every GPU (there is no sm_90a backward yet).
// AttentionArch::kSm80 forces the sm_80 kernels (how the Ampere path is tested on an H100);
// kSm90 forces the Hopper forward and reports cudaErrorNotSupported where it cannot run; it
// does not change the backward, which has only the one family.
#include "attention/attention_params.h"

namespace fast_attn {

namespace {

bool device_is_hopper(int device) {
  int major = 0;
  int minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  return major == 9 && minor == 0;  // sm_90a code runs on exactly 9.0
}

}  // namespace

cudaError_t attention_fwd(const AttentionFwdParams& params, cudaStream_t stream) {
  const bool hopper_ready = attention_sm90_built() && device_is_hopper(params.device);
  if (params.arch == AttentionArch::kSm90) {
    if (!hopper_ready) return cudaErrorNotSupported;
    // Forced: run the Hopper kernel unsplit rather than refuse a call that the op layer
    // sized for split-KV (a small grid); the split workspaces then go unused.
    AttentionFwdParams unsplit = params;
    unsplit.num_splits = 1;
    return attention_fwd_sm90(unsplit, stream);
  }
  if (params.arch == AttentionArch::kAuto && hopper_ready) {
    // The Hopper forward declines (cudaErrorNotSupported, nothing launched) the calls it
    // does not implement: varlen, kv-cache and split-KV (chosen when the grid underfills
    // the GPU, where splitting the keys is worth more than the faster kernel); those run
    // on the sm_80 kernels.
    const cudaError_t status = attention_fwd_sm90(params, stream);
    if (status != cudaErrorNotSupported) return status;
  }
  return attention_fwd_sm80(params, stream);
}

cudaError_t attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  return attention_bwd_sm80(params, stream);
}

}  // namespace fast_attn
