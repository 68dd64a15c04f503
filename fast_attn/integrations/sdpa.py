"""``torch.nn.functional.scaled_dot_product_attention``'s signature and semantics on fast_attn.

    from fast_attn import scaled_dot_product_attention
    out = scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, H, L, E)

Torch's semantics, kept here:

- Layout ``(..., H, L, E)`` for the query and ``(..., Hkv, S, E)`` / ``(..., Hkv, S, Ev)``
  for key and value: any number of leading batch dims (broadcast between the three, as
  torch's math backend does), 3-D ``(H, L, E)`` and 2-D ``(L, E)`` inputs included. The
  output has the query's layout: ``(..., H, L, Ev)``.
- ``is_causal`` keeps keys ``j <= i``, aligned to the TOP-LEFT corner even when
  ``L != S`` (fast_attn's own ``causal`` is bottom-right, FlashAttention's rule)::

      L=2, S=4 (1 = attend):  1 0 0 0       L=4, S=2:  1 0
                              1 1 0 0                  1 1
                                                       1 1
                                                       1 1

  ``is_causal`` together with an ``attn_mask`` raises, as in torch.
- ``attn_mask``: bool (True = takes part in attention) or float (added to the scores),
  broadcastable to ``(..., H, L, S)``; a float mask must be float32 or the query's dtype.
- ``scale`` defaults to ``1 / sqrt(E)``; ``enable_gqa=True`` lets K/V have fewer heads
  (``H % Hkv == 0``); without it the head counts must match, except that a single K/V
  head (or a single query head) broadcasts, as in torch.
- ``dropout_p`` drops attention weights and rescales the rest by ``1 / (1 - dropout_p)``;
  ``dropout_p = 1`` gives zeros.
- Errors where torch raises ``RuntimeError`` raise ``SDPAInputError``, which is both a
  ``RuntimeError`` (torch's type) and a ``ValueError`` (fast_attn's convention).

How: the ``(B, H, S, D)`` tensors are handed to ``fast_attn.attention`` as transposed
views (no copies; only inputs with more than one batch dim, or broadcast ones, may be
reshaped into one batch dim) and the result is returned as a ``(B, H, L, Ev)`` view.
Top-left causal becomes the window ``(-1, L - S)`` when ``L >= S`` and a bool ``(L, S)``
mask otherwise.

Differences from torch:

- ``Ev != E`` (value head dim unlike the query's) raises ``NotImplementedError``.
- A query row that may attend to no key gives 0 (with zero gradients), as torch 2.5+'s
  math backend does; some torch versions and fused backends give NaN.
- Dropout uses fast_attn's counter-based keep-mask (``fast_attn.dropout_mask``) with a
  seed drawn from torch's default CPU generator: same statistics as torch, other bits.
- A negative ``scale`` follows the documented formula (computed as ``|scale|`` on the
  negated query, one copy); torch's CPU math backend takes ``sqrt(scale)`` and returns
  NaN. Likewise ``scale=0`` with ``is_causal`` gives the uniform average over the allowed
  keys, where that backend gives NaN (``0 * -inf``).
- fast_attn's own validation (dtypes it does not support, devices, head dims a backend
  lacks) raises ``TypeError``/``ValueError``/``NotImplementedError``; the key and value
  sequence lengths must match (torch does not always check).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fast_attn.ops.attention import attention

__all__ = ["SDPAInputError", "scaled_dot_product_attention"]


class SDPAInputError(ValueError, RuntimeError):
    """Bad input that torch's SDPA rejects with a ``RuntimeError``."""


