"""Variable-length (packed) attention: FlashAttention-2's varlen layout as a custom op.

``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``
attends each of B packed sequences independently, with the options and conventions of
``fast_attn.attention`` (see fast_attn/ops/attention.py); causal alignment is per sequence
and dropout uses the keep-mask of the padded batch, so a varlen call equals the padded
dense call. Custom ops ``fast_attn::attention_varlen_fwd`` / ``_bwd``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _attention_common as common
from fast_attn.ops import _attention_cuda
from fast_attn.ops import _checks
from fast_attn.ops._reference_grad import reference_vjp
from fast_attn.reference.attention import attention_varlen_ref

# ----------------------------------------------------------------------- varlen: ops


def _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  attn_mask, alibi_slopes, seed, causal, softmax_scale, window, softcap,
                  dropout_p):
    return attention_varlen_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, window_size=window, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=seed,
    )


def _varlen_bwd_torch(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, attn_mask, alibi_slopes, seed, causal, softmax_scale,
                      window, softcap, dropout_p, deterministic, mask_grad, alibi_grad):
    def fn(q_, k_, v_, mask_, slopes_):
        return _varlen_torch(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, mask_, slopes_, seed, causal, softmax_scale,
                             window, softcap, dropout_p)[0]

    return reference_vjp(fn, (q, k, v, attn_mask, alibi_slopes), (dout,),
                         differentiable=(True, True, True, mask_grad, alibi_grad))


def _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
                   alibi_slopes, seed, causal, softmax_scale, window, softcap, dropout_p):
    from fast_attn.triton_kernels import attention as triton_attention

    return triton_attention.attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k, attn_mask, alibi_slopes, seed, causal,
                                                 softmax_scale, window, softcap, dropout_p)


def _varlen_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, attn_mask, alibi_slopes, seed, causal, softmax_scale, window,
                       softcap, dropout_p, deterministic, mask_grad, alibi_grad):
    from fast_attn.triton_kernels import attention as triton_attention

    return triton_attention.attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, attn_mask, alibi_slopes,
                                                 seed, causal, softmax_scale, window, softcap,
                                                 dropout_p, deterministic, mask_grad, alibi_grad)


# Kernels by backend; a kernel issue adds its entries here and its CAPABILITIES in backends.py.
_VARLEN_FWD = {"torch": _varlen_torch, "triton": _varlen_triton, "cuda": _attention_cuda.attention_varlen_fwd}
_VARLEN_BWD = {"torch": _varlen_bwd_torch, "triton": _varlen_bwd_triton, "cuda": _attention_cuda.attention_varlen_bwd}


@torch.library.custom_op("fast_attn::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    """(out (total_q, H, D), lse fp32 (H, total_q))."""
    window = (window_left, window_right)
    call = common.call_summary("attention_varlen", q, k, causal=causal, window=window,
                 alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=attn_mask,
                 dropout_p=dropout_p, deterministic=deterministic, backward=False)
    name = backends.resolve_backend(call, backend)
    _check_cu_seqlens_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if q.numel() == 0:
        return common.empty_outputs(q, (q.shape[1], q.shape[0]))
    out, lse = _VARLEN_FWD[name](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, attn_mask, alibi_slopes,
                                 common.seed_int(dropout_seed, dropout_p), causal, softmax_scale,
                                 window, softcap, dropout_p)
    return out, lse.float()


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, *args):
    total_q, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((heads, total_q), dtype=torch.float32)


@torch.library.custom_op("fast_attn::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    """(dq, dk, dv, dmask, dslopes), as attention_bwd."""
    window = (window_left, window_right)
    call = common.call_summary("attention_varlen", q, k, causal=causal, window=window,
                 alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=attn_mask,
                 dropout_p=dropout_p, deterministic=deterministic, backward=True,
                 mask_grad=mask_grad, alibi_grad=alibi_grad)
    name = backends.resolve_backend(call, backend)
    if q.numel() == 0 or k.numel() == 0:
        zeros = tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        return *zeros, *common.bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad)
    dq, dk, dv, dmask, dslopes = _VARLEN_BWD[name](
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        attn_mask, alibi_slopes, common.seed_int(dropout_seed, dropout_p), causal, softmax_scale,
        window, softcap, dropout_p, deterministic, mask_grad, alibi_grad,
    )
    return (*common.contiguous_grads(dq, dk, dv),
            *common.bias_grads(attn_mask, alibi_slopes, mask_grad, alibi_grad, (dmask, dslopes)))


@attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale, window_left, window_right,
      softcap, dropout_p, deterministic, mask_grad, alibi_grad, backend):
    return common.bwd_fake(q, k, v, attn_mask, alibi_slopes, mask_grad, alibi_grad)


def _varlen_setup(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
     alibi_slopes, dropout_seed, *options) = inputs
    out, lse = output
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.options = options
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, attn_mask,
                          alibi_slopes, dropout_seed)


def _varlen_backward(ctx, dout, _dlse):
    (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, attn_mask, alibi_slopes,
     dropout_seed) = ctx.saved_tensors
    *options, backend = ctx.options
    mask_grad, alibi_grad = common.bias_grad_flags(ctx, attn_mask, 7)
    dq, dk, dv, dmask, dslopes = attention_varlen_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, attn_mask,
        alibi_slopes, dropout_seed, *options, mask_grad, alibi_grad, backend,
    )
    return (dq, dk, dv, None, None, None, None, dmask if mask_grad else None,
            dslopes if alibi_grad else None, *([None] * (1 + len(ctx.options))))


attention_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    """Attention over sequences packed without padding (FlashAttention-2's varlen layout).

    Args:
        q: ``(total_q, H, D)``: the B sequences' queries concatenated.
        k, v: ``(total_k, Hkv, D)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)``, non-decreasing, starting at 0 and
            ending at total_q / total_k: sequence b is rows
            ``[cu_seqlens[b], cu_seqlens[b + 1])``; zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (upper bounds).
        attn_mask: broadcastable to ``(B, H, max_seqlen_q, max_seqlen_k)``, in the padded
            coordinates: sequence b uses ``attn_mask[b, :, :Sq_b, :Sk_b]``.
        Other options as ``attention``; causal alignment is per sequence. Dropout uses
        the mask of the padded batch, so a varlen call equals the padded dense call.

    Returns:
        ``out (total_q, H, D)``, or ``(out, lse)`` with lse fp32 ``(H, total_q)``.
    """
    common.check_qkv(q, k, v, q_ndim=3, layout="(total_k, Hkv, D)")
    batch = _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    softmax_scale, window, softcap, dropout_p = common.check_options(
        q, batch=batch, seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=dropout_seed,
        deterministic=deterministic, backend=backend,
    )
    out, lse = attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
        alibi_slopes, common.seed_tensor(dropout_p, dropout_seed), causal, softmax_scale,
        window[0], window[1], softcap, dropout_p, deterministic, backend,
    )
    return (out, lse) if return_lse else out


def _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> int:
    """Validates the packing's types and shapes; returns the number of sequences B.

    The values are checked by ``_check_cu_seqlens_values`` inside the op, where the
    tensors are real even under torch.compile.
    """
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _checks.check_tensor(name, cu, ndim=1, float_dtype=False)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        _checks.check_same_device("q", q, **{name: cu})
        if cu.shape[0] < 1:
            raise ValueError(f"{name} must have B + 1 >= 1 entries, got none")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got "
            f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    return cu_seqlens_q.shape[0] - 1


def _check_cu_seqlens_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """The packing's values; reads the (small) tensors, a device sync on CUDA."""
    packed = (("q", cu_seqlens_q, q.shape[0], max_seqlen_q), ("k", cu_seqlens_k, k.shape[0], max_seqlen_k))
    for suffix, cu, total, longest_allowed in packed:
        name = f"cu_seqlens_{suffix}"
        values = cu.tolist()
        if values[0] != 0 or values[-1] != total:
            raise ValueError(
                f"{name} must start at 0 and end at {total} (the packed length of {suffix}), "
                f"got {values[0]} .. {values[-1]}"
            )
        lengths = [b - a for a, b in zip(values, values[1:])]
        if any(length < 0 for length in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {values}")
        if lengths and max(lengths) > longest_allowed:
            raise ValueError(
                f"max_seqlen_{suffix} ({longest_allowed}) is smaller than the longest sequence "
                f"({max(lengths)})"
            )
