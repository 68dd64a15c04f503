"""Drop-in ``TransformerEncoderLayer`` and ``TransformerDecoderLayer`` built on fast_attn.

Each class subclasses its torch.nn twin: the constructor (``d_model, nhead,
dim_feedforward=2048, dropout=0.1, activation=F.relu, layer_norm_eps=1e-5,
batch_first=False, norm_first=False, bias=True, device=None, dtype=None``), its
initialisation (the same random draws, so a seed gives the same weights), the children
and the state_dict keys (``self_attn.*``, ``multihead_attn.*`` for the decoder,
``linear1``, ``linear2``, ``norm1..3``; dropouts and ``activation``, a string or a
callable) are torch's. The attention and norm children are the fast_attn.nn versions
(sharing the parameters torch's constructor created); Linear and Dropout stay torch's.

Forward signatures and maths are torch's (post-norm, or pre-norm with ``norm_first``; see
torch.nn.Transformer for the masks). The fused ops used:

- attention: ``self_attn``/``multihead_attn`` are fast_attn ``MultiheadAttention``
  (``need_weights=False``, the fast path);
- pre-norm (``norm_first=True``): each residual add is fused into the next LayerNorm,
  ``fast_attn.layer_norm(branch, residual=h) -> (norm(h + branch), h + branch)``;
- ``activation`` ``"gelu"``/``F.gelu``/``nn.GELU``: linear1's bias add and the GELU are one
  ``fast_attn.bias_gelu``; other activations (relu, any callable) run as given.

A fused step falls back to the plain module calls whenever it could differ: a child with
hooks or a replaced child class, or operands of different dtypes (autocast).

Padded batches through ``torch.nn.TransformerEncoder`` (``swap_modules`` keeps it):
in eval mode, without grad, with a ``src_key_padding_mask`` and
``enable_nested_tensor=True`` (torch's default; it needs ``batch_first``, post-norm,
relu/gelu and an even head count), the encoder turns the padded batch into a
NestedTensor of the real tokens, calls each layer on it and pads the result back with
zeros. ``TransformerEncoderLayer`` takes that NestedTensor as FlashAttention's varlen
packing (``fast_attn.nn._nested``): its buffer viewed as ``(total, E)`` tokens (no copy)
goes through the norms, the feed-forward block and the residuals token by token, and
self-attention runs as ``fast_attn.attention_varlen`` with ``cu_seqlens`` from the
nested lengths; the output is a NestedTensor with the same lengths, so the encoder's own
code (conversion, zero padding, final norm) is unchanged and the result is torch's,
padded positions (zeros before ``encoder.norm``) included. Intercepting in the layer
rather than replacing the encoder's forward keeps ``TransformerEncoder`` untouched and
also serves NestedTensors given to a layer directly. In every other case (training,
``norm_first``, a mask torch does not drop) the encoder passes the padded batch and the
padding mask, and the layer runs ``fast_attn.attention`` with that mask. A NestedTensor
the varlen path does not cover (masks besides it, ``is_causal``, a self_attn with hooks or
without ``batch_first``, jagged layout) is handed to torch.nn's own forward, as are
NestedTensors given to ``TransformerDecoderLayer`` (torch has no nested decoder path).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from fast_attn.nn._convert import adopt, plain_forward
from fast_attn.nn._nested import NestedPacking
from fast_attn.nn.attention import MultiheadAttention
from fast_attn.nn.feedforward import linear_gelu
from fast_attn.nn.norm import LayerNorm
from fast_attn.ops.norm import layer_norm

__all__ = ["TransformerEncoderLayer", "TransformerDecoderLayer"]

Activation = Union[str, Callable[[Tensor], Tensor]]


def _convert_children(layer: nn.Module, memo: Optional[dict] = None) -> None:
    """Replaces the layer's torch MultiheadAttention and LayerNorm children (exact types)
    by fast_attn ones sharing their parameters. ``memo`` maps id(old) -> new so a child
    shared between layers is converted once."""
    memo = {} if memo is None else memo
    for name, child in list(layer.named_children()):
        new = memo.get(id(child))
        if new is None:
            if type(child) is nn.MultiheadAttention:
                new = MultiheadAttention.from_torch(child)
            elif type(child) is nn.LayerNorm:
                new = LayerNorm.from_torch(child)
            else:
                continue
            memo[id(child)] = new
        setattr(layer, name, new)


def _gelu_approximation(activation) -> Optional[str]:
    """"none"/"tanh" if ``activation`` is torch's GELU (function or plain module), else None."""
    if activation is F.gelu:
        return "none"
    if isinstance(activation, nn.GELU) and plain_forward(activation, nn.GELU):
        return activation.approximate
    return None


