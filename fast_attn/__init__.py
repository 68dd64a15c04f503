"""fast_attn: fused attention, normalization and feed-forward kernels for PyTorch.

Every op runs on one of three backends ("cuda", "triton", "torch"; see
``fast_attn.backends``) behind one autograd API of torch.library custom ops, so
``torch.compile`` traces them. Importing this package compiles nothing and probes no GPU.

    import fast_attn
    out = fast_attn.attention(q, k, v, causal=True)        # (B, S, H, D)
    y, h = fast_attn.rms_norm(x, weight, residual=h)       # fused residual add
    fast_attn.available_backends()                         # what runs here, and why not
"""

from fast_attn.backends import available_backends, use_backend
from fast_attn.ops.attention import attention, dropout_mask
from fast_attn.ops.attention_kvcache import attention_with_kvcache
from fast_attn.ops.attention_varlen import attention_varlen
from fast_attn.ops.ffn import bias_gelu, geglu, swiglu
from fast_attn.ops.norm import layer_norm, rms_norm
from fast_attn.ops.rotary import rotary
from fast_attn.integrations.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from fast_attn.integrations.sdpa import scaled_dot_product_attention
from fast_attn import nn

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "available_backends",
    "bias_gelu",
    "dropout_mask",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "geglu",
    "layer_norm",
    "nn",
    "rms_norm",
    "rotary",
    "scaled_dot_product_attention",
    "swiglu",
    "use_backend",
]
