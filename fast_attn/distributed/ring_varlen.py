"""Ring attention over packed (varlen) batches: every sequence split across the ranks.

The packed batch is described by the global ``cu_seqlens`` (the same on every rank);
``layout.varlen_shard_plan`` splits each sequence into W (contiguous) or 2W (zigzag)
chunks with bounds ``floor(m * n / parts)``, so any length works and a sequence shorter
than the number of chunks simply leaves some ranks without rows of it. The ring is the
dense one (``ring.py``): K/V blocks (of each source rank's size) travel, fp32 dK/dV
accumulators come home, dQ stays local. Per step, the visible part of every
(query piece, key piece) pair of the same sequence is found by ``_blocks.block_relation``;
pairs with the same op options become the "sequences" of one ``attention_varlen`` call
on gathered rows (no gather when a call covers the local rows in order), split further
so that no query row appears twice in one call (the merge scatters rows back).

Not supported here: ALiBi (NotImplementedError).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fast_attn.distributed import _blocks
from fast_attn.distributed._checks import check_call, dtype_code
from fast_attn.distributed._comm import GRAD_TAG, KV_TAG, ring_shift
from fast_attn.distributed._group import ProcessGroupInfo, check_same_on_all_ranks
from fast_attn.distributed.layout import LAYOUTS, Piece, VarlenShardPlan, varlen_shard_plan

__all__ = ["ring_attention_varlen"]


class _Call(NamedTuple):
    """One ``attention_varlen`` call of a ring step: the rows it gathers (None = all local
    rows in order), the packing of its pairs and the op's options."""

    q_rows: Optional[Tensor]  # int64 indices into the local queries
    k_rows: Optional[Tensor]  # int64 indices into the visiting K/V block
    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int
    causal: bool
    left: int
    right: int


class _Pair(NamedTuple):
    q0: int  # local rows [q0, q1) of the queries
    q1: int
    k0: int  # rows [k0, k1) of the K/V block
    k1: int


def _pairs(q_pieces: list[Piece], k_pieces: list[Piece], causal: bool, window) -> dict:
    """The visible pairs of one step, by op options (causal, left, right), fused like
    ``_blocks.plan_blocks`` (a query piece that sees all of a sequence's key pieces in full
    is one pair; likewise a key piece seen in full by all of the sequence's query pieces)."""
    by_seq: dict[int, tuple[list, list]] = {}
    for p in q_pieces:
        by_seq.setdefault(p.seq, ([], []))[0].append(p)
    for p in k_pieces:
        by_seq.setdefault(p.seq, ([], []))[1].append(p)
    groups: dict = {}
    for qs, ks in by_seq.values():
        qs, ks = [p for p in qs if p.length], [p for p in ks if p.length]
        if not qs or not ks:
            continue
        for call in _blocks.plan_blocks(qs, ks, causal, window):
            pair = _Pair(call.q_rows.start, call.q_rows.stop, call.k_rows.start, call.k_rows.stop)
            groups.setdefault((call.causal, call.left, call.right), []).append(pair)
    return groups


def _split_disjoint(pairs: list[_Pair]) -> list[list[_Pair]]:
    """Greedy split so that no query row appears twice in one call."""
    calls: list[list[_Pair]] = []
    for pair in pairs:
        for call in calls:
            if all(pair.q1 <= p.q0 or p.q1 <= pair.q0 for p in call):
                call.append(pair)
                break
        else:
            calls.append([pair])
    return calls


def _rows(ranges: list[tuple[int, int]], total: int, device) -> Optional[Tensor]:
    """Indices of the concatenated ranges, or None when they are exactly [0, total) in order."""
    in_order = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if ranges and ranges[0][0] == 0 and ranges[-1][1] == total and in_order:
        return None
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def _cu(lengths: list[int], device) -> Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def _step_calls(plan: VarlenShardPlan, rank: int, source: int, causal: bool, window, device) -> list[_Call]:
    calls = []
    q_total, k_total = plan.totals[rank], plan.totals[source]
    for (c, left, right), pairs in _pairs(plan.pieces[rank], plan.pieces[source], causal, window).items():
        for part in _split_disjoint(pairs):
            q_len = [p.q1 - p.q0 for p in part]
            k_len = [p.k1 - p.k0 for p in part]
            calls.append(_Call(_rows([(p.q0, p.q1) for p in part], q_total, device),
                               _rows([(p.k0, p.k1) for p in part], k_total, device),
                               _cu(q_len, device), _cu(k_len, device), max(q_len), max(k_len), c, left, right))
    return calls


