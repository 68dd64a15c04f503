"""The Triton LayerNorm/RMSNorm launchers (``fast_attn.triton_kernels.norm``): what is specific
to them. The shared sweep through the public API (every backend) is test_norm.py.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1``); with one, compiled on CUDA. Checked here, on the launchers
(called through ``launch``, the one place that knows their signatures): the saved
statistics (mean, rstd: fp32, those of the h the backward receives), the column-loop
(wide-row) schedules reached on small shapes by lowering ``max_fused_width``, a real
width past both register-path thresholds, a broadcast (row stride 0) dy read in place,
strided rows not copied, large-mean rows keeping their variance, zero rows launching
nothing, and bitwise-reproducible dweight/dbias (also on large GPU shapes, ``-m gpu``).

Every comparison uses the DESIGN.md tolerance rule (``fast_attn.testing.assert_close``):
oracle the reference on fp64 copies, baseline the reference in the input dtype; the
launchers' buffers start as NaN so unwritten elements show; h must be the fp32 sum
rounded to nearest even (also under the interpreter, whose own fp32 -> bf16 conversion
truncates: the kernels round explicitly), and no input is ever written.
"""

import pytest
import torch

pytest.importorskip("triton")

from fast_attn import backends  # noqa: E402
from fast_attn.reference.norm import layer_norm_ref, rms_norm_ref  # noqa: E402
from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close, compare  # noqa: E402
from fast_attn import testing_cases as tc  # noqa: E402

if not (torch.cuda.is_available() or backends.triton_interpret_enabled()):
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fast_attn.triton_kernels import norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ("layer_norm", "rms_norm")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
# Lowered thresholds that send small rows through the column-loop schedules (under the
# interpreter a real 65536-wide row is too slow): several blocks and a ragged tail.
SMALL_MAX_FUSED_WIDTH = 128
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN, so an element (or a
    partial-sum row) that no program writes shows up in the comparisons."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_inputs(op, rows, width, dtype, *, weight=True, bias=True, residual=True, layout="contiguous",
                param_dtype=None):
    """x, weight, bias, residual (None where absent). ``layout``: "contiguous"; "strided"
    (rows of a wider tensor, one row stride); "unviewable" (a transposed 3-D view whose
    rows have no single stride, so the kernels' launcher must copy)."""

    def rand(scale=1.0, shift=0.0):
        if layout == "strided":
            t = torch.randn(rows, width + 5, dtype=dtype, device=DEVICE)[:, :width]
        elif layout == "unviewable":
            t = torch.randn(2, rows, width, dtype=dtype, device=DEVICE).transpose(0, 1)
        else:
            t = torch.randn(rows, width, dtype=dtype, device=DEVICE)
        return t.mul_(scale).add_(shift) if t.is_contiguous() else (t * scale + shift)

    param_dtype = param_dtype or dtype
    x = rand(1.5, 0.5)  # an offset mean exercises the centring
    w = torch.randn(width, dtype=param_dtype, device=DEVICE) if weight else None
    b = torch.randn(width, dtype=param_dtype, device=DEVICE) if bias and op == "layer_norm" else None
    r = rand() if residual else None
    return x, w, b, r


def reference(op, x, weight, bias, residual, upcast):
    if op == "layer_norm":
        return layer_norm_ref(x, weight, bias, EPS[op], residual, upcast=upcast)
    return rms_norm_ref(x, weight, EPS[op], residual, upcast=upcast)


def launch(kind: str, *args, **kwargs):
    """``norm.norm_fwd`` ("fwd") or ``norm.norm_bwd`` ("bwd"): every launcher call goes here."""
    return getattr(norm, f"norm_{kind}")(*args, **kwargs)


