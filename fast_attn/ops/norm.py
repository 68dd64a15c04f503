"""LayerNorm and RMSNorm ops, with the fused residual add: custom ops, fake functions, autograd.

Public functions:

- ``layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None, backend="auto")``
- ``rms_norm(x, weight=None, eps=1e-6, residual=None, backend="auto")``

Both normalise over the last dimension of ``x (..., N)``. Without ``residual`` they return
``y`` (x's shape and dtype). With ``residual`` (x's shape and dtype) they compute
``h = x + residual`` and return ``(norm(h), h)``: the pre-norm block's "add, then
normalise", where ``h`` is the next residual stream. Statistics are fp32 (fp64 for fp64).
Gradients flow to x, residual, weight and bias; the caller's tensors are never written.

Layers: ``fast_attn::{layer,rms}_norm_fwd`` / ``_bwd`` are torch.library custom ops whose
implementation dispatches (``_dispatch.py``) to the chosen backend's ``norm_fwd`` /
``norm_bwd``; the torch backend runs ATen's native layer/RMS norm.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _checks
from fast_attn.ops._dispatch import call_summary, dispatch
from fast_attn.ops._eager import EagerOp

_EMPTY = (0,)  # shape of the placeholder returned for an absent optional output
FAMILY = "norm"  # the backend modules' family name (fast_attn/ops/_dispatch.py)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 statistics for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


# ---------------------------------------------------------------------------- forward


def _norm_fwd(op: str, x, weight, bias, residual, eps, backend):
    """(y, h or empty, mean or empty, rstd) from the backend chosen for this call."""
    call = call_summary(op, x, weight=weight is not None, bias=bias is not None,
                        residual=residual is not None, backward=False)
    empty = (lambda: _norm_fwd_fake(op, x, weight, bias, residual, eps)) if x.numel() == 0 else None
    y, h, mean, rstd = dispatch(call, backend, FAMILY, "norm_fwd", empty, op, x, weight, bias, residual, eps)
    # Outputs are contiguous whatever x's layout (the fake function promises it), and absent
    # ones are distinct empty placeholders (a custom op's outputs may not alias each other).
    return (
        y.contiguous(),
        x.new_empty(_EMPTY) if h is None else h.contiguous(),
        x.new_empty(_EMPTY, dtype=stats_dtype(x.dtype)) if mean is None else mean,
        rstd,
    )


def _norm_fwd_fake(op, x, weight, bias, residual, eps):
    rows = _rows(x)
    sdtype = stats_dtype(x.dtype)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(_EMPTY)
    mean = x.new_empty((rows,) if op == "layer_norm" else _EMPTY, dtype=sdtype)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, h, mean, x.new_empty((rows,), dtype=sdtype)


@torch.library.custom_op("fast_attn::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h (empty without residual), mean (rows,), rstd (rows,)); stats fp32."""
    return _norm_fwd("layer_norm", x, weight, bias, residual, eps, backend)


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, backend):
    return _norm_fwd_fake("layer_norm", x, weight, bias, residual, eps)


@torch.library.custom_op("fast_attn::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h (empty without residual), empty, rstd (rows,)); stats fp32."""
    return _norm_fwd("rms_norm", x, weight, None, residual, eps, backend)


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps, backend):
    return _norm_fwd_fake("rms_norm", x, weight, None, residual, eps)


# --------------------------------------------------------------------------- backward


def _norm_bwd(op, dy, dh, inp, weight, bias, mean, rstd, eps, backend):
    """(dx, dweight or empty, dbias or empty); dx includes dh, the gradient flowing into h."""
    call = call_summary(op, inp, weight=weight is not None, bias=bias is not None,
                        residual=dh is not None, backward=True)
    if inp.numel() == 0:
        def empty():
            zeros = (torch.zeros_like(p) if p is not None else None for p in (weight, bias))
            return (torch.zeros(inp.shape, dtype=inp.dtype, device=inp.device), *zeros)
    else:
        empty = None
    dx, dweight, dbias = dispatch(call, backend, FAMILY, "norm_bwd", empty,
                                  op, dy, dh, inp, weight, bias, mean, rstd, eps)
    # Separate placeholders: a custom op's outputs may not alias each other.
    return (
        dx.contiguous(),
        inp.new_empty(_EMPTY) if dweight is None else dweight,
        inp.new_empty(_EMPTY) if dbias is None else dbias,
    )


def _norm_bwd_fake(dy, inp, weight, bias):
    return (
        torch.empty_like(inp, memory_format=torch.contiguous_format),
        inp.new_empty(_EMPTY) if weight is None else torch.empty_like(weight),
        inp.new_empty(_EMPTY) if bias is None else torch.empty_like(bias),
    )


