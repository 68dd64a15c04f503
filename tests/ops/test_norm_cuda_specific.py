"""The CUDA LayerNorm/RMSNorm kernels (csrc/norm): the raw ops, against the reference.

The public ``fast_attn.layer_norm`` / ``rms_norm`` with ``backend="cuda"`` under autograd
run the shared sweep of test_norm.py. Here: the raw ops ``torch.ops.fast_attn.cuda_norm_fwd/bwd``
(the kernels' contract: shapes, dtypes, empty placeholders, statistics, strided and
broadcast rows, mixed parameter dtypes, zero rows, schedule thresholds, input checks),
called through ``run_cuda``/``check_raw``. Every comparison uses the DESIGN.md
tolerance rule (``fast_attn.testing``): the oracle is the reference
(``fast_attn.reference.norm``) on fp64 copies, the baseline the reference in the input
dtype; gradients come from autograd through the reference (factor 3); dweight/dbias, sums
over rows, also get a floor of one ulp of the sum of |terms| (see
``assert_close_row_sum``). h must be bitwise the fp32 sum rounded to x's dtype, and mean/
rstd are compared with the statistics of that h. Before each kernel call, blocks of the
outputs' sizes are filled with NaN and freed, so the caching allocator likely hands them
to the kernel's outputs and an element no kernel writes shows up as a NaN.

The widths sweep both schedules of each direction: rows kept in registers (forward up to
16384 halves / 8192 floats, backward up to 8192 / 4096) and the wide-row paths beyond, the
16-byte vectorised kernels (rows aligned, width a multiple of 8 halves / 4 floats) and the
element-wise ones (odd widths, misaligned rows). GPU only (``pytest -m gpu``); skipped
without CUDA or without the extension.
"""

import pytest
import torch

from fast_attn.reference.norm import layer_norm_ref, rms_norm_ref
from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close, compare
from fast_attn import testing_cases as tc  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
OPS = ("layer_norm", "rms_norm")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
# 1, 7, 33, 12345: element-wise kernels; 1000 (fp16/bf16: 125 chunks of 8), 1024, 4096,
# 8192: vectorised register path; 12345 and 65536: past the backward's register path
# (8192 halves), 65536 past the forward's (16384 halves).
WIDTHS = (1, 7, 33, 1000, 1024, 4096, 8192, 12345, 65536)


# --------------------------------------------------------------------------- helpers


