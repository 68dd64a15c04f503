"""Attention for the "torch" backend: ATen's fused kernels where they compute exactly our
semantics, chunked plain maths for the rest.

What: ``attention_fwd(q, k, v, params, packing) -> (out, lse)`` and
``attention_bwd(dout, q, k, v, out, lse, params, packing, grads)``, the contract every
backend module keeps (``fast_attn/ops/attention_params.py`` has the layouts). The
semantics are those of ``fast_attn.reference.attention`` (bottom-right causal, window,
softcap before ALiBi, additive/bool masks, fully masked rows give 0 / -inf / zero grads,
counter-hash dropout); nothing here is shared with the reference.

Paths, chosen per call by ``_use_fused``:

- fused (no softcap, no ALiBi, no dropout, no bias gradients, Dv == D):
  CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``
  (flash-style tiling; fp16/bf16/fp32/fp64; GQA natively, dk/dv come back per kv head;
  the mask must be fp32, fp64 for fp64 inputs, any broadcast shape and strides).
  CUDA: ``aten._scaled_dot_product_efficient_attention`` and its ``_backward``
  (fp16/bf16/fp32, head dim a multiple of 8 up to 256; K/V expanded to the query heads,
  the bias in q's dtype with its last dimension padded to 16, so a user float mask takes
  this path only in fp32 where the bias stays exact). Causal with Sq == Sk is the
  kernels' own ``is_causal``; every other position rule is one additive bias of shape
  ``(Sq, Sk)``, ``(B, 1, Sq, Sk)`` (cache rows of different lengths) or the user mask's
  own broadcast shape, built once per call. Fully masked rows are fixed up afterwards:
  the CPU kernel returns out 0 and lse 0 for them, so lse is set to -inf; the backward
  gets lse = +inf there so that exp(s - lse) = 0.
- general (everything else, and devices without a fused kernel): plain maths in fp32
  (fp64 for fp64 inputs), ``SCORE_CHUNK_BYTES`` of scores per chunk of query rows, so
  memory is O(B * H * chunk * Sk); the backward recomputes each chunk's probabilities
  and applies dS = P * (dP - rowsum(P * dP)) with the dropout, softcap (1 - tanh^2),
  ALiBi (dslopes = -sum dS * distance) and mask (dmask = dS) chain rules. GQA reads K/V
  per kv head: a chunk of queries is laid out ``(B, Hkv, group * chunk, D)`` so no K/V
  copies are made; dk/dv are summed over the group by the same matmul.
- varlen: one dense call per sequence (``cu_seqlens.tolist()``), with the mask, ALiBi
  slopes and dropout counters of the padded ``(B, H, max_seqlen_q, max_seqlen_k)`` grid.
- cache: keys past ``seqlens_k`` are never read: the caches are sliced to the longest
  row, and when rows differ the shorter rows' tails are zeroed in a copy (NaN garbage
  would otherwise leak through 0 * NaN) and masked per row.

Limits: ``seqlens_k`` and ``cu_seqlens`` are read on the host (a device sync on CUDA).
The CUDA fused path has not run on a GPU in development (see tests/torch_backend).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fast_attn import _dropout_hash
from fast_attn.ops.attention_params import CACHE, VARLEN, AttentionParams, BiasGrads, Packing

__all__ = ["attention_fwd", "attention_bwd", "SCORE_CHUNK_BYTES"]

# Scores of one chunk of query rows, in bytes: ~32 MB keeps the chunk's few score-sized
# temporaries (scores, probabilities, dP, masks) in the low hundreds of MB at most.
SCORE_CHUNK_BYTES = 32 * 2**20
NEG_INF = float("-inf")
POS_INF = float("inf")
# fp64 stays on the general path: ATen's CPU flash kernel computes its exponentials with a
# fast approximation (~2**-20 relative), which costs fp64 callers (oracles, gradcheck,
# parity tests against torch's maths) ten decimal digits.
CPU_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_HEAD_DIM_ALIGN = 8  # memory-efficient kernel: 16-byte aligned rows
CUDA_MAX_HEAD_DIM = 256
CUDA_BIAS_ALIGN = 16  # its bias needs a row stride that is a multiple of 16 elements
CUDA_LSE_ALIGN = 32  # its lse is padded along Sq to a multiple of 32 (not on ROCm)


class _DropoutGrid(NamedTuple):
    """Where a dense call sits in the dropout counter space (varlen: the padded grid)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    batch_start: int


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_4d(t: Tensor) -> Tensor:
    """A mask broadcastable to (B, H, Sq, Sk) as a 4-D view with leading size-1 dims."""
    return t[(None,) * (4 - t.dim())] if t.dim() < 4 else t


