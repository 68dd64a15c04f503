"""Shared pytest fixtures: every test starts from the same random state."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seed():
    """Seed torch's global generator so each test draws the same inputs on every run."""
    torch.manual_seed(0)
    return 0
