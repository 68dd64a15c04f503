"""Tests of fast_attn.torch_backend.norm against fast_attn.reference.norm.

Tolerance rule of DESIGN.md: oracle = the reference on fp64 copies, baseline = the
reference in the input dtype (upcast=False); gradients by autograd through both. The
backend's backward is fed its own forward's h/mean/rstd, as the op layer does.
"""

import pytest
import torch

from fast_attn.reference.norm import layer_norm_ref, rms_norm_ref
from fast_attn.testing import assert_close
from fast_attn.torch_backend.norm import norm_bwd, norm_fwd

FP64_TOL = dict(atol=1e-10, rtol=1e-9)


def _ref(op, x, weight, bias, residual, eps, dy, dh, *, dtype, upcast):
    """Reference y, h, mean, rstd and gradients (dx, dresidual, dweight, dbias)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, weight, bias, residual)]
    xl, wl, bl, rl = leaves
    if op == "layer_norm":
        result = layer_norm_ref(xl, wl, bl, eps, residual=rl, upcast=upcast)
    else:
        result = rms_norm_ref(xl, wl, eps, residual=rl, upcast=upcast)
    outputs, grads_out = [result.y], [dy.to(dtype)]
    if result.h is not None:
        outputs.append(result.h)
        grads_out.append(dh.to(dtype))
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outputs, wanted, grads_out)
    grads = iter(grads)
    named = {name: (next(grads) if t is not None else None) for name, t in zip(("x", "w", "b", "r"), leaves)}
    return result, named


def _assert(got, oracle, baseline, name, gradient=False):
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, oracle, **FP64_TOL, msg=lambda m: f"{name}: {m}")
    else:
        assert_close(got, oracle, baseline.to(got.dtype), gradient=gradient, name=name)


def check(op, x, weight=None, bias=None, residual=None, eps=1e-5):
    y, h, mean, rstd = norm_fwd(op, x, weight, bias, residual, eps)
    rows = x.numel() // x.shape[-1]
    sdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert rstd.shape == (rows,) and rstd.dtype == sdtype
    assert (mean is None) == (op == "rms_norm")
    assert (h is None) == (residual is None)
    if mean is not None:
        assert mean.shape == (rows,) and mean.dtype == sdtype
    dy = torch.randn_like(x)
    dh = torch.randn_like(x) if residual is not None else None
    oracle, ograds = _ref(op, x, weight, bias, residual, eps, dy, dh, dtype=torch.float64, upcast=True)
    baseline, bgrads = _ref(op, x, weight, bias, residual, eps, dy, dh, dtype=x.dtype, upcast=False)
    _assert(y, oracle.y, baseline.y, "y")
    _assert(rstd, oracle.rstd, baseline.rstd, "rstd")
    if mean is not None:
        _assert(mean, oracle.mean, baseline.mean, "mean")
    if h is not None:
        _assert(h, oracle.h, baseline.h, "h")
    inp = h if h is not None else x
    dx, dweight, dbias = norm_bwd(op, dy, dh, inp, weight, bias, mean, rstd, eps)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.is_contiguous()
    _assert(dx, ograds["x"], bgrads["x"], "dx", gradient=True)
    if residual is not None:  # the residual's gradient is dx too (h = x + residual)
        _assert(dx, ograds["r"], bgrads["r"], "dresidual", gradient=True)
    for name, got, param in (("w", dweight, weight), ("b", dbias, bias)):
        if param is None:
            assert got is None
        else:
            assert got.dtype == param.dtype and got.shape == param.shape
            _assert(got, ograds[name], bgrads[name], "d" + name, gradient=True)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm(op, dtype, affine, with_residual):
    x = torch.randn(3, 17, 203, dtype=dtype) * 2 + 0.5
    weight = torch.randn(203, dtype=dtype) if affine else None
    bias = torch.randn(203, dtype=dtype) if affine and op == "layer_norm" else None
    residual = torch.randn_like(x) if with_residual else None
    check(op, x, weight, bias, residual)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_fp32_params(op, dtype):
    """bf16/fp16 x with fp32 weight/bias: y in x's dtype, stats and parameter grads fp32."""
    x = torch.randn(64, 96, dtype=dtype)
    bias = torch.randn(96) if op == "layer_norm" else None
    check(op, x, torch.randn(96), bias, torch.randn_like(x))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_fp16_x_bf16_params(op):
    """A parameter dtype ATen's mixed path refuses: upcast to fp32 first."""
    x = torch.randn(8, 33, dtype=torch.float16)
    bias = torch.randn(33, dtype=torch.bfloat16) if op == "layer_norm" else None
    check(op, x, torch.randn(33, dtype=torch.bfloat16), bias)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_strided_rows(op):
    base = torch.randn(6, 5, 2 * 40)
    x = base[:, :, :40]  # rows spaced 80 apart
    xt = torch.randn(40, 6, 5).permute(1, 2, 0)  # last dim not contiguous
    check(op, x, torch.randn(40), torch.randn(40) if op == "layer_norm" else None, torch.randn(6, 5, 40))
    check(op, xt)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_single_row_and_narrow(op):
    check(op, torch.randn(1, 7))
    check(op, torch.randn(5, 3), torch.randn(3))


def test_rms_width_one():
    # LayerNorm of width 1 or 2 is degenerate: its output is constant, so dx is exactly 0
    # and ATen keeps roundings of it amplified by rstd (up to eps**-0.5), above the rule's
    # floor at an oracle of 0. Only RMSNorm is checked at width 1.
    check("rms_norm", torch.randn(5, 1), torch.randn(1))
