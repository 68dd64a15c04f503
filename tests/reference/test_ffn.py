"""The activation references against independent fp64 formulas on Python floats."""

import math

import pytest
import torch

from fast_attn.reference.ffn import bias_gelu_ref, geglu_ref, swiglu_ref

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu(u: float, approximate: str) -> float:
    if approximate == "tanh":
        return 0.5 * u * (1.0 + math.tanh(SQRT_2_OVER_PI * (u + 0.044715 * u**3)))
    return 0.5 * u * (1.0 + math.erf(u / math.sqrt(2.0)))


def _silu(u: float) -> float:
    return u / (1.0 + math.exp(-u))


def _elementwise(fn, *tensors):
    flat = zip(*(t.reshape(-1).tolist() for t in tensors))
    return torch.tensor([fn(*values) for values in flat], dtype=torch.float64).reshape(tensors[0].shape)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("width", [1, 7, 129])
def test_bias_gelu_matches_formula(approximate, with_bias, width):
    x = torch.randn(3, width, dtype=torch.float64) * 3
    bias = torch.randn(width, dtype=torch.float64) if with_bias else None
    h = x + bias if with_bias else x
    expected = _elementwise(lambda u: _gelu(u, approximate), h)
    torch.testing.assert_close(bias_gelu_ref(x, bias, approximate), expected, rtol=1e-12, atol=1e-12)


def test_swiglu_matches_formula():
    gate, up = torch.randn(2, 5, 33, dtype=torch.float64) * 4, torch.randn(2, 5, 33, dtype=torch.float64)
    expected = _elementwise(lambda g, u: _silu(g) * u, gate, up)
    torch.testing.assert_close(swiglu_ref(gate, up), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_matches_formula(approximate):
    gate, up = torch.randn(7, 31, dtype=torch.float64) * 4, torch.randn(7, 31, dtype=torch.float64)
    expected = _elementwise(lambda g, u: _gelu(g, approximate) * u, gate, up)
    torch.testing.assert_close(geglu_ref(gate, up, approximate), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_outputs_keep_the_input_dtype(dtype):
    x = torch.randn(4, 8, dtype=dtype)
    assert bias_gelu_ref(x, torch.randn(8, dtype=dtype)).dtype == dtype
    assert swiglu_ref(x, x).dtype == dtype
    assert geglu_ref(x, x, "tanh").dtype == dtype


def test_upcast_false_is_the_lower_precision_baseline():
    gate, up = torch.randn(256, 257, dtype=torch.float64) * 3, torch.randn(256, 257, dtype=torch.float64)
    oracle = swiglu_ref(gate, up)
    precise = (swiglu_ref(gate.half(), up.half()).double() - oracle).abs().max()
    plain = (swiglu_ref(gate.half(), up.half(), upcast=False).double() - oracle).abs().max()
    assert plain > precise


def test_derivatives_by_gradcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bias_gelu_ref(a, b, "tanh"), (x, bias))
    assert torch.autograd.gradcheck(swiglu_ref, (x, up))
    assert torch.autograd.gradcheck(lambda g, u: geglu_ref(g, u, "none"), (x, up))
