"""How a sequence is split across the ranks of a context-parallel group, and the
functions that split and reassemble tensors: ``shard_sequence`` / ``unshard_sequence``.

Layouts (``W`` ranks, global sequence length ``S``):

- ``"contiguous"``: rank r holds positions ``[r * S / W, (r + 1) * S / W)``. With causal
  attention rank W-1 does W times the work of rank 0 (its queries see every key).
- ``"zigzag"``: the sequence is cut into 2W equal chunks and rank r holds chunks r and
  2W-1-r (in that order), so every rank holds one early and one late chunk and does the
  same causal work (ring-flash-attention's zigzag; Megatron's load-balanced CP)::

      W = 2, S = 8:   chunks  c0 c1 c2 c3   rank 0: c0 c3   rank 1: c1 c2

A dense shard is the ``(B, S / W, ...)`` slice of a ``(B, S, ...)`` tensor, so S must be
a multiple of W (contiguous) or of 2W (zigzag). Position ids go through the same
functions (``shard_positions`` gives a rank's global positions directly).

Packed (varlen) batches, ``(total, ...)`` with int32 ``cu_seqlens (B + 1,)``: every
sequence is split by the same rule, with chunk bounds ``floor(m * n / parts)`` so any
length works (a sequence shorter than the number of chunks leaves some chunks empty).
A rank stores its pieces sequence by sequence (sequence 0's pieces, then sequence 1's,
...); ``varlen_shard_plan`` gives the local ``cu_seqlens`` and every piece's position.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fast_attn.distributed._group import ProcessGroupInfo

__all__ = [
    "LAYOUTS",
    "shard_sequence",
    "unshard_sequence",
    "shard_positions",
    "varlen_shard_plan",
    "VarlenShardPlan",
]

LAYOUTS = ("contiguous", "zigzag")


class Piece(NamedTuple):
    """A run of consecutive positions stored consecutively on one rank."""

    local_start: int  # first row in the rank's shard
    length: int
    global_start: int  # its first position in the (global) sequence
    seq: int = 0  # which packed sequence (varlen); 0 for dense batches


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout  # type: ignore[return-value]


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def _chunk_ids(layout: str, rank: int, world: int) -> tuple[int, ...]:
    """Which of the ``chunks_per_rank * world`` chunks rank ``rank`` holds, in storage order."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def dense_pieces(layout: str, rank: int, world: int, local_len: int) -> list[Piece]:
    """The pieces of a rank's dense shard of ``local_len`` rows (a multiple of the chunks)."""
    chunk = local_len // chunks_per_rank(layout)
    return [Piece(i * chunk, chunk, c * chunk) for i, c in enumerate(_chunk_ids(layout, rank, world))]


def dense_positions(layout: str, rank: int, world: int, local_len: int, device=None) -> Tensor:
    """Global positions (int64 ``(local_len,)``) of the rows of a rank's dense shard."""
    parts = [torch.arange(p.global_start, p.global_start + p.length, device=device)
             for p in dense_pieces(layout, rank, world, local_len)]
    return torch.cat(parts)


def check_divisible(name: str, seqlen: int, layout: str, world: int) -> None:
    parts = chunks_per_rank(layout) * world
    if seqlen % parts != 0:
        raise ValueError(
            f"{name}: the {layout} layout splits the sequence into {parts} equal chunks "
            f"({chunks_per_rank(layout)} per rank x {world} ranks), so its length must be a "
            f"multiple of {parts}; got {seqlen} (pad the sequence, or use ring_attention_varlen)"
        )


