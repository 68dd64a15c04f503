"""Dense attention: the custom ops, their autograd, and the public ``attention``.

Public functions (layout ``(batch, seqlen, heads, head_dim)``, FlashAttention's):

- ``attention(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap,
  attn_mask, dropout_p, dropout_seed, return_lse, deterministic, backend)``
- ``dropout_mask(...)``: the keep-mask a call with a given ``dropout_seed`` used.

Packed sequences live in ``attention_varlen.py`` and the KV-cache decode step in
``attention_kvcache.py``; all three keep the conventions below and share their checks
(``_attention_common.py``).

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

Each public function validates its inputs and calls a ``fast_attn::attention*`` custom op
whose implementation asks ``fast_attn.backends`` which backend runs the call.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _attention_common as common
from fast_attn.ops import _attention_cuda
from fast_attn.ops._reference_grad import reference_vjp
from fast_attn.reference.attention import attention_ref, dropout_keep_mask

# ------------------------------------------------------------------------- dense: ops


def _attention_torch(q, k, v, attn_mask, alibi_slopes, seed, causal, softmax_scale,
                     window, softcap, dropout_p):
    return attention_ref(
        q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window,
        alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=attn_mask,
        dropout_p=dropout_p, dropout_seed=seed,
    )


def _attention_bwd_torch(dout, q, k, v, out, lse, attn_mask, alibi_slopes, seed, causal,
                         softmax_scale, window, softcap, dropout_p, deterministic, mask_grad,
                         alibi_grad):
    def fn(q_, k_, v_, mask_, slopes_):
        return _attention_torch(q_, k_, v_, mask_, slopes_, seed, causal, softmax_scale,
                                window, softcap, dropout_p)[0]

    return reference_vjp(fn, (q, k, v, attn_mask, alibi_slopes), (dout,),
                         differentiable=(True, True, True, mask_grad, alibi_grad))


# Kernels by backend. A kernel issue adds its "triton"/"cuda" entries here and its
# CAPABILITIES in fast_attn/backends.py.
def _attention_triton(q, k, v, attn_mask, alibi_slopes, seed, causal, softmax_scale,
                      window, softcap, dropout_p):
    from fast_attn.triton_kernels import attention as triton_attention  # imports triton only when used

    return triton_attention.attention_fwd(q, k, v, attn_mask, alibi_slopes, seed, causal,
                                          softmax_scale, window, softcap, dropout_p)


def _attention_bwd_triton(dout, q, k, v, out, lse, attn_mask, alibi_slopes, seed, causal,
                          softmax_scale, window, softcap, dropout_p, deterministic, mask_grad,
                          alibi_grad):
    from fast_attn.triton_kernels import attention as triton_attention

    return triton_attention.attention_bwd(dout, q, k, v, out, lse, attn_mask, alibi_slopes, seed,
                                          causal, softmax_scale, window, softcap, dropout_p,
                                          deterministic, mask_grad, alibi_grad)


_FWD = {"torch": _attention_torch, "triton": _attention_triton, "cuda": _attention_cuda.attention_fwd}
_BWD = {"torch": _attention_bwd_torch, "triton": _attention_bwd_triton, "cuda": _attention_cuda.attention_bwd}


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
    window = (window_left, window_right)
    call = common.call_summary("attention", q, k, causal=causal, window=window, alibi_slopes=alibi_slopes,
                 softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p,
                 deterministic=deterministic, backward=False)
    name = backends.resolve_backend(call, backend)
    if q.numel() == 0 or k.shape[1] == 0:
        batch, seqlen_q, heads, _ = q.shape
        return common.empty_outputs(q, (batch, heads, seqlen_q))
    out, lse = _FWD[name](q, k, v, attn_mask, alibi_slopes, common.seed_int(dropout_seed, dropout_p),
                          causal, softmax_scale, window, softcap, dropout_p)
    return out, lse.float()


@attention_fwd.register_fake
def _(q, k, v, attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale, window_left,
      window_right, softcap, dropout_p, deterministic, backend):
    batch, seqlen_q, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


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
    window = (window_left, window_right)
    call = common.call_summary("attention", q, k, causal=causal, window=window, alibi_slopes=alibi_slopes,
                 softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p,
                 deterministic=deterministic, backward=True, mask_grad=mask_grad,
                 alibi_grad=alibi_grad)
    name = backends.resolve_backend(call, backend)
    if q.numel() == 0 or k.shape[1] == 0:
        zeros = tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        return *zeros, *common.bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad)
    dq, dk, dv, dmask, dslopes = _BWD[name](
        dout, q, k, v, out, lse, attn_mask, alibi_slopes, common.seed_int(dropout_seed, dropout_p),
        causal, softmax_scale, window, softcap, dropout_p, deterministic, mask_grad, alibi_grad,
    )
    return (*common.contiguous_grads(dq, dk, dv),
            *common.bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad, (dmask, dslopes)))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale,
      window_left, window_right, softcap, dropout_p, deterministic, mask_grad, alibi_grad,
      backend):
    return common.bwd_fake(q, k, v, attn_mask, alibi_slopes, mask_grad, alibi_grad)


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, dropout_seed, *options = inputs
    out, lse = output
    ctx.options = options
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed = ctx.saved_tensors
    *options, backend = ctx.options
    mask_grad, alibi_grad = common.bias_grad_flags(ctx, attn_mask, 3)
    dq, dk, dv, dmask, dslopes = attention_bwd(
        dout, q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed, *options, mask_grad,
        alibi_grad, backend,
    )
    return (dq, dk, dv, dmask if mask_grad else None, dslopes if alibi_grad else None, None,
            *([None] * len(ctx.options)))


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


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
    common.check_qkv(q, k, v, q_ndim=4, layout="(B, Sk, Hkv, D)")
    batch, seqlen_q, _, _ = q.shape
    softmax_scale, window, softcap, dropout_p = common.check_options(
        q, batch=batch, seqlen_q=seqlen_q, seqlen_k=k.shape[1], causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=dropout_seed,
        deterministic=deterministic, backend=backend,
    )
    out, lse = attention_fwd(
        q, k, v, attn_mask, alibi_slopes, common.seed_tensor(dropout_p, dropout_seed), causal,
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
    return dropout_keep_mask(dropout_seed, batch, heads, seqlen_q, seqlen_k, dropout_p, device)