def poison(*shapes_dtypes):
    """Fill then free blocks of these (shape, dtype)s: the next allocations of the same
    sizes likely reuse them, so unwritten output elements read as NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for shape, dtype in shapes_dtypes]
    del blocks


def rows_tensor(rows, width, dtype, layout, scale=1.0, shift=0.0):
    """A (rows, width) tensor in one of these layouts: "contiguous"; "strided" (rows of a
    wider tensor, aligned row stride); "misaligned" (storage offset by one element: the
    element-wise kernels); "unviewable" (a transposed 3-D view whose rows have no single
    stride, so the binding copies it; then shape (rows, 2, width))."""
    if layout == "strided":
        t = torch.randn(rows, width + 8, dtype=dtype, device=DEVICE)[:, :width]
    elif layout == "misaligned":
        t = torch.randn(rows, width + 1, dtype=dtype, device=DEVICE)[:, 1:]
    elif layout == "unviewable":
        t = torch.randn(2, rows, width, dtype=dtype, device=DEVICE).transpose(0, 1)
    else:
        t = torch.randn(rows, width, dtype=dtype, device=DEVICE)
    return t * scale + shift if not t.is_contiguous() else t.mul_(scale).add_(shift)


def make_inputs(op, rows, width, dtype, *, weight=True, bias=True, residual=True, layout="contiguous",
                param_dtype=None):
    """x, weight, bias, residual, dy, dh (None where absent)."""
    param_dtype = param_dtype or dtype
    x = rows_tensor(rows, width, dtype, layout, 1.5, 0.5)  # an offset mean exercises the centring
    w = torch.randn(width, dtype=param_dtype, device=DEVICE) if weight else None
    b = torch.randn(width, dtype=param_dtype, device=DEVICE) if bias and op == "layer_norm" else None
    r = rows_tensor(rows, width, dtype, layout) if residual else None
    dy = rows_tensor(rows, width, dtype, layout)
    dh = rows_tensor(rows, width, dtype, layout) if residual else None
    return x, w, b, r, dy, dh


def reference(op, x, weight, bias, residual, upcast):
    if op == "layer_norm":
        return layer_norm_ref(x, weight, bias, EPS[op], residual, upcast=upcast)
    return rms_norm_ref(x, weight, EPS[op], residual, upcast=upcast)


def assert_close_row_sum(actual, oracle, baseline, terms, name):
    """The tolerance rule (factor 3) for dweight/dbias, column sums of ``terms`` (rows, N).

    A sum's rounding error scales with the sum of |terms|, which cancellation can make far
    larger than the sum itself (the rule's floor is one ulp of the result); so the floor
    here is one ulp of the parameter's dtype at the largest column's sum of |terms|."""
    result = compare(actual, oracle, baseline, factor=GRAD_FACTOR)
    floor = torch.finfo(actual.dtype).eps * (float(terms.abs().sum(0).max()) if terms.numel() else 0.0)
    assert not result.message and result.error <= result.allowed + floor, (
        f"{name}: {result} (row-sum floor {floor:.3g})"
    )


def run_cuda(cuda_ops, op, x, w, b, r, dy, dh):
    """The raw ops, forward then backward (on h with a residual), with poisoned memory."""
    rms = op == "rms_norm"
    rows = x.numel() // x.shape[-1]
    width = x.shape[-1]
    poison((x.shape, x.dtype), (x.shape, x.dtype), ((rows,), torch.float32), ((rows,), torch.float32))
    y, h, mean, rstd = cuda_ops.cuda_norm_fwd(x, r, w, b, EPS[op], rms)
    pdtype = w.dtype if w is not None else x.dtype
    poison((x.shape, x.dtype), ((width,), pdtype), ((width,), pdtype), ((64 * rows + 2 * 132 * width,), torch.float32))
    inp = h if r is not None else x
    dx, dw, db = cuda_ops.cuda_norm_bwd(dy, dh, inp, w, mean, rstd, rms, b is not None)
    return y, h, mean, rstd, dx, dw, db


def check_raw(cuda_ops, op, rows, width, dtype, **options):
    """Raw forward and backward on fresh inputs: every output against the oracle."""
    x, w, b, r, dy, dh = make_inputs(op, rows, width, dtype, **options)
    clones = [None if t is None else t.clone() for t in (x, w, b, r, dy, dh)]
    y, h, mean, rstd, dx, dw, db = run_cuda(cuda_ops, op, x, w, b, r, dy, dh)
    name = f"{op} rows={rows} width={width} {dtype} {options}"
    check_outputs(op, (x, w, b, r), dy, dh, (y, h, mean, rstd), (dx, dw, db), name)
    for before, after in zip(clones, (x, w, b, r, dy, dh)):
        assert after is None or torch.equal(before, after), f"{name}: an input was written"


def check_outputs(op, inputs, dy, dh, fwd, bwd, name):
    x, w, b, r = inputs
    y, h, mean, rstd = fwd
    dx, dw, db = bwd
    width = x.shape[-1]
    rows = x.numel() // width
    dtype = x.dtype

    # Forward: y; h (empty without residual); the statistics of the normalised h.
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(), name
    oracle, oracle_grads = tc.norm_reference_run(op, inputs, dy, dh, EPS[op], upcast=True)
    baseline, baseline_grads = tc.norm_reference_run(op, inputs, dy, dh, EPS[op], upcast=False)
    assert_close(y, oracle.y, baseline.y, factor=OUTPUT_FACTOR, name=f"{name} y")
    if r is None:
        assert h.shape == (0,), name
    else:
        assert h.shape == x.shape and h.is_contiguous(), name
        tc.assert_rounded_sum(h, x, r, name)
    inp = h if r is not None else x
    stats_oracle = reference(op, inp.double(), None, None, None, upcast=True)
    stats_baseline = reference(op, inp, None, None, None, upcast=False)
    if op == "layer_norm":
        assert mean.dtype == torch.float32 and mean.shape == (rows,), name
        assert_close(mean, stats_oracle.mean, stats_baseline.mean.float(), name=f"{name} mean")
    else:
        assert mean.shape == (0,), name
    assert rstd.dtype == torch.float32 and rstd.shape == (rows,), name
    assert_close(rstd, stats_oracle.rstd, stats_baseline.rstd.float(), name=f"{name} rstd")

    # Backward: dx (the gradient of x and of residual, dh included), dweight, dbias.
    assert dx.dtype == dtype and dx.shape == x.shape and dx.is_contiguous(), name
    assert_close(dx, oracle_grads[0], baseline_grads[0], factor=GRAD_FACTOR, name=f"{name} dx")
    if r is not None:
        assert_close(dx, oracle_grads[3], baseline_grads[3], factor=GRAD_FACTOR, name=f"{name} dresidual")
    xhat = reference(op, inp.double(), None, None, None, upcast=True).y.reshape(-1, width)
    dy64 = dy.double().reshape(-1, width)
    for grad, param, o, bl, terms, what in (
        (dw, w, oracle_grads[1], baseline_grads[1], dy64 * xhat, "dweight"),
        (db, b, oracle_grads[2], baseline_grads[2], dy64, "dbias"),
    ):
        if param is None:
            assert grad is None or grad.shape == (0,), f"{name}: {what} for an absent parameter"
        else:
            assert grad.shape == param.shape and grad.dtype == param.dtype, f"{name} {what}"
            assert_close_row_sum(grad, o, bl, terms, name=f"{name} {what}")


# ------------------------------------------------------------------------- raw ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("op", OPS)
def test_raw_ops_all_options(cuda_ops, op, width, dtype):
    check_raw(cuda_ops, op, 37 if width < 65536 else 7, width, dtype)


OPTION_SETS = {
    "none": dict(weight=False, bias=False, residual=False),
    "weight": dict(weight=True, bias=False, residual=False),
    "bias": dict(weight=False, bias=True, residual=False),
    "residual": dict(weight=False, bias=False, residual=True),
    "affine": dict(weight=True, bias=True, residual=False),
    "weight-residual": dict(weight=True, bias=False, residual=True),
}
OPTION_CASES = [(op, k) for op in OPS for k, o in OPTION_SETS.items() if op == "layer_norm" or not o["bias"]]


@pytest.mark.parametrize("width", [33, 1024, 8200, 16392])
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("op, options", OPTION_CASES, ids=[f"{op}-{k}" for op, k in OPTION_CASES])
def test_raw_ops_optional_inputs(cuda_ops, op, options, rows, width):
    check_raw(cuda_ops, op, rows, width, torch.bfloat16, **OPTION_SETS[options])


# Each side of each schedule threshold: forward register path up to 2048 chunks (16384
# halves, 8192 floats), backward up to 1024 chunks (8192 halves, 4096 floats).
THRESHOLD_WIDTHS = {
    torch.bfloat16: (8192, 8200, 16384, 16392),
    torch.float16: (8192, 8193, 16384, 16385),
    torch.float32: (4096, 4100, 8192, 8196),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_raw_ops_schedule_thresholds(cuda_ops, op, dtype):
    for width in THRESHOLD_WIDTHS[dtype]:
        check_raw(cuda_ops, op, 37, width, dtype)


@pytest.mark.parametrize("layout", ["strided", "misaligned", "unviewable"])
@pytest.mark.parametrize("width", [7, 1000, 1024, 4096, 12345])
@pytest.mark.parametrize("op", OPS)
def test_raw_ops_strided_rows(cuda_ops, op, width, layout):
    dtype = torch.float32 if width == 4096 else torch.float16
    check_raw(cuda_ops, op, 37, width, dtype, layout=layout)


@pytest.mark.parametrize(
    "rows, width", [(0, 7), (1, 1024), (37, 1024), (16384, 1024), (16384, 4096), (4099, 8192), (257, 65536)]
)
@pytest.mark.parametrize("op", OPS)
def test_raw_ops_row_counts(cuda_ops, op, rows, width):
    """From no row at all to more rows than the persistent backward grid has teams."""
    check_raw(cuda_ops, op, rows, width, torch.bfloat16)


@pytest.mark.parametrize(
    "dtype, param_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float64),
     (torch.bfloat16, torch.float64)],
    ids=str,
)
@pytest.mark.parametrize("width", [1000, 1024, 12345])
@pytest.mark.parametrize("op", OPS)
def test_raw_ops_mixed_parameter_dtypes(cuda_ops, op, width, dtype, param_dtype):
    """weight/bias in another float dtype than x: read in fp32; dweight in the weight's dtype."""
    x, w, b, r, dy, dh = make_inputs(op, 37, width, dtype, param_dtype=param_dtype)
    fwd_bwd = run_cuda(cuda_ops, op, x, w, b, r, dy, dh)
    assert fwd_bwd[5].dtype == param_dtype and fwd_bwd[6].dtype == param_dtype
    check_outputs(op, (x, w, b, r), dy, dh, fwd_bwd[:4], fwd_bwd[4:], f"{op} {dtype} params {param_dtype}")


@pytest.mark.parametrize("width", [1024, 12345])
@pytest.mark.parametrize("op", OPS)
def test_raw_ops_broadcast_gradient_rows(cuda_ops, op, width):
    """dy expanded from one row (row stride 0, as autograd hands out for a broadcast loss)
    is read in place and gives the same result as its materialised copy."""
    x, w, b, r, _, _ = make_inputs(op, 37, width, torch.bfloat16, residual=False)
    rms = op == "rms_norm"
    y, h, mean, rstd = cuda_ops.cuda_norm_fwd(x, None, w, b, EPS[op], rms)
    dy = torch.randn(width, dtype=x.dtype, device=DEVICE).expand(37, width)
    expanded = cuda_ops.cuda_norm_bwd(dy, None, x, w, mean, rstd, rms, b is not None)
    copied = cuda_ops.cuda_norm_bwd(dy.contiguous(), None, x, w, mean, rstd, rms, b is not None)
    for a, c in zip(expanded, copied):
        assert torch.equal(a, c)


@pytest.mark.parametrize("width", [300, 4096, 30000])
def test_raw_ops_large_mean_rows_keep_their_variance(cuda_ops, width):
    """|mean| = 1000 std: E[x^2] - E[x]^2 in fp32 would lose the variance to cancellation;
    the register path centres in registers, the wide path merges moments (Chan et al.)."""
    x = 1000.0 + torch.randn(5, width, dtype=torch.float32, device=DEVICE)
    oracle = layer_norm_ref(x.double(), eps=1e-5)
    y, _, mean, rstd = cuda_ops.cuda_norm_fwd(x, None, None, None, 1e-5, False)
    torch.testing.assert_close(mean.double(), oracle.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), oracle.rstd, rtol=1e-5, atol=0)
    torch.testing.assert_close(y.double(), oracle.y, rtol=0, atol=1e-3)


