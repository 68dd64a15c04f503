"""Rotary position embedding (RoPE): the custom op, its fake function and autograd.

Public function: ``rotary(x, cos, sin, *, interleaved=False, seqlen_offsets=0, backend="auto")``,
with the semantics of FlashAttention-2's ``flash_attn.layers.rotary.apply_rotary_emb``
(see its docstring below).

Layers: ``fast_attn::rotary`` is one torch.library custom op for both directions: its
``conjugate`` flag rotates by ``-sin``, which is the backward (a rotation's transpose is
its inverse), so the registered autograd calls the same op with the flag flipped. The
implementation dispatches (``_dispatch.py``) to the chosen backend's ``rotary.rotary``
(torch or triton; the cuda backend has none). An int offset travels as an int argument
and a per-batch one as a tensor; the per-batch range check reads the tensor, so it runs
inside the op (when the op runs, never while torch.compile traces).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _checks
from fast_attn.ops._dispatch import call_summary, dispatch
from fast_attn.ops._eager import EagerOp

FAMILY = "rotary"  # the backend modules' family name (fast_attn/ops/_dispatch.py)
OFFSET_DTYPES = (torch.int32, torch.int64)


def _check_offsets_range(offsets: Tensor, seqlen: int, seqlen_ro: int) -> None:
    """Per-batch offsets must keep every position inside the tables (one host sync)."""
    if offsets.numel() == 0 or seqlen == 0:
        return
    low, high = int(offsets.min()), int(offsets.max())
    if low < 0 or high + seqlen > seqlen_ro:
        raise ValueError(
            f"seqlen_offsets + S must lie in [0, {seqlen_ro}] (seqlen_ro, the rows of cos/sin); "
            f"got seqlen_offsets in [{low}, {high}] with S = {seqlen}"
        )


@torch.library.custom_op("fast_attn::rotary", mutates_args=())
def rotary_op(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    seqlen_offsets: Optional[Tensor],
    seqlen_offset: int,
    interleaved: bool,
    conjugate: bool,
    backend: str,
) -> Tensor:
    """``x`` rotated by ``cos``/``sin`` (by ``-sin`` when ``conjugate``), contiguous.

    ``seqlen_offsets`` (int32/int64 ``(B,)``) when given, else ``seqlen_offset`` for every row.
    """
    call = call_summary("rotary", x, interleaved=interleaved, batch_offsets=seqlen_offsets is not None,
                        backward=conjugate)
    if seqlen_offsets is not None:
        _check_offsets_range(seqlen_offsets, x.shape[1], cos.shape[0])
    empty = (lambda: torch.empty(x.shape, dtype=x.dtype, device=x.device)) if x.numel() == 0 else None
    out = dispatch(call, backend, FAMILY, "rotary", empty,
                   x, cos, sin, seqlen_offsets, seqlen_offset, interleaved, conjugate)
    return out.contiguous()  # the fake function promises a contiguous output


@rotary_op.register_fake
def _(x, cos, sin, seqlen_offsets, seqlen_offset, interleaved, conjugate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rotary_setup(ctx, inputs, output):
    _, cos, sin, seqlen_offsets, seqlen_offset, interleaved, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets)
    ctx.seqlen_offset, ctx.interleaved, ctx.conjugate, ctx.backend = seqlen_offset, interleaved, conjugate, backend


def _rotary_backward(ctx, dy):
    cos, sin, seqlen_offsets = ctx.saved_tensors
    dx = _eager_rotary(dy, cos, sin, seqlen_offsets, ctx.seqlen_offset, ctx.interleaved,
                       not ctx.conjugate, ctx.backend)
    return dx, None, None, None, None, None, None, None  # no gradient for cos/sin


rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup)

# What the public function and the backward call (see _eager.py).
_eager_rotary = EagerOp(rotary_op, rotary_op._init_fn, _rotary_setup, _rotary_backward)


# ------------------------------------------------------------------------- public API


def _validate(x, cos, sin, interleaved, seqlen_offsets, backend):
    """(offsets tensor or None, int offset) after checking every argument."""
    _checks.check_tensor("x", x, ndim=4)
    for name, table in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(name, table, ndim=2)
    _checks.check_same_device("x", x, cos=cos, sin=sin)
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    seqlen_ro, half = cos.shape
    head_dim = x.shape[3]
    if half < 1 or 2 * half > head_dim:
        raise ValueError(
            f"cos must have shape (seqlen_ro, rotary_dim / 2) with 2 <= rotary_dim <= D "
            f"(x's last dimension, {head_dim}), got {tuple(cos.shape)}"
        )
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    backends.check_name(backend)
    seqlen = x.shape[1]
    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.dtype not in OFFSET_DTYPES:
            raise TypeError(f"seqlen_offsets must be an int or an int32/int64 tensor, got {seqlen_offsets.dtype}")
        _checks.check_shape("seqlen_offsets", seqlen_offsets, (x.shape[0],), "(B,)")
        _checks.check_same_device("x", x, seqlen_offsets=seqlen_offsets)
        return seqlen_offsets, 0
    if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, (int, torch.SymInt)):
        raise TypeError(f"seqlen_offsets must be an int or an int32/int64 tensor, got {type(seqlen_offsets).__name__}")
    if seqlen_offsets < 0 or seqlen_offsets + seqlen > seqlen_ro:
        raise ValueError(
            f"seqlen_offsets + S must lie in [0, {seqlen_ro}] (seqlen_ro, the rows of cos/sin); "
            f"got seqlen_offsets = {seqlen_offsets} with S = {seqlen}"
        )
    return None, seqlen_offsets


def rotary(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    interleaved: bool = False,
    seqlen_offsets: Union[int, Tensor] = 0,
    backend: str = "auto",
) -> Tensor:
    """Rotary position embedding of ``x``, as FlashAttention-2's ``apply_rotary_emb``.

    Feature pairs ``(x1, x2)`` of row b at position s become
    ``(x1 cos - x2 sin, x1 sin + x2 cos)`` with ``cos[s + offset_b, m]``, ``sin[s + offset_b, m]``.

    Args:
        x: ``(B, S, H, D)``, float16/bfloat16/float32/float64, any strides.
        cos, sin: ``(seqlen_ro, rotary_dim / 2)`` with ``rotary_dim <= D``, any float dtype
            (read in the compute dtype). Features ``[rotary_dim, D)`` pass through unchanged.
        interleaved: False pairs features ``(m, m + rotary_dim / 2)`` (GPT-NeoX, Llama);
            True pairs ``(2m, 2m + 1)`` (GPT-J).
        seqlen_offsets: an int, or an int32/int64 tensor ``(B,)``: row b, position s uses
            table row ``s + offset_b`` (decoding with a KV cache). ``S + offset`` must not
            exceed seqlen_ro: ValueError otherwise (a per-batch tensor is checked when the
            op runs, one device-to-host read).
        backend: "auto", "triton" or "torch" (see ``fast_attn.backends``; the cuda backend
            has no rotary kernel).

    Returns:
        A new contiguous tensor of x's shape and dtype, computed in fp32 (fp64 for fp64).

    Gradients flow to ``x`` only (the rotation by ``-sin``); ``cos`` and ``sin`` get none.
    """
    offsets, offset = _validate(x, cos, sin, interleaved, seqlen_offsets, backend)
    return _eager_rotary(x, cos, sin, offsets, offset, interleaved, False, backend)
