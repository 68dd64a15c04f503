"""Fake (meta) functions of the CUDA extension's ops, ``torch.ops.fast_attn.cuda_*``.

The C++ side (csrc/) registers only CUDA kernels; these functions give each op its output
shapes, dtypes and devices without running it, so the raw ops work under FakeTensorMode,
torch.compile tracing and torch.export. Each one must agree with the allocation in the
op's ``*_ops.cpp`` (tests/ops/test_cuda_fakes.py checks them on CPU; the GPU tests check
them against the real kernels). ``register()`` runs once, from
``fast_attn._extension.load_extension`` after the extension has loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EMPTY = (0,)
_registered = False


def _like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _bias_gelu_fwd(x, bias, approximate_tanh):
    return _like(x)


def _bias_gelu_bwd(dy, x, bias, approximate_tanh):
    return _like(x), x.new_empty((x.shape[-1],) if bias is not None else _EMPTY)


def _glu_fwd(gate, up, activation):
    return _like(gate)


def _glu_bwd(dy, gate, up, activation):
    return _like(gate), _like(up)


def _norm_fwd(x, residual, weight, bias, eps, rms):
    rows = _rows(x)
    h = _like(x) if residual is not None else x.new_empty(_EMPTY)
    mean = x.new_empty(_EMPTY if rms else (rows,), dtype=torch.float32)
    return _like(x), h, mean, x.new_empty((rows,), dtype=torch.float32)


def _norm_bwd(dy, dh, inp, weight, mean, rstd, rms, want_dbias):
    # dweight and dbias come back in the weight's dtype (x's when there is no weight).
    width = inp.shape[-1]
    param_dtype = weight.dtype if weight is not None else inp.dtype
    dweight = inp.new_empty((width,) if weight is not None else _EMPTY, dtype=param_dtype)
    dbias = inp.new_empty((width,) if want_dbias else _EMPTY, dtype=param_dtype)
    return _like(inp), dweight, dbias


def _attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqlens_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale, causal, window_left, window_right, softcap, arch):
    if cu_seqlens_q is not None:  # varlen: q (total_q, H, D), lse (H, total_q)
        lse_shape = (q.shape[1], q.shape[0])
    else:  # q (B, Sq, H, D), lse (B, H, Sq)
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return _like(q), q.new_empty(lse_shape, dtype=torch.float32)


def _attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale, causal, window_left, window_right, softcap, deterministic, arch):
    return _like(q), _like(k), _like(v)


FAKES = {
    "cuda_bias_gelu_fwd": _bias_gelu_fwd,
    "cuda_bias_gelu_bwd": _bias_gelu_bwd,
    "cuda_glu_fwd": _glu_fwd,
    "cuda_glu_bwd": _glu_bwd,
    "cuda_norm_fwd": _norm_fwd,
    "cuda_norm_bwd": _norm_bwd,
    "cuda_attention_fwd": _attention_fwd,
    "cuda_attention_bwd": _attention_bwd,
}


def register() -> None:
    """Registers every fake function; idempotent. The extension must be loaded."""
    global _registered
    if _registered:
        return
    for name, fn in FAKES.items():
        torch.library.register_fake(f"fast_attn::{name}")(fn)
    _registered = True
