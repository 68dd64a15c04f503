"""Attention ops: dense, variable-length (packed) and KV-cache decode.

Public functions (layout ``(batch, seqlen, heads, head_dim)``, FlashAttention's):

- ``attention(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap,
  attn_mask, dropout_p, dropout_seed, return_lse, deterministic, backend)``
- ``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``
- ``attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, ...)``
- ``dropout_mask(...)``: the keep-mask a call with a given ``dropout_seed`` used.

Scores are computed in this order (DESIGN.md): ``s = softmax_scale * q.k``; with
``softcap > 0``, ``s = softcap * tanh(s / softcap)``; ALiBi adds
``-slope * |i + Sk - Sq - j|``; an additive ``attn_mask`` is added; then the causal,
window and bool masks remove keys. Causal with ``Sq != Sk`` is aligned bottom-right::

    Sq=2, Sk=5, causal=True      (1 = may attend)
        k: 0 1 2 3 4
    q0:    1 1 1 1 0
    q1:    1 1 1 1 1

A query row that sees no key gets output 0 and LSE ``-inf`` (and zero gradients).
``lse`` is ``log(sum(exp(s)))`` over the kept keys, fp32 ``(B, H, Sq)`` (varlen:
``(H, total_q)``); it carries no gradient. A float ``attn_mask`` or ``alibi_slopes`` that
requires grad gets its gradient (a learned bias); only the torch backend computes those.

Dropout drops entries of the normalised attention matrix with probability ``dropout_p``
and scales the rest by ``1 / (1 - dropout_p)``. The keep-mask is a counter-based hash of
``(dropout_seed, b, h, i, j)`` shared by every backend, so the forward and the backward
see the same mask and ``dropout_mask(seed, ...)`` recovers it for verification. When
``dropout_seed`` is None a seed is drawn from torch's default CPU generator, so
``torch.manual_seed`` makes a run reproducible.

Each public function validates its inputs and calls a ``fast_attn::attention*`` custom op
whose implementation asks ``fast_attn.backends`` which backend runs the call.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _checks
from fast_attn.ops._reference_grad import reference_vjp
from fast_attn.reference.attention import (
    attention_ref,
    attention_varlen_ref,
    attention_with_kvcache_ref,
    dropout_keep_mask,
)

_NO_GRAD = (0,)  # shape of the placeholder returned for a gradient nobody asked for
_SEED_LIMIT = 2**62  # seeds are drawn in [0, 2**62); users may pass any int in [0, 2**63)


# ----------------------------------------------------------------------- call summary


def _call(op, q, k, *, causal, window, alibi_slopes, softcap, attn_mask, dropout_p,
          deterministic, backward, mask_grad=False, alibi_grad=False) -> backends.Call:
    feats = backends.features(
        mask_grad=mask_grad,
        alibi_grad=alibi_grad,
        causal=causal,
        window=tuple(window) != (-1, -1),
        alibi=alibi_slopes is not None,
        softcap=softcap > 0,
        bool_mask=attn_mask is not None and attn_mask.dtype == torch.bool,
        additive_mask=attn_mask is not None and attn_mask.dtype != torch.bool,
        dropout=dropout_p > 0,
        gqa=k.shape[-2] != q.shape[-2],
        deterministic=deterministic and backward,
        backward=backward,
    )
    return backends.Call(op, q.device.type, q.dtype, feats, head_dim=q.shape[-1])


def _seed_int(dropout_seed: Optional[Tensor], dropout_p: float) -> int:
    return int(dropout_seed.item()) if dropout_p > 0 and dropout_seed is not None else 0


# ------------------------------------------------------------------------- dense: ops


def _attention_torch(q, k, v, attn_mask, alibi_slopes, seed, causal, softmax_scale,
                     window, softcap, dropout_p):
    return attention_ref(
        q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window,
        alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=attn_mask,
        dropout_p=dropout_p, dropout_seed=seed,
    )


def _attention_bwd_torch(dout, q, k, v, out, lse, attn_mask, alibi_slopes, seed, causal,
                         softmax_scale, window, softcap, dropout_p, deterministic, mask_grad,
                         alibi_grad):
    def fn(q_, k_, v_, mask_, slopes_):
        return _attention_torch(q_, k_, v_, mask_, slopes_, seed, causal, softmax_scale,
                                window, softcap, dropout_p)[0]

    return reference_vjp(fn, (q, k, v, attn_mask, alibi_slopes), (dout,),
                         differentiable=(True, True, True, mask_grad, alibi_grad))


# Kernels by backend. A kernel issue adds its "triton"/"cuda" entries here and its
# CAPABILITIES in fast_attn/backends.py.
_FWD = {"torch": _attention_torch}
_BWD = {"torch": _attention_bwd_torch}


def _empty_outputs(q: Tensor, lse_shape) -> tuple[Tensor, Tensor]:
    """What a call with no queries or no keys returns: out 0, lse -inf (contiguous)."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)


