"""fast_attn.nn: drop-in replacements for torch.nn layers, running fast_attn's fused ops.

``MultiheadAttention``, ``LayerNorm``, ``RMSNorm``, ``TransformerEncoderLayer`` and
``TransformerDecoderLayer`` subclass their torch.nn twins: same constructor and defaults,
same forward signature and return values, same parameter names and state_dict (loads both
ways with ``strict=True``), same initialisation. Only ``forward`` changes: it calls
``fast_attn.attention`` / ``layer_norm`` / ``rms_norm`` / ``bias_gelu``, which run on the
CUDA or Triton kernels on a GPU and on the pure-PyTorch reference elsewhere.
``FeedForward`` is the fused MLP block and ``RotaryEmbedding`` rotates queries and
keys (GPT-NeoX / Llama conventions; no torch.nn twins). ``swap_modules(model)`` swaps
the torch.nn layers of an existing model in place, sharing its parameters. Padded
batches that ``torch.nn.TransformerEncoder`` turns into NestedTensors (eval, no grad,
``src_key_padding_mask``) reach the swapped layers as ``fast_attn.attention_varlen``
calls (see ``fast_attn.nn.transformer``).

    from fast_attn import nn as fnn
    layer = fnn.TransformerEncoderLayer(512, 8, batch_first=True, norm_first=True)
    layer.load_state_dict(torch_layer.state_dict())
"""

from fast_attn.nn.attention import MultiheadAttention
from fast_attn.nn.feedforward import FeedForward
from fast_attn.nn.norm import LayerNorm, RMSNorm
from fast_attn.nn.rotary import RotaryEmbedding
from fast_attn.nn.swap import swap_modules
from fast_attn.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "FeedForward",
    "LayerNorm",
    "MultiheadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "swap_modules",
]