@torch.library.custom_op("fast_attn::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor,
    dh: Optional[Tensor],
    inp: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _norm_bwd("layer_norm", dy, dh, inp, weight, bias, mean, rstd, eps, backend)


@layer_norm_bwd.register_fake
def _(dy, dh, inp, weight, bias, mean, rstd, eps, backend):
    return _norm_bwd_fake(dy, inp, weight, bias)


@torch.library.custom_op("fast_attn::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: Tensor,
    dh: Optional[Tensor],
    inp: Tensor,
    weight: Optional[Tensor],
    rstd: Tensor,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _norm_bwd("rms_norm", dy, dh, inp, weight, None, None, rstd, eps, backend)


@rms_norm_bwd.register_fake
def _(dy, dh, inp, weight, rstd, eps, backend):
    return _norm_bwd_fake(dy, inp, weight, None)


# --------------------------------------------------------------------------- autograd


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, backend = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.eps, ctx.backend = eps, backend
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, dh, _dmean, _drstd):
    inp, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _eager_layer_norm_bwd(
        dy, dh if ctx.has_residual else None, inp, weight, bias, mean, rstd, ctx.eps, ctx.backend
    )
    return (
        dx,
        dweight if weight is not None else None,
        dbias if bias is not None else None,
        dx if ctx.has_residual else None,
        None,
        None,
    )


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, eps, backend = inputs
    _, h, _, rstd = output
    ctx.has_residual = residual is not None
    ctx.eps, ctx.backend = eps, backend
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _rms_norm_backward(ctx, dy, dh, _dmean, _drstd):
    inp, weight, rstd = ctx.saved_tensors
    dx, dweight, _ = _eager_rms_norm_bwd(
        dy, dh if ctx.has_residual else None, inp, weight, rstd, ctx.eps, ctx.backend
    )
    return dx, dweight if weight is not None else None, dx if ctx.has_residual else None, None, None


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)

# What the public functions and the backward functions call (see _eager.py).
_eager_layer_norm_fwd = EagerOp(layer_norm_fwd, layer_norm_fwd._init_fn, _layer_norm_setup, _layer_norm_backward)
_eager_rms_norm_fwd = EagerOp(rms_norm_fwd, rms_norm_fwd._init_fn, _rms_norm_setup, _rms_norm_backward)
_eager_layer_norm_bwd = EagerOp(layer_norm_bwd, layer_norm_bwd._init_fn)
_eager_rms_norm_bwd = EagerOp(rms_norm_bwd, rms_norm_bwd._init_fn)


# ------------------------------------------------------------------------- public API


def _validate(x, weight, bias, residual, eps, backend):
    _checks.check_tensor("x", x, min_ndim=1)
    width = x.shape[-1]
    if width < 1:
        raise ValueError(f"x must have a last dimension (the normalised width) >= 1, got shape {tuple(x.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            _checks.check_tensor(name, param, ndim=1)
            _checks.check_shape(name, param, (width,), "(the last dimension of x)")
    if residual is not None:
        _checks.check_tensor("residual", residual)
        _checks.check_shape("residual", residual, x.shape, "(the shape of x)")
        _checks.check_same_dtype("x", x, residual=residual)
    _checks.check_same_device("x", x, weight=weight, bias=bias, residual=residual)
    eps = _checks.check_float("eps", eps, low=0.0, high=float("inf"), high_inclusive=False)
    backends.check_name(backend)
    return eps


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    backend: str = "auto",
):
    """LayerNorm over the last dimension: ``(h - mean(h)) / sqrt(var(h) + eps) * weight + bias``.

    Args:
        x: ``(..., N)``, float16/bfloat16/float32/float64; rows may be strided.
        weight, bias: ``(N,)`` or None; any float dtype (computed in fp32).
        eps: added to the (biased) variance.
        residual: None, or x's shape and dtype: normalise ``h = x + residual`` instead.
        backend: "auto", "cuda", "triton" or "torch" (see ``fast_attn.backends``).

    Returns:
        ``y`` (x's shape and dtype), or ``(y, h)`` when ``residual`` is given.
    """
    eps = _validate(x, weight, bias, residual, eps, backend)
    y, h, _, _ = _eager_layer_norm_fwd(x, weight, bias, residual, eps, backend)
    return y if residual is None else (y, h)


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    residual: Optional[Tensor] = None,
    backend: str = "auto",
):
    """RMSNorm over the last dimension: ``h / sqrt(mean(h^2) + eps) * weight``.

    Args and returns as ``layer_norm`` (no bias).
    """
    eps = _validate(x, weight, None, residual, eps, backend)
    y, h, _, _ = _eager_rms_norm_fwd(x, weight, residual, eps, backend)
    return y if residual is None else (y, h)