def check_against_reference(op, rows, width, dtype, *, max_fused_width=None, **options):
    """norm_fwd then norm_bwd on fresh inputs: every output and gradient against the oracle."""
    x, w, b, r = inputs = make_inputs(op, rows, width, dtype, **options)
    if options.get("layout") == "strided":  # gradients with a row stride too
        dy = torch.randn(rows, width + 3, dtype=dtype, device=DEVICE)[:, :width]
    else:
        dy = torch.randn(x.shape, dtype=dtype, device=DEVICE)
    dh = torch.randn(x.shape, dtype=dtype, device=DEVICE) if r is not None else None
    clones = [None if t is None else t.clone() for t in (*inputs, dy, dh)]
    limit = {} if max_fused_width is None else {"max_fused_width": max_fused_width}

    y, h, mean, rstd = launch("fwd", op, x, w, b, r, EPS[op], **limit)
    dx, dw, db = launch("bwd", op, dy, dh, h if r is not None else x, w, b, mean, rstd, **limit)

    oracle, oracle_grads = tc.norm_reference_run(op, inputs, dy, dh, EPS[op], upcast=True)
    baseline, baseline_grads = tc.norm_reference_run(op, inputs, dy, dh, EPS[op], upcast=False)
    name = f"{op} rows={rows} width={width} {dtype}"
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, oracle.y, baseline.y, factor=OUTPUT_FACTOR, name=f"{name} y")
    if r is None:
        assert h is None
    else:
        assert h.is_contiguous()
        tc.assert_rounded_sum(h, x, r, name)
    # The statistics are those of the normalised tensor, h as returned (the backward gets
    # that h), so their oracle is the reference on it.
    inp = h if r is not None else x
    stats_oracle = reference(op, inp.double(), None, None, None, upcast=True)
    stats_baseline = reference(op, inp, None, None, None, upcast=False)
    if op == "layer_norm":
        assert mean.dtype == torch.float32 and mean.shape == (x.numel() // width,)
        assert_close(mean, stats_oracle.mean, stats_baseline.mean.float(), name=f"{name} mean")
    else:
        assert mean is None
    assert rstd.dtype == torch.float32
    assert_close(rstd, stats_oracle.rstd, stats_baseline.rstd.float(), name=f"{name} rstd")

    assert dx.dtype == dtype and dx.shape == x.shape and dx.is_contiguous()
    assert_close(dx, oracle_grads[0], baseline_grads[0], factor=GRAD_FACTOR, name=f"{name} dx")
    if r is not None:  # the op layer hands the same dx to x and residual
        assert_close(dx, oracle_grads[3], baseline_grads[3], factor=GRAD_FACTOR, name=f"{name} dresidual")
    xhat = reference(op, x.double(), None, None, None if r is None else r.double(), upcast=True).y
    dy64 = dy.double().reshape(-1, width)
    for grad, param, o, bl, terms, what in (
        (dw, w, oracle_grads[1], baseline_grads[1], dy64 * xhat.reshape(-1, width), "dweight"),
        (db, b, oracle_grads[2], baseline_grads[2], dy64, "dbias"),
    ):
        if param is None:
            assert grad is None, f"{name}: {what} for an absent parameter"
        else:
            assert grad.dtype == param.dtype and grad.shape == param.shape
            assert_close_row_sum(grad, o, bl, terms, name=f"{name} {what}")

    for before, after in zip(clones, (*inputs, dy, dh)):
        assert after is None or torch.equal(before, after), f"{name}: an input was written"


def assert_close_row_sum(actual, oracle, baseline, terms, name):
    """The tolerance rule (factor 3) for dweight/dbias, sums over rows of ``terms`` (rows, N).

    The rule's floor is one ulp at the result's magnitude; a sum's rounding error scales
    with the sum of the |terms| instead (its condition), which cancellation can make far
    larger than the result: at fp32, with an fp32 baseline that happened to round well,
    a correct kernel can miss 3x baseline by an ulp or two. So the floor here is one ulp
    of the parameter's dtype at the largest column's sum of |terms|."""
    result = compare(actual, oracle, baseline, factor=GRAD_FACTOR)
    floor = torch.finfo(actual.dtype).eps * float(terms.abs().sum(0).max())
    assert not result.message and result.error <= result.allowed + floor, (
        f"{name}: {result} (row-sum floor {floor:.3g})"
    )


# ------------------------------------------------------------------- CPU (interpreter)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 7, 1023])
@pytest.mark.parametrize("op", OPS)
def test_statistics_match_reference(op, width, dtype):
    """mean/rstd (and y, h, dx, dweight, dbias) of the launchers with every option on."""
    check_against_reference(op, 37, width, dtype)


@pytest.mark.parametrize("op", OPS)
def test_broadcast_gradient_rows(op):
    """dy expanded from one row (row stride 0, as autograd hands out for a broadcast
    loss) is read in place and gives the same result as its materialised copy."""
    x, w, b, r = make_inputs(op, 37, 65, torch.float32)
    y, h, mean, rstd = launch("fwd", op, x, w, b, r, EPS[op])
    dy = torch.randn(65, device=DEVICE).expand(37, 65)
    expanded = launch("bwd", op, dy, None, h, w, b, mean, rstd)
    copied = launch("bwd", op, dy.contiguous(), None, h, w, b, mean, rstd)
    for a, c in zip(expanded, copied):
        assert (a is None and c is None) or torch.equal(a, c)


def test_strided_rows_are_not_copied(monkeypatch):
    """A row-strided x reaches the kernel as it is: no .contiguous() of the input."""
    x = torch.randn(37, 70, device=DEVICE)[:, :64]
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copied"))
    view = norm._rows_view(x, 64)
    assert view.data_ptr() == x.data_ptr() and view.stride() == (70, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_wide_row_schedules_match_reference(op, dtype):
    """Rows wider than max_fused_width: two-pass forward and split-row backward, with a
    ragged last column block (300 = 2 * 128 + 44) over a persistent grid of row groups."""
    check_against_reference(op, 37, 300, dtype, max_fused_width=SMALL_MAX_FUSED_WIDTH)


@pytest.mark.parametrize("op", OPS)
def test_wide_row_schedules_strided_and_without_options(op):
    limit = SMALL_MAX_FUSED_WIDTH
    check_against_reference(op, 3, 257, torch.float16, max_fused_width=limit, layout="strided")
    none = dict(weight=False, bias=False, residual=False)
    check_against_reference(op, 3, 257, torch.float16, max_fused_width=limit, **none)


@pytest.mark.parametrize("op", OPS)
def test_width_above_fused_thresholds(op):
    """A real width past both default thresholds (no lowered limit)."""
    width = max(norm.MAX_FUSED_WIDTH_FWD, norm.MAX_FUSED_WIDTH_BWD) + 9
    check_against_reference(op, 3, width, torch.bfloat16)


def test_large_mean_rows_keep_their_variance():
    """|mean| = 1000 std: E[x^2] - E[x]^2 in fp32 would lose the variance to cancellation;
    the fused kernel centres in registers, the wide one merges per-block M2 (Chan)."""
    x = 1000.0 + torch.randn(5, 300, dtype=torch.float32, device=DEVICE)
    oracle = layer_norm_ref(x.double(), eps=1e-5)
    for limit in (norm.MAX_FUSED_WIDTH_FWD, SMALL_MAX_FUSED_WIDTH):
        y, _, mean, rstd = launch("fwd", "layer_norm", x, None, None, None, 1e-5, max_fused_width=limit)
        torch.testing.assert_close(rstd.double(), oracle.rstd, rtol=1e-5, atol=0)
        torch.testing.assert_close(y.double(), oracle.y, rtol=0, atol=1e-3)


@pytest.mark.parametrize("width", [7, 300])
@pytest.mark.parametrize("op", OPS)
def test_zero_rows_launch_nothing(op, width):
    x = torch.randn(0, 4, width, device=DEVICE)
    w, b = torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)
    y, h, mean, rstd = launch("fwd", op, x, w, b, x, EPS[op])
    assert y.shape == h.shape == x.shape and rstd.shape == (0,)
    assert mean is None if op == "rms_norm" else mean.shape == (0,)
    dx, dw, db = launch("bwd", op, x, x, x, w, b, mean, rstd)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w))
    assert db is None if op == "rms_norm" else torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("max_fused_width", [None, SMALL_MAX_FUSED_WIDTH])
