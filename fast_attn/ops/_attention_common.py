"""What the attention ops share: the call summary for backend selection, input checks,
the dropout seed, and the placeholders of absent outputs and gradients.

Used by fast_attn/ops/attention.py, attention_varlen.py and attention_kvcache.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _checks

NO_GRAD = (0,)  # shape of the placeholder returned for a gradient nobody asked for
SEED_LIMIT = 2**62  # seeds are drawn in [0, 2**62); users may pass any int in [0, 2**63)


# ----------------------------------------------------------------------- call summary


def call_summary(op, q, k, *, causal, window, alibi_slopes, softcap, attn_mask, dropout_p,
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


def seed_int(dropout_seed: Optional[Tensor], dropout_p: float) -> int:
    return int(dropout_seed.item()) if dropout_p > 0 and dropout_seed is not None else 0


def empty_outputs(q: Tensor, lse_shape) -> tuple[Tensor, Tensor]:
    """What a call with no queries or no keys returns: out 0, lse -inf (contiguous)."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)


def bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad, grads=(None, None)):
    """The dmask/dslopes outputs of a backward op: the gradient, or an empty placeholder."""
    dmask, dslopes = grads
    if mask_grad:
        dmask = torch.zeros_like(attn_mask) if dmask is None else dmask.contiguous()
    else:
        dmask = attn_mask.new_empty(NO_GRAD) if attn_mask is not None else torch.empty(NO_GRAD)
    if alibi_grad:
        dslopes = torch.zeros_like(alibi_slopes) if dslopes is None else dslopes.contiguous()
    else:
        dslopes = alibi_slopes.new_empty(NO_GRAD) if alibi_slopes is not None else torch.empty(NO_GRAD)
    return dmask, dslopes


def contiguous_grads(*tensors: Tensor) -> tuple:
    """Gradients are returned contiguous whatever the inputs' layout: the fake functions say so."""
    return tuple(t.contiguous() for t in tensors)


def bwd_fake(q, k, v, attn_mask, alibi_slopes, mask_grad, alibi_grad):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return *grads, *bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad)


def bias_grad_flags(ctx, attn_mask, mask_index):
    """Whether autograd wants the gradients of the additive mask and of the ALiBi slopes."""
    mask_grad = ctx.needs_input_grad[mask_index] and attn_mask is not None and attn_mask.is_floating_point()
    return bool(mask_grad), bool(ctx.needs_input_grad[mask_index + 1])


# -------------------------------------------------------------------------- validation


def check_qkv(q, k, v, *, q_ndim: int, layout: str) -> None:
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


def check_options(q, *, batch, seqlen_q, seqlen_k, causal, softmax_scale, window_size,
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
    window = check_window(window_size)
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
        check_mask(q, attn_mask, (batch, heads, seqlen_q, seqlen_k))
    if dropout_seed is not None:
        if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int):
            raise TypeError(f"dropout_seed must be an int or None, got {type(dropout_seed).__name__}")
        if not 0 <= dropout_seed < 2**63:
            raise ValueError(f"dropout_seed must be in [0, 2**63), got {dropout_seed}")
    backends.requested_backend(backend)
    return softmax_scale, window, softcap, dropout_p


def check_window(window_size: Sequence[int]) -> tuple[int, int]:
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def check_mask(q: Tensor, attn_mask: object, full_shape: tuple) -> None:
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


def seed_tensor(dropout_p: float, dropout_seed: Optional[int]) -> Optional[Tensor]:
    """The dropout seed as a CPU int64 scalar (a tensor, so torch.compile does not specialise)."""
    if dropout_p == 0:
        return None
    if dropout_seed is None:
        return torch.randint(0, SEED_LIMIT, (), dtype=torch.int64)
    return torch.tensor(dropout_seed, dtype=torch.int64)
