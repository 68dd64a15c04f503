"""The Triton feed-forward activation launchers (fast_attn.triton_kernels.ffn): what is specific
to them. The shared sweep through the public API (every backend) is test_ffn.py.

CPU (the Triton interpreter, TRITON_INTERPRET=1, set by conftest.py without a GPU; on a
GPU machine the same tests run compiled): bias_gelu_fwd/bwd and glu_fwd/bwd, called
through ``launch``, against the reference with the DESIGN.md rule: row-strided inputs
with an expanded (stride-0) dy and a strided bias; dbias bitwise reproducible over 3
runs, also when split over many slabs; long all-positive fp32 dbias sums (compensated);
the slab split; empty inputs launch nothing. Outputs are allocated NaN-filled so
unwritten elements show; inputs are checked unchanged.

GPU (`pytest -m gpu`): dbias reproducibility on a large tensor.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fast_attn import backends
from fast_attn.reference.ffn import bias_gelu_ref
from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close
from fast_attn import testing_cases as tc  # noqa: E402

ffn = pytest.importorskip("fast_attn.triton_kernels.ffn", reason="triton is not installed")

APPROXIMATIONS = ["none", "tanh"]
# GLU activation of the kernel -> (op name, GELU approximation or None for SwiGLU)
GLU_ACTIVATIONS = {"silu": None, "gelu": "none", "gelu_tanh": "tanh"}


def _kernel_device():
    """Where the kernels run in these tests: CPU under the interpreter, else CUDA, else None."""
    if backends.triton_interpret_enabled():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


DEVICE = _kernel_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
needs_compiled_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or backends.triton_interpret_enabled(),
    reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET unset)",
)


# ------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def nan_filled_outputs():
    """Every floating tensor torch.empty/empty_like allocates inside the block starts as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
        patch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
        yield


def launch(kernel: str, *args):
    """The Triton FFN launchers (``ffn.bias_gelu_fwd/bwd``, ``ffn.glu_fwd/bwd``), called
    directly: every launcher call of this file goes through here."""
    return getattr(ffn, kernel)(*args)


def bias_gelu_reference(x, bias, dy, approximate, upcast=True):
    """(y, dx, dbias or None) of the reference, gradients by autograd."""
    x = x.detach().requires_grad_()
    leaves = [x]
    if bias is not None:
        bias = bias.detach().requires_grad_()
        leaves.append(bias)
    y = bias_gelu_ref(x, bias, approximate, upcast=upcast)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads[0], (grads[1] if bias is not None else None)


def double(t):
    return None if t is None else t.double()


def check_bias_gelu(x, bias, dy, approximate):
    """Forward and backward kernels against the reference; inputs must come back unchanged."""
    tanh = approximate == "tanh"
    oracle = bias_gelu_reference(double(x), double(bias), double(dy), approximate)
    baseline = bias_gelu_reference(x, bias, dy, approximate, upcast=False)
    clones = [t.clone() for t in (x, bias, dy) if t is not None]

    with nan_filled_outputs():
        y = launch("bias_gelu_fwd", x, bias, "tanh" if tanh else "none")
        dx, dbias = launch("bias_gelu_bwd", dy, x, bias, "tanh" if tanh else "none")

    for before, after in zip(clones, [t for t in (x, bias, dy) if t is not None]):
        assert torch.equal(before, after), "an input was written"
    for out in (y, dx):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert_close(y, oracle[0], baseline[0], factor=OUTPUT_FACTOR, name="y")
    assert_close(dx, oracle[1], baseline[1], factor=GRAD_FACTOR, name="dx")
    if bias is None:
        assert dbias is None
    else:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
        assert_close(dbias, oracle[2], baseline[2], factor=GRAD_FACTOR, name="dbias")


def check_glu(gate, up, dy, activation):
    """glu_fwd/glu_bwd against swiglu_ref/geglu_ref; inputs must come back unchanged."""
    approximate = GLU_ACTIVATIONS[activation]
    oracle = tc.glu_reference(gate.double(), up.double(), dy.double(), approximate)
    baseline = tc.glu_reference(gate, up, dy, approximate, upcast=False)
    clones = [t.clone() for t in (gate, up, dy)]

    with nan_filled_outputs():
        y = launch("glu_fwd", gate, up, activation)
        dgate, dup = launch("glu_bwd", dy, gate, up, activation)

    for before, after in zip(clones, (gate, up, dy)):
        assert torch.equal(before, after), "an input was written"
    for out in (y, dgate, dup):
        assert out.shape == gate.shape and out.dtype == gate.dtype and out.is_contiguous()
    assert_close(y, oracle[0], baseline[0], factor=OUTPUT_FACTOR, name="y")
    assert_close(dgate, oracle[1], baseline[1], factor=GRAD_FACTOR, name="dgate")
    assert_close(dup, oracle[2], baseline[2], factor=GRAD_FACTOR, name="dup")


def randn(*shape, dtype, device=None, scale=1.0):
    """Normal samples times ``scale``, drawn in fp32 on CPU (the same on every device)."""
    values = torch.randn(*shape, dtype=torch.float32) * scale
    return values.to(dtype=dtype, device=device or DEVICE)