def _add_norm(norm: nn.Module, branch: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """``(norm(residual + branch), residual + branch)``, fused into one LayerNorm pass
    when ``norm`` is a plain LayerNorm over the last dimension and the dtypes agree."""
    fusable = (
        plain_forward(norm, LayerNorm, nn.LayerNorm)
        and len(norm.normalized_shape) == 1
        and branch.dtype == residual.dtype
        and not branch.is_nested
    )
    if fusable:
        return layer_norm(branch, norm.weight, norm.bias, norm.eps, residual=residual)
    h = residual + branch
    return norm(h), h


def _feed_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """``linear2(dropout(activation(linear1(x))))``, bias+GELU fused when it applies."""
    approximate = _gelu_approximation(layer.activation)
    if approximate is not None:
        h = linear_gelu(layer.linear1, x, approximate)
    else:
        h = layer.activation(layer.linear1(x))
    return layer.linear2(layer.dropout(h))


class _FromTorch:
    """``from_torch`` for the encoder and decoder layers."""

    @classmethod
    def from_torch(cls, module: nn.Module, memo: Optional[dict] = None):
        """A fast_attn layer sharing ``module``'s children and parameters (no copies); its
        MultiheadAttention and LayerNorm children become fast_attn ones."""
        new = adopt(cls, module)
        _convert_children(new, memo)
        return new


class TransformerEncoderLayer(_FromTorch, nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` on fast_attn (self-attention, then the MLP).

    Args and forward as torch's: ``forward(src, src_mask=None, src_key_padding_mask=None,
    is_causal=False)``; src ``(S, N, E)``, ``(N, S, E)`` with ``batch_first``, or ``(S, E)``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                         activation=activation, layer_norm_eps=layer_norm_eps,
                         batch_first=batch_first, norm_first=norm_first, bias=bias,
                         device=device, dtype=dtype)
        _convert_children(self)

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        if src.is_nested:
            return self._nested_forward(src, src_mask, src_key_padding_mask, is_causal)
        return self._encode(src, lambda h: self._sa_block(h, src_mask, src_key_padding_mask, is_causal))

    def _encode(self, x: Tensor, self_attention: Callable[[Tensor], Tensor]) -> Tensor:
        """The layer's maths on x ``(..., E)``; ``self_attention`` is the dropped-out
        attention branch (padded batch or packed tokens)."""
        if self.norm_first:
            attn = self_attention(self.norm1(x))
            y, x = _add_norm(self.norm2, attn, x)  # x + attn, and its norm
            return x + self._ff_block(y)
        x = self.norm1(x + self_attention(x))
        return self.norm2(x + self._ff_block(x))

    def _nested_forward(self, src: Tensor, src_mask: Optional[Tensor],
                        src_key_padding_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """A NestedTensor (TransformerEncoder's padding-free fast path) as packed tokens:
        every per-token op on ``(total, E)``, self-attention by ``attention_varlen``."""
        packing = None
        attn = self.self_attn
        if (src_mask is None and src_key_padding_mask is None and not is_causal
                and plain_forward(attn, MultiheadAttention) and attn._varlen_ready()):
            packing = NestedPacking.of(src)
        if packing is None or packing.values.shape[-1] != attn.embed_dim:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)

        def self_attention(h: Tensor) -> Tensor:  # (total, E) -> (total, E)
            return self.dropout1(attn._varlen_attention(h, h, h, packing, packing))

        return packing.nested(self._encode(packing.values, self_attention))

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool = False) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(_feed_forward(self, x))


class TransformerDecoderLayer(_FromTorch, nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` on fast_attn (self-attention, cross-attention
    over ``memory``, then the MLP).

    Args and forward as torch's: ``forward(tgt, memory, tgt_mask=None, memory_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=False,
    memory_is_causal=False)``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                         activation=activation, layer_norm_eps=layer_norm_eps,
                         batch_first=batch_first, norm_first=norm_first, bias=bias,
                         device=device, dtype=dtype)
        _convert_children(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        if tgt.is_nested or memory.is_nested:
            return super().forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                                   memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        x = tgt
        if self.norm_first:
            attn = self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            y, x = _add_norm(self.norm2, attn, x)
            cross = self._mha_block(y, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            y, x = _add_norm(self.norm3, cross, x)
            return x + self._ff_block(y)
        x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                           memory_is_causal))
        return self.norm3(x + self._ff_block(x))

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool = False) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           is_causal=is_causal, need_weights=False)[0]
        return self.dropout1(x)

    def _mha_block(self, x: Tensor, mem: Tensor, attn_mask: Optional[Tensor],
                   key_padding_mask: Optional[Tensor], is_causal: bool = False) -> Tensor:
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(_feed_forward(self, x))
