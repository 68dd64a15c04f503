// The sm_80 flash attention forward for fp16, head dim 128: one explicit instantiation of
// fwd_sm80_kernel.cuh (one (dtype, head dim) per file keeps each compile short).
#include "fwd_sm80_kernel.cuh"

namespace fast_attn {
namespace fwd_sm80 {

template cudaError_t run_attention_fwd_sm80<__half, 128>(const AttentionFwdParams& params, cudaStream_t stream);

}  // namespace fwd_sm80
}  // namespace fast_attn
