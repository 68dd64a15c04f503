"""Reference rotary position embedding (RoPE, Su et al. 2021): the oracle of the rotary op.

Plain PyTorch ops, differentiable by autograd, independent of the backends. The semantics
are FlashAttention-2's ``flash_attn.layers.rotary.apply_rotary_emb``: ``x (B, S, H, D)``,
``cos``/``sin (seqlen_ro, rotary_dim / 2)``; row b, position s uses table row
``s + seqlen_offsets[b]``; the first ``rotary_dim`` features are rotated in pairs, the
rest pass through. Written in the "rotate half" form of the GPT-NeoX / GPT-J code bases,
``x * cos + rotate(x) * sin`` with the tables widened to rotary_dim, a different
formulation from the backends' pairwise one.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rotate(x: Tensor, interleaved: bool) -> Tensor:
    """The partner of every feature with the sign of its sine term: ``(-x2, x1)`` per pair."""
    if interleaved:  # GPT-J: pairs (2m, 2m + 1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)  # GPT-NeoX: pairs (m, m + rotary_dim / 2)
    return torch.cat((-x2, x1), dim=-1)


def _widen(table: Tensor, interleaved: bool) -> Tensor:
    """``(..., rotary_dim / 2)`` -> ``(..., rotary_dim)``: each angle for both features of its pair."""
    return table.repeat_interleave(2, dim=-1) if interleaved else torch.cat((table, table), dim=-1)


def rotary_ref(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    seqlen_offsets: Union[int, Tensor] = 0,
    upcast: bool = True,
) -> Tensor:
    """Rotary embedding of ``x (B, S, H, D)``; returns x's shape and dtype.

    ``upcast=True`` computes in fp32 (fp64 stays fp64); ``upcast=False`` in x's dtype (the
    low-precision baseline of the tolerance rule). Positions past the tables are an
    IndexError here (the op checks them).
    """
    batch, seqlen = x.shape[0], x.shape[1]
    rotary_dim = 2 * cos.shape[1]
    compute = compute_dtype(x.dtype) if upcast else x.dtype
    steps = torch.arange(seqlen, device=x.device)
    if isinstance(seqlen_offsets, Tensor):
        positions = seqlen_offsets.to(torch.int64).view(batch, 1) + steps  # (B, S)
    else:
        positions = (steps + seqlen_offsets).expand(batch, seqlen)
    c = _widen(cos[positions].to(compute), interleaved).unsqueeze(2)  # (B, S, 1, rotary_dim)
    s = _widen(sin[positions].to(compute), interleaved).unsqueeze(2)
    rot = x[..., :rotary_dim].to(compute)
    rotated = rot * c + _rotate(rot, interleaved) * s
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)