def _take(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    return x if rows is None else x.index_select(0, rows)


class _VarlenSpec(NamedTuple):
    info: ProcessGroupInfo
    plan: VarlenShardPlan
    causal: bool
    window: tuple[int, int]
    opts: _blocks.BlockOptions


def _op_args(call: _Call, opts: _blocks.BlockOptions):
    return (call.cu_q, call.cu_k, call.max_q, call.max_k, None, None, None, call.causal, opts.softmax_scale,
            call.left, call.right, opts.softcap, 0.0, opts.deterministic)


def varlen_ring_fwd(q: Tensor, k: Tensor, v: Tensor, spec: _VarlenSpec) -> tuple[Tensor, Tensor]:
    info, plan = spec.info, spec.plan
    acc_dtype = _blocks.accumulator_dtype(q.dtype)
    acc_out = torch.zeros((q.shape[0], q.shape[1], v.shape[-1]), dtype=acc_dtype, device=q.device)
    acc_lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype, device=q.device)
    kv = [k, v]
    for t in range(info.world):
        source = (info.rank - t) % info.world
        in_flight = None
        if t + 1 < info.world:
            rows = plan.totals[(source - 1) % info.world]
            in_flight = ring_shift(info, kv, KV_TAG, [(rows, *k.shape[1:]), (rows, *v.shape[1:])])
        for call in _step_calls(plan, info.rank, source, spec.causal, spec.window, q.device):
            out, lse = torch.ops.fast_attn.attention_varlen_fwd(
                _take(q, call.q_rows), _take(kv[0], call.k_rows), _take(kv[1], call.k_rows),
                *_op_args(call, spec.opts), spec.opts.backend)
            if call.q_rows is None:
                _blocks.merge_(acc_out, acc_lse, out, lse)
            else:
                o, l = acc_out.index_select(0, call.q_rows), acc_lse.index_select(1, call.q_rows)
                _blocks.merge_(o, l, out, lse)
                acc_out.index_copy_(0, call.q_rows, o)
                acc_lse.index_copy_(1, call.q_rows, l)
        if in_flight is not None:
            kv = in_flight.wait()
    return acc_out.to(q.dtype), acc_lse.to(torch.float32)


def _call_bwd(dout, q, k, v, out, lse, call: _Call, opts: _blocks.BlockOptions):
    block = _blocks.BlockCall(slice(None), slice(None), call.causal, call.left, call.right)
    if _blocks.backward_reads_lse("attention_varlen", q, k, v, block, opts, None):
        dq, dk, dv, _, _ = torch.ops.fast_attn.attention_varlen_bwd(
            dout, q, k, v, out, lse, *_op_args(call, opts), False, False, opts.backend)
        return dq, dk, dv
    # the backend recomputes a block-local softmax: plain maths per pair, global statistics
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cu_q, cu_k = call.cu_q.tolist(), call.cu_k.tolist()
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        grads = _blocks.plain_block_bwd(dout[None, qs], q[None, qs], k[None, ks], v[None, ks], out[None, qs],
                                        lse[None, :, qs], block, opts, None)
        dq[qs], dk[ks], dv[ks] = (g[0] for g in grads)
    return dq, dk, dv


