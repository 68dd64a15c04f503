"""Ring attention: attention over a sequence sharded across the ranks of a process group.

Algorithm (Liu et al., "Ring Attention with Blockwise Transformers", 2023; the
FlashAttention-style block backward of ring-flash-attention): each rank keeps its queries
and passes its K/V block around the ring. At step t rank r holds the K/V of rank
``(r - t) mod W``; while that block is attended (one to three calls of our
``fast_attn::attention_fwd`` op, see ``_blocks.plan_blocks``), the next block is already
in flight (``batch_isend_irecv``). Partial outputs are merged by their LSE in fp32.

Backward: a second ring. The K/V blocks travel again; with each goes an fp32 dK/dV
accumulator that every rank adds its block gradients to and that arrives home after W
hops; dQ is accumulated locally in fp32. Each block backward is our
``fast_attn::attention_bwd`` op called with the merged (global) out and LSE.

Costs per rank (L = S / W local tokens, Hkv K/V heads of dim D): forward W - 1 hops of
``2 * B * L * Hkv * D`` elements; backward W - 1 such hops plus W hops of the fp32
accumulators; memory beyond single-GPU attention on L queries: two K/V blocks (the one in
use, the one arriving) and in the backward two fp32 dK/dV accumulators. GQA heads
travel as they are (never expanded). Deterministic for a fixed world size and layout
(the summation order is fixed) when the block kernels are.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fast_attn.distributed import _blocks
from fast_attn.distributed._checks import CallOptions, check_call
from fast_attn.distributed._comm import GRAD_TAG, KV_TAG, ring_shift
from fast_attn.distributed._group import ProcessGroupInfo
from fast_attn.distributed.layout import dense_pieces, dense_positions

__all__ = ["ring_attention"]


class _RingSpec(NamedTuple):
    info: ProcessGroupInfo
    opts: CallOptions

    @property
    def block_options(self) -> _blocks.BlockOptions:
        o = self.opts
        return _blocks.BlockOptions(o.softmax_scale, o.softcap, o.deterministic, o.backend)


class _Step(NamedTuple):
    """One ring step's block calls and, with ALiBi, the positions of both sides."""

    calls: list
    q_pos: Optional[Tensor]
    k_pos: Optional[Tensor]


def _step(spec: _RingSpec, t: int, local_len: int, alibi: Optional[Tensor], device) -> _Step:
    info, o = spec.info, spec.opts
    source = (info.rank - t) % info.world  # whose K/V this rank holds at step t
    q_pieces = dense_pieces(o.layout, info.rank, info.world, local_len)
    k_pieces = dense_pieces(o.layout, source, info.world, local_len)
    calls = _blocks.plan_blocks(q_pieces, k_pieces, o.causal, o.window)
    if alibi is None:
        return _Step(calls, None, None)
    return _Step(calls, dense_positions(o.layout, info.rank, info.world, local_len, device),
                 dense_positions(o.layout, source, info.world, local_len, device))


def _bias(step: _Step, call, alibi: Optional[Tensor], dtype) -> Optional[Tensor]:
    if alibi is None:
        return None
    return _blocks.alibi_bias(alibi, step.q_pos[call.q_rows], step.k_pos[call.k_rows], dtype)


def ring_fwd(q: Tensor, k: Tensor, v: Tensor, alibi: Optional[Tensor], spec: _RingSpec) -> tuple[Tensor, Tensor]:
    """(out in q's dtype, lse fp32 (B, H, L)) of this rank's queries against the whole ring."""
    batch, local_len, heads, _ = q.shape
    acc_dtype = _blocks.accumulator_dtype(q.dtype)
    acc_out = torch.zeros((batch, local_len, heads, v.shape[-1]), dtype=acc_dtype, device=q.device)
    acc_lse = torch.full((batch, heads, local_len), float("-inf"), dtype=acc_dtype, device=q.device)
    opts = spec.block_options
    kv = [k, v]
    for t in range(spec.info.world):
        in_flight = ring_shift(spec.info, kv, KV_TAG) if t + 1 < spec.info.world else None
        step = _step(spec, t, local_len, alibi, q.device)
        for call in step.calls:
            qr, kr = call.q_rows, call.k_rows
            out, lse = _blocks.block_fwd(q[:, qr], kv[0][:, kr], kv[1][:, kr], call, opts,
                                         _bias(step, call, alibi, acc_dtype))
            _blocks.merge_(acc_out[:, qr], acc_lse[:, :, qr], out, lse)
        if in_flight is not None:
            kv = in_flight.wait()
    return acc_out.to(q.dtype), acc_lse.to(torch.float32)


