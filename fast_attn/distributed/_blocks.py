"""The per-step work of ring attention: which block pairs to compute and how, the
log-sum-exp merge of partial results, and the block forward/backward calls.

**Relations.** A block pair is the queries of one piece (consecutive global positions
``[qs, qs + Lq)``) against the keys of another (``[ks, ks + Lk)``). The global rule keeps
key j for query i when ``j - i`` lies in ``[-left, min(0 if causal, right)]`` (a bound
dropped when unbounded; global Sq == Sk, so there is no bottom-right offset). Our op
aligns causal and windows bottom-right on its own ``(Lq, Lk)`` and accepts no window
entry below -1, so a pair is first trimmed to the query rows that see at least one key
and the keys that at least one of them sees; in the trimmed block the band is always
expressible as ``causal`` / ``window_size`` of the op (proof: the last kept row's last
key and the first kept row's first key sit on the band's edges) and a pair with no
visible key is skipped. With causal attention and equal pieces this gives the three
classic cases: full (keys before the queries), diagonal-causal, skipped. The plan then
fuses pairs that are all full into one call (zigzag: one call per off-diagonal step).

**Merge.** Partial outputs are combined by their LSE in fp32 (fp64 for fp64 inputs):
``lse = logaddexp(lse_a, lse_b)``, ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``,
with ``lse = -inf`` rows kept at out 0 (never NaN); one cast at the end.

**Backward.** The standard ring backward calls the block backward with the merged
(global) ``out`` and ``lse``: ``P = exp(s - lse)`` is then the global probability and
``delta = rowsum(dO * O)`` the global one, so block gradients sum to the true ones. A
backend whose backward recomputes a block-local softmax instead of reading ``lse`` (the
torch backend's plain-maths path: softcap, fp64 on CPU) would give block-local
gradients, so for those calls ``plain_block_bwd`` below does the block's maths with the
global statistics (O(Lq * Lk) memory per block: correctness first).

ALiBi across blocks is an additive fp32 bias ``-slope * |pos_i - pos_j|`` built per call
from the global positions (``(1 or B, H, Lq, Lk)`` floats per call: the cost of
correctness, documented in docs/context_parallel.md), since the op's own ALiBi uses
local, bottom-right positions.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fast_attn.distributed.layout import Piece

NEG_INF = float("-inf")


class Relation(NamedTuple):
    """A pair's visible part, in the pair's own coordinates: query rows [q0, q1) against
    keys [k0, k1), with the op's ``causal`` and ``window_size`` on that trimmed block."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    left: int
    right: int


class BlockCall(NamedTuple):
    """One call of the attention op in a ring step: rows of the local queries against rows
    of the visiting K/V block (slices of the sequence dimension), with the op's options."""

    q_rows: slice
    k_rows: slice
    causal: bool
    left: int
    right: int


class BlockOptions(NamedTuple):
    """The options shared by every block call of one ring attention call."""

    softmax_scale: float
    softcap: float
    deterministic: bool
    backend: str


def block_relation(q_start: int, q_len: int, k_start: int, k_len: int, causal: bool,
                   window: tuple[int, int]) -> Optional[Relation]:
    """What query positions ``[q_start, q_start + q_len)`` see of key positions
    ``[k_start, k_start + k_len)`` under the global ``causal`` / ``window``; None if nothing."""
    if q_len <= 0 or k_len <= 0:
        return None
    left, right = window
    shift = k_start - q_start
    # local offsets b - a (a: query row, b: key row) allowed: [lo, hi]; None = unbounded
    lo = None if left < 0 else -left - shift
    uppers = [u for u in ((0 if causal else None), (right if right >= 0 else None)) if u is not None]
    hi = min(uppers) - shift if uppers else None
    # row a sees keys [max(0, a + lo), min(k_len - 1, a + hi)]: keep rows where that is non-empty
    q0 = 0 if hi is None else max(0, -hi)
    q1 = q_len if lo is None else min(q_len, k_len - lo)
    if q0 >= q1:
        return None
    k0 = 0 if lo is None else max(0, q0 + lo)
    k1 = k_len if hi is None else min(k_len, q1 + hi)
    if k0 >= k1:
        return None
    rows, keys = q1 - q0, k1 - k0
    offset = keys - rows  # the op's bottom-right offset on the trimmed block
    new_left = new_right = -1
    if lo is not None and lo + q0 - k0 > -(rows - 1):
        new_left = offset - (lo + q0 - k0)
    if hi is not None and hi + q0 - k0 < keys - 1:
        new_right = (hi + q0 - k0) - offset
    if new_left < -1 or new_right < -1:  # excluded by the trimming argument above
        raise RuntimeError(f"internal error: block relation not expressible ({q_start}, {q_len}, {k_start}, "
                           f"{k_len}, {causal}, {window})")
    if new_right == 0:
        return Relation(q0, q1, k0, k1, True, new_left, -1)
    return Relation(q0, q1, k0, k1, False, new_left, new_right)


