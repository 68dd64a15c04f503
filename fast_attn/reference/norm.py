"""Reference LayerNorm and RMSNorm over the last dimension, with the fused residual add.

Plain PyTorch ops, differentiable by autograd: the CPU fallback of the norm ops and the
oracle the Triton and CUDA kernels are checked against.

Both functions return the per-row statistics the kernels save for the backward (fp32,
or fp64 for fp64 inputs): ``mean`` and ``rstd`` for LayerNorm, ``rstd`` for RMSNorm.
With ``residual`` the normalised tensor is ``h = x + residual`` (computed in the
statistics dtype, stored in x's dtype) and ``h`` is returned too: that is the pre-norm
transformer block's "add then normalise" step, where ``h`` is the next residual stream.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class NormOutput(NamedTuple):
    """What a norm call produces: y, the summed input h (None without residual), stats."""

    y: Tensor
    h: Optional[Tensor]
    mean: Optional[Tensor]  # (rows,) LayerNorm only
    rstd: Tensor  # (rows,)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 statistics for fp16/bf16/fp32 inputs, fp64 for fp64 (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _add_residual(x: Tensor, residual: Optional[Tensor], upcast: bool):
    """Return (h in compute dtype, h in x's dtype or None)."""
    compute = stats_dtype(x.dtype) if upcast else x.dtype
    h = x.to(compute)
    if residual is None:
        return h, None
    h = h + residual.to(compute)
    return h, h.to(x.dtype)


def layer_norm_ref(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    upcast: bool = True,
) -> NormOutput:
    """LayerNorm of ``x (..., N)`` over N: ``(h - mean) * rstd * weight + bias``.

    ``upcast=True`` computes in fp32 (fp64 stays fp64); ``upcast=False`` computes in x's
    dtype, the low-precision baseline of the tolerance rule. ``y`` has x's dtype.
    """
    h, h_out = _add_residual(x, residual, upcast)
    mean = h.mean(dim=-1, keepdim=True)
    centered = h - mean
    var = (centered * centered).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = centered * rstd
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    sdtype = stats_dtype(x.dtype)
    return NormOutput(
        y.to(x.dtype),
        h_out,
        mean.squeeze(-1).reshape(-1).to(sdtype),
        rstd.squeeze(-1).reshape(-1).to(sdtype),
    )


def rms_norm_ref(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    residual: Optional[Tensor] = None,
    upcast: bool = True,
) -> NormOutput:
    """RMSNorm of ``x (..., N)`` over N: ``h * rsqrt(mean(h^2) + eps) * weight``."""
    h, h_out = _add_residual(x, residual, upcast)
    rstd = torch.rsqrt((h * h).mean(dim=-1, keepdim=True) + eps)
    y = h * rstd
    if weight is not None:
        y = y * weight.to(y.dtype)
    return NormOutput(
        y.to(x.dtype), h_out, None, rstd.squeeze(-1).reshape(-1).to(stats_dtype(x.dtype))
    )
