"""Rotary position embedding for the "torch" backend: plain ATen maths on any device.

What: ``rotary(x, cos, sin, offsets, offset, interleaved, conjugate) -> out``, the contract
every backend module keeps (fast_attn/ops/rotary.py documents the arguments). The forward
and the backward are the same function: the backward rotates the incoming gradient by
the opposite angle (``conjugate=True`` negates sin), since a rotation's transpose is its
inverse.

Algorithm: the table rows of every (b, s) are gathered once (a slice for an int offset, an
index for per-batch offsets), and each pair ``(x1, x2)`` becomes ``(x1 cos - x2 sin,
x1 sin + x2 cos)`` in fp32 (fp64 for fp64 x), written straight into the strided halves of
a fresh contiguous output (one rounding to x's dtype); features past rotary_dim are
copied. No input checks (the op layer does them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["rotary"]


def rotary(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor], offset: int,
           interleaved: bool, conjugate: bool) -> Tensor:
    """``x (B, S, H, D)`` rotated at positions ``s + offsets[b]`` (or ``s + offset``);
    returns a contiguous tensor of x's shape and dtype."""
    batch, seqlen = x.shape[0], x.shape[1]
    half = cos.shape[1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if offsets is None:
        c, s = cos[offset:offset + seqlen], sin[offset:offset + seqlen]  # (S, R/2)
    else:
        positions = offsets.to(torch.int64).view(batch, 1) + torch.arange(seqlen, device=x.device)
        c, s = cos[positions], sin[positions]  # (B, S, R/2)
    c = c.to(compute).unsqueeze(-2)  # broadcast over the heads
    s = s.to(compute).unsqueeze(-2)
    if conjugate:
        s = -s
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if interleaved:  # GPT-J: pairs (2m, 2m + 1)
        first, second = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
    else:  # GPT-NeoX: pairs (m, m + R/2)
        first, second = slice(0, half), slice(half, 2 * half)
    x1, x2 = x[..., first].to(compute), x[..., second].to(compute)
    out[..., first] = x1 * c - x2 * s
    out[..., second] = x1 * s + x2 * c
    out[..., 2 * half:] = x[..., 2 * half:]
    return out
