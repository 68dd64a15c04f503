"""Route a reference GPT's training attention through a context-parallel scheme.

``enable_context_parallel(model, group, scheme, layout)`` sets the ``attention_fn`` hook of
every ``CausalSelfAttention`` in ``model`` (``fast_attn.models.gpt``) to ``ring_attention`` or
``ulysses_attention`` on ``group``; ``disable_context_parallel`` puts ``fast_attn.attention``
back. With the hook unset the model runs exactly as before (the hook is read only when it
is set). The caller feeds each rank its shard of the tokens with their global positions::

    enable_context_parallel(model, cp_group, "ring", "zigzag")
    pos = shard_positions(T, cp_group, "zigzag")                 # (T / W,)
    logits = model(shard_sequence(idx, cp_group, "zigzag"), position_ids=pos)

Only the KV-cache-free path (training, evaluation of whole sequences) is routed;
generation with a KV cache stays single-process. Attention dropout is not supported
under context parallelism (NotImplementedError when the model asks for it).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.distributed as dist
from torch import Tensor, nn

from fast_attn.distributed.layout import check_layout
from fast_attn.distributed.ring import ring_attention
from fast_attn.distributed.ulysses import ulysses_attention

__all__ = ["SCHEMES", "context_parallel_attention", "enable_context_parallel", "disable_context_parallel"]

SCHEMES = {"ring": ring_attention, "ulysses": ulysses_attention}


def context_parallel_attention(group: Optional[dist.ProcessGroup], scheme: str = "ring",
                               layout: str = "zigzag") -> Callable:
    """An ``attention(q, k, v, causal=..., dropout_p=...)`` for the model's hook."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
    check_layout(layout)
    fn = SCHEMES[scheme]

    def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, dropout_p: float = 0.0) -> Tensor:
        if dropout_p > 0.0:
            raise NotImplementedError(f"{scheme} context parallelism has no attention dropout; build the model "
                                      f"with attn_dropout=0.0")
        return fn(q, k, v, group=group, causal=causal, layout=layout)

    return attend


def _attention_modules(model: nn.Module) -> list:
    found = [m for m in model.modules() if hasattr(m, "attention_fn")]
    if not found:
        raise TypeError(f"{type(model).__name__} has no attention with a context-parallel hook (attention_fn); "
                        f"the GPT of fast_attn.models has one")
    return found


def enable_context_parallel(model: nn.Module, group: Optional[dist.ProcessGroup], scheme: str = "ring",
                            layout: str = "zigzag") -> nn.Module:
    attend = context_parallel_attention(group, scheme, layout)
    for module in _attention_modules(model):
        module.attention_fn = attend
    return model


def disable_context_parallel(model: nn.Module) -> nn.Module:
    for module in _attention_modules(model):
        module.attention_fn = None
    return model
