"""All-to-all context parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023).

Each rank holds ``(B, S / W, H, D)``. One ``all_to_all_single`` (q, k and v in one
message) swaps the sequence split for a head split: every rank then holds the whole
sequence for ``H / W`` heads, ``(B, S, H / W, D)``, reordered from the shards' layout to
global positions; attention is ``fast_attn.attention`` (its own custom op, autograd and
backend choice) on those heads; a second all-to-all swaps back. The backward is the same
two all-to-alls in reverse (the autograd Functions below are each other's backward).

Costs per rank: forward 4 messages' worth of ``B * (S / W) * H * D`` elements through an
all-to-all (q, k, v, out; (W - 1) / W of each leaves the rank), backward the same;
memory: the whole sequence for H / W heads (attention over S keys, no LSE merging).
Heads must divide by W; with GQA the K/V heads too, except that fewer K/V heads than
ranks (``W % Hkv == 0``, e.g. MQA) are repeated up to W heads before the exchange.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fast_attn.distributed._checks import check_call
from fast_attn.distributed._comm import all_to_all
from fast_attn.distributed._group import ProcessGroupInfo
from fast_attn.distributed.layout import dense_positions
from fast_attn.ops.attention import attention

__all__ = ["ulysses_attention"]


class _Order:
    """Shard order (rank 0's rows, rank 1's rows, ...) against global positions."""

    def __init__(self, layout: str, world: int, local_len: int, device) -> None:
        self.identity = layout == "contiguous"
        if not self.identity:
            # shard-order row -> its global position; and global position -> shard-order row
            self.positions = torch.cat([dense_positions(layout, r, world, local_len, device) for r in range(world)])
            self.rows = torch.argsort(self.positions)

    def to_global(self, x: Tensor, dim: int) -> Tensor:
        return x if self.identity else x.index_select(dim, self.rows)

    def to_shards(self, x: Tensor, dim: int) -> Tensor:
        return x if self.identity else x.index_select(dim, self.positions)


def seq_to_heads(info: ProcessGroupInfo, order: _Order, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``(B, L, Hx, D)`` shards -> ``(B, S, Hx / W, D)`` (global order), one all-to-all for all."""
    world = info.world
    batch, local_len = tensors[0].shape[:2]
    widths = [t.shape[2] // world for t in tensors]
    # (W, B, L, hx, D) per tensor: slice j holds head group j, which goes to rank j
    parts = [t.reshape(batch, local_len, world, w, t.shape[3]).permute(2, 0, 1, 3, 4)
             for t, w in zip(tensors, widths)]
    received = all_to_all(info, torch.cat(parts, dim=3))  # slice j: rank j's rows of my heads
    whole = received.permute(1, 0, 2, 3, 4).reshape(batch, world * local_len, sum(widths), -1)
    whole = order.to_global(whole, 1)
    return list(whole.split(widths, dim=2))


def heads_to_seq(info: ProcessGroupInfo, order: _Order, tensors: Sequence[Tensor]) -> list[Tensor]:
    """The inverse: ``(B, S, hx, D)`` in global order -> ``(B, L, hx * W, D)`` shards."""
    world = info.world
    batch, seqlen = tensors[0].shape[:2]
    local_len = seqlen // world
    widths = [t.shape[2] for t in tensors]
    whole = order.to_shards(torch.cat(list(tensors), dim=2), 1)
    send = whole.reshape(batch, world, local_len, sum(widths), -1).permute(1, 0, 2, 3, 4)  # slice j: rank j's rows
    received = all_to_all(info, send)  # slice j: my rows of rank j's heads
    out = []
    for part in received.split(widths, dim=3):  # (W, B, L, hx, D) -> (B, L, W * hx, D)
        out.append(part.permute(1, 2, 0, 3, 4).reshape(batch, local_len, world * part.shape[3], -1))
    return out


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, info, order, *tensors):
        ctx.info, ctx.order = info, order
        return tuple(seq_to_heads(info, order, tensors))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *heads_to_seq(ctx.info, ctx.order, grads))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, info, order, *tensors):
        ctx.info, ctx.order = info, order
        return tuple(heads_to_seq(info, order, tensors))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *seq_to_heads(ctx.info, ctx.order, grads))


def _lse_to_seq(info: ProcessGroupInfo, order: _Order, lse: Tensor) -> Tensor:
    """``(B, H / W, S)`` of this rank's heads -> ``(B, H, L)`` of this rank's rows."""
    batch, heads, seqlen = lse.shape
    local_len = seqlen // info.world
    send = order.to_shards(lse, 2).reshape(batch, heads, info.world, local_len).permute(2, 0, 1, 3)
    received = all_to_all(info, send)  # (W, B, hg, L): slice j = rank j's heads
    return received.permute(1, 0, 2, 3).reshape(batch, info.world * heads, local_len)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    layout: str = "zigzag",
):
    """Self-attention over a sequence split across the ranks of ``group``, by all-to-all.

    Same arguments, shapes and result as ``ring_attention``; in addition the number of
    query heads H must be a multiple of the world size W, and so must the K/V heads
    Hkv unless W is a multiple of Hkv (then K/V heads are repeated to W before the
    exchange). The layout matters only for the order of positions (zigzag is not needed
    for load balance here, but it is accepted so that both schemes take the same shards).
    """
    info, opts = check_call("ulysses_attention", q, k, v, group, causal=causal, softmax_scale=softmax_scale,
                            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                            deterministic=deterministic, backend=backend, layout=layout)
    world, heads, kv_heads = info.world, q.shape[2], k.shape[2]
    if heads % world != 0:
        raise ValueError(f"ulysses_attention splits the heads across the {world} ranks: the number of query "
                         f"heads of q ({heads}) must be a multiple of the world size {world}")
    if kv_heads % world != 0:
        if world % kv_heads != 0:
            raise ValueError(f"ulysses_attention splits the heads across the {world} ranks: the K/V heads of k "
                             f"({kv_heads}) must be a multiple of the world size or divide it")
        k, v = (t.repeat_interleave(world // kv_heads, dim=2) for t in (k, v))
    order = _Order(opts.layout, world, q.shape[1], q.device)
    qh, kh, vh = _SeqToHeads.apply(info, order, q, k, v)  # (B, S, H / W, D) each
    group_heads = heads // world
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes[..., info.rank * group_heads:(info.rank + 1) * group_heads].contiguous()
    out, lse = attention(qh, kh, vh, causal=opts.causal, softmax_scale=opts.softmax_scale,
                         window_size=opts.window, softcap=opts.softcap, alibi_slopes=alibi_slopes,
                         return_lse=True, deterministic=opts.deterministic, backend=opts.backend)
    (out,) = _HeadsToSeq.apply(info, order, out)
    if not return_lse:
        return out
    return out, _lse_to_seq(info, order, lse)
