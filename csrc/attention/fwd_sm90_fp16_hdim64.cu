// sm_90a flash attention forward, fp16 x head_dim 64: one template instantiation per file to
// keep each translation unit's compile time down (see fwd_sm90_kernel.cuh for the kernel;
// without FAST_ATTN_HAVE_SM90 this file is empty).
#include "fwd_sm90_kernel.cuh"

#if defined(FAST_ATTN_HAVE_SM90)
namespace fast_attn {
namespace sm90 {
template cudaError_t attention_fwd_sm90_launch<AttentionDtype::kFloat16, 64>(const AttentionFwdParams&, cudaStream_t);
}  // namespace sm90
}  // namespace fast_attn
#endif