def _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise SDPAInputError(
            f"Expected query, key, and value to all be at least 2 dimensional, but got "
            f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )
    if not query.dtype == key.dtype == value.dtype:
        raise SDPAInputError(
            f"Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead."
        )
    if not query.device == key.device == value.device:
        raise SDPAInputError(
            f"Expected query, key, and value to have the same device type, but got "
            f"query.device: {query.device} key.device: {key.device} and value.device: "
            f"{value.device} instead."
        )
    if query.shape[-1] != key.shape[-1]:
        raise SDPAInputError(
            f"query and key must have the same head dim E, got {query.shape[-1]} and {key.shape[-1]}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise SDPAInputError(
            f"key and value must have the same sequence length S, got {key.shape[-2]} and {value.shape[-2]}"
        )
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(
            f"scaled_dot_product_attention: a value head dim Ev ({value.shape[-1]}) unlike the "
            f"query/key head dim E ({query.shape[-1]}) is not supported by fast_attn"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise SDPAInputError(
                f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead."
            )
        if is_causal:
            raise SDPAInputError(
                "_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True"
            )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise SDPAInputError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise TypeError("is_causal and enable_gqa must be bools")


def _with_heads(x: Tensor) -> Tensor:
    """A 2-D ``(S, E)`` input gets its single head: ``(1, S, E)`` (a view)."""
    return x.unsqueeze(0) if x.dim() == 2 else x


def _head_counts(heads: int, kv_heads: int, enable_gqa: bool) -> int:
    """The output's head count under torch's rules for query/key head counts."""
    if enable_gqa:
        if kv_heads < 1 or heads % kv_heads != 0:
            raise SDPAInputError(
                f"Number of heads in key and value must divide the number of heads in query "
                f"(query heads {heads}, key/value heads {kv_heads})"
            )
        return heads
    if heads == kv_heads or kv_heads == 1:
        return heads
    if heads == 1:
        return kv_heads  # a single query head broadcasts over the key heads
    raise SDPAInputError(
        f"The size of tensor a ({heads}) must match the size of tensor b ({kv_heads}) at "
        f"the head dimension: query has {heads} heads, key/value {kv_heads}; pass "
        f"enable_gqa=True for grouped-query attention"
    )


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Attention with ``torch.nn.functional.scaled_dot_product_attention``'s signature.

    Computes ``softmax(query @ key^T * scale + bias) @ value`` where ``bias`` is the float
    mask, or -inf where the bool mask is False or the (top-left) causal mask excludes a key.

    Args:
        query: ``(..., H, L, E)``; also ``(H, L, E)`` and ``(L, E)``.
        key: ``(..., Hkv, S, E)``; value: ``(..., Hkv, S, Ev)`` with ``Ev == E`` here.
        attn_mask: bool (True = attend) or float (float32 or query's dtype, added),
            broadcastable to ``(..., H, L, S)``.
        dropout_p: probability in [0, 1] of dropping an attention weight.
        is_causal: keep keys ``j <= i`` (top-left aligned); excludes attn_mask.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: allow ``Hkv < H`` with ``H % Hkv == 0``.

    Returns:
        ``(..., H, L, Ev)`` in query's dtype (the leading dims broadcast over the inputs').
    """
    _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    unbatched = query.dim() == 2  # (L, E): no head dim either
    q, k, v = _with_heads(query), _with_heads(key), _with_heads(value)
    seqlen_q, seqlen_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-3] != v.shape[-3]:
        raise SDPAInputError(
            f"key and value must have the same number of heads, got {k.shape[-3]} and {v.shape[-3]}"
        )
    heads = _head_counts(q.shape[-3], k.shape[-3], enable_gqa)
    try:
        batch_shape = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError as error:
        raise SDPAInputError(
            f"the batch dims of query {tuple(q.shape[:-3])}, key {tuple(k.shape[:-3])} and "
            f"value {tuple(v.shape[:-3])} do not broadcast"
        ) from error
    full_shape = (*batch_shape, heads, seqlen_q, seqlen_k)  # what the scores broadcast to

    # Everything becomes (B, H, S, D): one batch dim, views wherever the strides allow.
    def to_4d(x: Tensor, x_heads: int) -> Tensor:
        x = x.expand(*batch_shape, x_heads, x.shape[-2], x.shape[-1])
        return x.reshape(-1, *x.shape[-3:]) if len(batch_shape) != 1 else x

    q4 = to_4d(q, heads)  # (B, H, L, E); a single query head broadcasts over the key heads
    k4 = to_4d(k, k.shape[-3])  # (B, Hkv, S, E)
    v4 = to_4d(v, v.shape[-3])  # (B, Hkv, S, Ev)

    mask = attn_mask
    if mask is not None:
        try:
            ok = torch.broadcast_shapes(mask.shape, full_shape) == torch.Size(full_shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise SDPAInputError(
                f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the attention "
                f"weights' shape {full_shape}"
            )
        if len(full_shape) > 4:
            mask = mask.expand(full_shape).reshape(-1, heads, seqlen_q, seqlen_k)

    softmax_scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if softmax_scale < 0:
        q4, softmax_scale = -q4, -softmax_scale  # fast_attn takes a non-negative scale

    # Top-left causal: query i keeps keys j <= i. fast_attn aligns to the bottom-right,
    # where the right window edge sits at j = i + S - L + right: right = L - S gives j <= i.
    causal, window = False, (-1, -1)
    if is_causal and seqlen_q == seqlen_k:
        causal = True
    elif is_causal and seqlen_q > seqlen_k:
        window = (-1, seqlen_q - seqlen_k)
    elif is_causal:  # L < S: the right edge would be negative; mask explicitly
        rows = torch.arange(seqlen_q, device=q.device).view(seqlen_q, 1)
        mask = torch.arange(seqlen_k, device=q.device).view(1, seqlen_k) <= rows  # (L, S)

    everything_dropped = dropout_p == 1.0
    out = attention(
        q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2),  # (B, S, H, D) views
        causal=causal, softmax_scale=softmax_scale, window_size=window, attn_mask=mask,
        dropout_p=0.0 if everything_dropped else float(dropout_p),
    )  # (B, L, H, Ev)
    if everything_dropped:
        out = out * 0.0  # every weight dropped; keeps torch's autograd connection
    out = out.transpose(1, 2)  # (B, H, L, Ev)
    if unbatched:
        return out[0, 0]  # (L, Ev)
    return out.reshape(*batch_shape, heads, seqlen_q, out.shape[-1])