@pytest.mark.parametrize("op", OPS)
def test_parameter_grads_are_bitwise_reproducible(op, max_fused_width):
    """Partial sums per program, reduced in a fixed order: three runs agree bit for bit."""
    limit = {} if max_fused_width is None else {"max_fused_width": max_fused_width}
    x, w, b, r = make_inputs(op, 37, 300, torch.bfloat16)
    y, h, mean, rstd = launch("fwd", op, x, w, b, r, EPS[op], **limit)
    dy, dh = torch.randn_like(y), torch.randn_like(y)
    runs = [launch("bwd", op, dy, dh, h, w, b, mean, rstd, **limit) for _ in range(3)]
    for dx, dw, db in runs[1:]:
        assert torch.equal(dx, runs[0][0]) and torch.equal(dw, runs[0][1])
        assert db is None if op == "rms_norm" else torch.equal(db, runs[0][2])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("width", [1024, 8192, 12288, 65536])
@pytest.mark.parametrize("op", OPS)
def test_gpu_parameter_grads_are_bitwise_reproducible(op, width):
    x, w, b, r = make_inputs(op, 4099 if width < 65536 else 257, width, torch.bfloat16)
    y, h, mean, rstd = launch("fwd", op, x, w, b, r, EPS[op])
    dy, dh = torch.randn_like(y), torch.randn_like(y)
    runs = [launch("bwd", op, dy, dh, h, w, b, mean, rstd) for _ in range(3)]
    for dx, dw, db in runs[1:]:
        assert torch.equal(dx, runs[0][0]) and torch.equal(dw, runs[0][1])
        assert db is None if op == "rms_norm" else torch.equal(db, runs[0][2])