@pytest.mark.parametrize("width", [7, 1024, 8192, 12345, 65536])
@pytest.mark.parametrize("op", OPS)
def test_raw_ops_are_bitwise_reproducible(cuda_ops, op, width):
    """Partial sums per block, reduced in a fixed order, no atomics: repeated runs agree
    bit for bit (dx, dweight, dbias)."""
    rows = 4099 if width <= 8192 else 257
    x, w, b, r, dy, dh = make_inputs(op, rows, width, torch.bfloat16)
    runs = [run_cuda(cuda_ops, op, x, w, b, r, dy, dh) for _ in range(3)]
    for run in runs[1:]:
        for a, c in zip(run, runs[0]):
            assert torch.equal(a, c)


@pytest.mark.parametrize("width", [7, 1024, 65536])
@pytest.mark.parametrize("op", OPS)
def test_raw_ops_zero_rows(cuda_ops, op, width):
    rms = op == "rms_norm"
    x = torch.randn(0, 3, width, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(width, device=DEVICE, dtype=torch.bfloat16)
    b = None if rms else torch.randn(width, device=DEVICE, dtype=torch.bfloat16)
    y, h, mean, rstd = cuda_ops.cuda_norm_fwd(x, x, w, b, EPS[op], rms)
    assert y.shape == h.shape == x.shape and rstd.shape == (0,) and mean.shape == (0,)
    dx, dw, db = cuda_ops.cuda_norm_bwd(x, x, x, w, mean, rstd, rms, b is not None)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))
    assert db.shape == (0,) if rms else torch.equal(db, torch.zeros_like(b))


