"""Input validation shared by the public ops: every message names the argument and what was expected.

Errors follow Python's conventions: ``TypeError`` for a wrong type or dtype, ``ValueError``
for a wrong value, shape or device, ``NotImplementedError`` for a valid request that no
backend here implements.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor

from fast_attn.backends import FLOAT_DTYPES

_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    float_dtype: bool = True,
) -> Tensor:
    """``value`` must be a tensor (of a floating dtype we support) with the given rank."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if float_dtype and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}"
        )
    return value


def check_same_device(reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    """Every tensor in ``others`` must be on ``reference``'s device."""
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{name} must be on the same device as {reference_name} "
                f"({reference.device}), got {tensor.device}"
            )


def check_same_dtype(reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    """Every tensor in ``others`` must have ``reference``'s dtype."""
    for name, tensor in others.items():
        if tensor is not None and tensor.dtype != reference.dtype:
            raise TypeError(
                f"{name} must have the same dtype as {reference_name} "
                f"({reference.dtype}), got {tensor.dtype}"
            )


def check_shape(name: str, tensor: Tensor, expected: Sequence[int], meaning: str = "") -> None:
    if tuple(tensor.shape) != tuple(expected):
        suffix = f" {meaning}" if meaning else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{suffix}, got {tuple(tensor.shape)}")


def check_float(name: str, value: object, *, low: float, high: float, high_inclusive: bool) -> float:
    """A real number in [low, high] or [low, high)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    above = value > high if high_inclusive else value >= high
    if math.isnan(value) or value < low or above:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def last_dim_contiguous(tensor: Tensor) -> Tensor:
    """The kernels need unit stride in the last dimension; copy only when it is missing."""
    if tensor.dim() == 0 or tensor.stride(-1) == 1 or tensor.shape[-1] <= 1:
        return tensor
    return tensor.contiguous()
