"""LayerNorm and RMSNorm with the fused residual add, in Triton: forward and backward.

Algorithm. LayerNorm (Ba et al. 2016; the layout of Triton's tutorial 05) maps each row
``h`` of width N to ``(h - mean) * rstd * w + b`` with ``rstd = 1 / sqrt(var + eps)``
(biased variance); RMSNorm (Zhang & Sennrich 2019) to ``h * rstd * w`` with
``rstd = 1 / sqrt(mean(h^2) + eps)``. With a residual, ``h = x + residual`` is added in
fp32 and rounded to x's dtype (the next residual stream, returned), and that rounded h is
what gets normalised: the backward receives h, so its saved statistics then match it
exactly. (Statistics of the unrounded sum would let a row of near-zero variance turn the
rounding into a gradient amplified by rstd: at width 1, |dx| ~ 1/sqrt(eps) instead of 0.)
The backward, with ``xhat = (h - mean) * rstd`` (``h * rstd`` for RMSNorm), ``g = dy * w``::

    dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) + dh    # no mean(g) term for RMSNorm
    dw = sum over rows of dy * xhat,   db = sum over rows of dy

where dh is the gradient that flowed into h directly. Statistics and accumulators are fp32
for every input dtype; each tensor keeps its own dtype (read from the pointer's type).

Schedules, chosen by width (the thresholds are the named constants below):

- forward, N <= MAX_FUSED_WIDTH_FWD: a tile of BLOCK_M whole rows per program, held in
  registers: one read of x (and residual), one write of y (and h);
- forward, wider: one row per program, looping over column blocks twice: statistics
  (per-block mean and M2 merged by Chan et al.'s parallel update, robust when
  |mean| >> std), then normalise, reading x (or the h it just stored) again, from L2
  while the row is still there;
- backward, N <= MAX_FUSED_WIDTH_BWD: a persistent grid (PROGRAMS_PER_SM per SM); each
  program walks row tiles with a stride, writes dx, and sums dy * xhat and dy over its
  rows in fp32 registers, stored once into a (programs, N) fp32 buffer;
- backward, wider: the row is split. A row-reduction kernel writes the two per-row sums
  mean(g * xhat) and mean(g); then a (column block, row group) grid writes dx and keeps
  its column block's dw/db sums in registers ((row groups, N) buffer). This reads x and
  dy twice (5 row-sized transfers instead of 3); the alternative, one program per row
  in two passes, cannot hold a 65536-wide dw accumulator in registers and would instead
  read and write its fp32 partial row in memory for every row it visits.
- the partial buffers (dw and db planes) are summed in a fixed order by one small
  launch. No atomics, no locks: dweight/dbias are bitwise reproducible for a given
  shape and device.

Limits: x, residual, dy and dh need a unit stride in the last dimension; their rows may
have one common row stride (e.g. ``x[:, :N]`` of a wider tensor), otherwise they are
copied by ``reshape``. Outputs are contiguous. fp16/bf16/fp32 inputs; weight/bias of any
float dtype; any number of rows (0 rows launch nothing); any width >= 1 (the column-loop
schedules have no upper bound; 65536 is the widest the GPU tests sweep).
Plain launch functions: no autograd, no input checks (``fast_attn.ops.norm`` does both).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fast_attn.triton_kernels._device import sm_count

# ------------------------------------------------------------------------ schedule knobs
# No timing was taken yet (no GPU where this was written): the speeds are to be measured on
# the H100 with the benchmark suite; change the numbers here, not the code. Register counts
# are from ptxas for sm_90 (kernels compiled ahead of time with Triton 3.6 and 3.8, all
# options on, bf16/fp32), for aligned rows whose width and stride are multiples of 16
# (vectorised loads) and, in brackets, for unaligned ones. 16 warps allow 128 per thread.

# Widest row the forward keeps whole in registers. 8192 columns: 40-64 registers (86-109);
# 16384: 82-127 (128 and 24-480 bytes of spills). 16384 would fit when aligned, with no
# headroom: measure it against the two-pass loop before raising this.
MAX_FUSED_WIDTH_FWD = 8192
# Widest row the backward keeps whole in registers (x, dy, w, xhat, g and the two fp32
# dw/db accumulators). 8192 columns: 102-128 registers, no spill (same unaligned);
# 16384: 224-1624 bytes of spills per thread.
MAX_FUSED_WIDTH_BWD = 8192
# Column block of the wide (looped) forward: 4096 values = 8 per thread at 16 warps.
WIDE_BLOCK_N_FWD = 4096
# Column block of the wide backward's row reductions and of its dx/dw tiles.
WIDE_BLOCK_N_BWD = 2048
# Rows per tile in the wide backward's dx/dw kernel: a few rows' loads in flight at once.
WIDE_BLOCK_M_BWD = 4
# Narrow rows: pack rows into one program until a tile holds about this many values, so
# that N = 1..1024 does not launch one tiny program per row.
ROW_TILE_ELEMS = 4096
MAX_BLOCK_M = 64
# Warps from the tile size: about this many values per thread, clamped to [1, 16].
ELEMS_PER_THREAD = 8
MIN_WARPS = 1
MAX_WARPS = 16
# Persistent backward grid: programs per SM. The backward tiles run 16 warps at 64-128
# registers per thread, so one or two programs are resident per SM; more programs would
# only grow the (programs, N) fp32 partial buffer (written once, read once by the reduction).
PROGRAMS_PER_SM = 2
# Partial-buffer reduction: BLOCK_P partial rows by BLOCK_N columns per step; narrow column
# blocks spread the small buffer over many SMs (it is latency-, not bandwidth-bound).
REDUCE_BLOCK_P = 32
REDUCE_BLOCK_N = 64
REDUCE_WARPS = 4
# CPU tensors run under the Triton interpreter: a small fixed persistent grid, so tests
# still exercise the strided row loop of each program.
INTERPRETER_PROGRAMS = 4


# ------------------------------------------------------------------------- rounding

BF16_ROUND_BIAS = tl.constexpr(0x7FFF)  # fp32 -> bf16 round-to-nearest-even: add this (+1 if odd), drop 16 bits


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded once, to nearest even, to ``DTYPE`` (the output's element type).

    ``v.to(tl.bfloat16)`` is ``cvt.rn`` on a GPU, but the Triton interpreter (3.6-3.9)
    truncates fp32 -> bf16 (even with ``fp_downcast_rounding="rtne"``): a value already
    rounded to fp32 was then rounded a second time, toward zero, up to one bf16 ulp off
    (e.g. RMSNorm at width 1, y = 1 - 5e-7 -> 0.99609375 instead of 1.0). So bf16 is
    rounded here in integer arithmetic; the final conversion is then exact everywhere.
    NaN passes through unchanged; values past bf16's range round to inf, as cvt.rn does.
    """
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits += BF16_ROUND_BIAS + ((bits >> 16) & 1)
        rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        v = tl.where(v != v, v, rounded)
    return v.to(DTYPE)


