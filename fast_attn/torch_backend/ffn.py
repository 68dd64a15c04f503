"""Bias+GELU, SwiGLU and GeGLU for the "torch" backend, on ATen's elementwise kernels.

What: ``bias_gelu_fwd(x, bias, approximate) -> y``, ``bias_gelu_bwd(dy, x, bias,
approximate) -> (dx, dbias)``, ``glu_fwd(gate, up, activation) -> y`` and
``glu_bwd(dy, gate, up, activation) -> (dgate, dup)``, the contract every backend module
keeps; ``approximate`` is "none" (erf) or "tanh"; ``activation`` is "silu", "gelu" or
"gelu_tanh".

Algorithm: ``F.gelu`` / ``F.silu`` forward and ``aten.gelu_backward`` /
``aten.silu_backward`` (their exact derivatives), in the input dtype: ATen computes each
elementwise op in fp32 internally for fp16/bf16. GLU: ``y = act(gate) * up``,
``dgate = act'(gate) * (dy * up)``, ``dup = dy * act(gate)``. ``dbias`` is dx summed over
all rows in fp32, then cast to the bias dtype.

Limits: a chain of two ATen ops (bias add then GELU, activation then product) rounds the
intermediate to fp16/bf16 once more than a fused kernel does; the tolerance rule's
baseline (plain PyTorch in the input dtype) does the same.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bias_gelu_fwd", "bias_gelu_bwd", "glu_fwd", "glu_bwd"]

GELU_APPROXIMATIONS = ("none", "tanh")
GLU_ACTIVATIONS = {"silu": None, "gelu": "none", "gelu_tanh": "tanh"}  # -> GELU approximate


def _check_approximate(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def _glu_approximate(activation: str) -> Optional[str]:
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(GLU_ACTIVATIONS)}, got {activation!r}")
    return GLU_ACTIVATIONS[activation]


def _pre_activation(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x if bias is None else x + bias.to(x.dtype)


def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    """``gelu(x + bias)`` for ``x (..., N)``, ``bias (N,)`` or None; contiguous, x's dtype."""
    _check_approximate(approximate)
    return F.gelu(_pre_activation(x, bias), approximate=approximate).contiguous()


def bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str):
    """Returns ``(dx, dbias)``: dx like x; dbias ``(N,)`` in bias's dtype (None without bias)."""
    _check_approximate(approximate)
    dx = torch.ops.aten.gelu_backward(dy, _pre_activation(x, bias), approximate=approximate)
    dbias = None
    if bias is not None:
        dbias = dx.reshape(-1, dx.shape[-1]).sum(dim=0, dtype=torch.float32 if dx.dtype != torch.float64 else torch.float64)
        dbias = dbias.to(bias.dtype)
    return dx.contiguous(), dbias


def _activation(gate: Tensor, approximate: Optional[str]) -> Tensor:
    return F.silu(gate) if approximate is None else F.gelu(gate, approximate=approximate)


def glu_fwd(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """``act(gate) * up``, elementwise; contiguous, gate's dtype."""
    approximate = _glu_approximate(activation)
    return (_activation(gate, approximate) * up).contiguous()


def glu_bwd(dy: Tensor, gate: Tensor, up: Tensor, activation: str):
    """Returns ``(dgate, dup)`` in gate's and up's dtypes."""
    approximate = _glu_approximate(activation)
    grad_act = dy * up
    if approximate is None:
        dgate = torch.ops.aten.silu_backward(grad_act, gate)
    else:
        dgate = torch.ops.aten.gelu_backward(grad_act, gate, approximate=approximate)
    dup = dy * _activation(gate, approximate)
    return dgate.contiguous(), dup.to(up.dtype).contiguous()