def test_raw_ops_bad_input_messages(cuda_ops):
    x = torch.randn(4, 8, device=DEVICE, dtype=torch.float16)
    w = torch.randn(8, device=DEVICE, dtype=torch.float16)
    fwd, bwd = cuda_ops.cuda_norm_fwd, cuda_ops.cuda_norm_bwd
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        fwd(x.double(), None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match=r"x must have a last dimension \(the normalised width\) >= 1"):
        fwd(x[:, :0], None, None, None, 1e-5, False)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        fwd(x, x.float(), None, None, 1e-5, False)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fwd(x, x[:2], None, None, 1e-5, False)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fwd(x, None, torch.randn(9, device=DEVICE, dtype=torch.float16), None, 1e-5, False)
    with pytest.raises(ValueError, match="bias must be on x's device"):
        fwd(x, None, w, torch.randn(8, dtype=torch.float16), 1e-5, False)
    with pytest.raises(TypeError, match="weight must be float16, bfloat16, float32 or float64"):
        fwd(x, None, torch.ones(8, device=DEVICE, dtype=torch.int32), None, 1e-5, False)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        fwd(x, None, None, None, -1.0, False)

    y, h, mean, rstd = fwd(x, None, w, None, 1e-5, False)
    with pytest.raises(ValueError, match="dy must have inp's shape"):
        bwd(y[:2], None, x, w, mean, rstd, False, False)
    with pytest.raises(TypeError, match="dh must have inp's dtype"):
        bwd(y, y.float(), x, w, mean, rstd, False, False)
    with pytest.raises(ValueError, match=r"rstd must have shape \(4,\)"):
        bwd(y, None, x, w, mean, rstd[:3], False, False)
    with pytest.raises(TypeError, match="mean must be float32"):
        bwd(y, None, x, w, mean.half(), rstd, False, False)
