"""Drop-in ``LayerNorm`` and ``RMSNorm``: torch.nn's modules running fast_attn's norm ops.

Each class subclasses its torch.nn twin and only replaces ``forward``: the constructor,
its defaults, ``reset_parameters``, ``extra_repr``, the parameter names and the state_dict
are torch.nn's own, so checkpoints load both ways and ``isinstance(m, torch.nn.LayerNorm)``
(weight-decay groups, init functions, FSDP wrap policies) keeps holding.

``forward`` flattens the ``normalized_shape`` trailing dimensions into one and calls
``fast_attn.layer_norm`` / ``fast_attn.rms_norm`` (fp32 statistics, any backend).

Differences from torch.nn:

- Under autocast torch computes LayerNorm/RMSNorm in fp32 and returns fp32; these modules
  keep the input's dtype (the point of a fused low-precision kernel). Statistics are fp32
  either way.
- Wrong input shapes raise ``ValueError`` (torch: ``RuntimeError``).
- NestedTensor inputs are handed to torch.nn's own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fast_attn.nn._convert import adopt
from fast_attn.ops.norm import layer_norm, rms_norm

__all__ = ["LayerNorm", "RMSNorm"]


def _flatten_rows(module: nn.Module, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """(x (..., N), weight (N,), bias (N,)) with the normalized dims flattened into N."""
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(
            f"{type(module).__name__}: expected input of shape (*, {', '.join(map(str, shape))}) "
            f"(normalized_shape), got {tuple(x.shape)}"
        )
    if len(shape) == 1:
        return x, weight, bias
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    return x.flatten(x.dim() - len(shape)), flat(weight), flat(bias)


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None)`` computed by ``fast_attn.layer_norm``.

    Shapes: input ``(*, *normalized_shape)``, output the same shape and dtype.
    """

    @classmethod
    def from_torch(cls, module: nn.LayerNorm) -> "LayerNorm":
        """A fast_attn LayerNorm sharing ``module``'s parameters and hooks (no copies)."""
        return adopt(cls, module)

    def forward(self, input: Tensor) -> Tensor:
        if input.is_nested:
            return super().forward(input)
        x, weight, bias = _flatten_rows(self, input, self.weight, self.bias)
        return layer_norm(x, weight, bias, self.eps).view(input.shape)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None)`` computed by ``fast_attn.rms_norm``; ``eps=None`` means
    ``torch.finfo(x.dtype).eps``, as in torch.

    Shapes: input ``(*, *normalized_shape)``, output the same shape and dtype.
    """

    @classmethod
    def from_torch(cls, module: nn.RMSNorm) -> "RMSNorm":
        """A fast_attn RMSNorm sharing ``module``'s parameters and hooks (no copies)."""
        return adopt(cls, module)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_nested:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        rows, weight, _ = _flatten_rows(self, x, self.weight, None)
        return rms_norm(rows, weight, eps).view(x.shape)
