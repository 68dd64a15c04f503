"""The "torch" backend: our ops on ATen's fused kernels, plain maths where ATen has none.

Each module keeps the contract every backend module keeps (``attention_fwd`` /
``attention_bwd``, ``norm_fwd`` / ``norm_bwd``, ``bias_gelu_*`` / ``glu_*``, ``rotary``): plain
functions, no autograd, no input checks (the op layer in ``fast_attn/ops`` does both).
Independent of ``fast_attn.reference``, which stays the oracle these are tested against.
"""

from fast_attn.torch_backend.attention import attention_bwd, attention_fwd
from fast_attn.torch_backend.ffn import bias_gelu_bwd, bias_gelu_fwd, glu_bwd, glu_fwd
from fast_attn.torch_backend.norm import norm_bwd, norm_fwd
from fast_attn.torch_backend.rotary import rotary

__all__ = [
    "attention_fwd",
    "attention_bwd",
    "norm_fwd",
    "norm_bwd",
    "bias_gelu_fwd",
    "bias_gelu_bwd",
    "glu_fwd",
    "glu_bwd",
    "rotary",
]
