"""Feed-forward activation ops: bias+GELU, SwiGLU, GeGLU: custom ops, fake functions, autograd.

Public functions:

- ``bias_gelu(x, bias=None, approximate="none", backend="auto")`` = ``gelu(x + bias)``
- ``swiglu(gate, up, backend="auto")``                            = ``silu(gate) * up``
- ``geglu(gate, up, approximate="none", backend="auto")``         = ``gelu(gate) * up``

``approximate`` is "none" (exact erf GELU) or "tanh", as in ``torch.nn.functional.gelu``.
Outputs have the input's shape and dtype; the maths runs in fp32. The backward recomputes
the activation from the saved inputs (nothing else is saved) and never writes into them.

Each public function calls a ``fast_attn::<op>_fwd`` custom op whose implementation
dispatches (``_dispatch.py``) to the chosen backend's ``bias_gelu_fwd`` / ``glu_fwd``; its
backward is ``fast_attn::<op>_bwd``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _checks
from fast_attn.ops._dispatch import call_summary, dispatch
from fast_attn.ops._eager import EagerOp

GELU_APPROXIMATIONS = ("none", "tanh")
FAMILY = "ffn"  # the backend modules' family name (fast_attn/ops/_dispatch.py)
_EMPTY = (0,)


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------- bias_gelu


@torch.library.custom_op("fast_attn::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
    call = call_summary("bias_gelu", x, backward=False, bias=bias is not None, gelu_tanh=approximate == "tanh")
    empty = (lambda: _empty_like(x)) if x.numel() == 0 else None
    return dispatch(call, backend, FAMILY, "bias_gelu_fwd", empty, x, bias, approximate).contiguous()


@bias_gelu_fwd.register_fake
def _(x, bias, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fast_attn::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(
    dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str, backend: str
) -> tuple[Tensor, Tensor]:
    """(dx, dbias); dbias is empty when bias is None."""
    call = call_summary("bias_gelu", x, backward=True, bias=bias is not None, gelu_tanh=approximate == "tanh")
    if x.numel() == 0:
        def empty():
            return _empty_like(x), (torch.zeros_like(bias) if bias is not None else None)
    else:
        empty = None
    dx, dbias = dispatch(call, backend, FAMILY, "bias_gelu_bwd", empty, dy, x, bias, approximate)
    return dx.contiguous(), x.new_empty(_EMPTY) if dbias is None else dbias


@bias_gelu_bwd.register_fake
def _(dy, x, bias, approximate, backend):
    dbias = x.new_empty(_EMPTY) if bias is None else torch.empty_like(bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dbias


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.approximate, ctx.backend = approximate, backend
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = _eager_bias_gelu_bwd(dy, x, bias, ctx.approximate, ctx.backend)
    return dx, (dbias if bias is not None else None), None, None


bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


# ------------------------------------------------------------------------ swiglu, geglu

# approximate (None for SwiGLU, "none"/"tanh" for GeGLU) -> the backends' activation name
_GLU_ACTIVATION = {None: "silu", "none": "gelu", "tanh": "gelu_tanh"}


def _glu_fwd(op, gate, up, approximate, backend):
    call = call_summary(op, gate, backward=False, gelu_tanh=approximate == "tanh")
    empty = (lambda: _empty_like(gate)) if gate.numel() == 0 else None
    y = dispatch(call, backend, FAMILY, "glu_fwd", empty, gate, up, _GLU_ACTIVATION[approximate])
    return y.contiguous()


def _glu_bwd(op, dy, gate, up, approximate, backend):
    call = call_summary(op, gate, backward=True, gelu_tanh=approximate == "tanh")
    empty = (lambda: (_empty_like(gate), _empty_like(up))) if gate.numel() == 0 else None
    dgate, dup = dispatch(call, backend, FAMILY, "glu_bwd", empty, dy, gate, up, _GLU_ACTIVATION[approximate])
    return dgate.contiguous(), dup.contiguous()


def _glu_fake_like(t):
    return _empty_like(t)


@torch.library.custom_op("fast_attn::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return _glu_fwd("swiglu", gate, up, None, backend)


@swiglu_fwd.register_fake
def _(gate, up, backend):
    return _glu_fake_like(gate)


@torch.library.custom_op("fast_attn::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return _glu_bwd("swiglu", dy, gate, up, None, backend)


@swiglu_bwd.register_fake
def _(dy, gate, up, backend):
    return _glu_fake_like(gate), _glu_fake_like(up)


@torch.library.custom_op("fast_attn::geglu_fwd", mutates_args=())
def geglu_fwd(gate: Tensor, up: Tensor, approximate: str, backend: str) -> Tensor:
    return _glu_fwd("geglu", gate, up, approximate, backend)


@geglu_fwd.register_fake
def _(gate, up, approximate, backend):
    return _glu_fake_like(gate)


@torch.library.custom_op("fast_attn::geglu_bwd", mutates_args=())
def geglu_bwd(
    dy: Tensor, gate: Tensor, up: Tensor, approximate: str, backend: str
) -> tuple[Tensor, Tensor]:
    return _glu_bwd("geglu", dy, gate, up, approximate, backend)


@geglu_bwd.register_fake
def _(dy, gate, up, approximate, backend):
    return _glu_fake_like(gate), _glu_fake_like(up)


def _glu_setup(ctx, inputs, output):
    gate, up = inputs[0], inputs[1]
    ctx.extra = inputs[2:]  # (backend,) for SwiGLU, (approximate, backend) for GeGLU
    ctx.save_for_backward(gate, up)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _eager_swiglu_bwd(dy, gate, up, *ctx.extra)
    return dgate, dup, None


def _geglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _eager_geglu_bwd(dy, gate, up, *ctx.extra)
    return dgate, dup, None, None


swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_glu_setup)
geglu_fwd.register_autograd(_geglu_backward, setup_context=_glu_setup)

# What the public functions and the backward functions call (see _eager.py).
_eager_bias_gelu_fwd = EagerOp(bias_gelu_fwd, bias_gelu_fwd._init_fn, _bias_gelu_setup, _bias_gelu_backward)
_eager_swiglu_fwd = EagerOp(swiglu_fwd, swiglu_fwd._init_fn, _glu_setup, _swiglu_backward)
_eager_geglu_fwd = EagerOp(geglu_fwd, geglu_fwd._init_fn, _glu_setup, _geglu_backward)
_eager_bias_gelu_bwd = EagerOp(bias_gelu_bwd, bias_gelu_bwd._init_fn)
_eager_swiglu_bwd = EagerOp(swiglu_bwd, swiglu_bwd._init_fn)
_eager_geglu_bwd = EagerOp(geglu_bwd, geglu_bwd._init_fn)


# ------------------------------------------------------------------------- public API


def _validate_pair(gate, up, backend):
    _checks.check_tensor("gate", gate, min_ndim=1)
    _checks.check_tensor("up", up, min_ndim=1)
    _checks.check_shape("up", up, gate.shape, "(the shape of gate)")
    _checks.check_same_dtype("gate", gate, up=up)
    _checks.check_same_device("gate", gate, up=up)
    backends.check_name(backend)


def bias_gelu(
    x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none", backend: str = "auto"
) -> Tensor:
    """``gelu(x + bias)``: the first feed-forward Linear's bias fused with its GELU.

    Args:
        x: ``(..., N)``, float16/bfloat16/float32/float64.
        bias: ``(N,)`` of x's dtype, or None.
        approximate: "none" (exact erf) or "tanh".
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        x's shape and dtype.
    """
    _checks.check_tensor("x", x, min_ndim=1)
    if bias is not None:
        _checks.check_tensor("bias", bias, ndim=1)
        _checks.check_shape("bias", bias, (x.shape[-1],), "(the last dimension of x)")
        _checks.check_same_dtype("x", x, bias=bias)
        _checks.check_same_device("x", x, bias=bias)
    _checks.check_choice("approximate", approximate, GELU_APPROXIMATIONS)
    backends.check_name(backend)
    return _eager_bias_gelu_fwd(x, bias, approximate, backend)


def swiglu(gate: Tensor, up: Tensor, backend: str = "auto") -> Tensor:
    """``silu(gate) * up`` (SwiGLU); gate and up have the same shape and dtype."""
    _validate_pair(gate, up, backend)
    return _eager_swiglu_fwd(gate, up, backend)


def geglu(gate: Tensor, up: Tensor, approximate: str = "none", backend: str = "auto") -> Tensor:
    """``gelu(gate) * up`` (GeGLU); gate and up have the same shape and dtype."""
    _validate_pair(gate, up, backend)
    _checks.check_choice("approximate", approximate, GELU_APPROXIMATIONS)
    return _eager_geglu_fwd(gate, up, approximate, backend)