def _is_full(rel: Optional[Relation], q: Piece, k: Piece) -> bool:
    return rel == Relation(0, q.length, 0, k.length, False, -1, -1)


def _span(pieces: Sequence[Piece]) -> slice:
    return slice(pieces[0].local_start, pieces[-1].local_start + pieces[-1].length)


def plan_blocks(q_pieces: Sequence[Piece], k_pieces: Sequence[Piece], causal: bool,
                window: tuple[int, int]) -> list[BlockCall]:
    """The op calls of one ring step (dense shards: pieces tile the local rows in order)."""
    rel = [[block_relation(qp.global_start, qp.length, kp.global_start, kp.length, causal, window)
            for kp in k_pieces] for qp in q_pieces]
    full = [[_is_full(rel[i][j], qp, kp) for j, kp in enumerate(k_pieces)] for i, qp in enumerate(q_pieces)]
    if all(all(row) for row in full):
        return [BlockCall(_span(q_pieces), _span(k_pieces), False, -1, -1)]
    calls, done = [], set()
    for i, qp in enumerate(q_pieces):  # a query piece that sees every key in full: one call
        if all(full[i]):
            calls.append(BlockCall(slice(qp.local_start, qp.local_start + qp.length), _span(k_pieces), False, -1, -1))
            done.update((i, j) for j in range(len(k_pieces)))
    for j, kp in enumerate(k_pieces):  # a key piece that every query piece sees in full: one call
        if not done and all(full[i][j] for i in range(len(q_pieces))):
            calls.append(BlockCall(_span(q_pieces), slice(kp.local_start, kp.local_start + kp.length), False, -1, -1))
            done.update((i, j) for i in range(len(q_pieces)))
    for i, qp in enumerate(q_pieces):
        for j, kp in enumerate(k_pieces):
            r = rel[i][j]
            if (i, j) in done or r is None:
                continue
            calls.append(BlockCall(slice(qp.local_start + r.q0, qp.local_start + r.q1),
                                   slice(kp.local_start + r.k0, kp.local_start + r.k1), r.causal, r.left, r.right))
    return calls


