"""Input checks shared by the context-parallel attention functions.

The per-tensor checks are the op layer's own (``fast_attn.ops._attention_core``), so the
messages match ``fast_attn.attention``'s; on top of them: an initialised process group,
a layout that can split the local shard, and one cheap cross-rank comparison of the
shapes and options (``_group.check_same_on_all_ranks``: one small all_reduce per call).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fast_attn.distributed._group import ProcessGroupInfo, check_same_on_all_ranks
from fast_attn.distributed.layout import LAYOUTS, check_layout
from fast_attn.ops import _attention_core as core


class CallOptions(NamedTuple):
    """The validated options of one context-parallel attention call."""

    causal: bool
    softmax_scale: float
    window: tuple[int, int]
    softcap: float
    deterministic: bool
    backend: str
    layout: str


def check_call(caller: str, q: Tensor, k: Tensor, v: Tensor, group, *, causal: bool,
               softmax_scale: Optional[float], window_size, softcap: float, alibi_slopes: Optional[Tensor],
               deterministic: bool, backend: str, layout: str,
               packed: bool = False) -> tuple[ProcessGroupInfo, CallOptions]:
    """Validates a call on this rank's shard; then compares shapes and options across ranks
    (dense calls; varlen calls compare their own sizes)."""
    core.check_qkv(q, k, v, q_ndim=3 if packed else 4,
                   layout="(total_local, Hkv, D)" if packed else "(B, S_local, Hkv, D)")
    seq_dim = 0 if packed else 1
    if k.shape[seq_dim] != q.shape[seq_dim]:
        raise ValueError(
            f"{caller} is self-attention over one sharded sequence: k must have q's local sequence "
            f"length {q.shape[seq_dim]}, got {k.shape[seq_dim]}"
        )
    check_layout(layout)
    batch = 1 if packed else q.shape[0]
    seqlen = q.shape[seq_dim]
    scale, window, softcap, _ = core.check_options(
        q, batch=batch, seqlen_q=seqlen, seqlen_k=seqlen, causal=causal, softmax_scale=softmax_scale,
        window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=None, dropout_p=0.0,
        dropout_seed=None, deterministic=deterministic, backend=backend,
    )
    if alibi_slopes is not None and alibi_slopes.requires_grad:
        raise NotImplementedError(f"{caller}: gradients for alibi_slopes are not implemented (pass a tensor "
                                  f"that does not require grad)")
    info = ProcessGroupInfo.of(group, q, caller=caller)
    if not packed and layout == "zigzag" and seqlen % 2 != 0:
        raise ValueError(
            f"q: the zigzag layout holds two equal chunks per rank, so the local sequence length "
            f"must be even, got {seqlen} (shard_sequence produces valid shards)"
        )
    opts = CallOptions(causal, scale, window, softcap, deterministic, backend, layout)
    if not packed:
        check_same_on_all_ranks(
            info,
            [*q.shape, k.shape[2], dtype_code(q.dtype), int(causal), *window,
             LAYOUTS.index(layout)],
            ["batch", "S_local", "heads", "head_dim", "kv_heads", "dtype(0=fp16,1=bf16,2=fp32,3=fp64)", "causal",
             "window_left", "window_right", "layout"],
            caller=caller,
        )
    return info, opts


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # a fixed order on every rank


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype)
