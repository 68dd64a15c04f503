"""Rotary position embedding (RoPE) in Triton: one kernel for the forward and the backward.

What: ``rotary(x, cos, sin, offsets, offset, interleaved, conjugate) -> out``, the backend
contract of fast_attn/ops/rotary.py. ``x (B, S, H, D)`` with any strides; ``cos``/``sin``
``(seqlen_ro, R/2)``; row b, position s reads table row ``s + offsets[b]`` (``s + offset``
without the per-batch tensor). Each pair ``(x1, x2)`` becomes ``(x1 c - x2 s, x1 s + x2 c)``
in fp32, rounded once to x's dtype; pairs are ``(m, m + R/2)`` (GPT-NeoX) or ``(2m, 2m + 1)``
(GPT-J, ``INTERLEAVED``); features ``[R, D)`` are copied. The backward is the same kernel
with ``CONJUGATE`` (sin negated): the gradient of a rotation is the opposite rotation.

Schedule: program (row, head block) handles one (b, s) row and ``BLOCK_H`` heads, so the
row's cos/sin are loaded once and reused across its heads; the kernel is memory-bound
(one read of x, one write of out, the tables from L2). Offsets are int64, so tensors
past 2^31 elements are addressed correctly. Positions were range-checked by the op
layer; loads are masked to the head and pair ranges only.

Limits: fp16/bf16/fp32 (fp64 is left to the torch backend); the output is a new
contiguous tensor; empty inputs launch nothing. Block sizes are untuned.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["rotary"]

# Elements of x one program touches, about: BLOCK_H heads of BLOCK_HALF pairs. Untuned.
TILE_ELEMS = 4096
NUM_WARPS = 4
MAX_BLOCK_REST = 128  # columns per step of the pass-through loop (features past R)


@triton.jit
def _rotary_kernel(
    X, COS, SIN, OFFSETS, OUT,
    seqlen, heads, head_dim, half, offset,
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_cos, stride_sin,
    HAS_OFFSETS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    HAS_REST: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * S + s
    b = row // seqlen
    s = row % seqlen
    if HAS_OFFSETS:
        pos = s + tl.load(OFFSETS + b).to(tl.int64)
    else:
        pos = s + offset

    m = tl.arange(0, BLOCK_HALF)
    m_mask = m < half
    c = tl.load(COS + pos * stride_cos + m, mask=m_mask, other=1.0).to(tl.float32)
    sn = tl.load(SIN + pos * stride_sin + m, mask=m_mask, other=0.0).to(tl.float32)
    if CONJUGATE:
        sn = -sn

    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < heads
    mask = h_mask[:, None] & m_mask[None, :]
    if INTERLEAVED:
        i1 = 2 * m
        i2 = 2 * m + 1
    else:
        i1 = m
        i2 = m + half
    x_row = X + b * stride_xb + s * stride_xs + h[:, None].to(tl.int64) * stride_xh
    out_row = OUT + row * heads * head_dim + h[:, None].to(tl.int64) * head_dim
    x1 = tl.load(x_row + i1[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * sn[None, :]
    o2 = x1 * sn[None, :] + x2 * c[None, :]
    tl.store(out_row + i1[None, :], o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_row + i2[None, :], o2.to(OUT.dtype.element_ty), mask=mask)

    if HAS_REST:  # partial rotary: features [2 * half, head_dim) pass through
        for start in tl.range(2 * half, head_dim, BLOCK_REST):
            cols = start + tl.arange(0, BLOCK_REST)
            rest_mask = h_mask[:, None] & (cols < head_dim)[None, :]
            v = tl.load(x_row + cols[None, :] * stride_xd, mask=rest_mask, other=0.0)
            tl.store(out_row + cols[None, :], v, mask=rest_mask)


def _on_device(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device) on the current stream."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def rotary(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor], offset: int,
           interleaved: bool, conjugate: bool) -> Tensor:
    """``x (B, S, H, D)`` rotated at positions ``s + offsets[b]`` (or ``s + offset``);
    returns a contiguous tensor of x's shape and dtype."""
    batch, seqlen, heads, head_dim = x.shape
    half = cos.shape[1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # The tables are read with a unit column stride (a copy only for an unusual layout).
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, TILE_ELEMS // (2 * block_half)))
    rest = head_dim - 2 * half
    block_rest = min(MAX_BLOCK_REST, triton.next_power_of_2(max(rest, 1)))
    grid = (batch * seqlen, triton.cdiv(heads, block_h))
    with _on_device(x):
        _rotary_kernel[grid](
            x, cos, sin, offsets if offsets is not None else cos, out,
            seqlen, heads, head_dim, half, offset,
            *x.stride(), cos.stride(0), sin.stride(0),
            HAS_OFFSETS=offsets is not None, INTERLEAVED=interleaved, CONJUGATE=conjugate,
            HAS_REST=rest > 0, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_REST=block_rest,
            num_warps=NUM_WARPS,
        )
    return out