# ------------------------------------------------------------------------------ merge


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulators, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def merge_(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Folds a partial result into the accumulators, in place.

    ``acc_out``/``out``: ``(..., n, H, D)``; ``acc_lse``/``lse``: ``(..., H, n)``. A row
    with lse -inf on both sides stays (0, -inf)."""
    new = torch.logaddexp(acc_lse, lse)
    ref = new.masked_fill(torch.isneginf(new), 0.0)  # -inf - -inf would be NaN
    w_acc = (acc_lse - ref).exp_().transpose(-1, -2).unsqueeze(-1)  # (..., n, H, 1)
    w_new = (lse - ref).exp_().transpose(-1, -2).unsqueeze(-1)
    acc_out.mul_(w_acc).add_(out.to(acc_out.dtype) * w_new)
    acc_lse.copy_(new)


# ----------------------------------------------------------------------- block calls


def alibi_bias(alibi_slopes: Optional[Tensor], q_pos: Tensor, k_pos: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """``-slope * |pos_q - pos_k|`` as an additive mask ``(1 or B, H, Lq, Lk)``."""
    if alibi_slopes is None:
        return None
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]  # (1 or B, H)
    distance = (q_pos[:, None] - k_pos[None, :]).abs().to(dtype)  # (Lq, Lk)
    return -slopes.to(dtype)[:, :, None, None] * distance


def block_fwd(q: Tensor, k: Tensor, v: Tensor, call: BlockCall, opts: BlockOptions,
              bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out (B, Lq, H, D) in q's dtype, lse fp32 (B, H, Lq)) of one dense block."""
    return torch.ops.fast_attn.attention_fwd(
        q, k, v, bias, None, None, call.causal, opts.softmax_scale, call.left, call.right,
        opts.softcap, 0.0, opts.deterministic, opts.backend,
    )


def block_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, call: BlockCall,
              opts: BlockOptions, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one dense block given the global out and lse."""
    if not backward_reads_lse("attention", q, k, v, call, opts, bias):
        return plain_block_bwd(dout, q, k, v, out, lse, call, opts, bias)
    dq, dk, dv, _, _ = torch.ops.fast_attn.attention_bwd(
        dout, q, k, v, out, lse, bias, None, None, call.causal, opts.softmax_scale, call.left,
        call.right, opts.softcap, 0.0, opts.deterministic, False, False, opts.backend,
    )
    return dq, dk, dv


def backward_reads_lse(op: str, q: Tensor, k: Tensor, v: Tensor, call: BlockCall, opts: BlockOptions,
                       bias: Optional[Tensor]) -> bool:
    """Whether the backend that runs this block's backward uses the ``out``/``lse`` it is
    given (flash-style) rather than recomputing a block-local softmax."""
    from fast_attn.ops import _attention_core as core
    from fast_attn.ops._dispatch import choose

    params = core.params_from_schema(bias, None, None, call.causal, opts.softmax_scale, call.left,
                                     call.right, opts.softcap, 0.0, opts.deterministic)
    if choose(core.call_summary(op, q, k, params, backward=True), opts.backend) != "torch":
        return True  # the triton and cuda backwards are flash-style
    from fast_attn.ops.attention_params import BiasGrads
    from fast_attn.torch_backend.attention import _use_fused  # its ATen path reads lse; the plain one does not

    return _use_fused(q, v, params, BiasGrads())


def keep_mask(rows: int, keys: int, causal: bool, left: int, right: int, device) -> Tensor:
    """The op's bottom-right causal/window rule on a ``(rows, keys)`` block (True = kept)."""
    d = torch.arange(keys, device=device)[None, :] - torch.arange(rows, device=device)[:, None] - (keys - rows)
    keep = torch.ones((rows, keys), dtype=torch.bool, device=device)
    if causal:
        keep &= d <= 0
    if left >= 0:
        keep &= d >= -left
    if right >= 0:
        keep &= d <= right
    return keep


def plain_block_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, call: BlockCall,
                    opts: BlockOptions, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One block's gradients with the global statistics, in plain maths (fp32, fp64 for
    fp64): ``P = exp(s - lse)``, ``dS = P * (dO V^T - rowsum(dO * O))``, then the softcap
    chain rule. GQA: query heads are grouped per kv head, no K/V copies."""
    dtype = accumulator_dtype(q.dtype)
    batch, rows, heads, dim = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # (B, Hkv, group, n, D): query head h = kv_head * group + g
    qh = q.to(dtype).permute(0, 2, 1, 3).reshape(batch, kv_heads, group, rows, dim)
    doh = dout.to(dtype).permute(0, 2, 1, 3).reshape(batch, kv_heads, group, rows, -1)
    oh = out.to(dtype).permute(0, 2, 1, 3).reshape(batch, kv_heads, group, rows, -1)
    kh = k.to(dtype).permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, Lk, D)
    vh = v.to(dtype).permute(0, 2, 1, 3)[:, :, None]
    s = torch.matmul(qh, kh.transpose(-1, -2)) * opts.softmax_scale  # (B, Hkv, group, Lq, Lk)
    tanh = None
    if opts.softcap > 0:
        tanh = torch.tanh(s / opts.softcap)
        s = opts.softcap * tanh
    if bias is not None:
        s = s + bias.to(dtype).reshape(bias.shape[0], kv_heads, group, rows, keys)
    keep = keep_mask(rows, keys, call.causal, call.left, call.right, q.device)
    lse_h = lse.to(dtype).reshape(batch, kv_heads, group, rows, 1)
    p = torch.exp(s - lse_h).masked_fill_(~keep, 0.0)
    dv = torch.matmul(p.transpose(-1, -2), doh).sum(2)  # (B, Hkv, Lk, Dv)
    dp = torch.matmul(doh, vh.transpose(-1, -2))
    delta = (doh * oh).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    ds = ds * opts.softmax_scale
    dq = torch.matmul(ds, kh).reshape(batch, heads, rows, dim).permute(0, 2, 1, 3)
    dk = torch.matmul(ds.transpose(-1, -2), qh).sum(2)  # (B, Hkv, Lk, D)
    return (dq.to(q.dtype), dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype))
