"""The CUDA SwiGLU / GeGLU kernels (csrc/ffn/glu.cu): what is specific to them. The shared
sweep through the public API (every backend, widths, dtypes, extreme inputs, 3-D) is
test_ffn.py.

GPU only (`pytest -m gpu`): every test skips without a CUDA device or when the extension
can be neither imported nor JIT-built. Through fast_attn.swiglu / geglu with
backend="cuda" and the raw ops torch.ops.fast_attn.cuda_glu_fwd / cuda_glu_bwd (via
``raw_glu``), against the reference with the DESIGN.md rule (fast_attn.testing.assert_close):
gate and up as the row-strided halves of one fused projection (16-byte aligned rows:
the vector path without copies; width 13: the scalar path); a broadcast (stride-0) dy
and a broadcast scalar; leading dimensions that do not collapse into one row stride
(copied by the op); tensors starting one element past a 16-byte boundary and rows whose
stride is not a multiple of 16 bytes (the scalar path); more rows than the grid's y
limit; empty inputs; bad inputs raise TypeError / ValueError whose message names the
argument; float64 is refused. Outputs are allocated where NaN-filled blocks were just
freed, so unwritten elements show as NaN; inputs must come back unchanged.
"""

from __future__ import annotations

import pytest
import torch

import fast_attn
from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close
from fast_attn import testing_cases as tc  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# the op's activation -> the GELU approximation of the public function, None for SwiGLU
ACTIVATIONS = {"silu": None, "gelu": "none", "gelu_tanh": "tanh"}
# gate's scale: wide enough to reach both tails of every activation
GATE_SCALE = 2.0
# the gridDim.y limit of the CUDA kernel (glu.cu: kMaxGridY)
MAX_GRID_Y = 65535


# ------------------------------------------------------------------------- helpers


def randn(*shape, dtype, scale=1.0):
    """Normal samples times ``scale`` on the GPU, never all zeros."""
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype)


def recycle_nan_blocks(like: torch.Tensor, count: int) -> None:
    """Free ``count`` NaN-filled blocks of like's size and dtype: the caching allocator hands
    them to the op's next allocations of that size, so elements it never writes stay NaN."""
    blocks = [torch.full(like.shape, float("nan"), dtype=like.dtype, device=like.device) for _ in range(count)]
    del blocks


def public_glu(gate, up, dy, activation):
    """(y, dgate, dup) through fast_attn.swiglu / geglu with backend="cuda" and autograd."""
    approximate = ACTIVATIONS[activation]
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()  # keeps the strides
    recycle_nan_blocks(gate, 1)
    if approximate is None:
        y = fast_attn.swiglu(gate, up, backend="cuda")
    else:
        y = fast_attn.geglu(gate, up, approximate=approximate, backend="cuda")
    recycle_nan_blocks(gate, 2)
    dgate, dup = torch.autograd.grad(y, [gate, up], dy)
    return y.detach(), dgate, dup


def raw_glu(ops, gate, up, dy, activation):
    """(y, dgate, dup) from the raw CUDA ops."""
    recycle_nan_blocks(gate, 1)
    y = ops.cuda_glu_fwd(gate, up, activation)
    recycle_nan_blocks(gate, 2)
    dgate, dup = ops.cuda_glu_bwd(dy, gate, up, activation)
    return y, dgate, dup


def check_glu(gate, up, dy, activation, run=public_glu):
    """``run``'s forward and gradients against the reference; inputs must be unchanged."""
    approximate = ACTIVATIONS[activation]
    oracle = tc.glu_reference(gate.double(), up.double(), dy.double(), approximate)
    baseline = tc.glu_reference(gate, up, dy, approximate, upcast=False)
    clones = [t.clone() for t in (gate, up, dy)]

    y, dgate, dup = run(gate, up, dy, activation)

    for name, before, after in zip(("gate", "up", "dy"), clones, (gate, up, dy)):
        assert torch.equal(before, after), f"{name} was written"
    for out in (y, dgate, dup):
        assert out.shape == gate.shape and out.dtype == gate.dtype and out.is_contiguous()
    assert_close(y, oracle[0], baseline[0], factor=OUTPUT_FACTOR, name="y")
    assert_close(dgate, oracle[1], baseline[1], factor=GRAD_FACTOR, gradient=True, name="dgate")
    assert_close(dup, oracle[2], baseline[2], factor=GRAD_FACTOR, gradient=True, name="dup")


