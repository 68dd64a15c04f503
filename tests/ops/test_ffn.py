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

from fast_attn import testing_cases as tc

ON_GPU = torch.cuda.is_available()
SPECS = tc.activation_specs(ON_GPU)


@pytest.mark.parametrize("backend", tc.BACKEND_NAMES)
@pytest.mark.parametrize("case", tc.pytest_params(SPECS))
def test_matches_reference(case, backend):
    tc.assert_matches_reference(case, backend)
