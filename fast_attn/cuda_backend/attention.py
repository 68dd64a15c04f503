"""The "cuda" backend of attention: the backend interface over csrc/attention/ through
``torch.ops.fast_attn.cuda_attention_fwd`` / ``cuda_attention_bwd``.

The CUDA kernels are compiled for head dims 64, 128 and 256. Any other head dim up to 256
is served by zero-padding q, k and v to the next compiled one: zero columns add nothing
to q.k, and the padded output columns are dropped (``softmax_scale`` is the caller's, so
the scale still follows the true head dim). Padding copies the inputs, so those head dims
cost one extra read and write of q, k and v (and, for the kv-cache op, of the whole cache
on every call).

The kernels implement causal, window, softcap, GQA/MQA, deterministic backward, varlen
and the KV-cache step (with split-KV); dropout, ALiBi and attention masks are declared
unsupported in ``fast_attn.backends.CAPABILITIES`` and never reach this module. The
kernel family (sm_80 or sm_90a) follows ``fast_attn.backends.use_cuda_attention_arch``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fast_attn import backends
from fast_attn.cuda_backend import ops
from fast_attn.ops.attention_params import CACHE, VARLEN, AttentionParams, BiasGrads, Packing

COMPILED_HEAD_DIMS = (64, 128, 256)


def padded_head_dim(head_dim: int) -> int:
    """The compiled head dim that serves ``head_dim`` (the smallest one >= it)."""
    for compiled in COMPILED_HEAD_DIMS:
        if head_dim <= compiled:
            return compiled
    raise ValueError(f"head_dim must be at most {COMPILED_HEAD_DIMS[-1]} for the cuda backend, got {head_dim}")


def _pad(t: Tensor, head_dim: int) -> Tensor:
    return t if t.shape[-1] == head_dim else F.pad(t, (0, head_dim - t.shape[-1]))


def _packing_args(packing: Packing) -> tuple:
    """(cu_seqlens_q, cu_seqlens_k, seqlens_k, max_seqlen_q, max_seqlen_k) as the raw ops take them."""
    if packing.kind == VARLEN:
        cu_q = packing.cu_seqlens_q.contiguous()
        cu_k = packing.cu_seqlens_k.contiguous()
        return cu_q, cu_k, None, packing.max_seqlen_q, packing.max_seqlen_k
    seqlens_k = packing.seqlens_k.contiguous() if packing.kind == CACHE and packing.seqlens_k is not None else None
    return None, None, seqlens_k, 0, 0


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, packing: Packing):
    """(out, lse); dense, varlen and KV-cache calls (the cache already appended)."""
    head_dim = q.shape[-1]
    padded = padded_head_dim(head_dim)
    cu_q, cu_k, seqlens_k, max_q, max_k = _packing_args(packing)
    out, lse = ops().cuda_attention_fwd(
        _pad(q, padded), _pad(k, padded), _pad(v, padded), cu_q, cu_k, seqlens_k, max_q, max_k,
        params.softmax_scale, params.causal, params.window[0], params.window[1], params.softcap,
        backends.cuda_attention_arch(),
    )
    return out[..., :head_dim].contiguous(), lse


def attention_bwd(dout, q, k, v, out, lse, params: AttentionParams, packing: Packing, grads: BiasGrads):
    """(dq, dk, dv, None, None): the kernels compute no learned-bias gradients."""
    head_dim = q.shape[-1]
    padded = padded_head_dim(head_dim)
    cu_q, cu_k, _, max_q, max_k = _packing_args(packing)
    dq, dk, dv = ops().cuda_attention_bwd(
        *(_pad(t, padded) for t in (dout, q, k, v, out)), lse, cu_q, cu_k, max_q, max_k,
        params.softmax_scale, params.causal, params.window[0], params.window[1], params.softcap,
        params.deterministic, backends.cuda_attention_arch(),
    )
    return (*(t[..., :head_dim] for t in (dq, dk, dv)), None, None)
