"""The "cuda" backend: thin adapters from the backend interface to the CUDA extension's
raw ops ``torch.ops.fast_attn.cuda_*`` (csrc/), one module per op family.

Every module exposes the names every backend module exposes (``attention_fwd`` /
``attention_bwd``, ``norm_fwd`` / ``norm_bwd``, ``bias_gelu_fwd`` / ``_bwd``,
``glu_fwd`` / ``glu_bwd``); ``ops()`` below is the one way to reach the raw ops: it loads
the extension (imports ``fast_attn._C`` or JIT-builds csrc/) on first use.
"""

from __future__ import annotations

import torch


def ops():
    """``torch.ops.fast_attn`` with the CUDA extension loaded (built or JIT-built on first use)."""
    from fast_attn._extension import load_extension

    load_extension()
    return torch.ops.fast_attn