def varlen_ring_bwd(dout, q, k, v, out, lse, spec: _VarlenSpec):
    info, plan = spec.info, spec.plan
    acc_dtype = _blocks.accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    kv, grads_home = [k, v], None
    for t in range(info.world):
        source = (info.rank - t) % info.world
        previous = (source - 1) % info.world
        in_flight = None
        if t + 1 < info.world:
            rows = plan.totals[previous]
            in_flight = ring_shift(info, kv, KV_TAG, [(rows, *k.shape[1:]), (rows, *v.shape[1:])])
        block_grads = []
        for call in _step_calls(plan, info.rank, source, spec.causal, spec.window, q.device):
            dq_c, dk_c, dv_c = _call_bwd(_take(dout, call.q_rows), _take(q, call.q_rows), _take(kv[0], call.k_rows),
                                         _take(kv[1], call.k_rows), _take(out, call.q_rows),
                                         lse if call.q_rows is None else lse.index_select(1, call.q_rows),
                                         call, spec.opts)
            if call.q_rows is None:
                dq += dq_c
            else:
                dq.index_add_(0, call.q_rows, dq_c.to(acc_dtype))
            block_grads.append((call.k_rows, dk_c, dv_c))
        if grads_home is None:
            dk_acc = torch.zeros(kv[0].shape, dtype=acc_dtype, device=q.device)
            dv_acc = torch.zeros(kv[1].shape, dtype=acc_dtype, device=q.device)
        else:
            dk_acc, dv_acc = grads_home.wait()
        for rows_k, dk_c, dv_c in block_grads:
            if rows_k is None:
                dk_acc += dk_c
                dv_acc += dv_c
            else:
                dk_acc.index_add_(0, rows_k, dk_c.to(acc_dtype))
                dv_acc.index_add_(0, rows_k, dv_c.to(acc_dtype))
        # the accumulator arriving next belongs to the block held at the next step
        home_rows = plan.totals[previous]
        grads_home = ring_shift(info, [dk_acc, dv_acc], GRAD_TAG,
                                [(home_rows, *k.shape[1:]), (home_rows, *v.shape[1:])])
        if in_flight is not None:
            kv = in_flight.wait()
    dk, dv = grads_home.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttentionVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: _VarlenSpec):
        out, lse = varlen_ring_fwd(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*varlen_ring_bwd(dout, q, k, v, out, lse, ctx.spec), None)


def _check_cu_seqlens(cu_seqlens: object, max_seqlen: object, q: Tensor) -> list[int]:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be a 1-D int32 tensor (B + 1,), got "
                        f"{type(cu_seqlens).__name__ if not isinstance(cu_seqlens, Tensor) else cu_seqlens.dtype}")
    starts = cu_seqlens.tolist()
    if not starts or starts[0] != 0 or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {starts}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    longest = max((b - a for a, b in zip(starts, starts[1:])), default=0)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({longest}) of cu_seqlens")
    return starts


def ring_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
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
    """Ring attention over a packed batch whose every sequence is split across the ranks.

    Args:
        q: ``(total_local, H, D)``: this rank's rows, as ``shard_sequence(x, group, layout,
            cu_seqlens=cu_seqlens)`` gives them.
        k, v: ``(total_local, Hkv, D)``.
        cu_seqlens: int32 ``(B + 1,)``, the *global* packing (the same on every rank);
            sequence b has ``cu_seqlens[b + 1] - cu_seqlens[b]`` tokens in all (any length,
            also shorter than the number of ranks).
        max_seqlen: the longest global sequence (an upper bound).
        Other options as ``ring_attention``; ``alibi_slopes`` is not supported.

    Returns:
        ``out (total_local, H, D)``, or ``(out, lse)`` with lse fp32 ``(H, total_local)``.
    """
    if alibi_slopes is not None:
        raise NotImplementedError("ring_attention_varlen: alibi_slopes is not supported (use ring_attention "
                                  "on a dense batch)")
    caller = "ring_attention_varlen"
    info, o = check_call(caller, q, k, v, group, causal=causal, softmax_scale=softmax_scale,
                         window_size=window_size, softcap=softcap, alibi_slopes=None, deterministic=deterministic,
                         backend=backend, layout=layout, packed=True)
    starts = _check_cu_seqlens(cu_seqlens, max_seqlen, q)
    plan = varlen_shard_plan(starts, info.world, o.layout)
    check_same_on_all_ranks(
        info,
        [len(starts), starts[-1], q.shape[1], q.shape[2], k.shape[1], dtype_code(q.dtype), int(causal), *o.window,
         LAYOUTS.index(o.layout)],
        ["len(cu_seqlens)", "cu_seqlens[-1]", "heads", "head_dim", "kv_heads", "dtype", "causal", "window_left",
         "window_right", "layout"],
        caller=caller,
    )
    if q.shape[0] != plan.totals[info.rank]:
        raise ValueError(f"q has {q.shape[0]} rows, but cu_seqlens gives rank {info.rank} of {info.world} "
                         f"{plan.totals[info.rank]} rows in the {o.layout} layout (shard with shard_sequence(..., "
                         f"cu_seqlens=cu_seqlens))")
    spec = _VarlenSpec(info, plan, o.causal, o.window,
                       _blocks.BlockOptions(o.softmax_scale, o.softcap, o.deterministic, o.backend))
    out, lse = RingAttentionVarlenFunction.apply(q, k, v, spec)
    return (out, lse) if return_lse else out
