"""The fake functions of the CUDA extension's raw ops (fast_attn/cuda_backend/_fakes.py), on CPU.

Every op declared in csrc/ops.cpp must have a fake function, and each fake must give the
shapes, dtypes and devices the op's ``*_ops.cpp`` allocates: checked here under
FakeTensorMode with fake CUDA tensors (no GPU needed), against the contract written in
csrc/ops.cpp. The GPU tests compare the real kernels' outputs with these contracts too.
Skips when fast_attn._C is not built.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fast_attn.cuda_backend import _fakes as _cuda_fakes

OPS_CPP = Path(__file__).resolve().parents[2] / "csrc" / "ops.cpp"


def declared_ops() -> set[str]:
    return set(re.findall(r'"(cuda_\w+)\(', OPS_CPP.read_text()))


def test_every_declared_op_has_a_fake():
    assert declared_ops() == set(_cuda_fakes.FAKES)


def test_every_declared_op_is_registered(cuda_ops):
    for name in declared_ops():
        assert hasattr(cuda_ops, name), name


def fake(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="cuda")


def meta(t):
    return (tuple(t.shape), t.dtype, t.device.type)


def test_activation_fakes(cuda_ops):
    with FakeTensorMode():
        x = fake(5, 7)
        assert meta(cuda_ops.cuda_bias_gelu_fwd(x, fake(7), False)) == ((5, 7), torch.bfloat16, "cuda")
        dx, dbias = cuda_ops.cuda_bias_gelu_bwd(fake(5, 7), x, fake(7), True)
        assert meta(dx) == ((5, 7), torch.bfloat16, "cuda") and tuple(dbias.shape) == (7,)
        assert tuple(cuda_ops.cuda_bias_gelu_bwd(fake(5, 7), x, None, True)[1].shape) == (0,)
        assert meta(cuda_ops.cuda_glu_fwd(x, fake(5, 7), "silu")) == ((5, 7), torch.bfloat16, "cuda")
        dgate, dup = cuda_ops.cuda_glu_bwd(fake(5, 7), x, fake(5, 7), "gelu_tanh")
        assert meta(dgate) == meta(dup) == ((5, 7), torch.bfloat16, "cuda")


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_fakes(cuda_ops, rms, residual):
    with FakeTensorMode():
        x = fake(2, 3, 33, dtype=torch.float16)
        res = fake(2, 3, 33, dtype=torch.float16) if residual else None
        y, h, mean, rstd = cuda_ops.cuda_norm_fwd(x, res, fake(33, dtype=torch.float16), None, 1e-5, rms)
        assert meta(y) == ((2, 3, 33), torch.float16, "cuda")
        assert tuple(h.shape) == ((2, 3, 33) if residual else (0,))
        assert meta(mean) == (((0,) if rms else (6,)), torch.float32, "cuda")
        assert meta(rstd) == ((6,), torch.float32, "cuda")
        dx, dweight, dbias = cuda_ops.cuda_norm_bwd(fake(2, 3, 33, dtype=torch.float16), None, x, None, mean,
                                               rstd, rms, not rms)
        assert meta(dx) == ((2, 3, 33), torch.float16, "cuda")
        assert tuple(dweight.shape) == (0,)
        assert tuple(dbias.shape) == ((0,) if rms else (33,))
        # Parameters in fp32 while x is fp16: their gradients follow the parameters' dtype.
        _, dweight, dbias = cuda_ops.cuda_norm_bwd(fake(2, 3, 33, dtype=torch.float16), None, x,
                                              fake(33, dtype=torch.float32), mean, rstd, rms, True)
        assert meta(dweight) == meta(dbias) == ((33,), torch.float32, "cuda")


def test_attention_fakes(cuda_ops):
    with FakeTensorMode():
        q, k = fake(2, 17, 8, 128), fake(2, 40, 2, 128)
        out, lse = cuda_ops.cuda_attention_fwd(q, k, k, None, None, None, 0, 0, 0.1, True, -1, -1, 0.0, 0)
        assert meta(out) == ((2, 17, 8, 128), torch.bfloat16, "cuda")
        assert meta(lse) == ((2, 8, 17), torch.float32, "cuda")
        dq, dk, dv = cuda_ops.cuda_attention_bwd(out, q, k, k, out, lse, None, None, 0, 0, 0.1, True, -1, -1,
                                            0.0, True, 0)
        assert meta(dq) == meta(q) and meta(dk) == meta(dv) == meta(k)
        cu = torch.empty((4,), dtype=torch.int32, device="cuda")
        qp, kp = fake(50, 8, 64), fake(70, 4, 64)
        out, lse = cuda_ops.cuda_attention_fwd(qp, kp, kp, cu, cu, None, 20, 30, 0.1, False, -1, -1, 0.0, 1)
        assert meta(out) == ((50, 8, 64), torch.bfloat16, "cuda")
        assert meta(lse) == ((8, 50), torch.float32, "cuda")
