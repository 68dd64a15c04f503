"""Reference feed-forward activations: bias+GELU, SwiGLU and GeGLU.

Plain PyTorch ops, differentiable by autograd: the CPU fallback of the activation ops
and the oracle for the Triton and CUDA kernels.

- ``bias_gelu(x, bias)  = gelu(x + bias)``, GELU exact (erf) or tanh-approximated;
- ``swiglu(gate, up)    = silu(gate) * up``                (Shazeer 2020, "GLU Variants");
- ``geglu(gate, up)     = gelu(gate) * up``.

``upcast=True`` computes in fp32 (fp64 stays fp64) and casts back to the input dtype;
``upcast=False`` computes in the input dtype (the tolerance rule's baseline).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

GELU_APPROXIMATIONS = ("none", "tanh")


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast or dtype == torch.float64:
        return dtype
    return torch.float32


def bias_gelu_ref(
    x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none", upcast: bool = True
) -> Tensor:
    """``gelu(x + bias)`` for ``x (..., N)`` and ``bias (N,)``; result in x's dtype."""
    compute = _compute_dtype(x.dtype, upcast)
    h = x.to(compute)
    if bias is not None:
        h = h + bias.to(compute)
    return F.gelu(h, approximate=approximate).to(x.dtype)


def swiglu_ref(gate: Tensor, up: Tensor, upcast: bool = True) -> Tensor:
    """``silu(gate) * up``, elementwise; result in gate's dtype."""
    compute = _compute_dtype(gate.dtype, upcast)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def geglu_ref(gate: Tensor, up: Tensor, approximate: str = "none", upcast: bool = True) -> Tensor:
    """``gelu(gate) * up``, elementwise; result in gate's dtype."""
    compute = _compute_dtype(gate.dtype, upcast)
    return (F.gelu(gate.to(compute), approximate=approximate) * up.to(compute)).to(gate.dtype)
