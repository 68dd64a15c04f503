"""The "cuda" backend of the feed-forward activations: the backend interface over
csrc/ffn/ (``torch.ops.fast_attn.cuda_bias_gelu_*``, ``cuda_glu_*``).

bias_gelu's raw ops take 2-D rows; the GLU ops read ``(..., N)`` views with any row
strides themselves (no reshape, no copy here).
"""

from __future__ import annotations

from fast_attn.cuda_backend import ops


def _rows(t, width):
    """``t`` as (rows, width) with a unit last stride (copies only when it lacks one)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        t = t.contiguous()
    return t.reshape(-1, width)


def bias_gelu_fwd(x, bias, approximate):
    y = ops().cuda_bias_gelu_fwd(_rows(x, x.shape[-1]), bias, approximate == "tanh")
    return y.reshape(x.shape)


def bias_gelu_bwd(dy, x, bias, approximate):
    width = x.shape[-1]
    dx, dbias = ops().cuda_bias_gelu_bwd(_rows(dy, width), _rows(x, width), bias, approximate == "tanh")
    return dx.reshape(x.shape), (dbias if bias is not None else None)


def glu_fwd(gate, up, activation):
    """``activation(gate) * up``; activation is "silu", "gelu" or "gelu_tanh"."""
    return ops().cuda_glu_fwd(gate, up, activation)


def glu_bwd(dy, gate, up, activation):
    return ops().cuda_glu_bwd(dy, gate, up, activation)
