"""The norm references against independent fp64 formulas (Python floats, one row at a time)."""

import math

import pytest
import torch

from fast_attn.reference.norm import layer_norm_ref, rms_norm_ref


def _layer_norm_rows(x, weight, bias, eps):
    """LayerNorm written with math on Python floats: mean, biased variance, affine."""
    out, means, rstds = [], [], []
    for row in x.tolist():
        n = len(row)
        mean = math.fsum(row) / n
        var = math.fsum((v - mean) ** 2 for v in row) / n
        rstd = 1.0 / math.sqrt(var + eps)
        normed = [(v - mean) * rstd for v in row]
        if weight is not None:
            normed = [a * w for a, w in zip(normed, weight.tolist())]
        if bias is not None:
            normed = [a + b for a, b in zip(normed, bias.tolist())]
        out.append(normed)
        means.append(mean)
        rstds.append(rstd)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(means, dtype=torch.float64), torch.tensor(rstds, dtype=torch.float64)


def _rms_norm_rows(x, weight, eps):
    out, rstds = [], []
    for row in x.tolist():
        rstd = 1.0 / math.sqrt(math.fsum(v * v for v in row) / len(row) + eps)
        normed = [v * rstd for v in row]
        if weight is not None:
            normed = [a * w for a, w in zip(normed, weight.tolist())]
        out.append(normed)
        rstds.append(rstd)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(rstds, dtype=torch.float64)


@pytest.mark.parametrize("width", [1, 7, 1023])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_formula(width, affine, with_residual):
    rows = 5
    x = torch.randn(rows, width, dtype=torch.float64)
    residual = torch.randn(rows, width, dtype=torch.float64) if with_residual else None
    weight = torch.randn(width, dtype=torch.float64) if affine else None
    bias = torch.randn(width, dtype=torch.float64) if affine else None
    result = layer_norm_ref(x, weight, bias, 1e-5, residual)
    h = x + residual if with_residual else x
    expected, mean, rstd = _layer_norm_rows(h, weight, bias, 1e-5)
    torch.testing.assert_close(result.y, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.rstd, rstd, rtol=1e-10, atol=1e-10)
    if with_residual:
        torch.testing.assert_close(result.h, h)
    else:
        assert result.h is None


@pytest.mark.parametrize("width", [1, 7, 1023])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_formula(width, with_weight, with_residual):
    x = torch.randn(3, 2, width, dtype=torch.float64)
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(width, dtype=torch.float64) if with_weight else None
    result = rms_norm_ref(x, weight, 1e-6, residual)
    h = x + residual if with_residual else x
    expected, rstd = _rms_norm_rows(h.reshape(-1, width), weight, 1e-6)
    torch.testing.assert_close(result.y, expected.reshape(x.shape), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.rstd, rstd, rtol=1e-10, atol=1e-10)
    assert result.mean is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_statistics_are_fp32_and_outputs_keep_the_dtype(dtype):
    x = torch.randn(4, 33, dtype=dtype)
    residual = torch.randn(4, 33, dtype=dtype)
    result = layer_norm_ref(x, residual=residual)
    assert result.y.dtype == dtype and result.h.dtype == dtype
    assert result.mean.dtype == torch.float32 and result.rstd.dtype == torch.float32
    assert rms_norm_ref(x).rstd.dtype == torch.float32


@pytest.mark.parametrize("fn", [layer_norm_ref, rms_norm_ref])
def test_upcast_false_is_the_lower_precision_baseline(fn):
    x = torch.randn(64, 1023, dtype=torch.float64) * 3 + 1
    oracle = fn(x).y
    precise = (fn(x.bfloat16()).y.double() - oracle).abs().max()
    plain = (fn(x.bfloat16(), upcast=False).y.double() - oracle).abs().max()
    assert plain > precise


def test_empty_rows_give_empty_results():
    x = torch.randn(0, 16)
    assert layer_norm_ref(x).y.shape == (0, 16)
    assert rms_norm_ref(x).rstd.shape == (0,)


def test_gradients_match_torch_layer_norm():
    x = torch.randn(6, 17, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(17, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 17, dtype=torch.float64)
    ours = torch.autograd.grad(layer_norm_ref(x, weight, bias).y, (x, weight, bias), grad)
    theirs = torch.autograd.grad(torch.nn.functional.layer_norm(x, (17,), weight, bias), (x, weight, bias), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
