"""The "cuda" backend of the attention ops: calls into csrc/attention/ through
``torch.ops.fast_attn.cuda_attention_fwd`` / ``cuda_attention_bwd``.

The CUDA kernels are compiled for head dims 64, 128 and 256. Any other head dim up to 256
is served by zero-padding q, k and v to the next compiled one: zero columns add nothing
to q.k, and the padded output columns are dropped (``softmax_scale`` is the caller's, so
the scale still follows the true head dim). Padding copies the inputs, so those head dims
cost one extra read and write of q, k and v (and, for the kv-cache op, of the whole cache
on every call).

The kernels implement causal, window, softcap, GQA/MQA, deterministic backward, varlen
and kv-cache; dropout, ALiBi and attention masks are declared unsupported in
``fast_attn.backends.CAPABILITIES`` and never reach this module.
``FAST_ATTN_CUDA_ATTENTION_ARCH`` (read in fast_attn.backends) forces the sm_80 or the
sm_90a kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fast_attn import backends

COMPILED_HEAD_DIMS = (64, 128, 256)


def padded_head_dim(head_dim: int) -> int:
    """The compiled head dim that serves ``head_dim`` (the smallest one >= it)."""
    for compiled in COMPILED_HEAD_DIMS:
        if head_dim <= compiled:
            return compiled
    raise ValueError(f"head_dim must be at most {COMPILED_HEAD_DIMS[-1]} for the cuda backend, got {head_dim}")


def _pad(t: Tensor, head_dim: int) -> Tensor:
    return t if t.shape[-1] == head_dim else F.pad(t, (0, head_dim - t.shape[-1]))


def _int32(offsets: Tensor) -> Tensor:
    """cu_seqlens as the kernels read them: int32, contiguous."""
    return offsets.to(torch.int32).contiguous()


def _ops():
    from fast_attn._extension import load_extension

    load_extension()
    return torch.ops.fast_attn


def _fwd(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, seqlens_k=None, max_seqlen_q=0,
         max_seqlen_k=0, causal, softmax_scale, window, softcap) -> tuple[Tensor, Tensor]:
    head_dim = q.shape[-1]
    if k.numel() == 0:  # no key at all (e.g. varlen with total_k = 0): every row is masked
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
        return out, torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    padded = padded_head_dim(head_dim)
    out, lse = _ops().cuda_attention_fwd(
        _pad(q, padded), _pad(k, padded), _pad(v, padded), cu_seqlens_q, cu_seqlens_k, seqlens_k,
        max_seqlen_q, max_seqlen_k, softmax_scale, causal, window[0], window[1], softcap,
        backends.cuda_attention_arch(),
    )
    return out[..., :head_dim].contiguous(), lse


def _bwd(dout, q, k, v, out, lse, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
         max_seqlen_k=0, causal, softmax_scale, window, softcap, deterministic):
    head_dim = q.shape[-1]
    if k.numel() == 0:
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    padded = padded_head_dim(head_dim)
    dq, dk, dv = _ops().cuda_attention_bwd(
        *(_pad(t, padded) for t in (dout, q, k, v, out)), lse, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, softmax_scale, causal, window[0], window[1], softcap,
        deterministic, backends.cuda_attention_arch(),
    )
    return tuple(t[..., :head_dim] for t in (dq, dk, dv))


# The signatures below are those of the kernel tables in fast_attn/ops/attention*.py.


def attention_fwd(q, k, v, attn_mask, alibi_slopes, seed, causal, softmax_scale, window, softcap,
                  dropout_p):
    return _fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap)


def attention_bwd(dout, q, k, v, out, lse, attn_mask, alibi_slopes, seed, causal, softmax_scale,
                  window, softcap, dropout_p, deterministic, mask_grad, alibi_grad):
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
                      window=window, softcap=softcap, deterministic=deterministic)
    return dq, dk, dv, None, None


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
                         alibi_slopes, seed, causal, softmax_scale, window, softcap, dropout_p):
    return _fwd(q, k, v, cu_seqlens_q=_int32(cu_seqlens_q), cu_seqlens_k=_int32(cu_seqlens_k),
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal,
                softmax_scale=softmax_scale, window=window, softcap=softcap)


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         attn_mask, alibi_slopes, seed, causal, softmax_scale, window, softcap, dropout_p,
                         deterministic, mask_grad, alibi_grad):
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, cu_seqlens_q=_int32(cu_seqlens_q),
                      cu_seqlens_k=_int32(cu_seqlens_k), max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                      window=window, softcap=softcap, deterministic=deterministic)
    return dq, dk, dv, None, None


def attention_with_kvcache_fwd(q, k_cache, v_cache, k: Optional[Tensor], v: Optional[Tensor],
                               cache_seqlens: Optional[Tensor], alibi_slopes, causal, softmax_scale,
                               window, softcap):
    """Appends k/v into the caches in place (one scatter each, no host sync), then attends
    to the first ``cache_seqlens[b] + S_new`` keys of each cache row with split-KV."""
    batch = q.shape[0]
    seqlens_k = None
    if k is not None:
        positions = cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=q.device)
        rows = torch.arange(batch, device=q.device)[:, None]
        k_cache[rows, positions] = k
        v_cache[rows, positions] = v
        seqlens_k = (cache_seqlens + k.shape[1]).to(torch.int32)
    elif cache_seqlens is not None:
        seqlens_k = cache_seqlens.to(torch.int32)
    return _fwd(q, k_cache, v_cache, seqlens_k=seqlens_k, causal=causal, softmax_scale=softmax_scale,
                window=window, softcap=softcap)