# --------------------------------------------------------------------------- forward


@triton.jit
def _norm_fwd_fused_kernel(
    X,  # (M, N) input rows, row stride stride_xm, unit column stride
    R,  # (M, N) residual, row stride stride_rm (unused without HAS_RESIDUAL)
    W,  # (N,) weight (unused without HAS_WEIGHT)
    B,  # (N,) bias (unused without HAS_BIAS)
    Y,  # (M, N) output, contiguous
    H,  # (M, N) x + residual in x's dtype, contiguous (unused without HAS_RESIDUAL)
    Mean,  # (M,) fp32 (unused for RMSNorm)
    Rstd,  # (M,) fp32
    stride_xm,
    stride_rm,
    M,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One tile of BLOCK_M whole rows (BLOCK_N >= N) per program.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    out_offs = rows[:, None] * N + cols[None, :]

    # h = x (+ residual): added in fp32, rounded to x's dtype (the stored h), normalised.
    h = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        h += r.to(tl.float32)
        h_out = _round_to(h, H.dtype.element_ty)
        tl.store(H + out_offs, h_out, mask=mask)
        h = h_out.to(tl.float32)

    # Statistics per row: centre first (LayerNorm), then the mean of squares.
    if IS_RMS:
        centered = h
    else:
        mean = tl.sum(h, axis=1) / N
        centered = tl.where(mask, h - mean[:, None], 0.0)
        tl.store(Mean + rows, mean, mask=row_mask)
    var = tl.sum(centered * centered, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + rows, rstd, mask=row_mask)

    # Normalise, scale, shift.
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + out_offs, _round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_wide_kernel(
    X, R, W, B, Y, H, Mean, Rstd,  # as in _norm_fwd_fused_kernel
    stride_xm,
    stride_rm,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One row per program, BLOCK_N < N columns at a time.
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    r_row = R + row * stride_rm
    out_off = row * N  # y and h are contiguous

    # Pass 1: per-block mean and M2 merged into the row's (count, mean, M2) (Chan et al.
    # 1979); RMSNorm only needs the sum of squares.
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for start in tl.range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
            h_out = _round_to(h, H.dtype.element_ty)
            tl.store(H + out_off + cols, h_out, mask=mask)
            h = h_out.to(tl.float32)
        if IS_RMS:
            m2 += tl.sum(h * h, axis=0)
        else:
            block_count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            block_mean = tl.sum(h, axis=0) / block_count
            d = tl.where(mask, h - block_mean, 0.0)
            block_m2 = tl.sum(d * d, axis=0)
            delta = block_mean - mean
            total = count + block_count
            mean += delta * (block_count / total)
            m2 += block_m2 + delta * delta * (count * block_count / total)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    tl.store(Rstd + row, rstd)
    if not IS_RMS:
        tl.store(Mean + row, mean)

    # Pass 2: read the row again (h as stored in pass 1, after a CTA barrier makes the
    # program's own stores visible to all its threads), normalise, scale, shift.
    if HAS_RESIDUAL:
        tl.debug_barrier()
    for start in tl.range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_RESIDUAL:
            h = tl.load(H + out_off + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            y = h * rstd
        else:
            y = (h - mean) * rstd
        if HAS_WEIGHT:
            y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + out_off + cols, _round_to(y, Y.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------- backward


@triton.jit
def _norm_bwd_fused_kernel(
    DY,  # (M, N) gradient of y, row stride stride_dym
    DH,  # (M, N) gradient flowing into h, row stride stride_dhm (unused without HAS_DH)
    X,  # (M, N) the normalised input (x, or h with a residual), row stride stride_xm
    W,  # (N,) weight (unused without HAS_WEIGHT)
    Mean,  # (M,) fp32 (unused for RMSNorm)
    Rstd,  # (M,) fp32
    DX,  # (M, N) output, contiguous
    DW_partial,  # (programs, N) fp32 per-program sums of dy * xhat (unused without HAS_WEIGHT)
    DB_partial,  # (programs, N) fp32 per-program sums of dy (unused without HAS_BIAS)
    stride_dym,
    stride_dhm,
    stride_xm,
    M,
    N,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Persistent: program pid takes row tiles pid, pid + programs, ... (whole rows).
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in tl.range(pid * BLOCK_M, M, num_programs * BLOCK_M):
        rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]

        # xhat from the saved statistics; padding lanes are zeroed.
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy

        # dx = rstd * (g - xhat * mean(g * xhat) - mean(g)), plus dh.
        c1 = tl.sum(g * xhat, axis=1) / N
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / N
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DH:
            dh = tl.load(DH + rows[:, None] * stride_dhm + cols[None, :], mask=mask, other=0.0)
            dx += dh.to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], _round_to(dx, DX.dtype.element_ty), mask=mask)

        # This program's dw/db partial sums, in registers.
        if HAS_WEIGHT:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)

    # One fp32 partial row per program.
    partial_offs = pid.to(tl.int64) * N + cols
    if HAS_WEIGHT:
        tl.store(DW_partial + partial_offs, dw_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial + partial_offs, db_acc, mask=col_mask)


@triton.jit
def _norm_bwd_row_sums_kernel(
    DY, X, W, Mean, Rstd,  # as in _norm_bwd_fused_kernel
    C1,  # (M,) fp32 output: mean(g * xhat) per row
    C2,  # (M,) fp32 output: mean(g) per row (unused for RMSNorm)
    stride_dym,
    stride_xm,
    N,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Wide rows, step 1: one row per program, the two row reductions dx needs.
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(Rstd + row)
    if not IS_RMS:
        mean = tl.load(Mean + row)
    # Lane-wise fp32 sums over the column blocks, reduced across lanes once at the end.
    acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + row * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = (x - mean) * rstd
        acc_gx += g * xhat
        acc_g += g
    tl.store(C1 + row, tl.sum(acc_gx, axis=0) / N)
    if not IS_RMS:
        tl.store(C2 + row, tl.sum(acc_g, axis=0) / N)


@triton.jit
def _norm_bwd_wide_kernel(
    DY, DH, X, W, Mean, Rstd, DX,  # as in _norm_bwd_fused_kernel
    C1, C2,  # (M,) fp32 from _norm_bwd_row_sums_kernel
    DW_partial,  # (row groups, N) fp32 per-group sums of dy * xhat (unused without HAS_WEIGHT)
    DB_partial,  # (row groups, N) fp32 per-group sums of dy (unused without HAS_BIAS)
    stride_dym,
    stride_dhm,
    stride_xm,
    M,
    N,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Wide rows, step 2: program (column block, row group) takes row tiles group,
    # group + groups, ... of its column block; dw/db stay in registers.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    num_groups = tl.num_programs(1)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in tl.range(group * BLOCK_M, M, num_groups * BLOCK_M):
        rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]

        # xhat and g for this tile; padding lanes are zeroed.
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy

        # dx = rstd * (g - xhat * c1 - c2), plus dh, with the row sums from step 1.
        c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.load(C2 + rows, mask=row_mask, other=0.0)
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DH:
            dh = tl.load(DH + rows[:, None] * stride_dhm + cols[None, :], mask=mask, other=0.0)
            dx += dh.to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], _round_to(dx, DX.dtype.element_ty), mask=mask)

        # This group's dw/db partial sums for the column block, in registers.
        if HAS_WEIGHT:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)

    partial_offs = group.to(tl.int64) * N + cols
    if HAS_WEIGHT:
        tl.store(DW_partial + partial_offs, dw_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial + partial_offs, db_acc, mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    Partials,  # (planes, P, N) fp32, contiguous: plane 0 is summed into OutA, plane 1 into OutB
    OutA,  # (N,) in its parameter's dtype
    OutB,  # (N,) in its parameter's dtype (unused with one plane)
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (column block, plane): the plane's P partial rows summed in a fixed order.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    plane = tl.program_id(1)
    col_mask = cols < N
    base = Partials + plane.to(tl.int64) * P * N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_mask[None, :]
        acc += tl.load(base + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if plane == 0:
        tl.store(OutA + cols, _round_to(total, OutA.dtype.element_ty), mask=col_mask)
    else:
        tl.store(OutB + cols, _round_to(total, OutB.dtype.element_ty), mask=col_mask)


# ------------------------------------------------------------------- launch functions


def _num_warps(tile_elems: int) -> int:
    """Warps for a tile of ``tile_elems`` values: about ELEMS_PER_THREAD per thread."""
    warps = triton.next_power_of_2(tile_elems) // (32 * ELEMS_PER_THREAD)
    return min(max(warps, MIN_WARPS), MAX_WARPS)


def _fused_tile(rows: int, width: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for whole rows: BLOCK_N covers the row, BLOCK_M packs narrow rows."""
    block_n = triton.next_power_of_2(width)
    block_m = min(max(ROW_TILE_ELEMS // block_n, 1), MAX_BLOCK_M, triton.next_power_of_2(rows))
    return block_m, block_n


def _max_programs(device: torch.device) -> int:
    """Size of a persistent grid: PROGRAMS_PER_SM per SM (a fixed few on the interpreter)."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return sm_count(device) * PROGRAMS_PER_SM


def _on_device(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device) on the current stream."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows_view(t: Tensor, width: int) -> Tensor:
    """``t`` as (rows, width) with a unit column stride and one row stride; copies only
    when the leading dimensions cannot be flattened into one stride."""
    if width > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, width)
    except RuntimeError:
        return t.reshape(-1, width)


class _ParamGrads:
    """The fp32 partial sums of dweight/dbias, one (P, N) plane per present parameter, and
    their deterministic reduction (one launch for both) into the parameters' dtypes."""

    def __init__(self, weight: Optional[Tensor], bias: Optional[Tensor], num_partials: int, width: int, device):
        self.params = [p for p in (weight, bias) if p is not None]
        shape = (len(self.params), num_partials, width)
        self.planes = torch.empty(shape, dtype=torch.float32, device=device)
        self.dweight = self.planes[0] if weight is not None else None
        self.dbias = self.planes[-1] if bias is not None else None

    def reduce(self) -> list:
        """[dweight, dbias] with None for an absent parameter."""
        if not self.params:
            return []
        planes, num_partials, width = self.planes.shape
        outs = [torch.empty(width, dtype=p.dtype, device=p.device) for p in self.params]
        grid = (triton.cdiv(width, REDUCE_BLOCK_N), planes)
        _sum_partials_kernel[grid](
            self.planes, outs[0], outs[-1], num_partials, width,
            BLOCK_P=REDUCE_BLOCK_P, BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_WARPS,
        )
        return outs


def norm_fwd(
    op: str,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    *,
    max_fused_width: int = MAX_FUSED_WIDTH_FWD,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """Forward of ``op`` ("layer_norm" or "rms_norm") over the last dimension of ``x``.

    Args:
        x: ``(..., N)`` fp16/bf16/fp32 with a unit last stride.
        weight, bias: ``(N,)`` or None, any float dtype (bias ignored by rms_norm).
        residual: None or x's shape and dtype; then ``h = x + residual`` is normalised.
        eps: added to the variance (mean square for rms_norm).
        max_fused_width: widest row kept whole in registers (tests lower it to reach
            the column-loop path on small shapes).

    Returns:
        ``(y, h, mean, rstd)``: y in x's shape and dtype, contiguous; h likewise, or None
        without residual; mean ``(rows,)`` fp32 for layer_norm, None for rms_norm; rstd
        ``(rows,)`` fp32.
    """
    is_rms = op == "rms_norm"
    width = x.shape[-1]
    x2 = _rows_view(x, width)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    mean = None if is_rms else torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, h, mean, rstd
    r2 = _rows_view(residual, width) if residual is not None else x2
    # Absent tensors are never read (their constexpr flag is off); x stands in for them.
    args = (
        x2, r2,
        weight if weight is not None else x2,
        bias if bias is not None and not is_rms else x2,
        y, h if h is not None else y,
        mean if mean is not None else rstd, rstd,
        x2.stride(0), r2.stride(0),
    )
    flags = dict(
        IS_RMS=is_rms,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None and not is_rms,
        HAS_RESIDUAL=residual is not None,
    )
    with _on_device(x):
        if width <= max_fused_width:
            block_m, block_n = _fused_tile(rows, width)
            grid = (triton.cdiv(rows, block_m),)
            _norm_fwd_fused_kernel[grid](
                *args, rows, width, eps, **flags,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n),
            )
        else:
            block_n = min(WIDE_BLOCK_N_FWD, triton.next_power_of_2(max_fused_width))
            _norm_fwd_wide_kernel[(rows,)](
                *args, width, eps, **flags, BLOCK_N=block_n, num_warps=_num_warps(block_n),
            )
    return y, h, mean, rstd


def norm_bwd(
    op: str,
    dy: Tensor,
    dh: Optional[Tensor],
    inp: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Optional[Tensor],
    rstd: Tensor,
    eps: float = 0.0,  # unused: the saved rstd carries it (the backends' common signature)
    *,
    max_fused_width: int = MAX_FUSED_WIDTH_BWD,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Backward of ``op`` from the saved statistics of ``norm_fwd``.

    Args:
        dy: gradient of y, inp's shape and dtype (any strides with a unit last stride).
        dh: None, or the gradient flowing into h (inp's shape and dtype); added into dx.
        inp: the normalised input: x, or h when the forward had a residual.
        weight, bias: as in the forward (bias ignored by rms_norm).
        mean: ``(rows,)`` fp32 for layer_norm (None for rms_norm); rstd: ``(rows,)`` fp32.
        max_fused_width: widest row kept whole in registers (tests lower it).

    Returns:
        ``(dx, dweight, dbias)``: dx in inp's shape and dtype, contiguous; dweight and
        dbias in weight's and bias's dtypes, or None where that parameter is None. They
        are summed from fp32 partials in a fixed order: bitwise reproducible.
    """
    is_rms = op == "rms_norm"
    has_bias = bias is not None and not is_rms
    width = inp.shape[-1]
    x2 = _rows_view(inp, width)
    rows = x2.shape[0]
    dx = torch.empty(inp.shape, dtype=inp.dtype, device=inp.device)
    if rows == 0:
        dweight = torch.zeros_like(weight) if weight is not None else None
        return dx, dweight, torch.zeros_like(bias) if has_bias else None
    dy2 = _rows_view(dy, width)
    dh2 = _rows_view(dh, width) if dh is not None else dy2
    mean_arg = mean if mean is not None and not is_rms else rstd
    flags = dict(
        IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_DH=dh is not None,
    )

    with _on_device(inp):
        if width <= max_fused_width:
            block_m, block_n = _fused_tile(rows, width)
            num_warps = _num_warps(block_m * block_n)
            num_programs = min(triton.cdiv(rows, block_m), _max_programs(inp.device))
            partials = _ParamGrads(weight, bias if has_bias else None, num_programs, width, inp.device)
            _norm_bwd_fused_kernel[(num_programs,)](
                dy2, dh2, x2,
                weight if weight is not None else x2,
                mean_arg, rstd, dx,
                partials.dweight if weight is not None else rstd,
                partials.dbias if has_bias else rstd,
                dy2.stride(0), dh2.stride(0), x2.stride(0), rows, width, **flags,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )
        else:
            # Step 1: the per-row sums mean(g * xhat) and mean(g).
            block_n = min(WIDE_BLOCK_N_BWD, triton.next_power_of_2(max_fused_width))
            c1 = torch.empty(rows, dtype=torch.float32, device=inp.device)
            c2 = torch.empty(rows, dtype=torch.float32, device=inp.device) if not is_rms else c1
            _norm_bwd_row_sums_kernel[(rows,)](
                dy2, x2, weight if weight is not None else x2, mean_arg, rstd, c1, c2,
                dy2.stride(0), x2.stride(0), width,
                IS_RMS=is_rms, HAS_WEIGHT=weight is not None,
                BLOCK_N=block_n, num_warps=_num_warps(block_n),
            )
            # Step 2: dx and per-group dw/db over a (column block, row group) grid.
            block_m = WIDE_BLOCK_M_BWD
            col_blocks = triton.cdiv(width, block_n)
            groups = min(triton.cdiv(_max_programs(inp.device), col_blocks), triton.cdiv(rows, block_m))
            partials = _ParamGrads(weight, bias if has_bias else None, groups, width, inp.device)
            _norm_bwd_wide_kernel[(col_blocks, groups)](
                dy2, dh2, x2,
                weight if weight is not None else x2,
                mean_arg, rstd, dx, c1, c2,
                partials.dweight if weight is not None else rstd,
                partials.dbias if has_bias else rstd,
                dy2.stride(0), dh2.stride(0), x2.stride(0), rows, width, **flags,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n),
            )

        sums = iter(partials.reduce())
        dweight = next(sums) if weight is not None else None
        dbias = next(sums) if has_bias else None
    return dx, dweight, dbias