def _bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad, grads=(None, None)):
    """The dmask/dslopes outputs of a backward op: the gradient, or an empty placeholder."""
    dmask, dslopes = grads
    if mask_grad:
        dmask = torch.zeros_like(attn_mask) if dmask is None else dmask.contiguous()
    else:
        dmask = attn_mask.new_empty(_NO_GRAD) if attn_mask is not None else torch.empty(_NO_GRAD)
    if alibi_grad:
        dslopes = torch.zeros_like(alibi_slopes) if dslopes is None else dslopes.contiguous()
    else:
        dslopes = alibi_slopes.new_empty(_NO_GRAD) if alibi_slopes is not None else torch.empty(_NO_GRAD)
    return dmask, dslopes


def _contiguous(*tensors: Tensor) -> tuple:
    """Gradients are returned contiguous whatever the inputs' layout: the fake functions say so."""
    return tuple(t.contiguous() for t in tensors)


@torch.library.custom_op("fast_attn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_seed: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out (B, Sq, H, D), lse fp32 (B, H, Sq))."""
    window = (window_left, window_right)
    call = _call("attention", q, k, causal=causal, window=window, alibi_slopes=alibi_slopes,
                 softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p,
                 deterministic=deterministic, backward=False)
    name = backends.resolve_backend(call, backend)
    if q.numel() == 0 or k.shape[1] == 0:
        batch, seqlen_q, heads, _ = q.shape
        return _empty_outputs(q, (batch, heads, seqlen_q))
    out, lse = _FWD[name](q, k, v, attn_mask, alibi_slopes, _seed_int(dropout_seed, dropout_p),
                          causal, softmax_scale, window, softcap, dropout_p)
    return out, lse.float()


@attention_fwd.register_fake
def _(q, k, v, attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale, window_left,
      window_right, softcap, dropout_p, deterministic, backend):
    batch, seqlen_q, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("fast_attn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_seed: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    mask_grad: bool,
    alibi_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask, dslopes); dk/dv are summed over the query heads that share a
    K/V head; dmask/dslopes are empty unless mask_grad/alibi_grad ask for them."""
    window = (window_left, window_right)
    call = _call("attention", q, k, causal=causal, window=window, alibi_slopes=alibi_slopes,
                 softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p,
                 deterministic=deterministic, backward=True, mask_grad=mask_grad,
                 alibi_grad=alibi_grad)
    name = backends.resolve_backend(call, backend)
    if q.numel() == 0 or k.shape[1] == 0:
        zeros = tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        return *zeros, *_bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad)
    dq, dk, dv, dmask, dslopes = _BWD[name](
        dout, q, k, v, out, lse, attn_mask, alibi_slopes, _seed_int(dropout_seed, dropout_p),
        causal, softmax_scale, window, softcap, dropout_p, deterministic, mask_grad, alibi_grad,
    )
    return (*_contiguous(dq, dk, dv),
            *_bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad, (dmask, dslopes)))


def _bwd_fake(q, k, v, attn_mask, alibi_slopes, mask_grad, alibi_grad):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return *grads, *_bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale,
      window_left, window_right, softcap, dropout_p, deterministic, mask_grad, alibi_grad,
      backend):
    return _bwd_fake(q, k, v, attn_mask, alibi_slopes, mask_grad, alibi_grad)


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, dropout_seed, *options = inputs
    out, lse = output
    ctx.options = options
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed)


def _bias_grad_flags(ctx, attn_mask, mask_index):
    """Whether autograd wants the gradients of the additive mask and of the ALiBi slopes."""
    mask_grad = ctx.needs_input_grad[mask_index] and attn_mask is not None and attn_mask.is_floating_point()
    return bool(mask_grad), bool(ctx.needs_input_grad[mask_index + 1])


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed = ctx.saved_tensors
    *options, backend = ctx.options
    mask_grad, alibi_grad = _bias_grad_flags(ctx, attn_mask, 3)
    dq, dk, dv, dmask, dslopes = attention_bwd(
        dout, q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed, *options, mask_grad,
        alibi_grad, backend,
    )
    return (dq, dk, dv, dmask if mask_grad else None, dslopes if alibi_grad else None, None,
            *([None] * len(ctx.options)))


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# ----------------------------------------------------------------------- varlen: ops


def _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  attn_mask, alibi_slopes, seed, causal, softmax_scale, window, softcap,
                  dropout_p):
    return attention_varlen_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, window_size=window, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=seed,
    )


def _varlen_bwd_torch(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, attn_mask, alibi_slopes, seed, causal, softmax_scale,
                      window, softcap, dropout_p, deterministic, mask_grad, alibi_grad):
    def fn(q_, k_, v_, mask_, slopes_):
        return _varlen_torch(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, mask_, slopes_, seed, causal, softmax_scale,
                             window, softcap, dropout_p)[0]

    return reference_vjp(fn, (q, k, v, attn_mask, alibi_slopes), (dout,),
                         differentiable=(True, True, True, mask_grad, alibi_grad))


_VARLEN_FWD = {"torch": _varlen_torch}
_VARLEN_BWD = {"torch": _varlen_bwd_torch}


@torch.library.custom_op("fast_attn::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    attn_mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_seed: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out (total_q, H, D), lse fp32 (H, total_q))."""
    window = (window_left, window_right)
    call = _call("attention_varlen", q, k, causal=causal, window=window,
                 alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=attn_mask,
                 dropout_p=dropout_p, deterministic=deterministic, backward=False)
    name = backends.resolve_backend(call, backend)
    _check_cu_seqlens_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if q.numel() == 0:
        return _empty_outputs(q, (q.shape[1], q.shape[0]))
    out, lse = _VARLEN_FWD[name](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, attn_mask, alibi_slopes,
                                 _seed_int(dropout_seed, dropout_p), causal, softmax_scale,
                                 window, softcap, dropout_p)
    return out, lse.float()


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, *args):
    total_q, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((heads, total_q), dtype=torch.float32)


