"""Tests of fast_attn.torch_backend.ffn against fast_attn.reference.ffn.

Tolerance rule of DESIGN.md: oracle = the reference on fp64 copies, baseline = the
reference in the input dtype (upcast=False); gradients by autograd through both.
"""

import pytest
import torch

from fast_attn.reference.ffn import bias_gelu_ref, geglu_ref, swiglu_ref
from fast_attn.testing import assert_close
from fast_attn.torch_backend.ffn import bias_gelu_bwd, bias_gelu_fwd, glu_bwd, glu_fwd

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FP64_TOL = dict(atol=1e-12, rtol=1e-10)


def _assert(got, oracle, baseline, name, gradient=False):
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, oracle, **FP64_TOL, msg=lambda m: f"{name}: {m}")
    else:
        assert_close(got, oracle, baseline.to(got.dtype), gradient=gradient, name=name)


def _vjp(fn, inputs, dy, dtype, upcast):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    y = fn(*leaves, upcast=upcast)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, dy.to(dtype)))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_gelu(dtype, approximate, with_bias):
    x = torch.randn(3, 17, 203, dtype=dtype) * 3
    bias = torch.randn(203, dtype=dtype) if with_bias else None
    y = bias_gelu_fwd(x, bias, approximate)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    dy = torch.randn_like(x)

    def ref(x_, b_, upcast):
        return bias_gelu_ref(x_, b_, approximate, upcast=upcast)

    oracle, ograds = _vjp(ref, (x, bias), dy, torch.float64, True)
    baseline, bgrads = _vjp(ref, (x, bias), dy, dtype, False)
    _assert(y, oracle, baseline, "y")
    dx, dbias = bias_gelu_bwd(dy, x, bias, approximate)
    assert dx.dtype == dtype and dx.is_contiguous()
    _assert(dx, ograds[0], bgrads[0], "dx", gradient=True)
    if bias is None:
        assert dbias is None
    else:
        assert dbias.dtype == bias.dtype and dbias.shape == bias.shape
        _assert(dbias, ograds[1], bgrads[1], "dbias", gradient=True)


def test_bias_gelu_fp32_bias_bf16_x():
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    bias = torch.randn(96)
    y = bias_gelu_fwd(x, bias, "tanh")
    dx, dbias = bias_gelu_bwd(torch.randn_like(x), x, bias, "tanh")
    assert y.dtype == dx.dtype == torch.bfloat16 and dbias.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_glu(dtype, activation):
    gate = torch.randn(4, 33, 113, dtype=dtype) * 3
    up = torch.randn_like(gate)
    y = glu_fwd(gate, up, activation)
    assert y.dtype == dtype and y.shape == gate.shape and y.is_contiguous()
    dy = torch.randn_like(gate)

    def ref(g, u, upcast):
        if activation == "silu":
            return swiglu_ref(g, u, upcast=upcast)
        return geglu_ref(g, u, "tanh" if activation == "gelu_tanh" else "none", upcast=upcast)

    oracle, ograds = _vjp(ref, (gate, up), dy, torch.float64, True)
    baseline, bgrads = _vjp(ref, (gate, up), dy, dtype, False)
    _assert(y, oracle, baseline, "y")
    dgate, dup = glu_bwd(dy, gate, up, activation)
    assert dgate.dtype == dup.dtype == dtype and dgate.is_contiguous() and dup.is_contiguous()
    _assert(dgate, ograds[0], bgrads[0], "dgate", gradient=True)
    _assert(dup, ograds[1], bgrads[1], "dup", gradient=True)


def test_strided_inputs():
    gate = torch.randn(8, 2 * 64)[:, :64]
    up = torch.randn(64, 8).t()
    dgate, dup = glu_bwd(torch.randn(8, 64), gate, up, "silu")
    assert dgate.is_contiguous() and dup.is_contiguous()
    torch.testing.assert_close(glu_fwd(gate, up, "silu"), torch.nn.functional.silu(gate) * up)