# ------------------------------------------------------------------ bias + GELU, CPU


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_gelu_strided_inputs(with_bias):
    dtype = torch.bfloat16
    # rows of a wider tensor: the last dimension is contiguous, the tensor is not
    x = randn(37, 1024 + 64, dtype=dtype)[:, 3 : 3 + 1024]
    # dy as autograd hands it over from a broadcast: an expanded (stride 0) view
    dy = randn(1, 1024, dtype=dtype).expand(37, 1024)
    bias = randn(2048, dtype=dtype)[::2] if with_bias else None  # a strided bias
    assert not x.is_contiguous() and not dy.is_contiguous()
    check_bias_gelu(x, bias, dy, "tanh")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bias_gelu_dbias_is_deterministic_over_many_slabs(dtype):
    # many small slabs, so the partial-sum reduction really adds several rows of partials
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ffn, "MIN_ROWS_PER_SLAB", 1)
        patch.setattr(ffn, "PROGRAMS_PER_SM", 64)
        x = randn(37, 1024, dtype=dtype, scale=2.0)
        block_m, block_n = ffn._tile(1024, ffn.BWD_MAX_BLOCK_M)
        n_slabs, _ = ffn._slabs(37, block_m, 1024 // block_n, ffn._program_target(x))
        assert n_slabs > 5
        bias = randn(1024, dtype=dtype)
        dy = randn(37, 1024, dtype=dtype)
        check_bias_gelu(x, bias, dy, "none")
        first_dx, first_dbias = launch("bias_gelu_bwd", dy, x, bias, "none")
        for _ in range(2):
            dx, dbias = launch("bias_gelu_bwd", dy, x, bias, "none")
            assert torch.equal(dbias, first_dbias) and torch.equal(dx, first_dx)


def test_bias_gelu_dbias_is_deterministic():
    x = randn(1031, 7, dtype=torch.float32, scale=2.0)  # 7 columns: 64-row tiles, several slabs
    bias = randn(7, dtype=torch.float32)
    dy = randn(1031, 7, dtype=torch.float32)
    check_bias_gelu(x, bias, dy, "tanh")
    runs = [launch("bias_gelu_bwd", dy, x, bias, "tanh")[1] for _ in range(3)]
    assert all(torch.equal(run, runs[0]) for run in runs)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_bias_gelu_dbias_long_fp32_sums(approximate):
    # all-positive terms (dy = 1, as from y.sum()): a plain running fp32 sum over 2053 rows
    # drifts by many ulp; the compensated one stays within the rule
    x = randn(2053, 11, dtype=torch.float32, scale=2.0)
    check_bias_gelu(x, randn(11, dtype=torch.float32), torch.ones_like(x), approximate)


def test_slab_split():
    # whole tiles, every row in exactly one slab, at most the program target, and slabs
    # of at least about MIN_ROWS_PER_SLAB rows (fewer only when there are fewer rows)
    cases = [(1, 4, 8), (37, 4, 8), (65, 4, 1000), (1031, 64, 8), (100000, 4, 64), (4099, 16, 7)]
    for n_rows, block_m, target in cases:
        n_slabs, rows_per_slab = ffn._slabs(n_rows, block_m, 1, target)
        assert rows_per_slab % block_m == 0 and 1 <= n_slabs <= target
        assert (n_slabs - 1) * rows_per_slab < n_rows <= n_slabs * rows_per_slab
        assert rows_per_slab >= min(ffn.MIN_ROWS_PER_SLAB // 2, n_rows)


def test_bias_gelu_empty_inputs_launch_nothing():
    with pytest.MonkeyPatch.context() as patch:
        kernels = ("_glu_fwd_kernel", "_glu_bwd_kernel", "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel")
        for name in kernels:
            patch.setattr(ffn, name, None)  # any launch would fail
        x = randn(0, 5, dtype=torch.float16)
        bias = randn(5, dtype=torch.float16)
        assert launch("bias_gelu_fwd", x, bias, "none").shape == (0, 5)
        dx, dbias = launch("bias_gelu_bwd", x, x, bias, "tanh")
        assert dx.shape == (0, 5) and torch.equal(dbias, torch.zeros_like(bias))
        assert launch("bias_gelu_bwd", x, x, None, "none")[1] is None
        empty = randn(2, 0, 3, dtype=torch.float32)
        assert launch("glu_fwd", empty, empty, "silu").shape == (2, 0, 3)
        dgate, dup = launch("glu_bwd", empty, empty, empty, "gelu")
        assert dgate.shape == dup.shape == (2, 0, 3)


# ---------------------------------------------------------------- SwiGLU / GeGLU, CPU


@pytest.mark.parametrize("activation", list(GLU_ACTIVATIONS))
def test_glu_strided_inputs(activation):
    dtype = torch.float16
    # gate and up as the two halves of one fused projection output: row-strided views
    fused = randn(37, 2 * 1023, dtype=dtype)
    gate, up = fused[:, :1023], fused[:, 1023:]
    dy = randn(1, 1023, dtype=dtype).expand(37, 1023)
    assert not gate.is_contiguous() and not up.is_contiguous()
    check_glu(gate, up, dy, activation)


# --------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@needs_compiled_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_dbias_is_deterministic(dtype):
    x = randn(8191, 4096, dtype=dtype, device="cuda")
    bias = randn(4096, dtype=dtype, device="cuda")
    dy = torch.randn_like(x)
    first_dx, first_dbias = launch("bias_gelu_bwd", dy, x, bias, "none")
    for _ in range(9):
        dx, dbias = launch("bias_gelu_bwd", dy, x, bias, "none")
        assert torch.equal(dbias, first_dbias) and torch.equal(dx, first_dx)
