"""``RotaryEmbedding``: rotary position embedding of queries and keys, on ``fast_attn.rotary``.

The conventions of the GPT-NeoX and Llama families (and of FlashAttention-2's
``flash_attn.layers.rotary.RotaryEmbedding``): inverse frequencies
``base^(-2m / dim)`` for ``m < dim / 2``, computed in fp32 (see ``rotary_tables``); the angle of position p is
``p * inv_freq[m]``; features pair as ``(m, m + dim / 2)`` ("rotate half"), or
``(2m, 2m + 1)`` with ``interleaved=True`` (GPT-J). ``dim`` may be smaller than the head
dimension (GPT-NeoX's ``rotary_pct``): the features past it pass through unchanged.

The cos/sin tables ``(max_seq_len, dim / 2)`` are built at construction as non-persistent
buffers: they follow ``.to(device)`` but are not in the state_dict, so checkpoints are
the same with or without this module. (Like any float buffer they also follow
``.to(dtype)``; the rotation itself is always computed in fp32.)

    rope = fast_attn.nn.RotaryEmbedding(head_dim, base=10000.0, max_seq_len=4096)
    q, k = rope(q, k, seqlen_offset=start_pos)   # (B, S, H, D), (B, S, Hkv, D)
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from fast_attn.ops.rotary import rotary

__all__ = ["RotaryEmbedding", "rotary_tables"]


def rotary_tables(max_seq_len: int, dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """(cos, sin), each ``(max_seq_len, dim / 2)`` fp32: angle ``p * base^(-2m / dim)``.

    Frequencies and angles are fp32 as in Hugging Face's Llama and GPT-NeoX, which write the
    frequency as ``1 / base^(2m / dim)``: a few frequencies then differ in their last bit.
    This form is the one the reference GPT always used, so its results stay bit for bit the
    same (and its fp32 training runs on the same trajectory)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


class RotaryEmbedding(nn.Module):
    """Rotates queries and keys ``(B, S, H, D)`` by the angles of their positions.

    Args:
        dim: the rotary dimension (even, <= the head dimension).
        base: the base of the inverse frequencies (10000 for GPT-NeoX and Llama 2,
            500000 for Llama 3).
        interleaved: pair features ``(2m, 2m + 1)`` (GPT-J) instead of ``(m, m + dim / 2)``.
        max_seq_len: rows of the cos/sin tables: positions must stay below it.
        device: where the tables are built.
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, max_seq_len: int = 2048,
                 device=None) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even int >= 2, got {dim!r}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be an int >= 1, got {max_seq_len!r}")
        if not base > 0:
            raise ValueError(f"base must be > 0, got {base!r}")
        self.dim, self.base, self.interleaved, self.max_seq_len = dim, float(base), bool(interleaved), max_seq_len
        cos, sin = rotary_tables(max_seq_len, dim, self.base, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}, max_seq_len={self.max_seq_len}"

    def forward(self, q: Tensor, k: Tensor, seqlen_offset: Union[int, Tensor] = 0,
                position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(q, k)`` rotated: token s of row b at position ``s + seqlen_offset`` (an int or
        an int32/int64 ``(B,)`` tensor, e.g. the lengths already in a KV cache), or at
        ``position_ids[s]`` (int ``(S,)``, e.g. a context-parallel shard's positions;
        then ``seqlen_offset`` must be 0). q and k may have different head counts."""
        cos, sin = self.cos, self.sin
        if position_ids is not None:
            if not (isinstance(seqlen_offset, int) and seqlen_offset == 0):
                raise ValueError("pass either seqlen_offset or position_ids, not both")
            cos, sin = cos[position_ids], sin[position_ids]
        return (rotary(q, cos, sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offset),
                rotary(k, cos, sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offset))
