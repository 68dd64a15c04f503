"""The tolerance rule every kernel is verified with (FlashAttention's; DESIGN.md).

A kernel's result is compared with the reference computed in high precision (the
*oracle*: fp64 on CPU, fp32 on GPU). The error it is allowed is relative to what plain
PyTorch achieves in the input dtype (the *baseline*: the same reference computed in
that dtype): ``max|kernel - oracle| <= factor * max|baseline - oracle| + floor``, with
``factor`` 2 for outputs and 3 for gradients and ``floor`` one unit in the last place of
the input dtype at the oracle's magnitude (for gradients at least ``GRAD_FP32_FLOOR_ULPS``
fp32 units: see there). Infinities must match exactly (a fully
masked row's LSE is ``-inf``); a NaN where the oracle has none always fails. Baseline
entries that are NaN (plain PyTorch overflowed) do not count towards the baseline error.

Used by the tests and by ``python -m fast_attn.verify``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
# Kernels accumulate in fp32. A gradient formed by cancellation (FlashAttention's
# delta = rowsum(dO * O) against rowsum(P * dP)) keeps a few fp32 roundings that the
# baseline, cancelling exactly, does not show: a row with one visible key has dS exactly
# 0, but a flash backward is left with a few ulps of |dO||V| per row, and dk sums them
# over the rows that see the key: measured 16 ulps (Triton, fp32, Sq=203, Sk=113,
# window (0, 0)) and 12 (ATen's CPU flash kernel behind the torch backend, Sq=Sk=17).
# Gradients therefore get a floor of this many fp32 ulps of their magnitude (3.8e-6 at
# magnitude 1, far below any real defect); it only matters for fp32 inputs.
GRAD_FP32_FLOOR_ULPS = 32


@dataclass(frozen=True)
class Comparison:
    """One tolerance-rule comparison; truthy when it passes."""

    error: float  # max |actual - oracle|
    baseline_error: float  # max |baseline - oracle|
    allowed: float  # factor * baseline_error + floor
    message: str = ""

    @property
    def ok(self) -> bool:
        return not self.message and self.error <= self.allowed

    @property
    def ratio(self) -> float:
        """error / allowed: at most 1 passes (reported in the verify matrix)."""
        return self.error / self.allowed if self.allowed > 0 else float("inf")

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAIL"
        detail = f" ({self.message})" if self.message else ""
        return (
            f"{status}: error {self.error:.3g} vs allowed {self.allowed:.3g} "
            f"(baseline error {self.baseline_error:.3g}){detail}"
        )


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def ulp_floor(dtype: torch.dtype, oracle: Tensor) -> float:
    """One unit in the last place of ``dtype`` at the oracle's magnitude (at least 1)."""
    finite = oracle[torch.isfinite(oracle)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return torch.finfo(dtype).eps * scale


def compare(
    actual: Tensor, oracle: Tensor, baseline: Tensor, *, factor: float = OUTPUT_FACTOR, gradient: bool = False
) -> Comparison:
    """The tolerance rule for ``actual`` (in the input dtype) against the fp64/fp32 oracle.

    ``gradient=True`` adds the fp32-accumulation floor (``GRAD_FP32_FLOOR_ULPS``).
    """
    if actual.shape != oracle.shape:
        return Comparison(float("inf"), 0.0, 0.0, f"shape {tuple(actual.shape)} != {tuple(oracle.shape)}")
    nan_actual = torch.isnan(actual) & ~torch.isnan(oracle)
    # Where plain PyTorch itself overflows to NaN (e.g. an fp16 rsqrt gradient) it sets no
    # bound: the baseline error is taken over the entries it computed.
    computed = ~torch.isnan(baseline) | torch.isnan(oracle)
    baseline_error = _max_abs_diff(baseline[computed], oracle[computed])
    floor = ulp_floor(actual.dtype, oracle)
    if gradient:
        floor = max(floor, GRAD_FP32_FLOOR_ULPS * ulp_floor(torch.float32, oracle))
    allowed = factor * baseline_error + floor
    if bool(nan_actual.any()):
        return Comparison(float("nan"), baseline_error, allowed, f"{int(nan_actual.sum())} NaN(s)")
    inf_mismatch = torch.isinf(actual) != torch.isinf(oracle)
    if bool(inf_mismatch.any()):
        return Comparison(float("inf"), baseline_error, allowed, f"{int(inf_mismatch.sum())} inf mismatch(es)")
    return Comparison(_max_abs_diff(actual, oracle), baseline_error, allowed)


def assert_close(
    actual: Tensor,
    oracle: Tensor,
    baseline: Tensor,
    *,
    factor: float = OUTPUT_FACTOR,
    gradient: bool = False,
    name: str = "output",
) -> None:
    """``compare`` that raises AssertionError with the numbers when the rule fails."""
    result = compare(actual, oracle, baseline, factor=factor, gradient=gradient)
    if not result:
        raise AssertionError(f"{name}: {result}")
