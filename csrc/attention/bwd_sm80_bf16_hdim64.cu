// Flash attention backward, sm_80 kernels for bf16 and head_dim 64: one explicit
// instantiation of launch_attention_bwd (bwd_sm80_kernel.cuh), so that the six (dtype,
// head_dim) combinations compile in parallel and none takes long. Called by bwd_sm80.cu.
#include "attention/bwd_sm80_kernel.cuh"

namespace fast_attn {
namespace sm80_bwd {

template cudaError_t launch_attention_bwd<__nv_bfloat16, 64>(const AttentionBwdParams&, int, cudaStream_t);

}  // namespace sm80_bwd
}  // namespace fast_attn
