"""Softmax attention in Triton: FlashAttention-2 forward and backward, dense and packed
(varlen), and the split-KV decode step over a KV cache.

Algorithm (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", arXiv 2307.08691; the loop structure of Triton's fused-attention tutorial
06). No score matrix is ever materialised:

- forward: one program per (query block of BLOCK_M rows, head, batch) walks the key
  blocks of its band, recomputing scores tile by tile with an online softmax: a running
  row max ``m`` and row sum ``l`` (fp32), the output accumulator rescaled by
  ``exp(m_old - m_new)`` when the max grows, divided by ``l`` once at the end. The
  softmax runs in base 2 (``exp2``) with ``softmax_scale * log2(e)`` folded into one
  multiply of ``q.k``; the row's log-sum-exp ``lse = (m + log2 l) * ln 2`` is saved.
- backward: ``delta = rowsum(dO * O)`` (a preprocess kernel, with the LSE converted to
  log2 units); one kernel per (key block, kv head, batch) recomputes ``P = exp(S - lse)``
  for every query block of its band and accumulates ``dV += P^T dO`` and
  ``dK += dS^T Q`` with ``dS = P * (dP - delta)``, ``dP = dO V^T``; a separate kernel per
  query block accumulates ``dQ += dS K``. No atomics anywhere: the backward is bitwise
  reproducible (``deterministic`` costs nothing extra), at the price of computing S and
  dP twice. GQA: the dK/dV program loops over the query heads of its kv head in a fixed
  order, so the group's sum is deterministic and no repeated K/V or fp32 buffer exists.

Scores, in DESIGN.md's order, all in log2 units inside the kernels: ``s = scale * q.k``;
with softcap ``s = softcap * tanh(s / softcap)`` (chain rule ``1 - tanh^2`` in the
backward); ALiBi adds ``-slope * |i + Sk - Sq - j|``; an additive mask is added; then the
causal/window band, the bool mask and the key-length bound remove keys (-inf). Causal is
bottom-right aligned and expressed as a window with right edge 0. Blocks entirely outside
a tile's band are never visited. In the forward and dQ kernels the key blocks that every
row of the query tile sees in full run a loop with no position masks, and the (at most
two) ranges of edge blocks at the band's edges and the sequence end run the masked loop;
the dK/dV kernel keeps one loop and masks its edge blocks behind a uniform branch (fewer
registers with K and V resident, see ``_attn_bwd_dkdv_blocks``). Dropout regenerates the
keep-mask of ``fast_attn._dropout_hash`` bit for bit (fmix32 counter hash on uint32) in the forward and both backward kernels; it is never stored.

The launchers ``attention_fwd(q, k, v, params, packing)`` and ``attention_bwd(dout, q,
k, v, out, lse, params, packing, grads)`` take the call's ``AttentionParams`` and
``Packing`` (fast_attn/ops/attention_params.py). Packed sequences (``packing.kind ==
"varlen"``, FlashAttention-2's varlen layout) run the same kernels with each program
finding its sequence's rows and length in ``cu_seqlens`` (IS_VARLEN); masks, ALiBi and
the dropout counter keep the padded ``(B, H, max_seqlen_q, max_seqlen_k)`` coordinates.
The KV-cache step (``"cache"``: the op layer has appended the new keys/values) runs the
forward with a per-row key count (HAS_SEQLENS_K; cache rows past it are never read); when the grid cannot fill the GPU the keys are split across programs
(Flash-Decoding: Dao et al. 2023) and ``_attn_fwd_combine_kernel`` merges the splits'
normalised outputs by their LSE.

Layout: q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hkv, D)`` with any strides whose last one is
1 (no copies; one with a strided last dimension, e.g. an expanded dout, is copied); out,
dq, dk, dv contiguous in the input layout; lse fp32 ``(B, H, Sq)`` (varlen ``(H,
total_q)``). Offsets into the tensors are 64-bit. Grids are 1-D over (block, [split,]
head, batch), blocks fastest.

Limits: fp16, bf16 and fp32 (fp32 dots in IEEE precision, not TF32); head_dim <= 256
(padded to the next power of two >= 16 with masked loads); k and v share one head dim;
the gradients of an additive mask and of the ALiBi slopes are not computed
(``attention_bwd`` raises NotImplementedError if asked); the KV-cache step takes no mask
and no dropout (as its op), and does not yet pack a GQA group's query heads into one
tile (each query head reads its K/V; L2 serves the group). Under the Triton interpreter
(TRITON_INTERPRET=1) bf16 dot operands are cast to fp32 first (the interpreter's dot
multiplies raw bf16 bits) and each kernel runs one pinned tile config. Plain launch
functions only: no autograd and no input checks (``fast_attn.ops.attention`` does both).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fast_attn._dropout_hash import dropout_key, dropout_threshold
from fast_attn.ops.attention_params import CACHE, VARLEN, AttentionParams, BiasGrads, Packing
from fast_attn.triton_kernels._device import interpret_enabled, sm_count

__all__ = ["attention_fwd", "attention_bwd"]

# --------------------------------------------------------------------------- constants

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e) = 1/ln(2): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log2-unit statistics back to natural log
NEG_TWO_LOG2E = tl.constexpr(-2.8853900817779268)  # -2*log2(e): exp(-2|x|) in tanh
# MurmurHash3 fmix32 multipliers: the dropout hash of fast_attn.reference.attention.
FMIX_MUL1 = tl.constexpr(0x85EBCA6B)
FMIX_MUL2 = tl.constexpr(0xC2B2AE35)
UINT32_MASK = tl.constexpr(0xFFFFFFFF)
TWO_POW_32 = 2**32  # a dropout threshold this large keeps nothing

# Attention-mask kinds (the MASK_KIND constexpr).
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)  # True = may attend (passed as uint8)
MASK_ADD = tl.constexpr(2)  # added to the scores

MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16
DELTA_BLOCK_M = 64  # rows per program of the backward preprocess (memory bound, any size works)

# ------------------------------------------------------------------------ tile configs
# Not timed yet: no GPU was available when these were written. The candidates start from
# FlashAttention-2's tiles (128x64 / 128x128 up to d=128, 64x64 above) and Triton's
# tutorial 06 space; the pruning budgets below are calibrated on register and shared
# memory counts that ptxas reports for these kernels compiled ahead of time for sm_90
# (Triton 3.8, bf16, no GPU needed). The GPU session must time the survivors and replace
# this comment with the measured reason for each tile kept. (BLOCK_M, BLOCK_N, warps, stages):
_FWD_TILES = (
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (64, 64, 8, 2),
    (64, 32, 4, 3),
    (32, 32, 4, 2),
)
# Backward: BLOCK_N keys owned by a dK/dV program, BLOCK_M query rows per step. The dQ
# kernel has the forward's shape (BLOCK_M query rows, BLOCK_N-key steps): _FWD_TILES.
_BWD_TILES = (
    (64, 128, 8, 2),
    (32, 128, 8, 2),
    (32, 64, 4, 2),
    (32, 64, 8, 2),
    (16, 64, 4, 2),
    (32, 32, 8, 2),
    (16, 32, 4, 2),
)
# fp32 tile values per thread a config may hold: accumulators plus score tiles, i.e.
# (BLOCK_M*BLOCK_D + BLOCK_M*BLOCK_N) / threads forward and dQ, (2*BLOCK_N*BLOCK_D +
# 2*BLOCK_N*BLOCK_M) / threads for dK/dV. ptxas, sm_90: forward d=64 128x64 4 warps =
# 128 values: 238 registers, no spill; d=128 128x64 4 warps = 192: 552 B spilled; d=256
# 64x64 4 warps = 160: 316 B spilled. dK/dV d=64 BLOCK_N=128 BLOCK_M=64 8 warps = 128: 233
# registers, no spill; d=128 BLOCK_N=64 BLOCK_M=32 4 warps = 160: 164 B spilled.
MAX_TILE_VALUES_PER_THREAD = 128
# Shared memory for the resident tile and the pipelined ones (the estimate matches the
# ptxas figure exactly for the plain kernels: d=128 128x64 3 stages = 128 KiB); the
# feature-heavy variants use more, and H100 allows 227 KiB per block.
SMEM_BUDGET_BYTES = 200 * 1024
THREADS_PER_WARP = 32
# Query tiles taller than this are pruned when the (bucketed) query length is at most
# this: the extra rows would be padding.
SHORT_QUERY = 64
MAX_TUNE_BUCKET = 16384  # sequence lengths are bucketed to powers of two up to this

# ---------------------------------------------------------------------- split-KV decode
# Split-KV (Flash-Decoding): when (query blocks x heads x batch) cannot fill the GPU, the
# keys are split across programs and the partial results merged by their LSE. The number
# of splits follows FlashAttention-2's heuristic (flash_api.cpp), on 2 programs per SM.
# Unmeasured on H100 yet, like the tiles above.
SPLIT_ALIGN = 128  # keys per split are a multiple of this: of every BLOCK_N candidate
NO_SPLIT_KEYS = 2**30  # split_keys of an unsplit launch: one split holds every key
MAX_KV_SPLITS = 128
PROGRAMS_PER_SM = 2
FULL_GPU_FRACTION = 0.8  # no split when the grid already fills this fraction of the slots
SPLIT_EFFICIENCY = 0.85  # fewest splits whose wave efficiency is within this of the best
DECODE_BLOCK_M = 64  # query rows per program assumed by the heuristic
COMBINE_BLOCK_M = 16  # rows per program of the combine kernel
# The one tile every kernel runs under the interpreter: small and unequal, so that the
# tests' short sequences still cross several blocks, ragged tails and band edges.
INTERPRETER_TILES = {
    "_attn_fwd_kernel": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
    "_attn_bwd_dkdv_kernel": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
    "_attn_bwd_dq_kernel": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
}


# ----------------------------------------------------------------- device helpers


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finalizer on uint32 (multiplies wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * FMIX_MUL1
    x = x ^ (x >> 13)
    x = x * FMIX_MUL2
    return x ^ (x >> 16)


@triton.jit
def _dropout_keep(row_base, offs_i, offs_j, seqlen_k, key, threshold):
    """The keep-mask tile: hash of idx = ((b*H + h)*Sq + i)*Sk + j >= threshold.

    ``row_base`` is (b*H + h)*Sq as int64; offs_i (int64) and offs_j broadcast to the
    tile; ``key`` and ``threshold`` are uint32 (see dropout_keep_mask's docstring).
    """
    # the 64-bit counter as two uint32 halves: 64-bit maths once per query row, then
    # a 32-bit add with carry per element
    row_start = (row_base + offs_i) * seqlen_k
    start_lo = (row_start & UINT32_MASK).to(tl.uint32)
    start_hi = (row_start >> 32).to(tl.uint32)
    idx_lo = start_lo + offs_j.to(tl.uint32)  # wraps modulo 2**32
    idx_hi = start_hi + (idx_lo < start_lo).to(tl.uint32)
    hashed = _fmix32(_fmix32(key ^ idx_lo) ^ idx_hi)
    hashed = _fmix32(hashed ^ key)  # re-inject the key
    return hashed >= threshold


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow."""
    e = tl.exp2(tl.abs(x) * NEG_TWO_LOG2E)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _mma(a, b, acc, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b in fp32 (acc None: a @ b); FP32_DOT casts the operands first."""
    if FP32_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A 2-D tile with only the bounds checks that can fail (0 outside)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _block_ranges(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Block indices (first, full_first, full_end, end) for a band of positions.

    [lo, hi) are the positions some row of the tile may see, [full_lo, full_hi) those
    every row sees. Blocks [first, end) cover the band; [full_first, full_end) are the
    blocks inside the full range (no position mask), the rest are edge blocks.
    """
    first = lo // BLOCK
    end = tl.where(hi > lo, tl.cdiv(tl.maximum(hi, 0), BLOCK), first)
    full_first = tl.cdiv(tl.maximum(full_lo, 0), BLOCK)
    full_end = tl.maximum(full_hi, 0) // BLOCK
    full_first = tl.minimum(tl.maximum(full_first, first), end)
    full_end = tl.minimum(tl.maximum(full_end, full_first), end)
    return first, full_first, full_end, end


@triton.jit
def _sequence(CuSeqlens, b, max_seqlen, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence b: rows [cu[b], cu[b+1]) of a packed (varlen)
    tensor, or (0, max_seqlen) in a dense batch."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + b)
        length = tl.load(CuSeqlens + b + 1) - start
        start = start.to(tl.int64)
    else:
        start = 0
        length = max_seqlen
    return start, length


@triton.jit
def _scores(
    qk, offs_i, offs_j, row0, col0, mask_base, stride_mm, stride_mn, alibi_log2,
    seqlen_q, seqlen_k, diag_offset, qk_scale, softcap_log2,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
):
    """Scores in log2 units from the raw ``q.k`` tile, and tanh of the softcap (or qk).

    ``offs_i`` (query rows) and ``offs_j`` (keys) broadcast to the tile's orientation,
    (BLOCK_M, BLOCK_N) or transposed; ``row0``/``col0`` are the tile's first row and key.
    """
    # scale (and softcap): qk_scale is scale*log2(e), or scale/softcap with softcap
    if HAS_SOFTCAP:
        tanh = _tanh(qk * qk_scale)
        s = tanh * softcap_log2
    else:
        tanh = qk
        s = qk * qk_scale
    # ALiBi: -slope * |i + Sk - Sq - j| (alibi_log2 = -slope * log2(e))
    if HAS_ALIBI:
        s += tl.abs(offs_i + diag_offset - offs_j).to(tl.float32) * alibi_log2
    # attention mask, read tile by tile through its (possibly 0) broadcast strides
    if MASK_KIND != MASK_NONE:
        in_bounds = (offs_i < seqlen_q) & (offs_j < seqlen_k)
        # 64-bit offset to the tile's corner, 32-bit offsets inside the tile
        mask_tile = mask_base + tl.cast(row0, tl.int64) * stride_mm + tl.cast(col0, tl.int64) * stride_mn
        mask_ptrs = mask_tile + ((offs_i - row0) * stride_mm + (offs_j - col0) * stride_mn)
        if MASK_KIND == MASK_BOOL:
            allowed = tl.load(mask_ptrs, mask=in_bounds, other=0)
            s = tl.where(allowed != 0, s, float("-inf"))
        else:
            s += tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    return s, tanh


@triton.jit
def _position_mask(s, offs_i, offs_j, seqlen_k, diag_offset, window_left, window_right,
                   HAS_BAND: tl.constexpr):
    """-inf for keys past Sk and, with a band, keys outside [diag - left, diag + right]."""
    keep = offs_j < seqlen_k
    if HAS_BAND:
        diag = offs_i + diag_offset
        keep = keep & (offs_j >= diag - window_left) & (offs_j <= diag + window_right)
    return tl.where(keep, s, float("-inf"))


# --------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_blocks(
    acc, l_i, m_i, q, K, V, stride_kn, stride_vn, m_first, offs_m, offs_d,
    block_first, block_end,
    mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
    dropout_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [block_first, block_end) of one query block."""
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(block_first * BLOCK_N, block_end * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        kv_rows = offs_n.to(tl.int64)[:, None]
        # S = Q K^T for this key block (raw, fp32)
        k = _load_tile(K + kv_rows * stride_kn + offs_d[None, :], n_ok, d_ok, EDGE, BLOCK_D != HEAD_DIM)
        qk = _mma(q, tl.trans(k), None, FP32_DOT, DOT_PRECISION)
        s, _ = _scores(
            qk, offs_m[:, None], offs_n[None, :], m_first, start_n, mask_base, stride_mm, stride_mn, alibi_log2,
            seqlen_q, seqlen_k, diag_offset, qk_scale, softcap_log2, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND,
        )
        if EDGE:
            s = _position_mask(s, offs_m[:, None], offs_n[None, :], seqlen_k, diag_offset,
                               window_left, window_right, HAS_BAND)
        # new row max; a row with no finite score yet keeps a 0 reference (no inf - inf)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        # rescale the running sum and accumulator to the new max
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # dropout zeroes kept-out probabilities (the 1/(1-p) scale is applied at the end)
        if HAS_DROPOUT:
            keep = _dropout_keep(dropout_row_base, offs_m.to(tl.int64)[:, None], offs_n[None, :],
                                 dropout_seqlen_k, dropout_key, dropout_thresh)
            p = tl.where(keep, p, 0.0)
        # O += P V
        v = _load_tile(V + kv_rows * stride_vn + offs_d[None, :], n_ok, d_ok, EDGE, BLOCK_D != HEAD_DIM)
        acc = _mma(p.to(v.dtype), v, acc, FP32_DOT, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["dropout_key", "dropout_thresh"])
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, Alibi, CuSeqlensQ, CuSeqlensK, SeqlensK,
    stride_qb, stride_qm, stride_qh,  # q (B, Sq, H, D)
    stride_kb, stride_kn, stride_kh,  # k (B, Sk, Hkv, D)
    stride_vb, stride_vn, stride_vh,  # v (B, Sk, Hkv, D)
    stride_ob, stride_om, stride_oh,  # out (B, Sq, H, D)
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask broadcast to (B, H, Sq, Sk)
    stride_ab, stride_ah,  # alibi slopes broadcast to (B, H)
    stride_lb, stride_lh,  # lse (B, H, Sq)
    stride_os, stride_ls,  # split-KV: the split's offset in the partial out / lse buffers
    max_seqlen_q, max_seqlen_k, num_heads, kv_group,
    qk_scale, softcap_log2, window_left, window_right,
    dropout_key, dropout_thresh, dropout_scale,
    num_splits, split_keys,  # split-KV: splits per row block, keys per split (1, 2**30: off)
    tune_seqlen_q, tune_seqlen_k,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SEQLENS_K: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (query block, KV split, head, batch) on a 1-D grid (no 65535 limit
    # on B or H), query blocks fastest so that one head's programs run together and share
    # its K/V in L2; within a head the last block (the longest under a causal band) first.
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(max_seqlen_q, BLOCK_M)
    start_m = num_m_blocks - 1 - pid % num_m_blocks
    split = (pid // num_m_blocks) % num_splits
    bh = (pid // num_m_blocks // num_splits).to(tl.int64)
    h = bh % num_heads
    b = bh // num_heads
    kv_h = h // kv_group
    # this sequence's rows and length (varlen: packed at cu_seqlens[b]; dense: all of them;
    # a KV cache: its first seqlens_k[b] keys)
    q_start, seqlen_q = _sequence(CuSeqlensQ, b, max_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _sequence(CuSeqlensK, b, max_seqlen_k, IS_VARLEN)
    if HAS_SEQLENS_K:
        seqlen_k = tl.load(SeqlensK + b)
    Q += b * stride_qb + h * stride_qh + q_start * stride_qm
    K += b * stride_kb + kv_h * stride_kh + k_start * stride_kn
    V += b * stride_vb + kv_h * stride_vh + k_start * stride_vn
    Out += b * stride_ob + h * stride_oh + q_start * stride_om + split.to(tl.int64) * stride_os
    Lse += b * stride_lb + h * stride_lh + q_start + split.to(tl.int64) * stride_ls
    mask_base = Mask + b * stride_mb + h * stride_mh
    alibi_log2 = 0.0
    if HAS_ALIBI:
        alibi_log2 = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32) * (-LOG2E)
    # the dropout counter runs over the padded (B, H, max Sq, max Sk) coordinates
    dropout_row_base = bh * max_seqlen_q
    # the dropout hash runs on uint32 (key and threshold arrive as i32 or i64 scalars)
    dropout_key = dropout_key.to(tl.uint32)
    dropout_thresh = dropout_thresh.to(tl.uint32)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q_rows = offs_m.to(tl.int64)[:, None]
    q = _load_tile(Q + q_rows * stride_qm + offs_d[None, :], m_ok, d_ok, True, BLOCK_D != HEAD_DIM)

    # The band of keys: row i sees j in [i + off - left, i + off + right] (off = Sk - Sq).
    diag_offset = seqlen_k - seqlen_q
    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, seqlen_q) - 1
    key_lo = tl.maximum(m_first + diag_offset - window_left, 0)
    key_hi = tl.minimum(m_last + diag_offset + window_right + 1, seqlen_k)
    key_hi = tl.where(m_first < seqlen_q, key_hi, key_lo)  # a block past a short sequence: nothing
    first, full_first, full_end, end = _block_ranges(
        key_lo, key_hi,
        m_last + diag_offset - window_left,
        tl.minimum(m_first + diag_offset + window_right + 1, seqlen_k),
        BLOCK_N,
    )
    # split-KV: this program's share of the key blocks (split_keys is a multiple of BLOCK_N)
    split_blocks = split_keys // BLOCK_N
    first = tl.maximum(first, split * split_blocks)
    end = tl.maximum(tl.minimum(end, (split + 1) * split_blocks), first)
    full_first = tl.minimum(tl.maximum(full_first, first), end)
    full_end = tl.minimum(tl.maximum(full_end, full_first), end)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # edge blocks before the fully visible ones (window left edge), then the unmasked
    # blocks, then the edge blocks after them (causal diagonal, window right edge, Sk)
    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, stride_kn, stride_vn, m_first, offs_m, offs_d, first, full_first,
        mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
        max_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_BAND, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND,
        HAS_DROPOUT, FP32_DOT, DOT_PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, stride_kn, stride_vn, m_first, offs_m, offs_d, full_first, full_end,
        mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
        max_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_BAND, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND,
        HAS_DROPOUT, FP32_DOT, DOT_PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, stride_kn, stride_vn, m_first, offs_m, offs_d, full_end, end,
        mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
        max_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right, qk_scale, softcap_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_BAND, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND,
        HAS_DROPOUT, FP32_DOT, DOT_PRECISION,
    )

    # Normalise; a row that saw no key (l = 0) gets out 0 and lse -inf. (Split-KV: the
    # split's own normalised out and lse, merged by _attn_fwd_combine_kernel.)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (dropout_scale / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(Out + q_rows * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_fwd_combine_kernel(
    OutPartial, LsePartial, Out, Lse,
    stride_ops, stride_lps,  # split strides of the partial out (S, B, Sq, H, D) and lse (S, B, H, Sq)
    num_rows, seqlen_q, num_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split-KV combine: out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse),
    lse = max lse + log(sum w_s); out (B, Sq, H, D) and lse (B, H, Sq), both contiguous."""
    # rows of out viewed as (B * Sq * H, D): row r is (b, i, h)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    h = rows % num_heads
    i = (rows // num_heads) % seqlen_q
    b = rows // (num_heads * seqlen_q)
    lse_offs = (b * num_heads + h) * seqlen_q + i
    # the max over splits (a split that saw no key has lse -inf)
    splits = tl.arange(0, BLOCK_S)
    lse_all = tl.load(LsePartial + splits[:, None].to(tl.int64) * stride_lps + lse_offs[None, :],
                      mask=(splits < num_splits)[:, None] & row_ok[None, :], other=float("-inf"))
    lse_max = tl.max(lse_all, 0)
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp(lse_all - lse_ref[None, :]), 0)
    # the weighted sum of the splits' normalised outputs
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(0, num_splits):
        split_64 = tl.cast(split, tl.int64)
        lse_s = tl.load(LsePartial + split_64 * stride_lps + lse_offs, mask=row_ok, other=float("-inf"))
        out_s = tl.load(OutPartial + split_64 * stride_ops + rows[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=tile_ok, other=0.0)
        acc += out_s * tl.exp(lse_s - lse_ref)[:, None]
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=tile_ok)
    lse = tl.where(empty, float("-inf"), lse_ref + tl.log(tl.where(empty, 1.0, total)))
    tl.store(Lse + lse_offs, lse, mask=row_ok)


# -------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DOut, Lse, Delta, Lse2,
    stride_ob, stride_om, stride_oh,  # out (B, Sq, H, D)
    stride_db, stride_dm, stride_dh,  # dout (B, Sq, H, D)
    seqlen_q, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    start_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    h = bh % num_heads
    b = bh // num_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    tile_ok = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + rows * stride_dm + offs_d[None, :], mask=tile_ok, other=0.0)
    # delta = rowsum(dO * O) = rowsum(P * dP) (dropout included)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    # LSE in log2 units; a fully masked row (-inf) becomes +inf so that exp2(s - lse) = 0
    lse_offs = bh * seqlen_q + offs_m
    lse = tl.load(Lse + lse_offs, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    tl.store(Delta + lse_offs, delta, mask=m_ok)
    tl.store(Lse2 + lse_offs, lse2, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_blocks(
    dk, dv, k, v, Q, DO, stride_qm, stride_dom, lse2_row, delta_row, n_first, offs_n, offs_d,
    block_first, full_first, full_end, block_end,
    mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
    dropout_scale, dropout_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK/dV of one key block over the query blocks [block_first, block_end) of one head.

    Tiles are transposed, (keys, queries), so P^T and dS^T feed the dots directly. One
    loop with a per-block (uniform) branch for the edge blocks outside
    [full_first, full_end): with K and V held across three separate loops, as in the
    forward, ptxas (Triton 3.8, sm_90) used 255 registers and spilled at d=64
    (BLOCK_N=64, BLOCK_M=32, 4 warps), against 190 registers and no spill this way.
    """
    d_ok = offs_d < HEAD_DIM
    for start_m in tl.range(block_first * BLOCK_M, block_end * BLOCK_M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        rows = offs_m.to(tl.int64)[:, None]
        # the row bound is checked on every block (a predicate per load): one loop body
        q = _load_tile(Q + rows * stride_qm + offs_d[None, :], m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        do = _load_tile(DO + rows * stride_dom + offs_d[None, :], m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        lse2 = tl.load(lse2_row + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_row + offs_m, mask=m_ok, other=0.0)
        # S^T = K Q^T, P^T = exp2(S^T - lse) (normalised probabilities)
        qk_t = _mma(k, tl.trans(q), None, FP32_DOT, DOT_PRECISION)
        s_t, tanh_t = _scores(
            qk_t, offs_m[None, :], offs_n[:, None], start_m, n_first, mask_base, stride_mm, stride_mn, alibi_log2,
            seqlen_q, seqlen_k, diag_offset, qk_scale, softcap_log2, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND,
        )
        if (start_m < full_first * BLOCK_M) | (start_m >= full_end * BLOCK_M):
            s_t = _position_mask(s_t, offs_m[None, :], offs_n[:, None], seqlen_k, diag_offset,
                                 window_left, window_right, HAS_BAND)
        p_t = tl.exp2(s_t - lse2[None, :])
        # dV += (P * keep)^T dO (the dropout scale is applied once at the end)
        if HAS_DROPOUT:
            keep_t = _dropout_keep(dropout_row_base, offs_m.to(tl.int64)[None, :], offs_n[:, None],
                                   dropout_seqlen_k, dropout_key, dropout_thresh)
            pd_t = tl.where(keep_t, p_t, 0.0)
        else:
            pd_t = p_t
        dv = _mma(pd_t.to(do.dtype), do, dv, FP32_DOT, DOT_PRECISION)
        # dP^T = V dO^T through the dropout mask; dS^T = P^T * (dP^T - delta)
        dp_t = _mma(v, tl.trans(do), None, FP32_DOT, DOT_PRECISION)
        if HAS_DROPOUT:
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        # softcap chain rule: d(scale*qk) = dS * (1 - tanh^2)
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        # dK += dS^T Q (softmax_scale applied once at the end)
        dk = _mma(ds_t.to(q.dtype), q, dk, FP32_DOT, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["dropout_key", "dropout_thresh"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse2, Delta, Mask, Alibi, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh,  # q (B, Sq, H, D)
    stride_kb, stride_kn, stride_kh,  # k (B, Sk, Hkv, D)
    stride_vb, stride_vn, stride_vh,  # v (B, Sk, Hkv, D)
    stride_dob, stride_dom, stride_doh,  # dout (B, Sq, H, D)
    stride_dkb, stride_dkn, stride_dkh,  # dk (B, Sk, Hkv, D)
    stride_dvb, stride_dvn, stride_dvh,  # dv (B, Sk, Hkv, D)
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask broadcast to (B, H, Sq, Sk)
    stride_ab, stride_ah,  # alibi slopes broadcast to (B, H)
    stride_lb, stride_lh,  # lse2 and delta (B, H, Sq)
    max_seqlen_q, max_seqlen_k, num_heads, kv_group,
    qk_scale, softcap_log2, softmax_scale, window_left, window_right,
    dropout_key, dropout_thresh, dropout_scale,
    tune_seqlen_q, tune_seqlen_k,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key block, kv head, batch) on a 1-D grid, key blocks fastest.
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(max_seqlen_k, BLOCK_N)
    start_n = pid % num_n_blocks
    b_kvh = (pid // num_n_blocks).to(tl.int64)
    kv_heads = num_heads // kv_group
    kv_h = b_kvh % kv_heads
    b = b_kvh // kv_heads
    q_start, seqlen_q = _sequence(CuSeqlensQ, b, max_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _sequence(CuSeqlensK, b, max_seqlen_k, IS_VARLEN)
    Q += q_start * stride_qm
    DO += q_start * stride_dom
    K += b * stride_kb + kv_h * stride_kh + k_start * stride_kn
    V += b * stride_vb + kv_h * stride_vh + k_start * stride_vn
    DK += b * stride_dkb + kv_h * stride_dkh + k_start * stride_dkn
    DV += b * stride_dvb + kv_h * stride_dvh + k_start * stride_dvn
    # the dropout hash runs on uint32 (key and threshold arrive as i32 or i64 scalars)
    dropout_key = dropout_key.to(tl.uint32)
    dropout_thresh = dropout_thresh.to(tl.uint32)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seqlen_k
    d_ok = offs_d < HEAD_DIM
    kv_rows = offs_n.to(tl.int64)[:, None]
    # K and V of this block stay resident for the whole program
    k = _load_tile(K + kv_rows * stride_kn + offs_d[None, :], n_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    v = _load_tile(V + kv_rows * stride_vn + offs_d[None, :], n_ok, d_ok, True, BLOCK_D != HEAD_DIM)

    # Query rows that see some key of the block, and rows that see all of them (none
    # when the block is cut by Sk, so unmasked steps never meet a missing key).
    diag_offset = seqlen_k - seqlen_q
    n_first = start_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, seqlen_k) - 1
    full_hi = tl.minimum(n_first - diag_offset + window_left + 1, seqlen_q)
    full_hi = tl.where(n_first + BLOCK_N <= seqlen_k, full_hi, 0)
    row_lo = tl.maximum(n_first - diag_offset - window_right, 0)
    row_hi = tl.minimum(n_last - diag_offset + window_left + 1, seqlen_q)
    row_hi = tl.where(n_first < seqlen_k, row_hi, row_lo)  # a block past a short sequence: nothing
    first, full_first, full_end, end = _block_ranges(
        row_lo, row_hi, n_last - diag_offset - window_right, full_hi, BLOCK_M,
    )

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # GQA: the query heads of this kv head, summed in a fixed order (deterministic)
    for g in range(0, kv_group):
        h = kv_h * kv_group + g
        bh = b * num_heads + h  # int64
        q_head = Q + b * stride_qb + h * stride_qh
        do_head = DO + b * stride_dob + h * stride_doh
        lse2_row = Lse2 + b * stride_lb + h * stride_lh + q_start
        delta_row = Delta + b * stride_lb + h * stride_lh + q_start
        mask_base = Mask + b * stride_mb + h * stride_mh
        alibi_log2 = 0.0
        if HAS_ALIBI:
            alibi_log2 = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32) * (-LOG2E)
        dropout_row_base = bh * max_seqlen_q
        dk, dv = _attn_bwd_dkdv_blocks(
            dk, dv, k, v, q_head, do_head, stride_qm, stride_dom, lse2_row, delta_row, n_first, offs_n, offs_d,
            first, full_first, full_end, end,
            mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
            dropout_scale, max_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
            qk_scale, softcap_log2,
            HEAD_DIM, BLOCK_D, BLOCK_M, HAS_BAND, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT,
            FP32_DOT, DOT_PRECISION,
        )

    # dK = scale * dS^T Q, dV = (P * keep / (1 - p))^T dO
    dk = dk * softmax_scale
    dv = dv * dropout_scale
    tile_ok = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + kv_rows * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + kv_rows * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _attn_bwd_dq_blocks(
    dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, m_first, offs_m, offs_d,
    block_first, block_end,
    mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
    dropout_scale, dropout_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ of one query block over key blocks [block_first, block_end)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(block_first * BLOCK_N, block_end * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        kv_rows = offs_n.to(tl.int64)[:, None]
        k = _load_tile(K + kv_rows * stride_kn + offs_d[None, :], n_ok, d_ok, EDGE, BLOCK_D != HEAD_DIM)
        v = _load_tile(V + kv_rows * stride_vn + offs_d[None, :], n_ok, d_ok, EDGE, BLOCK_D != HEAD_DIM)
        # S = Q K^T, P = exp2(S - lse)
        qk = _mma(q, tl.trans(k), None, FP32_DOT, DOT_PRECISION)
        s, tanh = _scores(
            qk, offs_m[:, None], offs_n[None, :], m_first, start_n, mask_base, stride_mm, stride_mn, alibi_log2,
            seqlen_q, seqlen_k, diag_offset, qk_scale, softcap_log2, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND,
        )
        if EDGE:
            s = _position_mask(s, offs_m[:, None], offs_n[None, :], seqlen_k, diag_offset,
                               window_left, window_right, HAS_BAND)
        p = tl.exp2(s - lse2[:, None])
        # dP = dO V^T through the dropout mask; dS = P * (dP - delta)
        dp = _mma(do, tl.trans(v), None, FP32_DOT, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(dropout_row_base, offs_m.to(tl.int64)[:, None], offs_n[None, :],
                                 dropout_seqlen_k, dropout_key, dropout_thresh)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh * tanh)
        # dQ += dS K (softmax_scale applied once at the end)
        dq = _mma(ds.to(k.dtype), k, dq, FP32_DOT, DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["dropout_key", "dropout_thresh"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse2, Delta, Mask, Alibi, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh,  # q (B, Sq, H, D)
    stride_kb, stride_kn, stride_kh,  # k (B, Sk, Hkv, D)
    stride_vb, stride_vn, stride_vh,  # v (B, Sk, Hkv, D)
    stride_dob, stride_dom, stride_doh,  # dout (B, Sq, H, D)
    stride_dqb, stride_dqm, stride_dqh,  # dq (B, Sq, H, D)
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask broadcast to (B, H, Sq, Sk)
    stride_ab, stride_ah,  # alibi slopes broadcast to (B, H)
    stride_lb, stride_lh,  # lse2 and delta (B, H, Sq)
    max_seqlen_q, max_seqlen_k, num_heads, kv_group,
    qk_scale, softcap_log2, softmax_scale, window_left, window_right,
    dropout_key, dropout_thresh, dropout_scale,
    tune_seqlen_q, tune_seqlen_k,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the forward's grid: (query block, head, batch), longest causal blocks first
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(max_seqlen_q, BLOCK_M)
    start_m = num_m_blocks - 1 - pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    h = bh % num_heads
    b = bh // num_heads
    kv_h = h // kv_group
    q_start, seqlen_q = _sequence(CuSeqlensQ, b, max_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _sequence(CuSeqlensK, b, max_seqlen_k, IS_VARLEN)
    Q += b * stride_qb + h * stride_qh + q_start * stride_qm
    DO += b * stride_dob + h * stride_doh + q_start * stride_dom
    DQ += b * stride_dqb + h * stride_dqh + q_start * stride_dqm
    K += b * stride_kb + kv_h * stride_kh + k_start * stride_kn
    V += b * stride_vb + kv_h * stride_vh + k_start * stride_vn
    Lse2 += b * stride_lb + h * stride_lh + q_start
    Delta += b * stride_lb + h * stride_lh + q_start
    mask_base = Mask + b * stride_mb + h * stride_mh
    alibi_log2 = 0.0
    if HAS_ALIBI:
        alibi_log2 = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32) * (-LOG2E)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    rows = offs_m.to(tl.int64)[:, None]
    q = _load_tile(Q + rows * stride_qm + offs_d[None, :], m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    do = _load_tile(DO + rows * stride_dom + offs_d[None, :], m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    lse2 = tl.load(Lse2 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + offs_m, mask=m_ok, other=0.0)

    # the same band of key blocks as the forward
    diag_offset = seqlen_k - seqlen_q
    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, seqlen_q) - 1
    key_lo = tl.maximum(m_first + diag_offset - window_left, 0)
    key_hi = tl.minimum(m_last + diag_offset + window_right + 1, seqlen_k)
    key_hi = tl.where(m_first < seqlen_q, key_hi, key_lo)  # a block past a short sequence: nothing
    first, full_first, full_end, end = _block_ranges(
        key_lo, key_hi,
        m_last + diag_offset - window_left,
        tl.minimum(m_first + diag_offset + window_right + 1, seqlen_k),
        BLOCK_N,
    )
    dropout_row_base = bh * max_seqlen_q
    # the dropout hash runs on uint32 (key and threshold arrive as i32 or i64 scalars)
    dropout_key = dropout_key.to(tl.uint32)
    dropout_thresh = dropout_thresh.to(tl.uint32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _attn_bwd_dq_blocks(
        dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, m_first, offs_m, offs_d, first, full_first,
        mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
        dropout_scale, max_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
        qk_scale, softcap_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_BAND, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT,
        FP32_DOT, DOT_PRECISION,
    )
    dq = _attn_bwd_dq_blocks(
        dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, m_first, offs_m, offs_d, full_first, full_end,
        mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
        dropout_scale, max_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
        qk_scale, softcap_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_BAND, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT,
        FP32_DOT, DOT_PRECISION,
    )
    dq = _attn_bwd_dq_blocks(
        dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, m_first, offs_m, offs_d, full_end, end,
        mask_base, stride_mm, stride_mn, alibi_log2, dropout_row_base, dropout_key, dropout_thresh,
        dropout_scale, max_seqlen_k, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
        qk_scale, softcap_log2,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_BAND, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT,
        FP32_DOT, DOT_PRECISION,
    )

    # dQ = scale * dS K
    dq = dq * softmax_scale
    tl.store(DQ + rows * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------- autotuning


def _config_fits(block_m: int, block_n: int, num_warps: int, num_stages: int, args: dict, *, backward: bool) -> bool:
    """Whether a tile config is worth trying for these arguments (see the budgets above)."""
    block_d = args["BLOCK_D"]
    elem = args["Q"].element_size()
    threads = THREADS_PER_WARP * num_warps
    if backward:
        # resident K, V (dK, dV in fp32 registers); Q and dO pipelined
        smem = (2 * block_n * block_d + num_stages * 2 * block_m * block_d) * elem
        values = (2 * block_n * block_d + 2 * block_n * block_m) / threads
    else:
        # resident Q; K and V pipelined
        smem = (block_m * block_d + num_stages * 2 * block_n * block_d) * elem
        values = (block_m * block_d + block_m * block_n) / threads
    if smem > SMEM_BUDGET_BYTES or values > MAX_TILE_VALUES_PER_THREAD:
        return False
    # short queries: a tall query tile is mostly padding
    return backward or not (args["tune_seqlen_q"] <= SHORT_QUERY and block_m > SHORT_QUERY)


def _make_pruner(backward: bool):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [
            c for c in configs
            if _config_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, args,
                            backward=backward)
        ]
        # never empty: the smallest tile always runs
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


def _configs(tiles) -> list:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in tiles
    ]


# Tuned per (padded head dim, band or not, bucketed lengths); the autotuner adds the
# tensors' dtypes to the key. The other feature flags share a shape's tuned tile.
_TUNE_KEY = ["BLOCK_D", "HAS_BAND", "tune_seqlen_q", "tune_seqlen_k"]
_attn_fwd_tuned = triton.autotune(
    configs=_configs(_FWD_TILES), key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _make_pruner(backward=False)},
)(_attn_fwd_kernel)
_attn_bwd_dkdv_tuned = triton.autotune(
    configs=_configs(_BWD_TILES), key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _make_pruner(backward=True)},
)(_attn_bwd_dkdv_kernel)
# The dQ kernel owns BLOCK_M query rows and steps over BLOCK_N keys: the forward's shape.
_attn_bwd_dq_tuned = triton.autotune(
    configs=_configs(_FWD_TILES), key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _make_pruner(backward=False)},
)(_attn_bwd_dq_kernel)


# Tests only: kernel name -> triton.Config run instead of autotuning (the GPU sweep pins
# tiles so that it compiles one tile per shape, not the whole config list).
TILE_OVERRIDE: dict = {}


def _launch(tuned, grid, *args, **kwargs) -> None:
    """Autotuned launch on a GPU; the pinned tile under the interpreter or when overridden."""
    name = tuned.fn.__name__
    config = TILE_OVERRIDE.get(name)
    if config is None and interpret_enabled():
        config = INTERPRETER_TILES[name]
    if config is None:
        tuned[grid](*args, **kwargs)
    else:
        tuned.fn[grid](*args, **kwargs, **config.all_kwargs())


# ------------------------------------------------------------------------- launchers


class _ScoreArgs(NamedTuple):
    """Score options as the kernels take them (shared by forward and backward)."""

    mask: Tensor  # the mask (uint8 view for bool) or a dummy pointer
    mask_strides: tuple  # (b, h, i, j) broadcast strides
    alibi: Tensor  # the slopes or a dummy pointer
    alibi_strides: tuple  # (b, h) broadcast strides
    softmax_scale: float
    qk_scale: float
    softcap_log2: float
    window_left: int
    window_right: int
    dropout_key: int
    dropout_thresh: int
    dropout_scale: float
    constexprs: dict


def _tune_bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), MAX_TUNE_BUCKET)


def _score_args(q: Tensor, batch: int, seqlen_q: int, seqlen_k: int, params: AttentionParams) -> _ScoreArgs:
    """The kernels' score arguments; seqlen_q/seqlen_k are the (padded, for varlen) extents."""
    num_heads, head_dim = q.shape[-2], q.shape[-1]

    # Band [i + off - left, i + off + right]; unbounded sides get a distance no pair of
    # positions reaches; causal is the band's right edge at 0.
    unbounded = seqlen_q + seqlen_k
    window_left = params.window[0] if params.window[0] >= 0 else unbounded
    window_right = params.window[1] if params.window[1] >= 0 else unbounded
    if params.causal:
        window_right = min(window_right, 0)

    attn_mask, alibi_slopes = params.attn_mask, params.alibi_slopes
    if attn_mask is None:
        mask, mask_strides, mask_kind = q, (0, 0, 0, 0), MASK_NONE
    else:
        mask = attn_mask.expand(batch, num_heads, seqlen_q, seqlen_k)
        if mask.dtype == torch.bool:
            mask, mask_kind = mask.view(torch.uint8), MASK_BOOL
        else:
            mask_kind = MASK_ADD
        mask_strides = mask.stride()
    if alibi_slopes is None:
        alibi, alibi_strides = q, (0, 0)
    else:
        alibi = alibi_slopes.reshape(-1, num_heads).expand(batch, num_heads)
        alibi_strides = alibi.stride()

    # Scores are kept in log2 units: exp(x) = exp2(x * log2(e)).
    softmax_scale, softcap = float(params.softmax_scale), float(params.softcap)
    if softcap > 0.0:
        qk_scale, softcap_log2 = softmax_scale / softcap, softcap * LOG2E.value
    else:
        qk_scale, softcap_log2 = softmax_scale * LOG2E.value, 0.0

    key, thresh, dropout_scale = 0, 0, 1.0
    dropout_p = params.dropout_p
    if dropout_p > 0.0:
        key = dropout_key(params.dropout_seed)
        thresh = dropout_threshold(dropout_p)
        dropout_scale = 1.0 / (1.0 - dropout_p)
        if thresh >= TWO_POW_32:
            # keep nothing: uint32 cannot hold the threshold, a zero scale drops it all
            thresh, dropout_scale = TWO_POW_32 - 1, 0.0

    # The interpreter's dot multiplies raw bf16 bits: feed it fp32. fp32 inputs get IEEE
    # fp32 dots (TF32 would be ~1e-3 off, far outside the tolerance rule).
    fp32_dot = interpret_enabled() and q.dtype == torch.bfloat16
    constexprs = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(triton.next_power_of_2(head_dim), MIN_BLOCK),
        HAS_BAND=params.has_band,
        HAS_SOFTCAP=softcap > 0.0,
        HAS_ALIBI=alibi_slopes is not None,
        MASK_KIND=mask_kind,
        HAS_DROPOUT=dropout_p > 0.0,
        FP32_DOT=fp32_dot,
        DOT_PRECISION="ieee" if (q.dtype == torch.float32 or fp32_dot) else "tf32",
    )
    return _ScoreArgs(mask, tuple(mask_strides), alibi, tuple(alibi_strides), softmax_scale, qk_scale, softcap_log2,
                      window_left, window_right, key, thresh, dropout_scale, constexprs)


def _strides3(t: Tensor, batched: bool = True) -> tuple:
    """(batch, seq, head) strides of a (B, S, H, D) tensor, or (0, seq, head) of a packed
    (total, H, D) one; the last stride is 1."""
    if batched:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(0), t.stride(1)


def _unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension is contiguous, else a contiguous copy (an
    autograd gradient may arrive expanded, with stride 0)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class _Extents(NamedTuple):
    """The launch extents of one call: batch and the (padded, for varlen) lengths."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    cu_seqlens: Optional[tuple]  # (cu_seqlens_q, cu_seqlens_k) for varlen, else None
    lse_strides: tuple  # (batch, head) strides of lse


def _extents(q: Tensor, k: Tensor, lse: Tensor, packing: Packing) -> _Extents:
    if packing.kind == VARLEN:
        return _Extents(packing.cu_seqlens_q.shape[0] - 1, packing.max_seqlen_q, packing.max_seqlen_k,
                        (packing.cu_seqlens_q, packing.cu_seqlens_k), (0, lse.stride(0)))
    return _Extents(q.shape[0], q.shape[1], k.shape[1], None, lse.stride()[:2])


def _fwd(q, k, v, out, lse, ext: _Extents, params: AttentionParams, *, seqlens_k=None, num_splits=1,
         split_keys=NO_SPLIT_KEYS, split_strides=(0, 0)) -> None:
    """Launches the forward on dense (cu_seqlens None) or packed tensors; with seqlens_k
    (B,) only the first seqlens_k[b] keys of row b count; with num_splits > 1 each split
    of split_keys keys writes its own out/lse at split_strides into partial buffers."""
    varlen = ext.cu_seqlens is not None
    num_heads, kv_heads = q.shape[-2], k.shape[-2]
    sa = _score_args(q, ext.batch, ext.seqlen_q, ext.seqlen_k, params)
    cu_q, cu_k = ext.cu_seqlens if varlen else (q, q)

    def grid(meta):
        return (triton.cdiv(ext.seqlen_q, meta["BLOCK_M"]) * num_splits * num_heads * ext.batch,)

    _launch(
        _attn_fwd_tuned, grid,
        q, k, v, out, lse, sa.mask, sa.alibi, cu_q, cu_k, q if seqlens_k is None else seqlens_k,
        *_strides3(q, not varlen), *_strides3(k, not varlen), *_strides3(v, not varlen),
        *_strides3(out, not varlen), *sa.mask_strides, *sa.alibi_strides, *ext.lse_strides, *split_strides,
        ext.seqlen_q, ext.seqlen_k, num_heads, num_heads // kv_heads,
        sa.qk_scale, sa.softcap_log2, sa.window_left, sa.window_right,
        sa.dropout_key, sa.dropout_thresh, sa.dropout_scale,
        num_splits, split_keys,
        _tune_bucket(ext.seqlen_q), _tune_bucket(ext.seqlen_k),
        IS_VARLEN=varlen, HAS_SEQLENS_K=seqlens_k is not None, **sa.constexprs,
    )


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, ext: _Extents, params: AttentionParams) -> None:
    """Launches the backward (preprocess, dK/dV, dQ) on dense or packed tensors."""
    varlen = ext.cu_seqlens is not None
    num_heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    sa = _score_args(q, ext.batch, ext.seqlen_q, ext.seqlen_k, params)
    cu_q, cu_k = ext.cu_seqlens if varlen else (q, q)
    batch, seqlen_q, seqlen_k = ext.batch, ext.seqlen_q, ext.seqlen_k

    # delta = rowsum(dO * O) and the LSE in log2 units, in the LSE's layout. A packed
    # (total, H, D) tensor is one sequence of `total` rows for this elementwise pass.
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    rows_out, rows_dout, rows = (out, dout, seqlen_q) if not varlen else (out[None], dout[None], q.shape[0])
    _attn_bwd_preprocess_kernel[(triton.cdiv(rows, DELTA_BLOCK_M) * num_heads * (1 if varlen else batch),)](
        rows_out, rows_dout, lse, delta, lse2, *_strides3(rows_out), *_strides3(rows_dout), rows, num_heads,
        HEAD_DIM=head_dim, BLOCK_D=sa.constexprs["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M,
    )

    shared = (
        *sa.mask_strides, *sa.alibi_strides, *ext.lse_strides,
        seqlen_q, seqlen_k, num_heads, num_heads // kv_heads,
        sa.qk_scale, sa.softcap_log2, sa.softmax_scale, sa.window_left, sa.window_right,
        sa.dropout_key, sa.dropout_thresh, sa.dropout_scale,
        _tune_bucket(seqlen_q), _tune_bucket(seqlen_k),
    )
    strides = [_strides3(t, not varlen) for t in (q, k, v, dout)]

    # dK, dV: one program per (key block, kv head, batch)
    def dkdv_grid(meta):
        return (triton.cdiv(seqlen_k, meta["BLOCK_N"]) * kv_heads * batch,)

    _launch(
        _attn_bwd_dkdv_tuned, dkdv_grid,
        q, k, v, dout, dk, dv, lse2, delta, sa.mask, sa.alibi, cu_q, cu_k,
        *strides[0], *strides[1], *strides[2], *strides[3], *_strides3(dk, not varlen), *_strides3(dv, not varlen),
        *shared, IS_VARLEN=varlen, **sa.constexprs,
    )

    # dQ: one program per (query block, head, batch)
    def dq_grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]) * num_heads * batch,)

    _launch(
        _attn_bwd_dq_tuned, dq_grid,
        q, k, v, dout, dq, lse2, delta, sa.mask, sa.alibi, cu_q, cu_k,
        *strides[0], *strides[1], *strides[2], *strides[3], *_strides3(dq, not varlen),
        *shared, IS_VARLEN=varlen, **sa.constexprs,
    )


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, packing: Packing, *,
                  num_splits: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Attention forward: ``(out contiguous in q's dtype and layout, lse fp32)``.

    Dense: q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hkv, D)`` (unit last stride, ``H % Hkv ==
    0``), lse ``(B, H, Sq)``. Varlen (``packing.kind == "varlen"``): q ``(total_q, H, D)``,
    k/v ``(total_k, Hkv, D)``, lse ``(H, total_q)``; masks, ALiBi and the dropout counter
    in the padded ``(B, H, max_seqlen_q, max_seqlen_k)`` coordinates. Cache
    (``"cache"``): k/v are the caches (already appended); row b attends to its first
    ``seqlens_k[b]`` keys (all when None), later rows are never read; the keys are split
    across programs when the grid cannot fill the GPU (``num_splits`` None: the
    heuristic, 1 on CPU) and ``_attn_fwd_combine_kernel`` merges the splits by their LSE.
    Rows that see no key: out 0, lse -inf.
    """
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if packing.kind == VARLEN:
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    ext = _extents(q, k, lse, packing)
    if out.numel() == 0 or ext.batch == 0 or k.shape[0 if packing.kind == VARLEN else 1] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if packing.kind != CACHE:
        _fwd(q, k, v, out, lse, ext, params)
        return out, lse
    return _fwd_cache(q, k, v, out, lse, ext, params, packing.seqlens_k, num_splits)


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  params: AttentionParams, packing: Packing, grads: BiasGrads) -> tuple:
    """Attention backward, dense or varlen: ``(dq, dk, dv, None, None)``, contiguous, in
    the inputs' dtypes; dK/dV summed over the query heads of each kv head. Always
    deterministic (no atomics), whatever ``params.deterministic`` says. The mask and
    ALiBi-slope gradients are not implemented (NotImplementedError if asked)."""
    if grads.mask or grads.alibi:
        raise NotImplementedError(
            "the triton attention backward does not compute attn_mask or alibi_slopes gradients"
        )
    dout, q, k, v, out = (_unit_last_stride(t) for t in (dout, q, k, v, out))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    lse = lse.contiguous()
    ext = _extents(q, k, lse, packing)
    if dq.numel() == 0 or dk.numel() == 0 or ext.batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), None, None
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, ext, params)
    return dq, dk, dv, None, None


def _num_splits(programs: int, key_blocks: int, device: torch.device) -> int:
    """How many KV splits (FlashAttention-2's heuristic): none when the grid fills the
    GPU, else the fewest whose last wave is nearly as full as the best count's."""
    if device.type != "cuda" or interpret_enabled():
        return 1
    slots = PROGRAMS_PER_SM * sm_count(device)
    if programs >= FULL_GPU_FRACTION * slots:
        return 1
    max_splits = max(1, min(MAX_KV_SPLITS, slots, key_blocks))
    efficiency = []
    for splits in range(1, max_splits + 1):
        waves = programs * splits / slots
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    for splits in range(1, max_splits + 1):
        # a count that gives the same keys per split as one fewer is never better
        if splits > 1 and math.ceil(key_blocks / splits) == math.ceil(key_blocks / (splits - 1)):
            continue
        if efficiency[splits - 1] >= SPLIT_EFFICIENCY * best:
            return splits
    return 1


def _fwd_cache(q, k_all, v_all, out, lse, ext: _Extents, params: AttentionParams,
               seqlens_k: Optional[Tensor], num_splits: Optional[int]):
    """The decode step over a KV cache, split-KV when the grid cannot fill the GPU."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    cache_len = k_all.shape[1]
    if num_splits is None:
        programs = triton.cdiv(seqlen_q, DECODE_BLOCK_M) * num_heads * batch
        num_splits = _num_splits(programs, triton.cdiv(cache_len, SPLIT_ALIGN), q.device)
    num_splits = max(1, min(num_splits, triton.cdiv(cache_len, SPLIT_ALIGN)))
    if num_splits == 1:
        _fwd(q, k_all, v_all, out, lse, ext, params, seqlens_k=seqlens_k)
        return out, lse

    # each split writes its normalised out and lse (fp32), then one pass merges them
    split_keys = triton.cdiv(triton.cdiv(cache_len, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    out_partial = torch.empty((num_splits, *out.shape), dtype=torch.float32, device=q.device)
    lse_partial = torch.empty((num_splits, *lse.shape), dtype=torch.float32, device=q.device)
    _fwd(q, k_all, v_all, out_partial[0], lse_partial[0], ext._replace(lse_strides=lse_partial.stride()[1:3]),
         params, seqlens_k=seqlens_k, num_splits=num_splits, split_keys=split_keys,
         split_strides=(out_partial.stride(0), lse_partial.stride(0)))
    num_rows = batch * seqlen_q * num_heads
    _attn_fwd_combine_kernel[(triton.cdiv(num_rows, COMBINE_BLOCK_M),)](
        out_partial, lse_partial, out, lse, out_partial.stride(0), lse_partial.stride(0),
        num_rows, seqlen_q, num_heads, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), MIN_BLOCK),
        BLOCK_M=COMBINE_BLOCK_M, BLOCK_S=max(triton.next_power_of_2(num_splits), 2),
    )
    return out, lse
