// CUDA kernels of fast_attn::cuda_attention_fwd / cuda_attention_bwd (schemas in ops.cpp).
//
// The torch side of csrc/attention/: argument checks whose messages name the argument and
// the expectation, the layout the kernels need (last dim contiguous, 16-byte aligned rows;
// anything else is copied), output and workspace allocation, and the launch on the current
// CUDA stream. Three call shapes share one pair of ops:
//   dense:    q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); lse (B, Hq, Sq)
//   varlen:   cu_seqlens_q/k (B + 1,) int32 given; q (total_q, Hq, D), k/v (total_k, Hkv, D);
//             lse (Hq, total_q); max_seqlen_q/k bound the per-sequence lengths
//   kv-cache: seqlens_k (B,) int32 given (forward only); k/v are the caches (B, capacity, Hkv, D)
//             and seqlens_k[b] of their rows are valid
// D must be 64, 128 or 256 (the Python op layer pads other head dims). Values inside
// cu_seqlens/seqlens_k are trusted here: the Python op layer has validated them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "attention/attention_params.h"

namespace {

constexpr int64_t kAlignElements = 8;  // 16 bytes of fp16/bf16: one cp.async / TMA unit
constexpr int64_t kAlignBytes = 16;

bool kernel_layout(const at::Tensor& t) {
  if (t.stride(-1) != 1 && t.size(-1) > 1) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % kAlignElements != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlignBytes == 0;
}

// t itself when the kernels can read it, else a fresh contiguous copy (which is aligned).
at::Tensor kernel_ready(const at::Tensor& t) {
  return kernel_layout(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

fast_attn::AttentionDtype attention_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kHalf:
      return fast_attn::AttentionDtype::kFloat16;
    case at::kBFloat16:
      return fast_attn::AttentionDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "attention: q must be float16 or bfloat16 for the cuda backend, got ",
                       q.scalar_type());
  }
}

fast_attn::AttentionArch attention_arch(int64_t arch) {
  TORCH_CHECK_VALUE(arch >= 0 && arch <= 2, "attention: arch must be 0 (auto), 1 (sm80) or 2 (sm90), got ", arch);
  return static_cast<fast_attn::AttentionArch>(arch);
}

void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), "attention: ", name, " must be on q's device (", q.device(), "), got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "attention: ", name, " must have q's dtype (",
                   q.scalar_type(), "), got ", t.scalar_type());
}

void check_int32_vector(const at::Tensor& t, const char* name, int64_t length, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), "attention: ", name, " must be on q's device (", q.device(), "), got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "attention: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && (length < 0 || t.size(0) == length), "attention: ", name, " must have shape (",
                    length, ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "attention: ", name, " must be contiguous");
}

fast_attn::Strides4 strides_of(const at::Tensor& t, bool packed) {
  // packed: (rows, heads, D) with no batch dimension (varlen)
  if (packed) return fast_attn::Strides4{0, t.stride(0), t.stride(1)};
  return fast_attn::Strides4{t.stride(0), t.stride(1), t.stride(2)};
}

int checked_int(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(value >= 0 && value <= INT32_MAX, "attention: ", what, " must fit in int32, got ", value);
  return static_cast<int>(value);
}

// The call's shapes, checked: everything but the pointers.
struct Shapes {
  bool varlen = false;
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0, total_q = 0;
};

