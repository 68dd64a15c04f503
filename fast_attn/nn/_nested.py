"""Nested-tensor (padded-batch) inputs as FlashAttention's varlen packing.

``torch.nn.TransformerEncoder`` in eval mode with a ``src_key_padding_mask`` (its
inference "fast path", ``enable_nested_tensor=True``) drops the padding: it turns the
padded batch into a strided NestedTensor with ``torch._nested_tensor_from_mask``, calls
each layer on it, and pads the result back with zeros (``to_padded_tensor(0.0, ...)``).
A contiguous strided NestedTensor of B sequences ``(S_b, E)`` stores exactly the
varlen layout: its buffer is the ``(total, E)`` tokens, sequence after sequence. So the
fast_attn layers view the buffer as ``(total, E)`` (no copy), run every per-token op on
it and self-attention as ``fast_attn.attention_varlen`` with ``cu_seqlens`` built from
the nested sizes (held on the host: no device sync), and view the ``(total, E_out)``
result as a NestedTensor with the same lengths. Autograd flows through both views.

Only strided NestedTensors of B matrices with one feature size are taken; jagged-layout
ones (``layout=torch.jagged``) and anything else make ``NestedPacking.of`` return None,
and the caller hands the input to torch.nn's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["NestedPacking"]


@dataclass(frozen=True)
class NestedPacking:
    """The varlen packing of a strided NestedTensor ``(B, S_b, E)``.

    values: ``(total, E)``, the tokens of sequence b in rows ``[cu_seqlens[b], cu_seqlens[b+1])``.
    cu_seqlens: int32 ``(B + 1,)`` on the tensor's device; host_cu_seqlens: int64 ``(B + 1,)``
    on the host (to rebuild the NestedTensor without a device sync).
    """

    values: Tensor
    cu_seqlens: Tensor
    host_cu_seqlens: Tensor
    max_seqlen: int

    @staticmethod
    def of(nested: Tensor) -> Optional["NestedPacking"]:
        """The packing of ``nested``, or None if it is not a strided NestedTensor of
        matrices sharing one feature size."""
        if not nested.is_nested or nested.layout != torch.strided or nested.dim() != 3:
            return None
        sizes = nested._nested_tensor_size()  # (B, 2) int64 on the host: (S_b, E)
        batch = sizes.shape[0]
        if batch == 0 or bool((sizes[:, 1] != sizes[0, 1]).any()):
            return None
        if not nested.is_contiguous():
            nested = nested.contiguous()  # a contiguous buffer is the varlen layout
        features = int(sizes[0, 1])
        lengths = sizes[:, 0]
        host_cu = torch.zeros(batch + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=host_cu[1:])
        values = nested.values().view(-1, features)  # (total, E)
        cu_seqlens = host_cu.to(device=nested.device, dtype=torch.int32)
        return NestedPacking(values, cu_seqlens, host_cu, int(lengths.max()))

    def nested(self, values: Tensor) -> Tensor:
        """``values`` ``(total, F)`` (any F) as a NestedTensor with these lengths (a view
        when ``values`` is contiguous)."""
        features = values.shape[-1]
        lengths = self.host_cu_seqlens.diff()  # (B,)
        sizes = torch.stack((lengths, torch.full_like(lengths, features)), dim=1)  # (B, 2)
        strides = torch.stack((torch.full_like(lengths, features), torch.ones_like(lengths)), dim=1)
        offsets = self.host_cu_seqlens[:-1] * features
        return torch._nested_view_from_buffer(values.contiguous().view(-1), sizes, strides, offsets)
