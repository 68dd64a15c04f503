"""Shared pytest fixtures: every test starts from the same random state."""

import os

import pytest
import torch

# Without a GPU, run the Triton kernels on CPU tensors through the Triton interpreter.
# Set before any test module imports triton (jit decorators read it at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def seed():
    """Seed torch's global generator so each test draws the same inputs on every run."""
    torch.manual_seed(0)
    return 0