def shard_positions(seqlen: int, group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag",
                    device=None) -> Tensor:
    """Global position ids (int64 ``(seqlen / W,)``) of this rank's tokens of a sequence of
    ``seqlen`` tokens: what rotary or learned position embeddings need on each rank."""
    check_layout(layout)
    info = ProcessGroupInfo.of(group, torch.empty(0), caller="shard_positions")
    check_divisible("seqlen", seqlen, layout, info.world)
    return dense_positions(layout, info.rank, info.world, seqlen // info.world, device)


def shard_sequence(x: Tensor, group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag", *,
                   seq_dim: Optional[int] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """This rank's shard of a tensor that every rank holds in full.

    Args:
        x: ``(B, S, ...)`` (sequence on ``seq_dim``, default 1; 1-D tensors such as position
            ids ``(S,)`` use dim 0), or a packed ``(total, ...)`` batch with ``cu_seqlens``.
        group: the context-parallel process group (None = the default group).
        layout: "zigzag" (default; balanced causal work) or "contiguous".
        cu_seqlens: int32 ``(B + 1,)``: x is packed and each sequence is split on its own.

    Returns:
        ``(B, S / W, ...)`` (a new tensor), or the packed ``(total_local, ...)`` rows.
        Differentiable (it is indexing).
    """
    check_layout(layout)
    info = ProcessGroupInfo.of(group, x, caller="shard_sequence")
    if cu_seqlens is not None:
        plan = varlen_shard_plan(cu_seqlens, info.world, layout)
        return x.index_select(0, plan.rows[info.rank].to(x.device))
    dim = _seq_dim(x, seq_dim)
    check_divisible("x", x.shape[dim], layout, info.world)
    local_len = x.shape[dim] // info.world
    parts = [x.narrow(dim, p.global_start, p.length) for p in dense_pieces(layout, info.rank, info.world, local_len)]
    return torch.cat(parts, dim=dim)


def unshard_sequence(x: Tensor, group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag", *,
                     seq_dim: Optional[int] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The whole sequence from every rank's shard (an all_gather): the inverse of
    ``shard_sequence``, returned on every rank. Not differentiable (the result carries
    no autograd history); meant for checks, logging and evaluation."""
    check_layout(layout)
    info = ProcessGroupInfo.of(group, x, caller="unshard_sequence")
    x = x.detach()
    if cu_seqlens is not None:
        return _unshard_varlen(x, info, layout, cu_seqlens)
    dim = _seq_dim(x, seq_dim)
    moved = x.movedim(dim, 0).contiguous()  # (S_local, ...): all_gather concatenates on dim 0
    gathered = [torch.empty_like(moved) for _ in range(info.world)]
    dist.all_gather(gathered, moved, group=info.group)
    local_len = moved.shape[0]
    full = torch.empty((local_len * info.world, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    for rank, part in enumerate(gathered):
        for p in dense_pieces(layout, rank, info.world, local_len):
            full[p.global_start:p.global_start + p.length] = part[p.local_start:p.local_start + p.length]
    return full.movedim(0, dim)


def _seq_dim(x: Tensor, seq_dim: Optional[int]) -> int:
    if seq_dim is None:
        seq_dim = 1 if x.dim() >= 2 else 0
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim {seq_dim} is out of range for x of shape {tuple(x.shape)}")
    return seq_dim % x.dim()


# --------------------------------------------------------------------------- varlen


class VarlenShardPlan(NamedTuple):
    """How a packed batch is split: per rank, its pieces (in storage order), the global
    packed rows it holds (int64), its local ``cu_seqlens`` (int32 ``(B + 1,)``) and its
    longest local sequence."""

    pieces: list[list[Piece]]
    rows: list[Tensor]
    cu_seqlens: list[Tensor]
    max_seqlen: list[int]

    @property
    def totals(self) -> list[int]:
        return [int(cu[-1]) for cu in self.cu_seqlens]


def varlen_shard_plan(cu_seqlens: Tensor, world: int, layout: str = "zigzag") -> VarlenShardPlan:
    """Every rank's share of the packed batch described by the global ``cu_seqlens``."""
    check_layout(layout)
    starts = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
    parts = chunks_per_rank(layout) * world
    pieces: list[list[Piece]] = [[] for _ in range(world)]
    rows: list[list[Tensor]] = [[] for _ in range(world)]
    seq_lens: list[list[int]] = [[] for _ in range(world)]
    for seq, (begin, end) in enumerate(zip(starts, starts[1:])):
        n = end - begin
        bounds = [m * n // parts for m in range(parts + 1)]
        for rank in range(world):
            held = 0
            for c in _chunk_ids(layout, rank, world):
                length = bounds[c + 1] - bounds[c]
                local_start = sum(p.length for p in pieces[rank])
                pieces[rank].append(Piece(local_start, length, bounds[c], seq))
                rows[rank].append(torch.arange(begin + bounds[c], begin + bounds[c + 1]))
                held += length
            seq_lens[rank].append(held)
    cu_local, longest = [], []
    for rank in range(world):
        lengths = torch.tensor([0, *seq_lens[rank]], dtype=torch.int64)
        cu_local.append(lengths.cumsum(0).to(torch.int32))
        longest.append(max(seq_lens[rank], default=0))
    empty = torch.zeros(0, dtype=torch.int64)
    return VarlenShardPlan(pieces, [torch.cat(r) if r else empty for r in rows], cu_local, longest)


def _unshard_varlen(x: Tensor, info: ProcessGroupInfo, layout: str, cu_seqlens: Tensor) -> Tensor:
    plan = varlen_shard_plan(cu_seqlens, info.world, layout)
    totals = plan.totals
    if x.shape[0] != totals[info.rank]:
        raise ValueError(f"x has {x.shape[0]} rows, but cu_seqlens gives rank {info.rank} {totals[info.rank]}")
    # all_gather needs equal sizes: pad every shard to the longest.
    longest = max(totals)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[:x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(info.world)]
    dist.all_gather(gathered, padded, group=info.group)
    full = x.new_empty((int(cu_seqlens[-1]), *x.shape[1:]))
    for rank, part in enumerate(gathered):
        full[plan.rows[rank].to(x.device)] = part[:totals[rank]]
    return full

