"""Variable-length (packed) attention: FlashAttention-2's varlen layout as a custom op.

``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``
attends each of B packed sequences independently, with the options and conventions of
``fast_attn.attention`` (see fast_attn/ops/attention.py); causal alignment is per sequence
and dropout uses the keep-mask of the padded batch, so a varlen call equals the padded
dense call. Custom ops ``fast_attn::attention_varlen_fwd`` / ``_bwd``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fast_attn.ops import _attention_core as core
from fast_attn.ops import _checks
from fast_attn.ops.attention_params import VARLEN, Packing

OP = "attention_varlen"

# ------------------------------------------------------------------------- custom ops


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
    params = core.params_from_schema(attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale,
                                     window_left, window_right, softcap, dropout_p, deterministic)
    packing = Packing(VARLEN, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_cu_seqlens_values(q, k, packing)
    return core.fwd(OP, q, k, v, params, packing, backend)


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
    params = core.params_from_schema(attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale,
                                     window_left, window_right, softcap, dropout_p, deterministic)
    packing = Packing(VARLEN, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    grads = core.BiasGrads(mask_grad, alibi_grad)
    return core.bwd(OP, dout, q, k, v, out, lse, params, packing, grads, backend)


_eager_fwd, _ = core.register(attention_varlen_fwd, attention_varlen_bwd, OP, VARLEN, packing_arity=4)


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
    core.check_qkv(q, k, v, q_ndim=3, layout="(total_k, Hkv, D)")
    batch = _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    softmax_scale, window, softcap, dropout_p = core.check_options(
        q, batch=batch, seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=dropout_seed,
        deterministic=deterministic, backend=backend,
    )
    out, lse = _eager_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
        alibi_slopes, core.seed_tensor(dropout_p, dropout_seed), causal, softmax_scale,
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


def _check_cu_seqlens_values(q: Tensor, k: Tensor, packing: Packing) -> None:
    """The packing's values; reads the (small) tensors, a device sync on CUDA."""
    packed = (("q", packing.cu_seqlens_q, q.shape[0], packing.max_seqlen_q),
              ("k", packing.cu_seqlens_k, k.shape[0], packing.max_seqlen_k))
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