@torch.library.custom_op("fast_attn::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    attn_mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_seed: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    mask_grad: bool,
    alibi_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask, dslopes), as attention_bwd."""
    window = (window_left, window_right)
    call = _call("attention_varlen", q, k, causal=causal, window=window,
                 alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=attn_mask,
                 dropout_p=dropout_p, deterministic=deterministic, backward=True,
                 mask_grad=mask_grad, alibi_grad=alibi_grad)
    name = backends.resolve_backend(call, backend)
    if q.numel() == 0 or k.numel() == 0:
        zeros = tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        return *zeros, *_bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad)
    dq, dk, dv, dmask, dslopes = _VARLEN_BWD[name](
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        attn_mask, alibi_slopes, _seed_int(dropout_seed, dropout_p), causal, softmax_scale,
        window, softcap, dropout_p, deterministic, mask_grad, alibi_grad,
    )
    return (*_contiguous(dq, dk, dv),
            *_bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad, (dmask, dslopes)))


@attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale, window_left, window_right,
      softcap, dropout_p, deterministic, mask_grad, alibi_grad, backend):
    return _bwd_fake(q, k, v, attn_mask, alibi_slopes, mask_grad, alibi_grad)


def _varlen_setup(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
     alibi_slopes, dropout_seed, *options) = inputs
    out, lse = output
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.options = options
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, attn_mask,
                          alibi_slopes, dropout_seed)


def _varlen_backward(ctx, dout, _dlse):
    (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, attn_mask, alibi_slopes,
     dropout_seed) = ctx.saved_tensors
    *options, backend = ctx.options
    mask_grad, alibi_grad = _bias_grad_flags(ctx, attn_mask, 7)
    dq, dk, dv, dmask, dslopes = attention_varlen_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, attn_mask,
        alibi_slopes, dropout_seed, *options, mask_grad, alibi_grad, backend,
    )
    return (dq, dk, dv, None, None, None, None, dmask if mask_grad else None,
            dslopes if alibi_grad else None, *([None] * (1 + len(ctx.options))))


attention_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# ---------------------------------------------------------------------- kv-cache: op


def _kvcache_torch(q, k_cache, v_cache, k, v, cache_seqlens, alibi_slopes, causal,
                   softmax_scale, window, softcap):
    return attention_with_kvcache_ref(
        q, k_cache, v_cache, k, v, cache_seqlens, causal=causal,
        softmax_scale=softmax_scale, window_size=window, alibi_slopes=alibi_slopes,
        softcap=softcap,
    )


_KVCACHE_FWD = {"torch": _kvcache_torch}


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
    window = (window_left, window_right)
    call = _call("attention_with_kvcache", q, k_cache, causal=causal, window=window,
                 alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=None, dropout_p=0.0,
                 deterministic=False, backward=False)
    name = backends.resolve_backend(call, backend)
    new_len = 0 if k is None else k.shape[1]
    _check_cache_seqlens_values(cache_seqlens, k_cache.shape[1], new_len)
    out, lse = _KVCACHE_FWD[name](q, k_cache, v_cache, k, v, cache_seqlens, alibi_slopes,
                                  causal, softmax_scale, window, softcap)
    return out, lse.float()


@attention_with_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, *args):
    batch, seqlen_q, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


# -------------------------------------------------------------------------- validation


def _check_qkv(q, k, v, *, q_ndim: int, layout: str) -> None:
    _checks.check_tensor("q", q, ndim=q_ndim)
    _checks.check_tensor("k", k, ndim=q_ndim)
    _checks.check_tensor("v", v, ndim=q_ndim)
    _checks.check_same_dtype("q", q, k=k, v=v)
    _checks.check_same_device("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {layout}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q_ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] < 1:
        raise ValueError("head_dim (the last dimension of q) must be >= 1")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"the number of query heads ({heads}) must be a multiple of the number of "
            f"key/value heads ({kv_heads})"
        )


def _check_options(q, *, batch, seqlen_q, seqlen_k, causal, softmax_scale, window_size,
                   alibi_slopes, softcap, attn_mask, dropout_p, dropout_seed, deterministic,
                   backend):
    """Validates the shared options; returns (softmax_scale, window, softcap, dropout_p)."""
    heads, head_dim = q.shape[-2], q.shape[-1]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    softmax_scale = _checks.check_float("softmax_scale", softmax_scale, low=0.0, high=float("inf"),
                                        high_inclusive=False)
    window = _check_window(window_size)
    softcap = _checks.check_float("softcap", softcap, low=0.0, high=float("inf"), high_inclusive=False)
    dropout_p = _checks.check_float("dropout_p", dropout_p, low=0.0, high=1.0, high_inclusive=False)
    if alibi_slopes is not None:
        _checks.check_tensor("alibi_slopes", alibi_slopes)
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(
                f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        _checks.check_same_device("q", q, alibi_slopes=alibi_slopes)
    if attn_mask is not None:
        _check_mask(q, attn_mask, (batch, heads, seqlen_q, seqlen_k))
    if dropout_seed is not None:
        if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int):
            raise TypeError(f"dropout_seed must be an int or None, got {type(dropout_seed).__name__}")
        if not 0 <= dropout_seed < 2**63:
            raise ValueError(f"dropout_seed must be in [0, 2**63), got {dropout_seed}")
    backends.requested_backend(backend)
    return softmax_scale, window, softcap, dropout_p


def _check_window(window_size: Sequence[int]) -> tuple[int, int]:
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def _check_mask(q: Tensor, attn_mask: object, full_shape: tuple) -> None:
    _checks.check_tensor("attn_mask", attn_mask, float_dtype=False)
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = may attend) or a float dtype, got {attn_mask.dtype}")
    _checks.check_same_device("q", q, attn_mask=attn_mask)
    shape = tuple(attn_mask.shape)
    ok = len(shape) <= 4 and all(
        size in (1, full) for size, full in zip(reversed(shape), reversed(full_shape))
    )
    if not ok:
        raise ValueError(f"attn_mask must be broadcastable to (B, H, Sq, Sk) = {full_shape}, got {shape}")


def _seed_tensor(dropout_p: float, dropout_seed: Optional[int]) -> Optional[Tensor]:
    """The dropout seed as a CPU int64 scalar (a tensor, so torch.compile does not specialise)."""
    if dropout_p == 0:
        return None
    if dropout_seed is None:
        return torch.randint(0, _SEED_LIMIT, (), dtype=torch.int64)
    return torch.tensor(dropout_seed, dtype=torch.int64)


# -------------------------------------------------------------------------- public API


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
):
    """Scaled dot-product attention, FlashAttention layout.

    Args:
        q: ``(B, Sq, H, D)``, float16/bfloat16/float32/float64. Any strides with a
            contiguous last dimension; ``(B, H, S, D)`` tensors are passed as
            ``x.transpose(1, 2)`` views.
        k, v: ``(B, Sk, Hkv, D)``, q's dtype and device; ``H % Hkv == 0`` (GQA/MQA).
        causal: mask keys after the query, bottom-right aligned when ``Sq != Sk``.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        window_size: ``(left, right)``: query i keeps keys
            ``j in [i + Sk - Sq - left, i + Sk - Sq + right]``; -1 = unbounded.
        alibi_slopes: float32 ``(H,)`` or ``(B, H)``: adds ``-slope * |i + Sk - Sq - j|``.
        softcap: > 0 applies ``softcap * tanh(s / softcap)`` to the scaled scores.
        attn_mask: bool (True = may attend) or additive float, broadcastable to
            ``(B, H, Sq, Sk)``.
        dropout_p: dropout probability in [0, 1) on the attention matrix.
        dropout_seed: seed of the dropout mask (see ``dropout_mask``); drawn from torch's
            default generator when None.
        return_lse: also return the log-sum-exp, fp32 ``(B, H, Sq)`` (no gradient).
        deterministic: ask for a bitwise-reproducible backward.
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        ``out (B, Sq, H, D)`` in q's dtype, or ``(out, lse)`` with ``return_lse``.
    """
    _check_qkv(q, k, v, q_ndim=4, layout="(B, Sk, Hkv, D)")
    batch, seqlen_q, _, _ = q.shape
    softmax_scale, window, softcap, dropout_p = _check_options(
        q, batch=batch, seqlen_q=seqlen_q, seqlen_k=k.shape[1], causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=dropout_seed,
        deterministic=deterministic, backend=backend,
    )
    out, lse = attention_fwd(
        q, k, v, attn_mask, alibi_slopes, _seed_tensor(dropout_p, dropout_seed), causal,
        softmax_scale, window[0], window[1], softcap, dropout_p, deterministic, backend,
    )
    return (out, lse) if return_lse else out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
):
    """Attention over sequences packed without padding (FlashAttention-2's varlen layout).

    Args:
        q: ``(total_q, H, D)``: the B sequences' queries concatenated.
        k, v: ``(total_k, Hkv, D)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)``, non-decreasing, starting at 0 and
            ending at total_q / total_k: sequence b is rows
            ``[cu_seqlens[b], cu_seqlens[b + 1])``; zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (upper bounds).
        attn_mask: broadcastable to ``(B, H, max_seqlen_q, max_seqlen_k)``, in the padded
            coordinates: sequence b uses ``attn_mask[b, :, :Sq_b, :Sk_b]``.
        Other options as ``attention``; causal alignment is per sequence. Dropout uses
        the mask of the padded batch, so a varlen call equals the padded dense call.

    Returns:
        ``out (total_q, H, D)``, or ``(out, lse)`` with lse fp32 ``(H, total_q)``.
    """
    _check_qkv(q, k, v, q_ndim=3, layout="(total_k, Hkv, D)")
    batch = _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    softmax_scale, window, softcap, dropout_p = _check_options(
        q, batch=batch, seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=dropout_seed,
        deterministic=deterministic, backend=backend,
    )
    out, lse = attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
        alibi_slopes, _seed_tensor(dropout_p, dropout_seed), causal, softmax_scale,
        window[0], window[1], softcap, dropout_p, deterministic, backend,
    )
    return (out, lse) if return_lse else out


def _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> int:
    """Validates the packing's types and shapes; returns the number of sequences B.

    The values are checked by ``_check_cu_seqlens_values`` inside the op, where the
    tensors are real even under torch.compile.
    """
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _checks.check_tensor(name, cu, ndim=1, float_dtype=False)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        _checks.check_same_device("q", q, **{name: cu})
        if cu.shape[0] < 1:
            raise ValueError(f"{name} must have B + 1 >= 1 entries, got none")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got "
            f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    return cu_seqlens_q.shape[0] - 1


def _check_cu_seqlens_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """The packing's values; reads the (small) tensors, a device sync on CUDA."""
    packed = (("q", cu_seqlens_q, q.shape[0], max_seqlen_q), ("k", cu_seqlens_k, k.shape[0], max_seqlen_k))
    for suffix, cu, total, longest_allowed in packed:
        name = f"cu_seqlens_{suffix}"
        values = cu.tolist()
        if values[0] != 0 or values[-1] != total:
            raise ValueError(
                f"{name} must start at 0 and end at {total} (the packed length of {suffix}), "
                f"got {values[0]} .. {values[-1]}"
            )
        lengths = [b - a for a, b in zip(values, values[1:])]
        if any(length < 0 for length in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {values}")
        if lengths and max(lengths) > longest_allowed:
            raise ValueError(
                f"max_seqlen_{suffix} ({longest_allowed}) is smaller than the longest sequence "
                f"({max(lengths)})"
            )


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
    _check_qkv(q, k_cache, v_cache, q_ndim=4, layout="(B, S_cache, Hkv, D)")
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
    softmax_scale, window, softcap, _ = _check_options(
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
    out, lse = attention_with_kvcache_op(
        q, k_cache, v_cache, k, v, cache_seqlens, alibi_slopes, causal, softmax_scale,
        window[0], window[1], softcap, backend,
    )
    return (out, lse) if return_lse else out


def _check_cache_seqlens(q, cache_seqlens, batch, new_len) -> Optional[Tensor]:
    """Validates cache_seqlens' type and shape (an int becomes a tensor); the values are
    checked by ``_check_cache_seqlens_values`` inside the op."""
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


def _check_cache_seqlens_values(cache_seqlens: Optional[Tensor], cache_len: int, new_len: int) -> None:
    """Every row's filled length plus the appended keys must fit in the cache (a device
    sync on CUDA: the alternative is writing past the cache)."""
    if cache_seqlens is None or cache_seqlens.numel() == 0:
        return
    low, high = int(cache_seqlens.min()), int(cache_seqlens.max())
    if low < 0 or high + new_len > cache_len:
        raise ValueError(
            f"cache_seqlens + S_new must lie in [0, {cache_len}] (the cache length); got "
            f"cache_seqlens in [{low}, {high}] with S_new = {new_len}"
        )


def dropout_mask(
    dropout_seed: int,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """The bool keep-mask ``(B, H, Sq, Sk)`` (True = kept) that ``attention(...,
    dropout_p=dropout_p, dropout_seed=dropout_seed)`` applies, on every backend.

    For ``attention_varlen`` pass the padded sizes ``(B, H, max_seqlen_q, max_seqlen_k)``:
    sequence b uses ``mask[b, :, :Sq_b, :Sk_b]``.
    """
    return dropout_keep_mask(dropout_seed, batch, heads, seqlen_q, seqlen_k, dropout_p, device)
