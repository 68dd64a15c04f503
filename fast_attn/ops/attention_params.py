"""What one attention call computes (``AttentionParams``) and how its sequences are laid
out (``Packing``): the Python twin of ``csrc/attention/attention_params.h``.

Each ``fast_attn::attention*`` custom op takes a flat schema (so torch.compile and
opcheck see plain arguments) and builds these two frozen objects once, inside the op;
from there every layer below (the one attention core in ``fast_attn/ops/_attention_core.py``,
the backends' ``attention_fwd(q, k, v, params, packing)`` /
``attention_bwd(dout, q, k, v, out, lse, params, packing, grads)``) passes them whole.

Layouts by ``Packing.kind``:

- ``"dense"``:  q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hkv, D)``, out like q, lse fp32 ``(B, H, Sq)``.
- ``"varlen"``: q ``(total_q, H, D)``, k/v ``(total_k, Hkv, D)``; sequence b is rows
  ``[cu_seqlens[b], cu_seqlens[b + 1])``; lse fp32 ``(H, total_q)``. Masks, ALiBi and the
  dropout counter use the padded ``(B, H, max_seqlen_q, max_seqlen_k)`` coordinates.
- ``"cache"``:  dense layouts, k/v are the KV caches ``(B, S_cache, Hkv, D)`` (the new
  keys already appended); row b attends to its first ``seqlens_k[b]`` keys (the whole
  cache when ``seqlens_k`` is None) with causal/window/ALiBi aligned to that length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

DENSE, VARLEN, CACHE = "dense", "varlen", "cache"


@dataclass(frozen=True)
class AttentionParams:
    """The options of one attention call, validated by the public function.

    Scores, in this order: ``s = softmax_scale * q.k``; with ``softcap > 0``
    ``s = softcap * tanh(s / softcap)``; ALiBi adds ``-slope * |i + Sk - Sq - j|``; a
    float ``attn_mask`` is added; then causal, window and a bool ``attn_mask`` (True =
    may attend) remove keys; dropout with the counter-hash keep-mask of ``dropout_seed``.
    """

    softmax_scale: float
    causal: bool = False
    window: tuple = (-1, -1)  # (left, right), -1 = unbounded on that side
    softcap: float = 0.0  # 0 = off
    dropout_p: float = 0.0
    dropout_seed: int = 0  # meaningful only when dropout_p > 0
    deterministic: bool = False  # bitwise-reproducible backward requested
    attn_mask: Optional[Tensor] = None  # bool or additive, broadcastable to (B, H, Sq, Sk)
    alibi_slopes: Optional[Tensor] = None  # fp32 (H,) or (B, H)

    @property
    def has_window(self) -> bool:
        return self.window[0] >= 0 or self.window[1] >= 0

    @property
    def has_band(self) -> bool:
        """Whether positions remove keys (causal or a window)."""
        return self.causal or self.has_window

    @property
    def mask_is_bool(self) -> bool:
        return self.attn_mask is not None and self.attn_mask.dtype == torch.bool


@dataclass(frozen=True)
class Packing:
    """How the call's sequences are laid out (see the module docstring)."""

    kind: str = DENSE
    cu_seqlens_q: Optional[Tensor] = None  # varlen: int32 (B + 1,)
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_q: int = 0  # varlen: the padded extents
    max_seqlen_k: int = 0
    seqlens_k: Optional[Tensor] = None  # cache: int32 (B,) keys per row after the append


DENSE_PACKING = Packing()


class BiasGrads(NamedTuple):
    """Which learned-bias gradients the backward must return (autograd asks per call)."""

    mask: bool = False  # d attn_mask (a float mask that requires grad)
    alibi: bool = False  # d alibi_slopes


NO_BIAS_GRADS = BiasGrads()