def _unexpand(t: Tensor) -> Tensor:
    """Shrink stride-0 (expanded) dims to size 1: same broadcast, no materialisation."""
    index = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for n, st in zip(t.shape, t.stride()))
    return t[index]


def _rows_of(t: Tensor, i0: int, i1: int) -> Tensor:
    """Rows [i0, i1) of a 4-D mask along Sq (a broadcast Sq dim stays as it is)."""
    return t if t.shape[2] == 1 else t[:, :, i0:i1]


def _reduce_to(t: Tensor, shape) -> Tensor:
    """Sum ``t`` over the dims where ``shape`` broadcasts (size 1), keeping dims."""
    dims = [d for d, (n, m) in enumerate(zip(shape, t.shape)) if n == 1 and m != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _positions(params: AttentionParams, i0: int, i1: int, seqlen_q: int, seqlen_k: int,
               valid_k: Optional[Tensor], device, want_diag: bool):
    """Query rows [i0, i1) against all keys: (keep, diag, cols).

    keep: bool ``(rows, Sk)`` or ``(B, 1, rows, Sk)`` from causal/window/valid_k, or None
    when positions remove nothing. diag: the key each row is aligned with (bottom-right,
    against the row's valid length), for ALiBi distances; only when ``want_diag``.
    """
    if not (params.has_band or valid_k is not None or want_diag):
        return None, None, None
    cols = torch.arange(seqlen_k, device=device)
    rows = torch.arange(i0, i1, device=device).view(-1, 1)
    if valid_k is None:
        diag = rows + (seqlen_k - seqlen_q)  # (rows, 1)
        keep = None
    else:
        lengths = valid_k.to(device=device, dtype=torch.int64).view(-1, 1, 1, 1)
        diag = rows + lengths - seqlen_q  # (B, 1, rows, 1)
        keep = cols < lengths  # (B, 1, 1, Sk)
    left, right = params.window
    rules = []
    if params.causal:
        rules.append(cols <= diag)
    if left >= 0:
        rules.append(cols >= diag - left)
    if right >= 0:
        rules.append(cols <= diag + right)
    for rule in rules:
        keep = rule if keep is None else keep & rule
    return keep, (diag if want_diag else None), cols


# ----------------------------------------------------------------------------------------
# Fused path
# ----------------------------------------------------------------------------------------


def _use_fused(q: Tensor, v: Tensor, params: AttentionParams, grads: BiasGrads) -> bool:
    if params.softcap > 0.0 or params.alibi_slopes is not None or params.dropout_p > 0.0:
        return False
    if grads.mask or grads.alibi or q.shape[-1] != v.shape[-1]:
        return False
    if q.device.type == "cpu":
        return q.dtype in CPU_FUSED_DTYPES
    if q.device.type == "cuda":
        head_dim = q.shape[-1]
        float_mask = params.attn_mask is not None and not params.mask_is_bool
        return (
            q.dtype in CUDA_FUSED_DTYPES
            and head_dim % CUDA_HEAD_DIM_ALIGN == 0
            and head_dim <= CUDA_MAX_HEAD_DIM
            and not (float_mask and q.dtype != torch.float32)
        )
    return False


class _FusedBias(NamedTuple):
    is_causal: bool
    bias: Optional[Tensor]  # additive, 4-D, broadcastable to (B, H, Sq, Sk)
    fully_masked: Optional[Tensor]  # bool (B|1, H|1, Sq), only when some row is


def _fused_bias(q: Tensor, k: Tensor, params: AttentionParams, valid_k: Optional[Tensor]) -> _FusedBias:
    """One additive bias for the whole call (0 = attend, -inf = removed), or is_causal."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    mask = params.attn_mask
    if mask is None and valid_k is None and params.causal and not params.has_window and seqlen_q == seqlen_k:
        return _FusedBias(True, None, None)  # the kernels' top-left causal is ours here
    bias_dtype = _compute_dtype(q.dtype)
    keep, _, _ = _positions(params, 0, seqlen_q, seqlen_q, seqlen_k, valid_k, q.device, False)
    additive = None
    if mask is not None:
        mask = _unexpand(_as_4d(mask.to(q.device)))
        if params.mask_is_bool:
            keep = mask if keep is None else keep & mask
        else:
            additive = mask.to(bias_dtype)
    if keep is None:
        bias = additive
    else:
        base = additive if additive is not None else torch.zeros((), dtype=bias_dtype, device=q.device)
        bias = torch.where(keep, base, NEG_INF)
    if bias is None:
        return _FusedBias(False, None, None)
    bias = _as_4d(bias)
    fully_masked = torch.isneginf(bias).all(dim=-1)
    return _FusedBias(False, bias, fully_masked if bool(fully_masked.any()) else None)


def _heads_last(t: Tensor) -> Tensor:
    """(B, S, H, D) -> the (B, H, S, D) view the ATen kernels take (no copy)."""
    return t.transpose(1, 2)


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    """(B, S, Hkv, D) -> (B, S, H, D): the CUDA kernel wants equal head counts."""
    batch, seqlen, kv_heads, dim = t.shape
    if kv_heads == heads:
        return t
    group = heads // kv_heads
    return t.unsqueeze(3).expand(batch, seqlen, kv_heads, group, dim).reshape(batch, seqlen, heads, dim)


def _sum_groups(t: Tensor, kv_heads: int) -> Tensor:
    """(B, S, H, D) gradient of an expanded K/V -> (B, S, Hkv, D), summed over the group."""
    batch, seqlen, heads, dim = t.shape
    if heads == kv_heads:
        return t
    return t.view(batch, seqlen, kv_heads, heads // kv_heads, dim).sum(dim=3)


def _cuda_bias(bias: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """The bias as the memory-efficient kernel wants it: q's dtype, (B, H, Sq, Sk) view of a
    buffer whose rows are padded to CUDA_BIAS_ALIGN elements."""
    if bias is None:
        return None
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k = k.shape[1]
    padded = -(-seqlen_k // CUDA_BIAS_ALIGN) * CUDA_BIAS_ALIGN
    buffer = torch.zeros((*bias.shape[:-1], padded), dtype=q.dtype, device=q.device)
    buffer[..., :seqlen_k] = bias
    return buffer[..., :seqlen_k].expand(batch, heads, seqlen_q, seqlen_k)


def _fused_fwd(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, valid_k: Optional[Tensor]):
    fused = _fused_bias(q, k, params, valid_k)
    scale = params.softmax_scale
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_last(q), _heads_last(k), _heads_last(v), 0.0, fused.is_causal,
            attn_mask=fused.bias, scale=scale,
        )
    else:
        heads = q.shape[2]
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            _heads_last(q), _heads_last(_expand_kv(k, heads)), _heads_last(_expand_kv(v, heads)),
            _cuda_bias(fused.bias, q, k), True, 0.0, fused.is_causal, scale=scale,
        )
        lse = lse[:, :, : q.shape[1]]
    out = out.transpose(1, 2).contiguous()  # the kernels write (B, S, H, D) memory: no copy
    if lse.dtype != torch.float32:  # a no-op .to() still costs ~2 us per call
        lse = lse.float()
    lse = lse.contiguous()
    if fused.fully_masked is not None:
        rows = fused.fully_masked.expand(lse.shape)
        lse = lse.masked_fill(rows, NEG_INF)
        out = out.masked_fill(rows.transpose(1, 2).unsqueeze(-1), 0.0)
    return out, lse


def _fused_bwd(dout, q, k, v, out, lse, params: AttentionParams):
    fused = _fused_bias(q, k, params, None)
    scale = params.softmax_scale
    # Fully masked rows carry lse = -inf; +inf makes every exp(s - lse) exactly 0 there.
    lse = lse.to(_compute_dtype(q.dtype))
    lse = lse.masked_fill(torch.isneginf(lse), POS_INF).contiguous()
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_last(dout), _heads_last(q), _heads_last(k), _heads_last(v), _heads_last(out),
            lse, 0.0, fused.is_causal, attn_mask=fused.bias, scale=scale,
        )
        return dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()
    heads, kv_heads, seqlen_q = q.shape[2], k.shape[2], q.shape[1]
    if torch.version.hip is None:  # the kernel's own lse layout: Sq padded to 32
        padded = -(-seqlen_q // CUDA_LSE_ALIGN) * CUDA_LSE_ALIGN
        lse = torch.nn.functional.pad(lse, (0, padded - seqlen_q))
    no_rng = torch.zeros((), dtype=torch.int64)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _heads_last(dout), _heads_last(q), _heads_last(_expand_kv(k, heads)),
        _heads_last(_expand_kv(v, heads)), _cuda_bias(fused.bias, q, k), _heads_last(out), lse,
        no_rng, no_rng, 0.0, [True, True, True, False], fused.is_causal, scale=scale,
    )
    dk = _sum_groups(dk.transpose(1, 2), kv_heads)
    dv = _sum_groups(dv.transpose(1, 2), kv_heads)
    return dq.transpose(1, 2).contiguous(), dk.contiguous(), dv.contiguous()


# ----------------------------------------------------------------------------------------
# General path: chunks of query rows, plain maths
# ----------------------------------------------------------------------------------------


def _chunk_rows(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype) -> int:
    row_bytes = batch * heads * seqlen_k * torch.finfo(dtype).bits // 8
    return max(1, min(seqlen_q, SCORE_CHUNK_BYTES // max(row_bytes, 1)))


def _grouped_rows(t: Tensor, i0: int, i1: int, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """Rows [i0, i1) of a (B, S, H, D) tensor as (B, Hkv, group * rows, D) in ``dtype``:
    query head h = kv_head * group + g, so each kv head's queries form one matrix."""
    batch, _, heads, dim = t.shape
    rows = t[:, i0:i1].transpose(1, 2)
    rows = torch.empty(rows.shape, dtype=dtype, device=t.device).copy_(rows)  # one copy, cast included
    return rows.view(batch, kv_heads, (heads // kv_heads) * (i1 - i0), dim)


class _Chunk(NamedTuple):
    probs: Tensor  # (B, H, rows, Sk) softmax probabilities (0 on fully masked rows)
    lse: Tensor  # (B, H, rows), -inf on fully masked rows
    tanh: Optional[Tensor]  # softcap: tanh(s / softcap), for the chain rule
    distance: Optional[Tensor]  # ALiBi: |diag - j|, broadcastable to the scores


def _chunk_probs(q_rows: Tensor, k_t: Tensor, params: AttentionParams, i0: int, i1: int,
                 seqlen_q: int, heads: int, valid_k: Optional[Tensor]) -> _Chunk:
    """Scores of rows [i0, i1) in the documented order, masked, then softmax."""
    batch, seqlen_k = k_t.shape[0], k_t.shape[2]
    rows = i1 - i0
    scores = torch.matmul(q_rows, k_t.transpose(-1, -2)).view(batch, heads, rows, seqlen_k)
    scores.mul_(params.softmax_scale)
    tanh = None
    if params.softcap > 0.0:
        tanh = torch.tanh(scores / params.softcap)
        scores = tanh * params.softcap
    slopes = params.alibi_slopes
    keep, diag, cols = _positions(params, i0, i1, seqlen_q, seqlen_k, valid_k, q_rows.device, slopes is not None)
    distance = None
    if slopes is not None:
        distance = (diag - cols).abs().to(scores.dtype)
        if distance.dim() == 2:
            distance = distance.view(1, 1, rows, seqlen_k)
        scores.sub_(slopes.to(device=scores.device, dtype=scores.dtype).view(-1, heads, 1, 1) * distance)
    mask = params.attn_mask
    if mask is not None:
        mask = _rows_of(_as_4d(mask.to(scores.device)), i0, i1)
        if params.mask_is_bool:
            keep = mask if keep is None else keep & mask
        else:
            scores.add_(mask.to(scores.dtype))
    if keep is not None:
        scores.masked_fill_(~keep, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    # A fully masked row has lse -inf; exp(-inf - (+inf)) = 0 gives it zero probabilities.
    safe = lse.masked_fill(torch.isneginf(lse), POS_INF)
    probs = scores.sub_(safe.unsqueeze(-1)).exp_()
    return _Chunk(probs, lse, tanh, distance)


def _dropout_scale(params: AttentionParams, grid: _DropoutGrid, batch: int, heads: int, i0: int,
                   i1: int, seqlen_k: int, dtype, device) -> Tensor:
    """keep / (1 - p) for rows [i0, i1) of this call's block of the dropout grid."""
    keep = _dropout_hash.keep_mask(
        params.dropout_seed, grid.batch, heads, grid.seqlen_q, grid.seqlen_k, params.dropout_p,
        device=device, rows=slice(i0, i1), cols=slice(0, seqlen_k),
        batches=slice(grid.batch_start, grid.batch_start + batch),
    )
    return keep.to(dtype) * (1.0 / (1.0 - params.dropout_p))


def _general_fwd(q, k, v, params: AttentionParams, valid_k: Optional[Tensor], grid: _DropoutGrid):
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k, kv_heads, dim_v = k.shape[1], k.shape[2], v.shape[3]
    dtype = _compute_dtype(q.dtype)
    k_t = k.transpose(1, 2).to(dtype)  # (B, Hkv, Sk, D): a copy only when upcasting
    v_t = v.transpose(1, 2).to(dtype)
    out = torch.empty((batch, seqlen_q, heads, dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=dtype, device=q.device)
    step = _chunk_rows(batch, heads, seqlen_q, seqlen_k, dtype)
    for i0 in range(0, seqlen_q, step):
        i1 = min(i0 + step, seqlen_q)
        rows = i1 - i0
        chunk = _chunk_probs(_grouped_rows(q, i0, i1, kv_heads, dtype), k_t, params, i0, i1, seqlen_q, heads, valid_k)
        probs = chunk.probs
        if params.dropout_p > 0.0:
            probs = probs.mul_(_dropout_scale(params, grid, batch, heads, i0, i1, seqlen_k, dtype, q.device))
        out_rows = torch.matmul(probs.view(batch, kv_heads, -1, seqlen_k), v_t)
        out[:, i0:i1] = out_rows.view(batch, heads, rows, dim_v).transpose(1, 2)
        lse[:, :, i0:i1] = chunk.lse
    return out, lse


def _general_bwd(dout, q, k, v, params: AttentionParams, grid: _DropoutGrid, grads: BiasGrads):
    """Returns dq, dk, dv (input dtypes) and, when asked, dmask in the 4-D shape of the
    un-expanded mask and dslopes in the slopes' shape (compute dtype)."""
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    dtype = _compute_dtype(q.dtype)
    k_t = k.transpose(1, 2).to(dtype)
    v_t = v.transpose(1, 2).to(dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk_acc = torch.zeros(k_t.shape, dtype=dtype, device=q.device)
    dv_acc = torch.zeros(v_t.shape, dtype=dtype, device=q.device)
    dmask = dslopes = None
    if grads.mask:
        # Not un-expanded: an expanded view's gradient is per element, not summed.
        dmask = torch.zeros(_as_4d(params.attn_mask).shape, dtype=dtype, device=q.device)
    if grads.alibi:
        dslopes = torch.zeros(params.alibi_slopes.shape, dtype=dtype, device=q.device)
    step = _chunk_rows(batch, heads, seqlen_q, seqlen_k, dtype)
    for i0 in range(0, seqlen_q, step):
        i1 = min(i0 + step, seqlen_q)
        rows = i1 - i0
        q_rows = _grouped_rows(q, i0, i1, kv_heads, dtype)  # (B, Hkv, group * rows, D)
        do_rows = _grouped_rows(dout, i0, i1, kv_heads, dtype)  # (B, Hkv, group * rows, Dv)
        chunk = _chunk_probs(q_rows, k_t, params, i0, i1, seqlen_q, heads, None)
        probs, dropped = chunk.probs, chunk.probs
        drop = None
        if params.dropout_p > 0.0:
            drop = _dropout_scale(params, grid, batch, heads, i0, i1, seqlen_k, dtype, q.device)
            dropped = probs * drop
        # dV += (P * keep / (1 - p))^T dO, summed over the query heads of each kv head.
        dv_acc += torch.matmul(dropped.view(batch, kv_heads, -1, seqlen_k).transpose(-1, -2), do_rows)
        del dropped
        # dP = dO V^T (through the dropout), dS = P * (dP - rowsum(P * dP)).
        dp = torch.matmul(do_rows, v_t.transpose(-1, -2)).view(batch, heads, rows, seqlen_k)
        if drop is not None:
            dp.mul_(drop)
        delta = (probs * dp).sum(dim=-1, keepdim=True)
        ds = dp.sub_(delta).mul_(probs)
        if dmask is not None:
            dmask_rows = _rows_of(dmask, i0, i1)  # a view: += writes into dmask
            dmask_rows += _reduce_to(ds, dmask_rows.shape)
        if dslopes is not None:
            per_head = (ds * chunk.distance).sum(dim=(-1, -2))  # (B, H)
            dslopes -= per_head.sum(dim=0) if dslopes.dim() == 1 else per_head
        if chunk.tanh is not None:
            ds.mul_(1.0 - chunk.tanh * chunk.tanh)  # d(c * tanh(s / c)) / ds
        ds.mul_(params.softmax_scale)
        ds_grouped = ds.view(batch, kv_heads, -1, seqlen_k)
        dq_rows = torch.matmul(ds_grouped, k_t).view(batch, heads, rows, -1)
        dq[:, i0:i1] = dq_rows.transpose(1, 2)
        dk_acc += torch.matmul(ds_grouped.transpose(-1, -2), q_rows)
    dk = dk_acc.transpose(1, 2).to(k.dtype).contiguous()
    dv = dv_acc.transpose(1, 2).to(v.dtype).contiguous()
    return dq, dk, dv, dmask, dslopes


# ----------------------------------------------------------------------------------------
# Dense, cache and varlen drivers
# ----------------------------------------------------------------------------------------


def _dense_fwd(q, k, v, params: AttentionParams, valid_k: Optional[Tensor] = None,
               grid: Optional[_DropoutGrid] = None):
    if _use_fused(q, v, params, BiasGrads()):
        return _fused_fwd(q, k, v, params, valid_k)
    if grid is None:
        grid = _DropoutGrid(q.shape[0], q.shape[1], k.shape[1], 0)
    return _general_fwd(q, k, v, params, valid_k, grid)


def _dense_bwd(dout, q, k, v, out, lse, params: AttentionParams, grads: BiasGrads,
               grid: Optional[_DropoutGrid] = None):
    if _use_fused(q, v, params, grads):
        return (*_fused_bwd(dout, q, k, v, out, lse, params), None, None)
    if grid is None:
        grid = _DropoutGrid(q.shape[0], q.shape[1], k.shape[1], 0)
    return _general_bwd(dout, q, k, v, params, grid, grads)


def _empty_rows(q: Tensor, v: Tensor, lse_shape) -> tuple:
    """The result of a call where no row sees a key: out 0, lse -inf."""
    out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    return out, torch.full(lse_shape, NEG_INF, dtype=_compute_dtype(q.dtype), device=q.device)


def _cache_fwd(q, k_cache, v_cache, params: AttentionParams, seqlens_k: Optional[Tensor]):
    if seqlens_k is None:
        return _dense_fwd(q, k_cache, v_cache, params)
    lengths = seqlens_k.tolist()
    shortest, longest = min(lengths), max(lengths)
    if longest == 0:
        return _empty_rows(q, v_cache, (q.shape[0], q.shape[2], q.shape[1]))
    # Never read past the longest row; equal rows need nothing more.
    k, v = k_cache[:, :longest], v_cache[:, :longest]
    if shortest == longest:
        return _dense_fwd(q, k, v, params)
    # Zero the shorter rows' tails in a copy: a masked key still meets 0 * NaN in P @ V
    # and NaN in q.k (which -inf masking cannot remove).
    valid = torch.arange(longest, device=k.device) < seqlens_k.to(k.device).view(-1, 1)  # (B, Sk)
    invalid = ~valid.view(*valid.shape, 1, 1)
    k, v = k.masked_fill(invalid, 0.0), v.masked_fill(invalid, 0.0)
    return _dense_fwd(q, k, v, params, valid_k=seqlens_k.to(device=q.device, dtype=torch.int64))


class _Sequence(NamedTuple):
    index: int
    q_rows: slice
    k_rows: slice
    seqlen_q: int
    seqlen_k: int


def _sequences(packing: Packing):
    starts_q, starts_k = packing.cu_seqlens_q.tolist(), packing.cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        yield _Sequence(b, slice(q0, q1), slice(k0, k1), q1 - q0, k1 - k0)


def _block_index(mask4: Tensor, seq: _Sequence) -> tuple:
    """Sequence b's block [b, :, :Sq_b, :Sk_b] of a padded-grid mask (broadcast dims kept)."""
    index = (
        slice(seq.index, seq.index + 1) if mask4.shape[0] != 1 else slice(None),
        slice(None),
        slice(0, seq.seqlen_q) if mask4.shape[2] != 1 else slice(None),
        slice(0, seq.seqlen_k) if mask4.shape[3] != 1 else slice(None),
    )
    return index


def _sequence_params(params: AttentionParams, mask4: Optional[Tensor], seq: _Sequence) -> AttentionParams:
    mask = None if mask4 is None else mask4[_block_index(mask4, seq)]
    slopes = params.alibi_slopes
    if slopes is not None and slopes.dim() == 2:
        slopes = slopes[seq.index]
    return dataclasses.replace(params, attn_mask=mask, alibi_slopes=slopes)


def _varlen_fwd(q, k, v, params: AttentionParams, packing: Packing):
    total_q, heads, _ = q.shape
    out = torch.empty((total_q, heads, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total_q), dtype=_compute_dtype(q.dtype), device=q.device)
    mask4 = None if params.attn_mask is None else _unexpand(_as_4d(params.attn_mask))
    batch = packing.cu_seqlens_q.numel() - 1
    for seq in _sequences(packing):
        if seq.seqlen_q == 0:
            continue
        if seq.seqlen_k == 0:
            out[seq.q_rows] = 0.0
            lse[:, seq.q_rows] = NEG_INF
            continue
        grid = _DropoutGrid(batch, packing.max_seqlen_q, packing.max_seqlen_k, seq.index)
        out_b, lse_b = _dense_fwd(
            q[seq.q_rows].unsqueeze(0), k[seq.k_rows].unsqueeze(0), v[seq.k_rows].unsqueeze(0),
            _sequence_params(params, mask4, seq), grid=grid,
        )
        out[seq.q_rows] = out_b[0]
        lse[:, seq.q_rows] = lse_b[0]
    return out, lse


def _varlen_bwd(dout, q, k, v, out, lse, params: AttentionParams, packing: Packing, grads: BiasGrads):
    dtype = _compute_dtype(q.dtype)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    mask4 = None if params.attn_mask is None else _as_4d(params.attn_mask)
    dmask = torch.zeros(mask4.shape, dtype=dtype, device=q.device) if grads.mask else None
    dslopes = torch.zeros(params.alibi_slopes.shape, dtype=dtype, device=q.device) if grads.alibi else None
    batch = packing.cu_seqlens_q.numel() - 1
    for seq in _sequences(packing):
        if seq.seqlen_q == 0 or seq.seqlen_k == 0:
            continue  # no attended key: every gradient of the sequence is zero
        grid = _DropoutGrid(batch, packing.max_seqlen_q, packing.max_seqlen_k, seq.index)
        dq_b, dk_b, dv_b, dmask_b, dslopes_b = _dense_bwd(
            dout[seq.q_rows].unsqueeze(0), q[seq.q_rows].unsqueeze(0), k[seq.k_rows].unsqueeze(0),
            v[seq.k_rows].unsqueeze(0), out[seq.q_rows].unsqueeze(0), lse[:, seq.q_rows].unsqueeze(0),
            _sequence_params(params, mask4, seq), grads, grid=grid,
        )
        dq[seq.q_rows] = dq_b[0]
        dk[seq.k_rows] = dk_b[0]
        dv[seq.k_rows] = dv_b[0]
        if dmask is not None:
            dmask[_block_index(dmask, seq)] += dmask_b
        if dslopes is not None:
            if dslopes.dim() == 2:
                dslopes[seq.index] += dslopes_b
            else:
                dslopes += dslopes_b
    return dq, dk, dv, dmask, dslopes


# ----------------------------------------------------------------------------------------
# The backend interface
# ----------------------------------------------------------------------------------------


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, packing: Packing):
    """Softmax attention with our semantics; returns ``(out, lse)``.

    Args:
        q, k, v: dense/cache ``(B, Sq, H, D)``, ``(B, Sk, Hkv, D)``; varlen ``(total, H, D)``;
            any strides with a unit last stride. H % Hkv == 0; v may have its own Dv.
        params, packing: see ``fast_attn/ops/attention_params.py``.

    Returns:
        out contiguous in q's dtype and layout (head dim Dv); lse ``(B, H, Sq)`` (varlen
        ``(H, total_q)``), fp32 (fp64 for fp64 inputs), -inf on fully masked rows.
    """
    if packing.kind == VARLEN:
        return _varlen_fwd(q, k, v, params, packing)
    if packing.kind == CACHE:
        return _cache_fwd(q, k, v, params, packing.seqlens_k)
    return _dense_fwd(q, k, v, params)


def _bias_grads_out(dmask: Optional[Tensor], dslopes: Optional[Tensor], params: AttentionParams):
    if dmask is not None:
        dmask = dmask.reshape(params.attn_mask.shape).to(params.attn_mask.dtype).contiguous()
    if dslopes is not None:
        dslopes = dslopes.to(params.alibi_slopes.dtype).contiguous()
    return dmask, dslopes


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  params: AttentionParams, packing: Packing, grads: BiasGrads):
    """Gradients of ``attention_fwd`` (dense and varlen packings).

    Returns ``(dq, dk, dv, dmask, dslopes)``: dq/dk/dv contiguous in the inputs' dtypes and
    layouts (dk/dv summed over the query heads of each kv head); dmask in attn_mask's
    shape and dtype when ``grads.mask``, dslopes in alibi_slopes' shape when
    ``grads.alibi``, else None. ``lse`` may be fp32 for fp64 inputs.
    """
    if packing.kind == VARLEN:
        dq, dk, dv, dmask, dslopes = _varlen_bwd(dout, q, k, v, out, lse, params, packing, grads)
    elif packing.kind == CACHE:
        raise NotImplementedError("attention_bwd: the kv-cache packing has no backward")
    else:
        dq, dk, dv, dmask, dslopes = _dense_bwd(dout, q, k, v, out, lse, params, grads)
    return (dq, dk, dv, *_bias_grads_out(dmask, dslopes, params))
