"""``FeedForward``: the transformer's position-wise MLP with fused activations.

    x (..., d_model) -> fc1 -> activation -> dropout -> fc2 -> (..., d_model)

``activation`` picks the middle step:

| activation    | fc1 output       | middle step                              | fused op            |
|---------------|------------------|------------------------------------------|---------------------|
| ``"gelu"``    | d_hidden         | ``gelu(x W1^T + b1)`` (exact erf)        | ``bias_gelu``       |
| ``"gelu_tanh"``| d_hidden        | ``gelu(x W1^T + b1, approximate="tanh")``| ``bias_gelu``       |
| ``"relu"``    | d_hidden         | ``relu(fc1(x))``                         | (none)              |
| ``"swiglu"``  | 2 * d_hidden     | ``silu(gate) * up``                      | ``swiglu``          |
| ``"geglu"``   | 2 * d_hidden     | ``gelu(gate) * up`` (exact erf)          | ``geglu``           |

For the GELU variants fc1 runs without its bias and ``fast_attn.bias_gelu`` adds it, so
the bias add and the activation are one pass over the hidden tensor. For the GLU
variants fc1 is one fused projection to ``2 * d_hidden`` features split as
``gate, up = fc1(x).chunk(2, dim=-1)``: the *first* half (rows ``[:d_hidden]`` of
``fc1.weight``) is the gate, the second half the up projection. To load separate
``W_gate``/``W_up`` matrices (e.g. Llama's ``gate_proj``/``up_proj``) use
``fc1.weight = cat([W_gate, W_up])``.

Parameters (state_dict keys): ``fc1.weight (d_hidden or 2 * d_hidden, d_model)``,
``fc1.bias``, ``fc2.weight (d_model, d_hidden)``, ``fc2.bias`` (biases only with
``bias=True``); both Linears use torch.nn.Linear's default initialisation.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from fast_attn.nn._convert import plain_forward
from fast_attn.ops.ffn import bias_gelu, geglu, swiglu

__all__ = ["FeedForward", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu")
_GLU = ("swiglu", "geglu")


def linear_gelu(linear: nn.Linear, x: Tensor, approximate: str) -> Tensor:
    """``gelu(linear(x), approximate)`` with the bias add fused into ``fast_attn.bias_gelu``.

    Falls back to the unfused module call when that would differ: ``linear`` is not a
    plain ``nn.Linear`` or has hooks, or (autocast) the bias and the product differ in dtype.
    """
    if plain_forward(linear, nn.Linear):
        h = F.linear(x, linear.weight)
        bias: Optional[Tensor] = linear.bias
        if bias is None or bias.dtype == h.dtype:
            return bias_gelu(h, bias, approximate)
    return F.gelu(linear(x), approximate=approximate)


class FeedForward(nn.Module):
    """``fc1 -> activation -> dropout -> fc2``; see the module docstring for the layout.

    Args:
        d_model: input and output features.
        d_hidden: hidden features (after the GLU product for "swiglu"/"geglu").
        activation: "gelu" (default), "gelu_tanh", "relu", "swiglu" or "geglu".
        bias: whether fc1 and fc2 have biases.
        dropout: dropout probability on the hidden activations (training only).
        device, dtype: of the parameters.

    Shapes: input ``(..., d_model)``, output ``(..., d_model)``, input's dtype.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.activation = activation
        fc1_out = 2 * d_hidden if activation in _GLU else d_hidden
        self.fc1 = nn.Linear(d_model, fc1_out, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=bias, **factory)

    def reset_parameters(self) -> None:
        """torch.nn.Linear's default initialisation of fc1 and fc2."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}"

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "gelu":
            h = linear_gelu(self.fc1, x, "none")  # (..., d_hidden)
        elif self.activation == "gelu_tanh":
            h = linear_gelu(self.fc1, x, "tanh")
        elif self.activation == "relu":
            h = F.relu(self.fc1(x))
        else:
            gate, up = self.fc1(x).chunk(2, dim=-1)  # 2 x (..., d_hidden) views
            h = swiglu(gate, up) if self.activation == "swiglu" else geglu(gate, up)
        return self.fc2(self.dropout(h))