Shapes check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                    const std::optional<at::Tensor>& seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK_VALUE(q.is_cuda(), "attention: q must be a CUDA tensor, got device ", q.device());
  attention_dtype(q);
  check_like_q(k, "k", q);
  check_like_q(v, "v", q);
  Shapes s;
  s.varlen = cu_seqlens_q.has_value() || cu_seqlens_k.has_value();
  TORCH_CHECK_VALUE(!s.varlen || (cu_seqlens_q.has_value() && cu_seqlens_k.has_value()),
                    "attention: cu_seqlens_q and cu_seqlens_k must be given together");
  TORCH_CHECK_VALUE(!(s.varlen && seqlens_k.has_value()), "attention: seqlens_k (kv-cache) cannot be combined with cu_seqlens");
  const int64_t rank = s.varlen ? 3 : 4;
  const char* layout = s.varlen ? "(total, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  TORCH_CHECK_VALUE(q.dim() == rank && k.dim() == rank && v.dim() == rank, "attention: q, k and v must have shape ",
                    layout, ", got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "attention: k and v must have the same shape, got k ", k.sizes(), ", v ",
                    v.sizes());
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128 || head_dim == 256,
                    "attention: head_dim must be 64, 128 or 256 for the cuda kernels (the op layer pads others), got ",
                    head_dim);
  TORCH_CHECK_VALUE(k.size(-1) == head_dim, "attention: k must have q's head_dim ", head_dim, ", got ", k.size(-1));
  s.head_dim = static_cast<int>(head_dim);
  s.heads_q = checked_int(q.size(-2), "q's heads");
  s.heads_kv = checked_int(k.size(-2), "k's heads");
  TORCH_CHECK_VALUE(s.heads_kv > 0 && s.heads_q % s.heads_kv == 0, "attention: q's heads (", s.heads_q,
                    ") must be a multiple of k's heads (", s.heads_kv, ")");
  if (s.varlen) {
    const int64_t batch = cu_seqlens_q->numel() - 1;
    TORCH_CHECK_VALUE(batch >= 1, "attention: cu_seqlens_q must have at least 2 entries, got ", cu_seqlens_q->sizes());
    check_int32_vector(*cu_seqlens_q, "cu_seqlens_q", batch + 1, q);
    check_int32_vector(*cu_seqlens_k, "cu_seqlens_k", batch + 1, q);
    s.batch = checked_int(batch, "batch");
    s.seqlen_q = checked_int(max_seqlen_q, "max_seqlen_q");
    s.seqlen_k = checked_int(max_seqlen_k, "max_seqlen_k");
    s.total_q = checked_int(q.size(0), "total_q");
    checked_int(k.size(0), "total_k");
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "attention: k must have q's batch size ", q.size(0), ", got ", k.size(0));
    s.batch = checked_int(q.size(0), "batch");
    s.seqlen_q = checked_int(q.size(1), "seqlen_q");
    s.seqlen_k = checked_int(k.size(1), "seqlen_k");
    if (seqlens_k.has_value()) check_int32_vector(*seqlens_k, "seqlens_k", s.batch, q);
  }
  return s;
}

void fill_common(fast_attn::AttentionFwdParams& p, const Shapes& s, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const std::optional<at::Tensor>& cu_seqlens_q,
                 const std::optional<at::Tensor>& cu_seqlens_k, double softmax_scale, bool causal,
                 int64_t window_left, int64_t window_right, double softcap, int64_t arch) {
  TORCH_CHECK_VALUE(softcap >= 0.0, "attention: softcap must be >= 0 (0 = off), got ", softcap);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "attention: window_left/window_right must be >= -1 (-1 = unbounded), got (",
                    window_left, ", ", window_right, ")");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides_of(q, s.varlen);
  p.k_strides = strides_of(k, s.varlen);
  p.v_strides = strides_of(v, s.varlen);
  p.batch = s.batch;
  p.heads_q = s.heads_q;
  p.heads_kv = s.heads_kv;
  p.seqlen_q = s.seqlen_q;
  p.seqlen_k = s.seqlen_k;
  p.head_dim = s.head_dim;
  p.total_q = s.total_q;
  p.cu_seqlens_q = s.varlen ? cu_seqlens_q->data_ptr<int>() : nullptr;
  p.cu_seqlens_k = s.varlen ? cu_seqlens_k->data_ptr<int>() : nullptr;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.causal = causal;
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, INT32_MAX));
  p.window_right = static_cast<int>(std::min<int64_t>(window_right, INT32_MAX));
  p.dtype = attention_dtype(q);
  p.arch = attention_arch(arch);
  p.device = q.get_device();
}

