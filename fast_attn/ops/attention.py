"""Dense attention: the custom ops, their autograd, and the public ``attention``.

Public functions (layout ``(batch, seqlen, heads, head_dim)``, FlashAttention's):

- ``attention(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap,
  attn_mask, dropout_p, dropout_seed, return_lse, deterministic, backend)``
- ``dropout_mask(...)``: the keep-mask a call with a given ``dropout_seed`` used.

Packed sequences live in ``attention_varlen.py`` and the KV-cache decode step in
``attention_kvcache.py``; all three keep the conventions below and share one core
(``_attention_core.py``).

Scores are computed in this order (DESIGN.md): ``s = softmax_scale * q.k``; with
``softcap > 0``, ``s = softcap * tanh(s / softcap)``; ALiBi adds
``-slope * |i + Sk - Sq - j|``; an additive ``attn_mask`` is added; then the causal,
window and bool masks remove keys. Causal with ``Sq != Sk`` is aligned bottom-right::

    Sq=2, Sk=5, causal=True      (1 = may attend)
        k: 0 1 2 3 4
    q0:    1 1 1 1 0
    q1:    1 1 1 1 1

A query row that sees no key gets output 0 and LSE ``-inf`` (and zero gradients).
``lse`` is ``log(sum(exp(s)))`` over the kept keys, fp32 ``(B, H, Sq)`` (varlen:
``(H, total_q)``); it carries no gradient. A float ``attn_mask`` or ``alibi_slopes`` that
requires grad gets its gradient (a learned bias); only the torch backend computes those.

Dropout drops entries of the normalised attention matrix with probability ``dropout_p``
and scales the rest by ``1 / (1 - dropout_p)``. The keep-mask is a counter-based hash of
``(dropout_seed, b, h, i, j)`` shared by every backend, so the forward and the backward
see the same mask and ``dropout_mask(seed, ...)`` recovers it for verification. When
``dropout_seed`` is None a seed is drawn from torch's default CPU generator, so
``torch.manual_seed`` makes a run reproducible.

Each public function validates its inputs and calls a ``fast_attn::attention*`` custom op;
the op builds the call's ``AttentionParams`` and ``Packing`` (attention_params.py) and runs
the one attention core (``_attention_core.py``), which asks ``fast_attn.backends`` which
backend runs the call.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fast_attn import _dropout_hash
from fast_attn.ops import _attention_core as core
from fast_attn.ops.attention_params import DENSE, DENSE_PACKING

OP = "attention"

# ------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fast_attn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_seed: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out (B, Sq, H, D), lse fp32 (B, H, Sq))."""
    params = core.params_from_schema(attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale,
                                     window_left, window_right, softcap, dropout_p, deterministic)
    return core.fwd(OP, q, k, v, params, DENSE_PACKING, backend)


@torch.library.custom_op("fast_attn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_seed: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    mask_grad: bool,
    alibi_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask, dslopes); dk/dv are summed over the query heads that share a
    K/V head; dmask/dslopes are empty unless mask_grad/alibi_grad ask for them."""
    params = core.params_from_schema(attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale,
                                     window_left, window_right, softcap, dropout_p, deterministic)
    grads = core.BiasGrads(mask_grad, alibi_grad)
    return core.bwd(OP, dout, q, k, v, out, lse, params, DENSE_PACKING, grads, backend)


_eager_fwd, _ = core.register(attention_fwd, attention_bwd, OP, DENSE, packing_arity=0)


# -------------------------------------------------------------------------- public API


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
):
    """Scaled dot-product attention, FlashAttention layout.

    Args:
        q: ``(B, Sq, H, D)``, float16/bfloat16/float32/float64. Any strides with a
            contiguous last dimension; ``(B, H, S, D)`` tensors are passed as
            ``x.transpose(1, 2)`` views.
        k, v: ``(B, Sk, Hkv, D)``, q's dtype and device; ``H % Hkv == 0`` (GQA/MQA).
        causal: mask keys after the query, bottom-right aligned when ``Sq != Sk``.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        window_size: ``(left, right)``: query i keeps keys
            ``j in [i + Sk - Sq - left, i + Sk - Sq + right]``; -1 = unbounded.
        alibi_slopes: float32 ``(H,)`` or ``(B, H)``: adds ``-slope * |i + Sk - Sq - j|``.
        softcap: > 0 applies ``softcap * tanh(s / softcap)`` to the scaled scores.
        attn_mask: bool (True = may attend) or additive float, broadcastable to
            ``(B, H, Sq, Sk)``.
        dropout_p: dropout probability in [0, 1) on the attention matrix.
        dropout_seed: seed of the dropout mask (see ``dropout_mask``); drawn from torch's
            default generator when None.
        return_lse: also return the log-sum-exp, fp32 ``(B, H, Sq)`` (no gradient).
        deterministic: ask for a bitwise-reproducible backward.
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        ``out (B, Sq, H, D)`` in q's dtype, or ``(out, lse)`` with ``return_lse``.
    """
    core.check_qkv(q, k, v, q_ndim=4, layout="(B, Sk, Hkv, D)")
    batch, seqlen_q, _, _ = q.shape
    softmax_scale, window, softcap, dropout_p = core.check_options(
        q, batch=batch, seqlen_q=seqlen_q, seqlen_k=k.shape[1], causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=dropout_seed,
        deterministic=deterministic, backend=backend,
    )
    out, lse = _eager_fwd(
        q, k, v, attn_mask, alibi_slopes, core.seed_tensor(dropout_p, dropout_seed), causal,
        softmax_scale, window[0], window[1], softcap, dropout_p, deterministic, backend,
    )
    return (out, lse) if return_lse else out


def dropout_mask(
    dropout_seed: int,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """The bool keep-mask ``(B, H, Sq, Sk)`` (True = kept) that ``attention(...,
    dropout_p=dropout_p, dropout_seed=dropout_seed)`` applies, on every backend.

    For ``attention_varlen`` pass the padded sizes ``(B, H, max_seqlen_q, max_seqlen_k)``:
    sequence b uses ``mask[b, :, :Sq_b, :Sk_b]``.
    """
    return _dropout_hash.keep_mask(dropout_seed, batch, heads, seqlen_q, seqlen_k, dropout_p, device)
