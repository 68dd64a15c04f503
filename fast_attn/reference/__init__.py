"""Pure-PyTorch reference implementations of every op: the CPU fallback and the oracle."""
