"""Shared pytest fixtures: every test starts from the same random state."""

import os

import pytest
import torch

# Without a GPU, run the Triton kernels on CPU tensors through the Triton interpreter.
# Set before any test module imports triton (jit decorators read it at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def cuda_ops():
    """``torch.ops.fast_attn`` with the CUDA extension loaded (built or JIT-built); skips
    the test when it cannot be had here."""
    from fast_attn import _extension

    try:
        _extension.load_extension()
    except _extension.ExtensionUnavailable as exc:
        pytest.skip(f"CUDA extension unavailable: {exc}")
    return torch.ops.fast_attn


@pytest.fixture(autouse=True)
def seed():
    """Seed torch's global generator so each test draws the same inputs on every run."""
    torch.manual_seed(0)
    return 0
