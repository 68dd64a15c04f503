"""KV-cache attention, the decode step of generation, as a custom op.

``attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, ...)`` appends the new
keys/values into the caches in place, then attends q to each row's filled prefix, with
the options and conventions of ``fast_attn.attention`` (fast_attn/ops/attention.py).
Forward only. Custom op ``fast_attn::attention_with_kvcache`` (mutates the caches).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fast_attn.ops import _attention_core as core
from fast_attn.ops import _checks
from fast_attn.ops._eager import EagerOp
from fast_attn.ops.attention_params import DENSE_PACKING, AttentionParams

# ------------------------------------------------------------------------- custom op


@torch.library.custom_op("fast_attn::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def attention_with_kvcache_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor],
    v: Optional[Tensor],
    cache_seqlens: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Appends k/v into the caches in place, then (out (B, Sq, H, D), lse (B, H, Sq))."""
    params = AttentionParams(softmax_scale, causal=causal, window=(window_left, window_right),
                             softcap=softcap, alibi_slopes=alibi_slopes)
    return core.append_and_attend(q, k_cache, v_cache, k, v, cache_seqlens, params, backend)


@attention_with_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, *args):
    return core.fwd_fake(q, DENSE_PACKING)


_eager_op = EagerOp(attention_with_kvcache_op, attention_with_kvcache_op._init_fn)


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens: Union[Tensor, int, None] = None,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """One decoding step: append the new keys/values to the cache in place, then attend.

    Args:
        q: ``(B, Sq, H, D)``, usually ``Sq = 1``.
        k_cache, v_cache: ``(B, S_cache, Hkv, D)``, q's dtype; written in place.
        k, v: the new ``(B, S_new, Hkv, D)`` entries, or both None.
        cache_seqlens: int32 ``(B,)`` or an int: how many cache rows are filled before
            this step; k/v go to rows ``[cache_seqlens[b], cache_seqlens[b] + S_new)``.
            None means the whole cache is filled (then k and v must be None).
        Other options as ``attention``; keys beyond ``cache_seqlens[b] + S_new`` are
        ignored and causal alignment uses that length. Forward only: no gradient.

    Returns:
        ``out (B, Sq, H, D)``, or ``(out, lse)`` with lse fp32 ``(B, H, Sq)``.
    """
    core.check_qkv(q, k_cache, v_cache, q_ndim=4, layout="(B, S_cache, Hkv, D)")
    batch, seqlen_q, _, _ = q.shape
    cache_len = k_cache.shape[1]
    new_len = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (both None or both tensors)")
    if k is not None:
        _checks.check_tensor("k", k, ndim=4)
        _checks.check_tensor("v", v, ndim=4)
        expected = (batch, k.shape[1], k_cache.shape[2], k_cache.shape[3])
        _checks.check_shape("k", k, expected, "(B, S_new, Hkv, D)")
        _checks.check_shape("v", v, expected, "(B, S_new, Hkv, D)")
        _checks.check_same_dtype("k_cache", k_cache, k=k, v=v)
        _checks.check_same_device("q", q, k=k, v=v)
        new_len = k.shape[1]
    cache_seqlens = _check_cache_seqlens(q, cache_seqlens, batch, new_len)
    softmax_scale, window, softcap, _ = core.check_options(
        q, batch=batch, seqlen_q=seqlen_q, seqlen_k=cache_len, causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=None, dropout_p=0.0, dropout_seed=None,
        deterministic=False, backend=backend,
    )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "attention_with_kvcache is forward only: call it under torch.no_grad() or "
            "with tensors that do not require grad (use attention() to train)"
        )
    out, lse = _eager_op(
        q, k_cache, v_cache, k, v, cache_seqlens, alibi_slopes, causal, softmax_scale,
        window[0], window[1], softcap, backend,
    )
    return (out, lse) if return_lse else out


def _check_cache_seqlens(q, cache_seqlens, batch, new_len) -> Optional[Tensor]:
    """Validates cache_seqlens' type and shape (an int becomes a tensor); the values are
    checked by ``_attention_core.check_cache_seqlens_values`` inside the op, before the append."""
    if cache_seqlens is None:
        if new_len:
            raise ValueError("cache_seqlens is required when appending k/v: where do they go?")
        return None
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    _checks.check_tensor("cache_seqlens", cache_seqlens, ndim=1, float_dtype=False)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32 (or a Python int), got {cache_seqlens.dtype}")
    _checks.check_shape("cache_seqlens", cache_seqlens, (batch,), "(B,)")
    _checks.check_same_device("q", q, cache_seqlens=cache_seqlens)
    return cache_seqlens
