"""Feed-forward activation ops: bias+GELU, SwiGLU, GeGLU: custom ops, fake functions, autograd.

Public functions:

- ``bias_gelu(x, bias=None, approximate="none", backend="auto")`` = ``gelu(x + bias)``
- ``swiglu(gate, up, backend="auto")``                            = ``silu(gate) * up``
- ``geglu(gate, up, approximate="none", backend="auto")``         = ``gelu(gate) * up``

``approximate`` is "none" (exact erf GELU) or "tanh", as in ``torch.nn.functional.gelu``.
Outputs have the input's shape and dtype; the maths runs in fp32. The backward recomputes
the activation from the saved inputs (nothing else is saved) and never writes into them.

Each public function calls a ``fast_attn::<op>_fwd`` custom op whose implementation asks
``fast_attn.backends`` which backend runs the call; its backward is ``fast_attn::<op>_bwd``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _checks
from fast_attn.ops._reference_grad import reference_vjp
from fast_attn.reference.ffn import GELU_APPROXIMATIONS, bias_gelu_ref, geglu_ref, swiglu_ref

_EMPTY = (0,)


# ---------------------------------------------------------------------------- bias_gelu


def _cuda_bias_gelu_fwd(x, bias, approximate):
    from fast_attn._extension import load_extension

    load_extension()
    x2d = _checks.last_dim_contiguous(x).reshape(-1, x.shape[-1])
    y = torch.ops.fast_attn.cuda_bias_gelu_fwd(x2d, bias, approximate == "tanh")
    return y.reshape(x.shape)


def _cuda_bias_gelu_bwd(dy, x, bias, approximate):
    from fast_attn._extension import load_extension

    load_extension()
    width = x.shape[-1]
    x2d = _checks.last_dim_contiguous(x).reshape(-1, width)
    dy2d = _checks.last_dim_contiguous(dy).reshape(-1, width)
    dx, dbias = torch.ops.fast_attn.cuda_bias_gelu_bwd(dy2d, x2d, bias, approximate == "tanh")
    return dx.reshape(x.shape), (dbias if bias is not None else None)


def _torch_bias_gelu_bwd(dy, x, bias, approximate):
    return reference_vjp(lambda a, b: bias_gelu_ref(a, b, approximate), (x, bias), (dy,))


def _triton_bias_gelu_fwd(x, bias, approximate):
    from fast_attn.triton_kernels import ffn as triton_ffn

    return triton_ffn.bias_gelu_fwd(x, bias, approximate == "tanh")


def _triton_bias_gelu_bwd(dy, x, bias, approximate):
    from fast_attn.triton_kernels import ffn as triton_ffn

    return triton_ffn.bias_gelu_bwd(dy, x, bias, approximate == "tanh")


# Kernels by backend. A kernel issue adds its entries here and its CAPABILITIES in backends.py.
_BIAS_GELU_FWD = {"torch": bias_gelu_ref, "cuda": _cuda_bias_gelu_fwd, "triton": _triton_bias_gelu_fwd}
_BIAS_GELU_BWD = {"torch": _torch_bias_gelu_bwd, "cuda": _cuda_bias_gelu_bwd, "triton": _triton_bias_gelu_bwd}


def _backend_for(op: str, x: Tensor, backend: str, *, backward: bool, **flags: bool) -> str:
    """The backend that runs this activation call (torch for empty tensors: nothing to launch)."""
    if x.numel() == 0:
        return "torch"
    call = backends.Call(op, x.device.type, x.dtype, backends.features(backward=backward, **flags))
    return backends.resolve_backend(call, backend)


@torch.library.custom_op("fast_attn::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
    name = _backend_for("bias_gelu", x, backend, backward=False, bias=bias is not None,
                        gelu_tanh=approximate == "tanh")
    return _BIAS_GELU_FWD[name](x, bias, approximate).contiguous()


@bias_gelu_fwd.register_fake
def _(x, bias, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fast_attn::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(
    dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str, backend: str
) -> tuple[Tensor, Tensor]:
    """(dx, dbias); dbias is empty when bias is None."""
    name = _backend_for("bias_gelu", x, backend, backward=True, bias=bias is not None,
                        gelu_tanh=approximate == "tanh")
    dx, dbias = _BIAS_GELU_BWD[name](dy, x, bias, approximate)
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
    dx, dbias = bias_gelu_bwd(dy, x, bias, ctx.approximate, ctx.backend)
    return dx, (dbias if bias is not None else None), None, None


bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


# ------------------------------------------------------------------------ swiglu, geglu


def _torch_glu_fwd(gate, up, approximate):
    if approximate is None:
        return swiglu_ref(gate, up)
    return geglu_ref(gate, up, approximate)


def _torch_glu_bwd(dy, gate, up, approximate):
    return reference_vjp(lambda g, u: _torch_glu_fwd(g, u, approximate), (gate, up), (dy,))


# approximate (None for SwiGLU, "none"/"tanh" for GeGLU) -> the activation name the Triton
# kernels and the CUDA op take
_GLU_ACTIVATION = {None: "silu", "none": "gelu", "tanh": "gelu_tanh"}


def _cuda_glu_fwd(gate, up, approximate):
    from fast_attn._extension import load_extension

    load_extension()
    # the op reads (..., N) views with any row strides itself: no reshape, no copy here
    return torch.ops.fast_attn.cuda_glu_fwd(gate, up, _GLU_ACTIVATION[approximate])


def _cuda_glu_bwd(dy, gate, up, approximate):
    from fast_attn._extension import load_extension

    load_extension()
    return torch.ops.fast_attn.cuda_glu_bwd(dy, gate, up, _GLU_ACTIVATION[approximate])


def _triton_glu_fwd(gate, up, approximate):
    from fast_attn.triton_kernels import ffn as triton_ffn

    return triton_ffn.glu_fwd(gate, up, _GLU_ACTIVATION[approximate])


def _triton_glu_bwd(dy, gate, up, approximate):
    from fast_attn.triton_kernels import ffn as triton_ffn

    return triton_ffn.glu_bwd(dy, gate, up, _GLU_ACTIVATION[approximate])


# Kernels by backend, fn(gate, up, approximate or None for SwiGLU); see _BIAS_GELU_FWD.
_GLU_FWD = {"torch": _torch_glu_fwd, "cuda": _cuda_glu_fwd, "triton": _triton_glu_fwd}
_GLU_BWD = {"torch": _torch_glu_bwd, "cuda": _cuda_glu_bwd, "triton": _triton_glu_bwd}


def _glu_fake_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.custom_op("fast_attn::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    name = _backend_for("swiglu", gate, backend, backward=False)
    return _GLU_FWD[name](gate, up, None).contiguous()


@swiglu_fwd.register_fake
def _(gate, up, backend):
    return _glu_fake_like(gate)


@torch.library.custom_op("fast_attn::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    name = _backend_for("swiglu", gate, backend, backward=True)
    return tuple(g.contiguous() for g in _GLU_BWD[name](dy, gate, up, None))


@swiglu_bwd.register_fake
def _(dy, gate, up, backend):
    return _glu_fake_like(gate), _glu_fake_like(up)


@torch.library.custom_op("fast_attn::geglu_fwd", mutates_args=())
def geglu_fwd(gate: Tensor, up: Tensor, approximate: str, backend: str) -> Tensor:
    name = _backend_for("geglu", gate, backend, backward=False, gelu_tanh=approximate == "tanh")
    return _GLU_FWD[name](gate, up, approximate).contiguous()


@geglu_fwd.register_fake
def _(gate, up, approximate, backend):
    return _glu_fake_like(gate)


@torch.library.custom_op("fast_attn::geglu_bwd", mutates_args=())
def geglu_bwd(
    dy: Tensor, gate: Tensor, up: Tensor, approximate: str, backend: str
) -> tuple[Tensor, Tensor]:
    name = _backend_for("geglu", gate, backend, backward=True, gelu_tanh=approximate == "tanh")
    return tuple(g.contiguous() for g in _GLU_BWD[name](dy, gate, up, approximate))


@geglu_bwd.register_fake
def _(dy, gate, up, approximate, backend):
    return _glu_fake_like(gate), _glu_fake_like(up)


def _glu_setup(ctx, inputs, output):
    gate, up = inputs[0], inputs[1]
    ctx.extra = inputs[2:]  # (backend,) for SwiGLU, (approximate, backend) for GeGLU
    ctx.save_for_backward(gate, up)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = swiglu_bwd(dy, gate, up, *ctx.extra)
    return dgate, dup, None


def _geglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = geglu_bwd(dy, gate, up, *ctx.extra)
    return dgate, dup, None, None


swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_glu_setup)
geglu_fwd.register_autograd(_geglu_backward, setup_context=_glu_setup)


# ------------------------------------------------------------------------- public API


def _validate_pair(gate, up, backend):
    _checks.check_tensor("gate", gate, min_ndim=1)
    _checks.check_tensor("up", up, min_ndim=1)
    _checks.check_shape("up", up, gate.shape, "(the shape of gate)")
    _checks.check_same_dtype("gate", gate, up=up)
    _checks.check_same_device("gate", gate, up=up)
    backends.requested_backend(backend)


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
    backends.requested_backend(backend)
    return bias_gelu_fwd(x, bias, approximate, backend)


def swiglu(gate: Tensor, up: Tensor, backend: str = "auto") -> Tensor:
    """``silu(gate) * up`` (SwiGLU); gate and up have the same shape and dtype."""
    _validate_pair(gate, up, backend)
    return swiglu_fwd(gate, up, backend)


def geglu(gate: Tensor, up: Tensor, approximate: str = "none", backend: str = "auto") -> Tensor:
    """``gelu(gate) * up`` (GeGLU); gate and up have the same shape and dtype."""
    _validate_pair(gate, up, backend)
    _checks.check_choice("approximate", approximate, GELU_APPROXIMATIONS)
    return geglu_fwd(gate, up, approximate, backend)