# ------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [13, 4096])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_glu_fused_projection_halves(cuda_ops, dtype, width, activation):
    # gate and up as the two halves of one (rows, 2 * width) projection: row-strided views,
    # rows 16-byte aligned for width 4096 (vector path), not for 13 (scalar path)
    fused = randn(37, 2 * width, dtype=dtype, scale=GATE_SCALE)
    gate, up = fused[:, :width], fused[:, width:]
    assert not gate.is_contiguous() and not up.is_contiguous()
    check_glu(gate, up, randn(37, width, dtype=dtype), activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_glu_broadcast_dy(cuda_ops, dtype, activation):
    gate, up = randn(37, 1024, dtype=dtype, scale=GATE_SCALE), randn(37, 1024, dtype=dtype)
    # a broadcast row (row stride 0, vector path), and a broadcast scalar as y.sum()
    # hands over (last-dimension stride 0: copied)
    check_glu(gate, up, randn(1, 1024, dtype=dtype).expand(37, 1024), activation)
    check_glu(gate, up, torch.ones((), device="cuda", dtype=dtype).expand(37, 1024), activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glu_non_collapsible_leading_dims(cuda_ops, dtype):
    # (3, 37, N) views of (37, 3, N) tensors: no single row stride, the op copies
    gate = randn(37, 3, 1023, dtype=dtype, scale=GATE_SCALE).transpose(0, 1)
    up = randn(37, 3, 1023, dtype=dtype).transpose(0, 1)
    dy = randn(3, 37, 1023, dtype=dtype)
    for activation in ACTIVATIONS:
        check_glu(gate, up, dy, activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("misaligned", ["gate", "up", "dy"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_glu_misaligned_inputs(cuda_ops, dtype, misaligned, activation):
    rows, width = 37, 4096
    tensors = {}
    for name in ("gate", "up", "dy"):
        scale = GATE_SCALE if name == "gate" else 1.0
        if name == misaligned:
            # contiguous, but starting one element past a 16-byte boundary: scalar path
            flat = randn(rows * width + 1, dtype=dtype, scale=scale)
            tensors[name] = flat[1:].view(rows, width)
            assert tensors[name].data_ptr() % 16 != 0
        else:
            tensors[name] = randn(rows, width, dtype=dtype, scale=scale)
    check_glu(tensors["gate"], tensors["up"], tensors["dy"], activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glu_misaligned_row_stride(cuda_ops, dtype):
    # rows of (37, 4097) tensors: every row start but the first off a 16-byte boundary
    gate = randn(37, 4097, dtype=dtype, scale=GATE_SCALE)[:, :4096]
    up = randn(37, 4097, dtype=dtype)[:, 1:]
    dy = randn(37, 4096, dtype=dtype)
    for activation in ACTIVATIONS:
        check_glu(gate, up, dy, activation)


def test_glu_more_rows_than_the_grid_y_limit(cuda_ops):
    # narrow strided rows: blocks of 32 x 8 threads, so this needs the kernel's row loop
    rows = MAX_GRID_Y * 8 + 37
    fused = randn(rows, 6, dtype=torch.bfloat16, scale=GATE_SCALE)
    gate, up = fused[:, :3], fused[:, 3:]
    check_glu(gate, up, randn(rows, 3, dtype=torch.bfloat16), "gelu_tanh")


# ------------------------------------------------------------------------ raw ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 7, 8, 4096])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_raw_ops_match_reference(cuda_ops, dtype, width, activation):
    gate = randn(37, width, dtype=dtype, scale=GATE_SCALE)
    up, dy = randn(37, width, dtype=dtype), randn(37, width, dtype=dtype)
    check_glu(gate, up, dy, activation, run=lambda *args: raw_glu(cuda_ops, *args))


@pytest.mark.parametrize("shape", [(0, 7), (5, 0), (2, 0, 3)])
def test_raw_ops_empty_inputs(cuda_ops, shape):
    gate = torch.randn(shape, device="cuda", dtype=torch.float16)
    y = cuda_ops.cuda_glu_fwd(gate, gate, "silu")
    dgate, dup = cuda_ops.cuda_glu_bwd(gate, gate, gate, "gelu")
    for out in (y, dgate, dup):
        assert out.shape == gate.shape and out.dtype == gate.dtype and out.is_cuda


def test_raw_ops_bad_inputs(cuda_ops):
    gate = torch.randn(4, 8, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match=r'activation must be "silu", "gelu" or "gelu_tanh", got "relu"'):
        cuda_ops.cuda_glu_fwd(gate, gate, "relu")
    with pytest.raises(ValueError, match="activation must be"):
        cuda_ops.cuda_glu_bwd(gate, gate, gate, "tanh")
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        cuda_ops.cuda_glu_fwd(gate, gate.float(), "silu")
    with pytest.raises(ValueError, match="up must have gate's shape"):
        cuda_ops.cuda_glu_fwd(gate, gate[:, :7], "silu")
    with pytest.raises(ValueError, match="dy must have gate's shape"):
        cuda_ops.cuda_glu_bwd(gate[:3], gate, gate, "gelu")
    with pytest.raises(TypeError, match="dy must have gate's dtype"):
        cuda_ops.cuda_glu_bwd(gate.bfloat16(), gate, gate, "gelu")
    with pytest.raises(ValueError, match="up must be on gate's device"):
        cuda_ops.cuda_glu_fwd(gate, gate.cpu(), "silu")
    with pytest.raises(ValueError, match="gate must be a CUDA tensor"):
        cuda_ops.cuda_glu_fwd(gate.cpu(), gate, "silu")
    with pytest.raises(TypeError, match="gate must be float16, bfloat16 or float32"):
        cuda_ops.cuda_glu_fwd(gate.double(), gate.double(), "silu")
    with pytest.raises(ValueError, match="0-dim"):
        cuda_ops.cuda_glu_fwd(gate[0, 0], gate[0, 0], "silu")


def test_public_cuda_backend_rejects_float64(cuda_ops):
    gate = torch.randn(4, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        fast_attn.swiglu(gate, gate, backend="cuda")
    with pytest.raises(NotImplementedError, match="float64"):
        fast_attn.geglu(gate, gate, backend="cuda")
