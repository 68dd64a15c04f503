// The sm_90a (Hopper) flash attention forward: which calls it handles, and the dispatch to
// the per-(dtype, head_dim) launchers of fwd_sm90_<dtype>_hdim<D>.cu (kernel:
// fwd_sm90_kernel.cuh). No CuTe here, so this file compiles in seconds.
//
// Handled (everything else returns cudaErrorNotSupported without launching, and
// attention_fwd falls back to the sm_80 kernels):
//   * built with FAST_ATTN_HAVE_SM90 and running on a compute capability 9.0 device;
//   * dense batches: no cu_seqlens_q/k (varlen), no seqlens_k (kv-cache), num_splits <= 1;
//   * fp16 or bf16, head_dim 64, 128 or 256; heads_q a multiple of heads_kv;
//   * causal / sliding window / softcap / GQA / cross-attention (Sq != Sk) in any mix;
//   * softmax_scale > 0 (the running max is taken on unscaled scores);
//   * what TMA needs: 16-byte aligned q/k/v/out, row/head/batch strides that are multiples
//     of 8 elements, positive wherever that dimension has more than one entry, below 2^40
//     bytes; sequence lengths, heads and batch >= 1; heads_q, batch <= 65535 (grid y, z).
#include "attention_params.h"

#include <cstdint>

namespace fast_attn {

#if defined(FAST_ATTN_HAVE_SM90)

namespace sm90 {
// Defined in fwd_sm90_kernel.cuh, instantiated in fwd_sm90_<dtype>_hdim<D>.cu.
template <AttentionDtype kDtype, int kHeadDim>
cudaError_t attention_fwd_sm90_launch(const AttentionFwdParams& params, cudaStream_t stream);
}  // namespace sm90

namespace {

constexpr int kElementBytes = 2;             // fp16 / bf16
constexpr int64_t kTmaAlignBytes = 16;       // TMA base address and stride granularity
constexpr int64_t kTmaMaxStrideBytes = int64_t{1} << 40;
constexpr int kMaxGridYZ = 65535;

bool is_aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kTmaAlignBytes == 0; }

// A stride TMA can encode for a dimension of `size` entries (a size-1 dimension's stride is
// never used: the launcher replaces it).
bool tma_stride_ok(int64_t stride, int size) {
  if (size == 1) return true;
  const int64_t bytes = stride * kElementBytes;
  return stride > 0 && bytes % kTmaAlignBytes == 0 && bytes < kTmaMaxStrideBytes;
}

bool tma_strides_ok(const Strides4& st, int seqlen, int heads, int batch) {
  return tma_stride_ok(st.row, seqlen) && tma_stride_ok(st.head, heads) && tma_stride_ok(st.batch, batch);
}

bool sm90_handles(const AttentionFwdParams& p) {
  int major = 0;
  int minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, p.device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, p.device) != cudaSuccess) {
    return false;
  }
  if (major != 9 || minor != 0) return false;  // sm_90a code runs on exactly 9.0
  if (p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr || p.seqlens_k != nullptr) return false;
  if (p.num_splits > 1) return false;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return false;
  if (p.dtype != AttentionDtype::kFloat16 && p.dtype != AttentionDtype::kBFloat16) return false;
  if (p.batch < 1 || p.seqlen_q < 1 || p.seqlen_k < 1 || p.heads_q < 1 || p.heads_kv < 1) return false;
  if (p.heads_q % p.heads_kv != 0) return false;
  if (p.heads_q > kMaxGridYZ || p.batch > kMaxGridYZ) return false;
  if (!(p.softmax_scale > 0.f)) return false;
  if (p.lse == nullptr) return false;
  if (!is_aligned(p.q) || !is_aligned(p.k) || !is_aligned(p.v) || !is_aligned(p.out)) return false;
  return tma_strides_ok(p.q_strides, p.seqlen_q, p.heads_q, p.batch) &&
         tma_strides_ok(p.k_strides, p.seqlen_k, p.heads_kv, p.batch) &&
         tma_strides_ok(p.v_strides, p.seqlen_k, p.heads_kv, p.batch) &&
         tma_strides_ok(p.out_strides, p.seqlen_q, p.heads_q, p.batch);
}

template <AttentionDtype kDtype>
cudaError_t launch_for_head_dim(const AttentionFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return sm90::attention_fwd_sm90_launch<kDtype, 64>(p, stream);
    case 128:
      return sm90::attention_fwd_sm90_launch<kDtype, 128>(p, stream);
    case 256:
      return sm90::attention_fwd_sm90_launch<kDtype, 256>(p, stream);
    default:
      return cudaErrorNotSupported;
  }
}

}  // namespace

bool attention_sm90_built() { return true; }

cudaError_t attention_fwd_sm90(const AttentionFwdParams& params, cudaStream_t stream) {
  if (!sm90_handles(params)) return cudaErrorNotSupported;
  return params.dtype == AttentionDtype::kFloat16 ? launch_for_head_dim<AttentionDtype::kFloat16>(params, stream)
                                                  : launch_for_head_dim<AttentionDtype::kBFloat16>(params, stream);
}

#else  // !FAST_ATTN_HAVE_SM90: built without sm_90a or without the CuTe headers

bool attention_sm90_built() { return false; }

cudaError_t attention_fwd_sm90(const AttentionFwdParams&, cudaStream_t) { return cudaErrorNotSupported; }

#endif  // FAST_ATTN_HAVE_SM90

}  // namespace fast_attn
