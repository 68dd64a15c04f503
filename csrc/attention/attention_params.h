// Flash attention on CUDA: the parameter structs and launchers shared by the kernel files
// (no torch headers here, so kernel files compile fast) and csrc/attention/attention_ops.cpp.
//
// Layout and semantics follow the reference (fast_attn/reference/attention.py):
//   q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out like q, lse fp32 (B, Hq, Sq) for the dense
//   and kv-cache calls; varlen packs the batch into the row dimension: q (total_q, Hq, D),
//   k/v (total_k, Hkv, D), lse (Hq, total_q), with cu_seqlens_q/k (B + 1,) int32 offsets.
//   Hq is a multiple of Hkv (GQA/MQA): query head h reads K/V head h / (Hq / Hkv).
//   Scores: s = softmax_scale * q.k; with softcap > 0, s = softcap * tanh(s / softcap).
//   Query row i of a sequence with lengths (sq, sk) may attend key j when
//     causal:          j <= i + sk - sq                       (bottom-right aligned)
//     window_left>=0:  j >= i + sk - sq - window_left
//     window_right>=0: j <= i + sk - sq + window_right
//   A row with no key to attend gives out = 0 and lse = -inf; its gradients are 0.
// Element type: fp16 or bf16 for every tensor but lse/workspaces (fp32). head_dim is one of
// the compiled dims (64, 128, 256); the op layer pads other dims <= 256 with zeros.
// Strides are in elements; the last dimension (D) of every tensor is contiguous, and every
// row/head/batch stride is a multiple of 8 elements (16 bytes), which the op layer ensures.
//
// Launchers enqueue on `stream`, never synchronize, and return the launch status
// (cudaGetLastError), or cudaErrorNotSupported for a combination they were not built for.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fast_attn {

enum class AttentionDtype : int { kFloat16, kBFloat16 };

// Which kernel family runs a call.
enum class AttentionArch : int {
  kAuto = 0,  // sm_90a kernels on Hopper when built, else the sm_80 kernels
  kSm80 = 1,  // force the Ampere path (mma.sync, cp.async): runs on sm_80 and newer
  kSm90 = 2,  // force the Hopper path (TMA, wgmma); cudaErrorNotSupported where unavailable
};

// Strides of a (batch, row, head, D) tensor; batch_stride is unused for varlen (packed rows).
struct Strides4 {
  int64_t batch = 0;
  int64_t row = 0;
  int64_t head = 0;
};

struct AttentionFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // dense/kv-cache: (B, Hq, Sq) contiguous; varlen: (Hq, total_q) contiguous
  Strides4 q_strides, k_strides, v_strides, out_strides;

  int batch = 0;
  int heads_q = 0;
  int heads_kv = 0;
  int seqlen_q = 0;  // dense: Sq; varlen: max_seqlen_q
  int seqlen_k = 0;  // dense: Sk; varlen: max_seqlen_k; kv-cache: cache capacity
  int head_dim = 0;  // 64, 128 or 256
  int total_q = 0;   // varlen only: rows of q (the lse row length)

  // varlen: (B + 1,) int32 prefix sums; sequence b owns q rows [cu_seqlens_q[b], cu_seqlens_q[b+1]).
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  // kv-cache: (B,) int32, the number of valid keys of batch b (cache length after the
  // append); keys past it are masked and the causal/window diagonal uses it as sk.
  const int* seqlens_k = nullptr;

  float softmax_scale = 1.f;
  float softcap = 0.f;  // 0: off
  bool causal = false;
  int window_left = -1;  // -1: unbounded
  int window_right = -1;

  AttentionDtype dtype = AttentionDtype::kBFloat16;
  AttentionArch arch = AttentionArch::kAuto;
  int device = 0;  // CUDA device of every pointer (its SM count sizes grids and splits)

  // Split-KV (decode): num_splits > 1 splits the keys of each (batch, head, query block)
  // into num_splits chunks whose partial results go to the fp32 workspaces
  //   out_accum (num_splits, B, Hq, Sq, D) and lse_accum (num_splits, B, Hq, Sq),
  // and a combine kernel reduces them in split order (deterministic). Not for varlen.
  int num_splits = 1;
  float* out_accum = nullptr;
  float* lse_accum = nullptr;
};

struct AttentionBwdParams : AttentionFwdParams {
  // Inputs besides q/k/v/out/lse (which hold the forward's values): dout like out.
  const void* dout = nullptr;
  Strides4 dout_strides;
  // Outputs: dq like q, dk/dv like k/v (Hkv heads), all allocated contiguous by the op layer.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides4 dq_strides, dk_strides, dv_strides;
  // fp32 workspaces, contiguous, sized by attention_bwd_workspace():
  float* dsoftmax_sum = nullptr;  // rowsum(dout * out): dense (B, Hq, Sq_pad), varlen (Hq, total_q_pad)
  float* dq_accum = nullptr;      // fp32 dQ accumulator, layout chosen by the kernel
  float* dk_accum = nullptr;      // fp32 dK/dV per query head before the GQA group sum
  float* dv_accum = nullptr;      //   (only when heads_q != heads_kv); layout chosen by the kernel
  bool deterministic = false;     // bitwise-reproducible dq (no atomics, fixed order)
};

// fp32 element counts of the backward workspaces for these shapes (see AttentionBwdParams).
struct AttentionBwdWorkspace {
  int64_t dsoftmax_sum = 0;
  int64_t dq_accum = 0;
  int64_t dk_accum = 0;
  int64_t dv_accum = 0;
};

// The number of KV splits the forward would like for this call (1 = no split): used by the
// op layer to size out_accum/lse_accum. Depends on shapes and the device's SM count.
int attention_fwd_num_splits(const AttentionFwdParams& params);

// out, lse (and, with num_splits > 1, the workspaces then the combine).
cudaError_t attention_fwd(const AttentionFwdParams& params, cudaStream_t stream);

AttentionBwdWorkspace attention_bwd_workspace(const AttentionBwdParams& params);

// dq, dk, dv; workspaces must be sized by attention_bwd_workspace (the kernels zero what
// they need to zero).
cudaError_t attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

// Per-family entry points behind attention_fwd/attention_bwd (dispatch in attention_dispatch.cu).
cudaError_t attention_fwd_sm80(const AttentionFwdParams& params, cudaStream_t stream);
cudaError_t attention_bwd_sm80(const AttentionBwdParams& params, cudaStream_t stream);
cudaError_t attention_fwd_sm90(const AttentionFwdParams& params, cudaStream_t stream);
bool attention_sm90_built();  // true when the Hopper kernels were compiled (sm_90a + CuTe)

}  // namespace fast_attn
