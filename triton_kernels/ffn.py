"""Feed-forward activation kernels in Triton: bias+GELU, SwiGLU and GeGLU, forward and backward.

What:

- ``bias_gelu_fwd(x, bias, approximate) -> y``                ``y = gelu(x + bias)``
- ``bias_gelu_bwd(dy, x, bias, approximate) -> (dx, dbias)``
- ``glu_fwd(gate, up, activation) -> y``                      ``y = act(gate) * up``
- ``glu_bwd(dy, gate, up, activation) -> (dgate, dup)``

``activation`` is "silu" (SwiGLU), "gelu" or "gelu_tanh" (GeGLU): the gated linear unit
variants of Shazeer 2020, "GLU Variants Improve Transformer" (arXiv:2002.05202).
Plain launch functions: no autograd, no input checks (fast_attn/ops/ffn.py does both).

The maths, in fp32 whatever the storage dtype (fp16, bf16 or fp32, taken from the inputs),
rounded once to the input dtype on store; ``u`` is ``x + bias`` or ``gate``:

- exact GELU:  ``gelu(u) = u * Phi(u)``, ``Phi(u) = 0.5 * (1 + erf(u / sqrt(2)))``;
               ``gelu'(u) = Phi(u) + u * phi(u)``, ``phi(u) = exp(-u^2 / 2) / sqrt(2 pi)``.
- tanh GELU:   ``gelu(u) = 0.5 * u * (1 + t)``, ``t = tanh(k * (u + c * u^3))``,
               ``k = sqrt(2 / pi)``, ``c = 0.044715``;
               ``gelu'(u) = 0.5 * (1 + t) + 0.5 * u * (1 - t^2) * k * (1 + 3 c u^2)``.
- SiLU:        ``silu(u) = u * s``, ``s = sigmoid(u)``; ``silu'(u) = s + u * s * (1 - s)``.
- GLU backward: ``dgate = dy * up * act'(gate)``, ``dup = dy * act(gate)``.
- bias+GELU backward: ``dx = dy * gelu'(x + bias)``; ``dbias = sum over rows of dx``,
  summed from the fp32 ``dx`` before it is rounded, in fp32 with Kahan compensation,
  deterministically: each program writes the column sums of its slab of rows into an
  fp32 ``(slabs, N)`` workspace, and a second kernel adds the slabs up in slab order (no
  atomics), so the result is bitwise reproducible run to run on one GPU.

Kernels are memory-bound: each input is read once and each output written once. The
elementwise kernels walk the flattened tensor in blocks of ``BLOCK_SIZE`` elements with
int64 offsets and a masked tail. bias+GELU with a bias uses a 2-D ``(rows, N)`` tiling
instead (see ``_bias_gelu_fwd_kernel``). Triton 3.6 has no ``tl.math.tanh``
(``tl.math.erf`` exists from Triton 3.0 on), so tanh is written through the sigmoid,
``1 + t = 2 sigmoid(2z)`` and ``1 - t = 2 (1 - sigmoid(2z))``, both computed from
``exp(-|2z|)``: no overflow, and ``1 - t^2 = (1 + t)(1 - t)`` keeps its precision where
``t`` is near +-1 (more precise than PyTorch's ``1 - t * t``).

Limits:

- Every input is used through flat offsets, so one that is not contiguous (including a
  view with only its last dimension contiguous) is copied once with ``.contiguous()``;
  outputs are always new contiguous tensors of the input's shape and dtype.
- Inputs are never written. Empty tensors return empty outputs (and a zero ``dbias``)
  without launching a kernel.
- The block sizes and warp counts below have not yet been tuned on a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fast_attn.triton_kernels._device import sm_count

# Globals a kernel reads must be tl.constexpr instances.
INV_SQRT2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2): erf argument of the exact GELU
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi): standard normal density scale
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi): k of the tanh approximation
GELU_TANH_COEFF = tl.constexpr(0.044715)  # c: the cubic term of the tanh approximation

# Activation codes (the ACTIVATION constexpr): which function a kernel instance computes.
ACT_SILU = tl.constexpr(0)
ACT_GELU = tl.constexpr(1)
ACT_GELU_TANH = tl.constexpr(2)
ACTIVATIONS = {"silu": ACT_SILU.value, "gelu": ACT_GELU.value, "gelu_tanh": ACT_GELU_TANH.value}

# Elementwise kernels: elements per program and warps per program (16 per thread: two
# 16-byte accesses per tensor in fp16/bf16, four in fp32). Untuned.
ELEMENTWISE_BLOCK_SIZE = 4096
ELEMENTWISE_NUM_WARPS = 8

# bias+GELU 2-D tiles: BLOCK_N columns (at most MAX_BLOCK_N) by BLOCK_M rows, about
# TILE_ELEMENTS elements a tile. Untuned.
TILE_ELEMENTS = 4096
MAX_BLOCK_N = 1024
TILE_NUM_WARPS = 8
# The backward's tiles have at most this many rows: the rows of one tile are summed
# plainly at the end of a slab (the slab's tiles are added with compensation), so this
# bounds that plain sum. Only rows narrower than 64 columns get tiles smaller than
# TILE_ELEMENTS.
BWD_MAX_BLOCK_M = 64

# dbias: programs a backward launch aims for (per SM), and the fewest rows one slab sums
# (each slab writes and re-reads 8 bytes of fp32 partials per column: at 64 rows that is
# at most 2% of the 6 bytes per element a bf16 backward moves).
PROGRAMS_PER_SM = 8
MIN_ROWS_PER_SLAB = 64
INTERPRETER_SMS = 1  # no SMs under the Triton interpreter: a small fixed program target
REDUCE_BLOCK_N = 1024
REDUCE_NUM_WARPS = 4


# ------------------------------------------------------------------ activations (fp32)


# In these helpers a named constant always multiplies a tensor from the right
# (``u * INV_SQRT2``): the Triton interpreter evaluates ``constexpr * tensor`` to a
# constexpr wrapping the tensor, which later ops reject.


@triton.jit
def _sigmoid_pair(x):
    """(sigmoid(x), 1 - sigmoid(x)), each to a few ulp of itself, never overflowing.

    With e = exp(-|x|) in (0, 1], the larger of the two is 1 / (1 + e), the smaller
    e / (1 + e): no cancellation in 1 - s near s = 1, and no exp(+large) = inf.
    """
    e = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + e)
    small = e * big
    positive = x >= 0.0
    return tl.where(positive, big, small), tl.where(positive, small, big)


@triton.jit
def _act_fwd(u, ACTIVATION: tl.constexpr):
    """act(u) for an fp32 tensor u."""
    if ACTIVATION == ACT_SILU:
        # silu(u) = u * sigmoid(u)
        s, _ = _sigmoid_pair(u)
        out = u * s
    elif ACTIVATION == ACT_GELU:
        # u * Phi(u), Phi the standard normal CDF
        out = 0.5 * u * (1.0 + tl.math.erf(u * INV_SQRT2))
    else:
        # 0.5 * u * (1 + tanh(z)) = u * sigmoid(2z), z = k * (u + c * u^3)
        z = (u + u * u * u * GELU_TANH_COEFF) * SQRT_2_OVER_PI
        s, _ = _sigmoid_pair(2.0 * z)
        out = u * s
    return out


@triton.jit
def _act_fwd_and_grad(u, ACTIVATION: tl.constexpr):
    """(act(u), act'(u)) for an fp32 tensor u; the compiler drops whichever is unused."""
    if ACTIVATION == ACT_SILU:
        # s = sigmoid(u); silu = u * s; silu' = s + u * s * (1 - s)
        s, one_minus_s = _sigmoid_pair(u)
        out = u * s
        grad = s + u * s * one_minus_s
    elif ACTIVATION == ACT_GELU:
        # Phi = 0.5 * (1 + erf(u / sqrt 2)); gelu' = Phi + u * phi(u)
        cdf = 0.5 * (1.0 + tl.math.erf(u * INV_SQRT2))
        pdf = tl.exp(-0.5 * u * u) * INV_SQRT_2PI
        out = u * cdf
        grad = cdf + u * pdf
    else:
        # gelu' = 0.5 (1 + t) + 0.5 u (1 - t^2) z', t = tanh(z), z' = k (1 + 3 c u^2);
        # with s = sigmoid(2z): 1 + t = 2s, 1 - t = 2(1 - s), so gelu' = s + 2 u s (1 - s) z'
        z = (u + u * u * u * GELU_TANH_COEFF) * SQRT_2_OVER_PI
        s, one_minus_s = _sigmoid_pair(2.0 * z)
        dz = (1.0 + u * u * GELU_TANH_COEFF * 3.0) * SQRT_2_OVER_PI
        out = u * s
        grad = s + 2.0 * u * s * one_minus_s * dz
    return out, grad


# ------------------------------------------------------------------ elementwise kernels


@triton.jit
def _glu_fwd_kernel(
    gate_ptr,  # (n,) flat, contiguous
    up_ptr,  # (n,) flat, contiguous; unused without HAS_UP
    y_ptr,  # (n,) flat, contiguous, gate's dtype
    n_elements,
    ACTIVATION: tl.constexpr,
    HAS_UP: tl.constexpr,  # False: y = act(gate) (bias+GELU without a bias)
    BLOCK_SIZE: tl.constexpr,
):
    # this program's block of the flat tensor, int64 offsets, masked tail
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    # act(gate) in fp32
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = _act_fwd(g, ACTIVATION)
    # times up
    if HAS_UP:
        y = y * tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dy_ptr,  # (n,) flat, contiguous
    gate_ptr,  # (n,) flat, contiguous
    up_ptr,  # (n,) flat, contiguous; unused without HAS_UP
    dgate_ptr,  # (n,) flat, contiguous, gate's dtype
    dup_ptr,  # (n,) flat, contiguous, up's dtype; unused without HAS_UP
    n_elements,
    ACTIVATION: tl.constexpr,
    HAS_UP: tl.constexpr,  # False: dgate = dy * act'(gate) only
    BLOCK_SIZE: tl.constexpr,
):
    # this program's block of the flat tensor, int64 offsets, masked tail
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # act(gate) and act'(gate), recomputed from the saved input
    a, da = _act_fwd_and_grad(g, ACTIVATION)
    if HAS_UP:
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # dup = dy * act(gate); dgate = dy * up * act'(gate)
        tl.store(dup_ptr + offsets, (dy * a).to(dup_ptr.dtype.element_ty), mask=mask)
        dg = dy * up * da
    else:
        dg = dy * da
    tl.store(dgate_ptr + offsets, dg.to(dgate_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------- bias + GELU, 2-D tiles
#
# With a bias every element needs its column, offset % N. On flat offsets that is a
# 64-bit integer remainder per element, which the GPU emulates in dozens of instructions:
# enough to make the kernel instruction-bound rather than memory-bound at ~3 TB/s. A 2-D
# (rows, N) tiling gets the column from the program id and an arange instead, loads the
# bias tile once per program, and gives the backward its per-column partial sums of dx
# directly. Without a bias the flat elementwise kernels above are used.


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,  # (n_rows, n_cols) contiguous
    bias_ptr,  # (n_cols,)
    y_ptr,  # (n_rows, n_cols) contiguous, x's dtype
    n_rows,
    n_cols,
    ACTIVATION: tl.constexpr,  # ACT_GELU or ACT_GELU_TANH
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # this program's (BLOCK_M, BLOCK_N) tile: rows from axis 0 (int64), columns from axis 1
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_mask[None, :]
    offsets = rows[:, None] * n_cols + cols[None, :]
    # u = x + bias in fp32; the bias tile is loaded once and broadcast over the rows
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    # y = gelu(u), rounded once to x's dtype
    y = _act_fwd(u, ACTIVATION)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr,  # (n_rows, n_cols) contiguous
    x_ptr,  # (n_rows, n_cols) contiguous
    bias_ptr,  # (n_cols,)
    dx_ptr,  # (n_rows, n_cols) contiguous, x's dtype
    partial_ptr,  # (n_slabs, n_cols) fp32: column sums of dx over each slab of rows
    n_rows,
    n_cols,
    rows_per_slab,  # a multiple of BLOCK_M
    ACTIVATION: tl.constexpr,  # ACT_GELU or ACT_GELU_TANH
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # this program: slab program_id(0) of the rows, column block program_id(1)
    slab = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    slab_start = slab.to(tl.int64) * rows_per_slab
    # Kahan-compensated running sum of dx: acc - comp is the sum to about one ulp
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    comp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # walk the slab BLOCK_M rows at a time, in a fixed order
    for r in range(0, rows_per_slab, BLOCK_M):
        rows = slab_start + r + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        # dx = dy * gelu'(x + bias) in fp32; masked elements have dy = 0, so dx = 0
        _, du = _act_fwd_and_grad(u, ACTIVATION)
        dx = dy * du
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        # add the unrounded fp32 dx to the compensated sum
        term = dx - comp
        total = acc + term
        comp = (total - acc) - term
        acc = total
    # this slab's column sums of dx
    partial = tl.sum(acc - comp, axis=0)
    tl.store(partial_ptr + slab.to(tl.int64) * n_cols + cols, partial, mask=col_mask)


@triton.jit
def _dbias_reduce_kernel(
    partial_ptr,  # (n_slabs, n_cols) fp32
    dbias_ptr,  # (n_cols,), bias's dtype
    n_slabs,
    n_cols,
    BLOCK_N: tl.constexpr,
):
    # this program's block of columns
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    comp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # add the slabs' partial sums in slab order (the same order on every run), compensated
    ptrs = partial_ptr + cols
    for _ in range(0, n_slabs):
        term = tl.load(ptrs, mask=mask, other=0.0) - comp
        total = acc + term
        comp = (total - acc) - term
        acc = total
        ptrs += n_cols  # next slab (pointer arithmetic is 64-bit)
    tl.store(dbias_ptr + cols, (acc - comp).to(dbias_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ launch functions


def _contiguous(t: Tensor) -> Tensor:
    """``t`` itself when contiguous, else one contiguous copy (flat offsets need it)."""
    return t if t.is_contiguous() else t.contiguous()


def _device_guard(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), not cuda:0."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _program_target(t: Tensor) -> int:
    """Programs one backward launch aims for on ``t``'s device."""
    if not t.is_cuda:
        return PROGRAMS_PER_SM * INTERPRETER_SMS
    return PROGRAMS_PER_SM * sm_count(t.device)


def _tile(n_cols: int, max_block_m: Optional[int] = None) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the bias+GELU tiles for rows of ``n_cols`` elements."""
    block_n = min(triton.next_power_of_2(n_cols), MAX_BLOCK_N)
    block_m = max(1, TILE_ELEMENTS // block_n)
    return (block_m if max_block_m is None else min(block_m, max_block_m)), block_n


def _elementwise_grid(n_elements: int):
    return (triton.cdiv(n_elements, ELEMENTWISE_BLOCK_SIZE),)


def _gelu_activation(approximate: str) -> int:
    return ACT_GELU_TANH if approximate == "tanh" else ACT_GELU


def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    """``y = gelu(x + bias)``.

    Args:
        x: ``(..., N)``, float16/bfloat16/float32; copied once if not contiguous.
        bias: ``(N,)`` of x's dtype, or None.
        approximate: "none" (exact erf GELU) or "tanh".

    Returns:
        y: x's shape and dtype, contiguous.
    """
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x = _contiguous(x)
    activation = _gelu_activation(approximate)
    with _device_guard(x):
        if bias is None:
            # no column dependence: the flat elementwise kernel, y = act(x)
            _glu_fwd_kernel[_elementwise_grid(x.numel())](
                x, x, y, x.numel(),
                ACTIVATION=activation, HAS_UP=False,
                BLOCK_SIZE=ELEMENTWISE_BLOCK_SIZE, num_warps=ELEMENTWISE_NUM_WARPS,
            )
            return y
        n_cols = x.shape[-1]
        n_rows = x.numel() // n_cols
        block_m, block_n = _tile(n_cols)
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
        _bias_gelu_fwd_kernel[grid](
            x, _contiguous(bias), y, n_rows, n_cols,
            ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=TILE_NUM_WARPS,
        )
    return y


def _slabs(n_rows: int, block_m: int, column_blocks: int, program_target: int) -> Tuple[int, int]:
    """(n_slabs, rows_per_slab) for the dbias partial sums; rows_per_slab is a multiple of BLOCK_M.

    Enough slabs to give about ``program_target`` programs, but none shorter than
    MIN_ROWS_PER_SLAB rows (each slab costs one fp32 row of partials).
    """
    max_slabs = max(1, triton.cdiv(n_rows, max(MIN_ROWS_PER_SLAB, block_m)))
    wanted = max(1, program_target // column_blocks)
    n_slabs = min(max_slabs, wanted)
    rows_per_slab = triton.cdiv(triton.cdiv(n_rows, n_slabs), block_m) * block_m
    return triton.cdiv(n_rows, rows_per_slab), rows_per_slab


def bias_gelu_bwd(
    dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of ``gelu(x + bias)``: ``(dx, dbias)``, dbias None when bias is None.

    Args:
        dy: x's shape (the gradient of y); copied once if not contiguous.
        x, bias, approximate: as given to ``bias_gelu_fwd``.

    Returns:
        dx: x's shape and dtype, contiguous.
        dbias: ``(N,)`` of bias's dtype, the fp32 sum of dx over all rows (zeros when x
        has no rows), bitwise reproducible; None without a bias.
    """
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, (None if bias is None else torch.zeros_like(bias))
    x, dy = _contiguous(x), _contiguous(dy)
    activation = _gelu_activation(approximate)
    with _device_guard(x):
        if bias is None:
            # no dbias: the flat elementwise kernel, dx = dy * act'(x)
            _glu_bwd_kernel[_elementwise_grid(x.numel())](
                dy, x, x, dx, dx, x.numel(),
                ACTIVATION=activation, HAS_UP=False,
                BLOCK_SIZE=ELEMENTWISE_BLOCK_SIZE, num_warps=ELEMENTWISE_NUM_WARPS,
            )
            return dx, None
        n_cols = x.shape[-1]
        n_rows = x.numel() // n_cols
        block_m, block_n = _tile(n_cols, BWD_MAX_BLOCK_M)
        column_blocks = triton.cdiv(n_cols, block_n)
        n_slabs, rows_per_slab = _slabs(n_rows, block_m, column_blocks, _program_target(x))
        # dx and each slab's fp32 column sums of dx
        partial = torch.empty((n_slabs, n_cols), dtype=torch.float32, device=x.device)
        _bias_gelu_bwd_kernel[(n_slabs, column_blocks)](
            dy, x, _contiguous(bias), dx, partial, n_rows, n_cols, rows_per_slab,
            ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=TILE_NUM_WARPS,
        )
        # dbias: the slabs added in slab order
        dbias = torch.empty_like(bias)
        _dbias_reduce_kernel[(triton.cdiv(n_cols, REDUCE_BLOCK_N),)](
            partial, dbias, n_slabs, n_cols, BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_NUM_WARPS,
        )
    return dx, dbias


def glu_fwd(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """``y = act(gate) * up`` with act "silu" (SwiGLU), "gelu" or "gelu_tanh" (GeGLU).

    Args:
        gate, up: the same shape and dtype (float16/bfloat16/float32); each is copied
            once if not contiguous.

    Returns:
        y: gate's shape and dtype, contiguous.
    """
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return y
    gate, up = _contiguous(gate), _contiguous(up)
    with _device_guard(gate):
        _glu_fwd_kernel[_elementwise_grid(gate.numel())](
            gate, up, y, gate.numel(),
            ACTIVATION=ACTIVATIONS[activation], HAS_UP=True,
            BLOCK_SIZE=ELEMENTWISE_BLOCK_SIZE, num_warps=ELEMENTWISE_NUM_WARPS,
        )
    return y


def glu_bwd(dy: Tensor, gate: Tensor, up: Tensor, activation: str) -> Tuple[Tensor, Tensor]:
    """Gradients of ``act(gate) * up``: ``(dgate, dup)``.

    Args:
        dy: gate's shape (the gradient of y); copied once if not contiguous.
        gate, up, activation: as given to ``glu_fwd``.

    Returns:
        dgate = dy * up * act'(gate) and dup = dy * act(gate): gate's shape, their
        inputs' dtypes, contiguous.
    """
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dgate, dup
    dy, gate, up = _contiguous(dy), _contiguous(gate), _contiguous(up)
    with _device_guard(gate):
        _glu_bwd_kernel[_elementwise_grid(gate.numel())](
            dy, gate, up, dgate, dup, gate.numel(),
            ACTIVATION=ACTIVATIONS[activation], HAS_UP=True,
            BLOCK_SIZE=ELEMENTWISE_BLOCK_SIZE, num_warps=ELEMENTWISE_NUM_WARPS,
        )
    return dgate, dup
