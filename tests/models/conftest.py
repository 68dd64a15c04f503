"""Fixtures of the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the test models are too small to gain from two, and on a
    2-core machine shared with other jobs two OpenMP threads can stall each other ~10x
    (a 30-step GPT run: 2 s with one thread, 170 s with two next to a busy neighbour)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
