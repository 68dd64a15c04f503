"""Drop-in ``MultiheadAttention``: torch.nn.MultiheadAttention running ``fast_attn.attention``.

The class subclasses ``torch.nn.MultiheadAttention`` and only replaces ``forward``: the
constructor (``embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None``),
its initialisation, the parameters (``in_proj_weight`` or ``q/k/v_proj_weight`` when
kdim/vdim differ from embed_dim, ``in_proj_bias``, ``out_proj`` (a
``NonDynamicallyQuantizableLinear``), ``bias_k``, ``bias_v``) and the state_dict are
torch's own, so checkpoints load both ways.

Forward: ``(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None)``, with
torch's semantics:

- shapes ``(L, N, E)`` (``batch_first=False``), ``(N, L, E)`` (``batch_first=True``) or
  unbatched ``(L, E)``; key/value ``(S, N, kdim/vdim)`` likewise;
- ``key_padding_mask (N, S)`` (unbatched ``(S,)``): bool True = *ignore this key*, or
  additive float;
- ``attn_mask (L, S)`` or ``(N * num_heads, L, S)``: bool True = *not allowed* (the
  opposite of ``fast_attn.attention``'s convention, converted here), or additive float.
  A float mask that requires grad gets its gradient;
- ``is_causal`` is a hint that ``attn_mask`` is the causal mask and needs ``attn_mask``
  (``RuntimeError`` otherwise, as torch). Like torch, when no key_padding_mask is given
  and ``need_weights=False`` the mask is then replaced by the causal rule, which for
  ``L != S`` is torch's *top-left* one (query i sees keys ``j <= i``); otherwise the
  given mask is used as is;
- attention dropout only in training mode.

Two paths:

- ``need_weights=False`` (what the Transformer layers use): the projections are viewed as
  ``(N, L, H, D)`` tensors (no copies beyond the projection itself; ``bias_k`` and
  ``add_zero_attn`` append one key by concatenation) and ``fast_attn.attention`` runs
  on the fastest backend that can do the call.
- ``need_weights=True`` (torch's default!): the *slower, exact* path. The weights are
  materialised as ``softmax(q k^T / sqrt(D) + mask)`` in fp32 (fp64 for fp64 inputs),
  dropped out in training as torch does, and ``weights @ v`` gives the output; the
  returned weights are the ones used, averaged over heads or per head. Pass
  ``need_weights=False`` for speed.

Differences from torch.nn:

- A query row whose keys are all masked gives output 0 and (need_weights) weights 0 on
  both paths; torch gives NaN on its need_weights path (0 on its SDPA path).
- Dropout draws a different random mask (fast_attn's counter-based one) than torch.
- Shape and dtype errors raise ``ValueError``/``TypeError`` (torch: ``AssertionError``).
- NestedTensor inputs (strided, ``(B, S_b, E)``, as ``torch.nn.TransformerEncoder``
  makes them) run as ``fast_attn.attention_varlen`` when torch's fast path would take
  them: ``batch_first``, no masks (the nesting is the padding), ``need_weights=False``,
  no ``is_causal``, no bias_k/bias_v/add_zero_attn; the result is a NestedTensor with
  the query's lengths (see ``fast_attn.nn._nested``). Unlike torch's fast path this
  also runs in training mode (with attention dropout) and with gradients. Other nested
  calls (``need_weights=True``, masks, jagged layout) are handed to torch.nn's forward.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fast_attn.nn._convert import adopt
from fast_attn.nn._nested import NestedPacking
from fast_attn.ops.attention import attention
from fast_attn.ops.attention_varlen import attention_varlen

__all__ = ["MultiheadAttention"]


def _check_mask_dtype(name: str, mask: Optional[Tensor]) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or a floating dtype, got {mask.dtype}")


def _blocked_to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A torch-convention mask (bool True = blocked, or float) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _append_key(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Pads a (..., S) torch-convention mask with one allowed key column."""
    if mask is None:
        return None
    return F.pad(mask, (0, 1), value=False if mask.dtype == torch.bool else 0.0)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed by ``fast_attn.attention``; see the module
    docstring for the semantics, the two paths and the differences from torch."""

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """A fast_attn MultiheadAttention sharing ``module``'s parameters and hooks (no copies)."""
        return adopt(cls, module)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            out = None
            if key_padding_mask is None and attn_mask is None and not need_weights and not is_causal:
                out = self._nested_attention(query, key, value)
            if out is None:  # what the varlen path does not cover: torch's rules (and errors)
                return super().forward(query, key, value, key_padding_mask, need_weights,
                                       attn_mask, average_attn_weights, is_causal)
            return out, None
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=2)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (torch.nn.MultiheadAttention's "
                "rule). You may use torch.nn.Transformer.generate_square_subsequent_mask."
            )

        q, k, v = self._project(query, key, value, batched)  # (N, L, H, D), (N, S, H, D) x2
        batch, seqlen_q, heads, head_dim = q.shape
        seqlen_k = k.shape[1]

        # Masks in torch's convention, broadcastable to (N, H, L, S).
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.reshape(batch, 1, 1, seqlen_k)
        if attn_mask is not None:
            attn_mask = (attn_mask.reshape(1, 1, seqlen_q, seqlen_k) if attn_mask.dim() == 2
                         else attn_mask.reshape(batch, heads, seqlen_q, seqlen_k))
        # Use the causal rule instead of the mask when torch would (see the module docstring).
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if use_causal:
            attn_mask = None

        # bias_k/bias_v, then a zero key/value: one more key each, allowed by every mask.
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, 1, heads, head_dim).expand(batch, 1, -1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, heads, head_dim).expand(batch, 1, -1, -1)], dim=1)
            attn_mask, key_padding_mask = _append_key(attn_mask), _append_key(key_padding_mask)
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, 1, heads, head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask, key_padding_mask = _append_key(attn_mask), _append_key(key_padding_mask)

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            mask = self._additive_mask(attn_mask, key_padding_mask, q.dtype)
            out, weights = self._attention_with_weights(q, k, v, mask, dropout_p)  # (N, L, H, D)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = self._fast_attention(q, k, v, attn_mask, key_padding_mask, use_causal, dropout_p)
            weights = None

        out = out.flatten(2)  # (N, L, E)
        if batched and not self.batch_first:
            out = out.transpose(0, 1)  # (L, N, E): out_proj then writes a contiguous result
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    # ------------------------------------------------------------------------ pieces

    def _varlen_ready(self) -> bool:
        """Whether packed (varlen) inputs can run here: torch's NestedTensor rules
        (``batch_first``; no bias_k/bias_v or add_zero_attn, which append a key per sequence)."""
        return (self.batch_first and self.bias_k is None and self.bias_v is None
                and not self.add_zero_attn)

    def _varlen_attention(self, query: Tensor, key: Tensor, value: Tensor, q_packing: NestedPacking,
                         kv_packing: NestedPacking) -> Tensor:
        """Attention over packed tokens: query ``(total_q, E)``, key/value ``(total_k,
        kdim/vdim)``, sequence b in the rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` of its
        packing; returns ``(total_q, E)``. Pass the same tensor object for query, key and
        value (self-attention) to get one in-projection. Needs ``_varlen_ready()``."""
        q, k, v = (t.squeeze(0) for t in self._project(query, key, value, batched=False))  # (total, H, D)
        out = attention_varlen(q, k, v, q_packing.cu_seqlens, kv_packing.cu_seqlens,
                               q_packing.max_seqlen, kv_packing.max_seqlen,
                               dropout_p=self.dropout if self.training else 0.0)
        return F.linear(out.flatten(1), self.out_proj.weight, self.out_proj.bias)

    def _nested_attention(self, query: Tensor, key: Tensor, value: Tensor) -> Optional[Tensor]:
        """NestedTensor (B, S_b, E) inputs by ``attention_varlen``; None where torch's own
        forward must decide (see ``_varlen_ready``, ``NestedPacking.of``)."""
        if not (query.is_nested and key.is_nested and value.is_nested) or not self._varlen_ready():
            return None
        q_packing = NestedPacking.of(query)
        k_packing = q_packing if key is query else NestedPacking.of(key)
        v_packing = k_packing if value is key else NestedPacking.of(value)
        if q_packing is None or k_packing is None or v_packing is None:
            return None
        if not torch.equal(v_packing.host_cu_seqlens, k_packing.host_cu_seqlens):
            return None  # keys and values of different lengths
        features = (q_packing.values.shape[-1], k_packing.values.shape[-1], v_packing.values.shape[-1])
        if features != (self.embed_dim, self.kdim, self.vdim):
            return None
        # Keep the identities _project uses to share one in-projection.
        q = q_packing.values
        k = q if key is query else k_packing.values
        v = k if value is key else v_packing.values
        return q_packing.nested(self._varlen_attention(q, k, v, q_packing, k_packing))


    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Shape checks (torch's rules); returns whether the input is batched."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (L, E) or 3-D (batched), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"key and value must be {query.dim()}-D like query, got shapes "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must have embed_dim={self.embed_dim} features, got {query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"key and value must have kdim={self.kdim} and vdim={self.vdim} features, got "
                f"{key.shape[-1]} and {value.shape[-1]}"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree in all but the last dimension, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if batched:
            batch_dim = 0 if self.batch_first else 1
            seq_dim = 1 - batch_dim
            batch = query.shape[batch_dim]
            if key.shape[batch_dim] != batch:
                raise ValueError(f"key must have query's batch size {batch}, got shape {tuple(key.shape)}")
            seqlen_q, seqlen_k = query.shape[seq_dim], key.shape[seq_dim]
        else:
            batch, seqlen_q, seqlen_k = 1, query.shape[0], key.shape[0]
        if key_padding_mask is not None:
            expected = (batch, seqlen_k) if batched else (seqlen_k,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask must have shape {expected}, got {tuple(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            allowed = ((seqlen_q, seqlen_k), (batch * self.num_heads, seqlen_q, seqlen_k))
            if tuple(attn_mask.shape) not in allowed:
                raise ValueError(
                    f"attn_mask must have shape {allowed[0]} or {allowed[1]} "
                    f"(L, S) / (N * num_heads, L, S), got {tuple(attn_mask.shape)}"
                )
        return batched

    def _project(self, query: Tensor, key: Tensor, value: Tensor, batched: bool):
        """The in-projections as (N, seqlen, H, D) views of the projection outputs."""
        embed, heads = self.embed_dim, self.num_heads
        split = (heads, self.head_dim)
        batch_first = self.batch_first or not batched

        def bshd(t: Tensor) -> Tensor:  # (..., E) in the input layout -> (N, S, H, D) view
            if not batched:
                t = t.unsqueeze(0)
            elif not batch_first:
                t = t.transpose(0, 1)
            return t.unflatten(-1, split)

        if not self._qkv_same_embed_dim:
            bias_q = bias_k = bias_v = None
            if self.in_proj_bias is not None:
                bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
            return (bshd(F.linear(query, self.q_proj_weight, bias_q)),
                    bshd(F.linear(key, self.k_proj_weight, bias_k)),
                    bshd(F.linear(value, self.v_proj_weight, bias_v)))

        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:  # self-attention: one projection
            qkv = bshd(F.linear(query, weight, bias).unflatten(-1, (3, embed)))  # (N, S, 3, H, D)
            return qkv.unbind(dim=2)
        weights = weight.split(embed)
        biases = bias.split(embed) if bias is not None else (None, None, None)
        q = bshd(F.linear(query, weights[0], biases[0]))
        if key is value:  # encoder-decoder attention: one projection for k and v
            kv_bias = bias[embed:] if bias is not None else None
            kv = bshd(F.linear(key, weight[embed:], kv_bias).unflatten(-1, (2, embed)))  # (N, S, 2, H, D)
            return (q, *kv.unbind(dim=2))
        return (q, bshd(F.linear(key, weights[1], biases[1])),
                bshd(F.linear(value, weights[2], biases[2])))

    @staticmethod
    def _additive_mask(attn_mask, key_padding_mask, dtype) -> Optional[Tensor]:
        """torch's rule: both masks as additive floats, summed (broadcast to (N, H, L, S))."""
        masks = [_blocked_to_additive(m, dtype) for m in (attn_mask, key_padding_mask) if m is not None]
        if not masks:
            return None
        return masks[0] if len(masks) == 1 else masks[0] + masks[1]

    def _fast_attention(self, q, k, v, attn_mask, key_padding_mask, use_causal, dropout_p):
        """fast_attn.attention with the masks in its convention (bool True = may attend)."""
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        causal, window, mask = False, (-1, -1), None
        if use_causal:
            # torch's causal rule is top-left: query i sees keys j <= i. fast_attn's is
            # bottom-right (j <= i + S - L): equal when L == S; for L > S a window of
            # L - S keys to the right of the diagonal shifts it; for L < S, a mask.
            if seqlen_q == seqlen_k:
                causal = True
            elif seqlen_q > seqlen_k:
                window = (-1, seqlen_q - seqlen_k)
            else:
                mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).tril_()
        elif attn_mask is not None or key_padding_mask is not None:
            given = [m for m in (attn_mask, key_padding_mask) if m is not None]
            if all(m.dtype == torch.bool for m in given):
                blocked = given[0] if len(given) == 1 else given[0] | given[1]
                mask = ~blocked
            else:
                mask = self._additive_mask(attn_mask, key_padding_mask, q.dtype)
        out = attention(q, k, v, causal=causal, window_size=window, attn_mask=mask, dropout_p=dropout_p)
        return out  # (N, L, H, D)

    @staticmethod
    def _attention_with_weights(q, k, v, mask, dropout_p):
        """The exact weights path: (out (N, L, H, D), weights (N, H, L, S)) in q's dtype."""
        dtype = q.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        q_, k_, v_ = (t.transpose(1, 2).to(compute) for t in (q, k, v))  # (N, H, seqlen, D)
        scores = (q_ * (1.0 / math.sqrt(q.shape[-1]))) @ k_.transpose(-2, -1)  # (N, H, L, S)
        if mask is not None:
            scores = scores + mask.to(compute)
        # A row with every key masked gets weights 0 (not NaN), and no NaN gradient.
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        out = (weights @ v_).transpose(1, 2).to(dtype)  # (N, L, H, D)
        return out, weights.to(dtype)
