"""LayerNorm and RMSNorm (with the fused residual add) for the "torch" backend.

What: ``norm_fwd(op, x, weight, bias, residual, eps) -> (y, h, mean, rstd)`` and
``norm_bwd(op, dy, dh, inp, weight, bias, mean, rstd, eps) -> (dx, dweight, dbias)``,
the contract every backend module keeps; ``op`` is "layer_norm" or "rms_norm".

Algorithm: with a residual, ``h = x + residual`` is formed once, rounded to x's dtype
(the next residual stream, returned) and that h is normalised (the Triton kernels do
the same). LayerNorm runs on ``aten.native_layer_norm`` / ``native_layer_norm_backward``.
ATen keeps its statistics in the parameters' dtype, so weight and bias are always passed
in the statistics dtype (fp32, fp64 for fp64 x; an exact upcast of N values) and a
missing weight becomes ones: that selects ATen's mixed-dtype path, which for bf16/fp16 x
computes in fp32 and returns fp32 mean/rstd and a y in x's dtype. Its backward takes that
path only without parameters: with them, fp16/bf16 dy and h are upcast and the fp32
kernel runs, since the mixed kernel's dweight/dbias miss the tolerance rule. RMSNorm's forward is
``aten._fused_rms_norm`` where this torch has it (fp32 rstd for any x dtype); its
backward, which ATen implements on CUDA only, is plain maths in the statistics dtype:
``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = dy * weight``, ``xhat = h * rstd``.

Limits: x may have any strides (rows are gathered by ``reshape``, a copy when they are
not evenly strided). Parameter gradients come back in the parameters' dtypes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["norm_fwd", "norm_bwd"]

LAYER_NORM, RMS_NORM = "layer_norm", "rms_norm"
# LayerNorm rows narrower than this run plain maths: there the output is (nearly) constant,
# the exact dx and dweight (nearly) 0, and ATen's kernels leave rounding residues that
# rstd ~ 1/sqrt(eps) amplifies (dweight 5e-5 off at width 1 in fp32, where plain maths
# is exact). Such rows are tiny, so the plain maths costs nothing that matters.
MIN_ATEN_LAYER_NORM_WIDTH = 4
_HAS_FUSED_RMS = hasattr(torch.ops.aten, "_fused_rms_norm")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _check_op(op: str) -> None:
    if op not in (LAYER_NORM, RMS_NORM):
        raise ValueError(f"norm op must be 'layer_norm' or 'rms_norm', got {op!r}")


def _rms_fwd_plain(h: Tensor, weight: Optional[Tensor], eps: float):
    sdtype = _stats_dtype(h.dtype)
    hs = h.to(sdtype)
    rstd = torch.rsqrt(hs.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = hs * rstd
    if weight is not None:
        y = y * weight.to(sdtype)
    return y.to(h.dtype), rstd


def _layer_norm_fwd_plain(h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """(y contiguous, mean (rows,), rstd (rows,)) in plain maths, statistics dtype."""
    sdtype = _stats_dtype(h.dtype)
    rows = h.reshape(-1, h.shape[-1]).to(sdtype)
    mean = rows.mean(dim=-1, keepdim=True)
    centered = rows - mean
    rstd = torch.rsqrt((centered * centered).mean(dim=-1, keepdim=True) + eps)
    y = centered * rstd
    if weight is not None:
        y = y * weight.to(sdtype)
    if bias is not None:
        y = y + bias.to(sdtype)
    return y.to(h.dtype).view(h.shape), mean.view(-1), rstd.view(-1)


def _layer_norm_bwd_plain(dy: Tensor, h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, rstd: Tensor):
    """LayerNorm gradients in plain maths: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``
    with ``g = dy * weight``; dweight ``sum(dy * xhat)``, dbias ``sum(dy)``."""
    sdtype = _stats_dtype(h.dtype)
    width = h.shape[-1]
    rstd_col = rstd.to(sdtype).view(-1, 1)
    xhat = (h.reshape(-1, width).to(sdtype) - mean.to(sdtype).view(-1, 1)) * rstd_col
    grad = dy.reshape(-1, width).to(sdtype)
    g = grad * weight.to(sdtype) if weight is not None else grad
    dx = rstd_col * (g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    dweight = (grad * xhat).sum(dim=0) if weight is not None else None
    dbias = grad.sum(dim=0) if bias is not None else None
    return dx.to(h.dtype).view(h.shape), dweight, dbias


def norm_fwd(op: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], eps: float):
    """Normalise ``x (..., N)`` (plus ``residual``) over its last dimension.

    Returns ``(y, h, mean, rstd)``: y contiguous in x's shape and dtype; h = x + residual
    in x's dtype (None without residual); mean ``(rows,)`` for layer_norm (None for
    rms_norm); rstd ``(rows,)``; statistics fp32 (fp64 for fp64 x). RMSNorm adds
    ``bias`` after the scale when one is given.
    """
    _check_op(op)
    width = x.shape[-1]
    sdtype = _stats_dtype(x.dtype)
    h = None
    inp = x
    if residual is not None:
        h = torch.add(x, residual).to(x.dtype).contiguous()  # one rounding to x's dtype
        inp = h
    if op == LAYER_NORM and width < MIN_ATEN_LAYER_NORM_WIDTH:
        y, mean, rstd = _layer_norm_fwd_plain(inp, weight, bias, eps)
        return y, h, mean, rstd
    if op == LAYER_NORM:
        w = _param(weight, sdtype)
        if w is None and x.dtype != sdtype:
            w = torch.ones(width, dtype=sdtype, device=x.device)  # mixed path: fp32 stats
        y, mean, rstd = torch.native_layer_norm(inp, [width], w, _param(bias, sdtype), eps)
        return y.contiguous(), h, mean.reshape(-1).to(sdtype), rstd.reshape(-1).to(sdtype)
    if _HAS_FUSED_RMS:
        y, rstd = torch.ops.aten._fused_rms_norm(inp, [width], weight, eps)
    else:
        y, rstd = _rms_fwd_plain(inp, weight, eps)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.contiguous(), h, None, rstd.reshape(-1).to(sdtype)


def norm_bwd(op: str, dy: Tensor, dh: Optional[Tensor], inp: Tensor, weight: Optional[Tensor],
             bias: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor, eps: float):
    """Gradients of ``norm_fwd`` given the normalised input ``inp`` (h with a residual).

    Returns ``(dx, dweight, dbias)``: dx in inp's shape and dtype, including ``dh`` (the
    gradient that reached h directly; it is also the residual's gradient); dweight/dbias
    in the parameters' dtypes, None for absent parameters.
    """
    _check_op(op)
    width = inp.shape[-1]
    sdtype = _stats_dtype(inp.dtype)
    if op == LAYER_NORM and width < MIN_ATEN_LAYER_NORM_WIDTH:
        dx, dweight, dbias = _layer_norm_bwd_plain(dy, inp, weight, bias, mean, rstd)
    elif op == LAYER_NORM:
        stats_shape = (*inp.shape[:-1], 1)
        mean, rstd = mean.to(sdtype).view(stats_shape), rstd.to(sdtype).view(stats_shape)
        w, b = _param(weight, sdtype), _param(bias, sdtype)
        grad, x_in = dy, inp
        if inp.dtype != sdtype:
            if weight is None and bias is None:
                w = torch.ones(width, dtype=sdtype, device=inp.device)  # mixed path: fp32 maths
            else:
                # ATen's mixed-dtype CPU backward sums dweight/dbias at ~bf16 precision (0.18
                # vs 0.04 for plain bf16 maths at 64 x 96), outside the tolerance rule; its
                # fp32 kernel on upcast copies is exact (267 ms vs 33 ms mixed at 8192 x 1024
                # bf16, 2 loaded CPU cores).
                grad, x_in = dy.to(sdtype), inp.to(sdtype)
        dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
            grad, x_in, [width], mean, rstd, w, b, [True, weight is not None, bias is not None],
        )
        dx = dx.to(inp.dtype)
    else:
        rows = inp.reshape(-1, width).to(sdtype)
        grad = dy.reshape(-1, width).to(sdtype)
        rstd_col = rstd.to(sdtype).view(-1, 1)
        xhat = rows * rstd_col
        dweight = (grad * xhat).sum(dim=0) if weight is not None else None
        dbias = grad.sum(dim=0) if bias is not None else None
        g = grad * weight.to(sdtype) if weight is not None else grad
        dx = rstd_col * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
        dx = dx.to(inp.dtype).view(inp.shape)
    if dh is not None:
        dx = dx + dh
    dweight = None if dweight is None else dweight.to(weight.dtype)
    dbias = None if dbias is None else dbias.to(bias.dtype)
    return dx.contiguous(), dweight, dbias
