"""The feed-forward activations (bias_gelu, swiglu, geglu) on every backend against the reference.

The cases come from ``fast_attn.testing_cases`` (shared with ``python -m fast_attn.verify``):
widths 1, 7, 129, 1023, 1024, 4096; prime row counts; fp16/bf16/fp32; with and without
bias; exact and tanh GELU; 3-D inputs, row-strided inputs (gate and up as the two
halves of one fused projection), non-viewable (copied) inputs, extreme inputs (|x| up
to ~60) whose exponentials over/underflow. Each runs through the public function with
``backend=`` each of "torch", "triton", "cuda" (skipped where unavailable or the
features are not declared), forward and backward, compared with the DESIGN.md
tolerance rule (``fast_attn.testing``), inputs unchanged, every fresh allocation
NaN-filled.

On CPU the triton backend runs under the Triton interpreter on the ``quick`` cases;
``pytest -m gpu`` adds the GPU sweep (widths up to 65536, 2053 rows). Kernel
internals (slabs, dbias determinism, empty launches, raw CUDA ops): test_ffn_triton_specific.py
and test_ffn_cuda_specific.py.
"""

from __future__ import annotations

import pytest
import torch

from fast_attn import backends
from fast_attn import testing_cases as tc

BACKENDS = ("torch", "triton", "cuda")
ON_GPU = torch.cuda.is_available()
SPECS = tc.activation_specs(ON_GPU)


def why_not(backend: str, case: tc.Case):
    """None if ``backend`` can run ``case`` here when asked for by name, else why not (the skip reason)."""
    return backends.why_not(backend, case.call(device_for(backend)))


def device_for(backend: str) -> str:
    return "cuda" if ON_GPU else "cpu"


def interpreter_skip(case: tc.Case, backend: str):
    """The triton cases the interpreter leaves to a GPU (too slow there)."""
    if backend == "triton" and not ON_GPU and not case.quick:
        return "the interpreter runs the quick cases; this one runs on a GPU"
    return None


def case_params(specs):
    return [pytest.param(tc.build(spec), id=tc.label(spec), marks=[pytest.mark.gpu] if spec.gpu else [])
            for spec in specs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", case_params(SPECS))
def test_matches_reference(case, backend):
    if case.gpu and not ON_GPU:
        pytest.skip("a GPU-sized case")
    reason = why_not(backend, case) or interpreter_skip(case, backend)
    if reason:
        pytest.skip(reason)
    with tc.nan_poisoned():
        result = tc.evaluate(case, backend, device_for(backend))
    assert result, f"{case.label} on {backend}: {result.report()}"