def ring_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, alibi: Optional[Tensor],
             spec: _RingSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of this rank's shard: the second ring."""
    local_len = q.shape[1]
    acc_dtype = _blocks.accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    opts = spec.block_options
    kv, grads_home = [k, v], None
    for t in range(spec.info.world):
        in_flight = ring_shift(spec.info, kv, KV_TAG) if t + 1 < spec.info.world else None
        step = _step(spec, t, local_len, alibi, q.device)
        block_grads = []
        for call in step.calls:
            qr, kr = call.q_rows, call.k_rows
            dq_b, dk_b, dv_b = _blocks.block_bwd(dout[:, qr], q[:, qr], kv[0][:, kr], kv[1][:, kr], out[:, qr],
                                                 lse[:, :, qr], call, opts, _bias(step, call, alibi, acc_dtype))
            dq[:, qr] += dq_b
            block_grads.append((kr, dk_b, dv_b))
        # the accumulator of the block this rank holds: from the previous rank (zeros at t = 0)
        if grads_home is None:
            dk_acc = torch.zeros(kv[0].shape, dtype=acc_dtype, device=q.device)
            dv_acc = torch.zeros(kv[1].shape, dtype=acc_dtype, device=q.device)
        else:
            dk_acc, dv_acc = grads_home.wait()
        for kr, dk_b, dv_b in block_grads:
            dk_acc[:, kr] += dk_b
            dv_acc[:, kr] += dv_b
        grads_home = ring_shift(spec.info, [dk_acc, dv_acc], GRAD_TAG)  # after W hops: home
        if in_flight is not None:
            kv = in_flight.wait()
    dk, dv = grads_home.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Autograd for ``ring_attention``: the forward ring and the backward ring."""

    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes, spec: _RingSpec):
        out, lse = ring_fwd(q, k, v, alibi_slopes, spec)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = ring_bwd(dout, q, k, v, out, lse, alibi_slopes, ctx.spec)
        return dq, dk, dv, None, None


def ring_attention(
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
    """Self-attention over a sequence split across the ranks of ``group``, by ring.

    Every rank calls it with its shard (``shard_sequence``) and gets the output for its
    own queries; the result equals ``fast_attn.attention`` on the whole sequence
    (``unshard_sequence`` of the outputs), and so do the gradients.

    Args:
        q: ``(B, S_local, H, D)``, this rank's queries (any strides with a contiguous last
            dimension); the same shape on every rank (checked: one small all_reduce).
        k, v: ``(B, S_local, Hkv, D)``, ``H % Hkv == 0`` (GQA/MQA: the Hkv heads travel).
        group: the context-parallel process group (None = the default group).
        causal, softmax_scale, window_size, softcap, alibi_slopes, deterministic, backend:
            as ``fast_attn.attention``, over global positions (bottom-right alignment is
            the same as top-left here: one sequence attends to itself). ``alibi_slopes``
            gets no gradient.
        return_lse: also return the LSE of the local queries, fp32 ``(B, H, S_local)``.
        layout: how the sequence was split: "zigzag" (default) or "contiguous"
            (``fast_attn.distributed.layout``).

    Returns:
        ``out (B, S_local, H, D)`` in q's dtype, or ``(out, lse)``.
    """
    info, opts = check_call("ring_attention", q, k, v, group, causal=causal, softmax_scale=softmax_scale,
                            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                            deterministic=deterministic, backend=backend, layout=layout)
    out, lse = RingAttentionFunction.apply(q, k, v, alibi_slopes, _RingSpec(info, opts))
    return (out, lse) if return_lse else out