at::Tensor lse_like(const Shapes& s, const at::Tensor& q) {
  const auto options = q.options().dtype(at::kFloat);
  if (s.varlen) return at::empty({s.heads_q, s.total_q}, options);
  return at::empty({s.batch, s.heads_q, s.seqlen_q}, options);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                                 const std::optional<at::Tensor>& cu_seqlens_k,
                                                 const std::optional<at::Tensor>& seqlens_k, int64_t max_seqlen_q,
                                                 int64_t max_seqlen_k, double softmax_scale, bool causal,
                                                 int64_t window_left, int64_t window_right, double softcap,
                                                 int64_t arch) {
  const Shapes s = check_shapes(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, seqlens_k, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = kernel_ready(q_in);
  const at::Tensor k = kernel_ready(k_in);
  const at::Tensor v = kernel_ready(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = lse_like(s, q);
  if (q.numel() == 0) return {out, lse};
  if (k.numel() == 0) {  // no key anywhere: every row is fully masked
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }

  fast_attn::AttentionFwdParams p;
  fill_common(p, s, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left, window_right, softcap,
              arch);
  p.out = out.data_ptr();
  p.out_strides = strides_of(out, s.varlen);
  p.lse = lse.data_ptr<float>();
  const at::Tensor seqlens = seqlens_k.has_value() ? seqlens_k->contiguous() : at::Tensor();
  p.seqlens_k = seqlens.defined() ? seqlens.data_ptr<int>() : nullptr;

  at::Tensor out_accum;
  at::Tensor lse_accum;
  p.num_splits = s.varlen ? 1 : fast_attn::attention_fwd_num_splits(p);
  if (p.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_accum = at::empty({p.num_splits, s.batch, s.heads_q, s.seqlen_q, s.head_dim}, f32);
    lse_accum = at::empty({p.num_splits, s.batch, s.heads_q, s.seqlen_q}, f32);
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  const cudaError_t status = fast_attn::attention_fwd(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK_NOT_IMPLEMENTED(status != cudaErrorNotSupported || p.arch != fast_attn::AttentionArch::kSm90,
                              "attention: the sm_90a forward forced by FAST_ATTN_CUDA_ATTENTION_ARCH=sm90 does not ",
                              "handle this call (it needs a Hopper GPU, an extension built for 9.0a with CuTe, and ",
                              "a dense call: no varlen, no kv-cache); unset the variable to let the sm_80 kernels run it");
  C10_CUDA_CHECK(status);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap, bool deterministic, int64_t arch) {
  const Shapes s = check_shapes(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, std::nullopt, max_seqlen_q, max_seqlen_k);
  check_like_q(dout_in, "dout", q_in);
  check_like_q(out_in, "out", q_in);
  TORCH_CHECK_VALUE(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
                    "attention: dout and out must have q's shape ", q_in.sizes(), ", got dout ", dout_in.sizes(),
                    ", out ", out_in.sizes());
  const at::Tensor expected_lse = lse_like(s, q_in);
  TORCH_CHECK_VALUE(lse_in.device() == q_in.device() && lse_in.scalar_type() == at::kFloat &&
                        lse_in.sizes() == expected_lse.sizes(),
                    "attention: lse must be float32 of shape ", expected_lse.sizes(), " on q's device, got ",
                    lse_in.scalar_type(), " ", lse_in.sizes(), " on ", lse_in.device());
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = kernel_ready(q_in);
  const at::Tensor k = kernel_ready(k_in);
  const at::Tensor v = kernel_ready(v_in);
  const at::Tensor out = kernel_ready(out_in);
  const at::Tensor dout = kernel_ready(dout_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }

  fast_attn::AttentionBwdParams p;
  fill_common(p, s, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left, window_right, softcap,
              arch);
  p.out = const_cast<void*>(out.data_ptr());
  p.out_strides = strides_of(out, s.varlen);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr();
  p.dout_strides = strides_of(dout, s.varlen);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_strides = strides_of(dq, s.varlen);
  p.dk_strides = strides_of(dk, s.varlen);
  p.dv_strides = strides_of(dv, s.varlen);
  p.deterministic = deterministic;

  const fast_attn::AttentionBwdWorkspace sizes = fast_attn::attention_bwd_workspace(p);
  // One zeroed allocation for the four workspaces (a kernel may accumulate into them), each
  // part starting on a 16-byte boundary for vector access.
  const int64_t sizes_in_order[] = {sizes.dsoftmax_sum, sizes.dq_accum, sizes.dk_accum, sizes.dv_accum};
  float** parts_in_order[] = {&p.dsoftmax_sum, &p.dq_accum, &p.dk_accum, &p.dv_accum};
  int64_t offsets[4];
  int64_t total = 0;
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(sizes_in_order[i] >= 0, "attention: the backward workspace size query failed");
    offsets[i] = total;
    total += (sizes_in_order[i] + kAlignBytes / 4 - 1) / (kAlignBytes / 4) * (kAlignBytes / 4);
  }
  at::Tensor workspace = at::zeros({total}, q.options().dtype(at::kFloat));
  for (int i = 0; i < 4; ++i) {
    *parts_in_order[i] = sizes_in_order[i] > 0 ? workspace.data_ptr<float>() + offsets[i] : nullptr;
  }
  C10_CUDA_CHECK(fast_attn::attention_bwd(p, c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_attn, CUDA, m) {
  m.impl("cuda_attention_fwd", &attention_fwd);
  m.impl("cuda_attention_bwd", &attention_bwd);
}
