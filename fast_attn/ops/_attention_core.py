"""The one attention core under the three attention custom ops (dense, varlen, KV cache).

Each custom op turns its flat schema into an ``AttentionParams`` and a ``Packing``
(``fast_attn/ops/attention_params.py``) and calls ``fwd`` / ``bwd`` here, which build the
call summary the backend choice needs, apply the one empty-input rule (no query or no key:
out 0, lse -inf, zero gradients) and run the chosen backend's
``attention_fwd(q, k, v, params, packing)`` / ``attention_bwd(dout, q, k, v, out, lse,
params, packing, grads)``. The input checks of the public functions and the autograd
glue shared by the three ops live here too.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fast_attn import backends
from fast_attn.ops import _checks
from fast_attn.ops._dispatch import choose, dispatch, kernel
from fast_attn.ops._eager import EagerOp
from fast_attn.ops.attention_params import (
    CACHE,
    VARLEN,
    AttentionParams,
    BiasGrads,
    Packing,
)

NO_GRAD = (0,)  # shape of the placeholder returned for a gradient nobody asked for
SEED_LIMIT = 2**62  # seeds are drawn in [0, 2**62); users may pass any int in [0, 2**63)
FAMILY = "attention"  # the backend modules' family name (fast_attn/ops/_dispatch.py)


# ---------------------------------------------------------------- params from a schema


def params_from_schema(attn_mask, alibi_slopes, dropout_seed, causal, softmax_scale, window_left,
                       window_right, softcap, dropout_p, deterministic) -> AttentionParams:
    """The custom ops' flat arguments as one ``AttentionParams`` (built once per op call)."""
    seed = int(dropout_seed.item()) if dropout_p > 0 and dropout_seed is not None else 0
    return AttentionParams(
        softmax_scale=softmax_scale, causal=causal, window=(window_left, window_right),
        softcap=softcap, dropout_p=dropout_p, dropout_seed=seed, deterministic=deterministic,
        attn_mask=attn_mask, alibi_slopes=alibi_slopes,
    )


_CALLS: dict = {}  # call summaries by their inputs: a few dozen per process, built once each


def call_summary(op: str, q: Tensor, k: Tensor, params: AttentionParams, *, backward: bool = False,
                 grads: BiasGrads = BiasGrads()) -> backends.Call:
    """What the backend choice needs to know about this call (memoized)."""
    mask = params.attn_mask
    key = (op, q.device, q.dtype, q.shape[-1], k.shape[-2] != q.shape[-2], params.causal,
           params.window, params.softcap > 0, None if mask is None else mask.dtype,
           params.alibi_slopes is None, params.dropout_p > 0, params.deterministic, backward, grads)
    call = _CALLS.get(key)
    if call is None:
        call = _CALLS[key] = _summarise(op, q, k, params, backward, grads)
    return call


def _summarise(op, q, k, params, backward, grads) -> backends.Call:
    mask = params.attn_mask
    feats = backends.features(
        causal=params.causal,
        window=params.has_window,
        alibi=params.alibi_slopes is not None,
        softcap=params.softcap > 0,
        bool_mask=mask is not None and mask.dtype == torch.bool,
        additive_mask=mask is not None and mask.dtype != torch.bool,
        dropout=params.dropout_p > 0,
        gqa=k.shape[-2] != q.shape[-2],
        deterministic=params.deterministic and backward,
        backward=backward,
        mask_grad=grads.mask,
        alibi_grad=grads.alibi,
    )
    return backends.Call(op, q.device.type, q.dtype, feats, head_dim=q.shape[-1],
                         arch=backends.device_arch(q.device))


# ----------------------------------------------------------------------- fwd and bwd


def lse_shape(q: Tensor, packing: Packing) -> tuple:
    if packing.kind == VARLEN:
        return (q.shape[1], q.shape[0])  # (H, total_q)
    batch, seqlen_q, heads, _ = q.shape
    return (batch, heads, seqlen_q)


def _no_keys(k: Tensor, packing: Packing) -> bool:
    return k.shape[0 if packing.kind == VARLEN else 1] == 0


def _empty_fwd(q: Tensor, packing: Packing):
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.full(lse_shape(q, packing), float("-inf"), dtype=torch.float32, device=q.device)


def fwd(op: str, q: Tensor, k: Tensor, v: Tensor, params: AttentionParams, packing: Packing,
        backend: str) -> tuple[Tensor, Tensor]:
    """(out contiguous, lse fp32) from the backend chosen for this call."""
    call = call_summary(op, q, k, params)
    empty = (lambda: _empty_fwd(q, packing)) if q.numel() == 0 or _no_keys(k, packing) else None
    out, lse = dispatch(call, backend, FAMILY, "attention_fwd", empty, q, k, v, params, packing)
    return out.contiguous(), (lse if lse.dtype == torch.float32 else lse.float())


def bias_grad_placeholders(params: AttentionParams, grads: BiasGrads, computed=(None, None)) -> tuple:
    """The dmask/dslopes outputs of a backward op: the gradient (zeros if a backend left
    it None), or an empty placeholder nobody reads."""
    out = []
    for wanted, tensor, grad in ((grads.mask, params.attn_mask, computed[0]),
                                 (grads.alibi, params.alibi_slopes, computed[1])):
        if wanted:
            out.append(torch.zeros_like(tensor) if grad is None else grad.contiguous())
        else:
            out.append(tensor.new_empty(NO_GRAD) if tensor is not None else torch.empty(NO_GRAD))
    return tuple(out)


def bwd(op: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        params: AttentionParams, packing: Packing, grads: BiasGrads, backend: str) -> tuple:
    """(dq, dk, dv, dmask, dslopes), contiguous; dk/dv summed over each kv head's group."""
    call = call_summary(op, q, k, params, backward=True, grads=grads)
    if q.numel() == 0 or k.numel() == 0:
        def empty():
            return (*(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)), None, None)
    else:
        empty = None
    dq, dk, dv, dmask, dslopes = dispatch(call, backend, FAMILY, "attention_bwd", empty,
                                          dout, q, k, v, out, lse, params, packing, grads)
    return (dq.contiguous(), dk.contiguous(), dv.contiguous(),
            *bias_grad_placeholders(params, grads, (dmask, dslopes)))


def fwd_fake(q: Tensor, packing: Packing) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(lse_shape(q, packing), dtype=torch.float32)


def bwd_fake(q, k, v, params: AttentionParams, grads: BiasGrads) -> tuple:
    grads_qkv = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return (*grads_qkv, *bias_grad_placeholders(params, grads))


# ------------------------------------------------------------------------ the KV cache


def append_and_attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                      cache_seqlens: Optional[Tensor], params: AttentionParams, backend: str):
    """The KV-cache step: choose the backend, check the lengths, append k/v in place (once,
    for every backend), then attend. Every check runs before the append, so a call that
    fails leaves the caches as they were."""
    call = call_summary("attention_with_kvcache", q, k_cache, params)
    name = choose(call, backend)
    new_len = 0 if k is None else k.shape[1]
    check_cache_seqlens_values(cache_seqlens, k_cache.shape[1], new_len)
    seqlens_k = append_to_cache(k_cache, v_cache, k, v, cache_seqlens)
    packing = Packing(CACHE, seqlens_k=seqlens_k)
    if q.numel() == 0 or k_cache.shape[1] == 0:
        return _empty_fwd(q, packing)
    out, lse = kernel(name, FAMILY, "attention_fwd")(q, k_cache, v_cache, params, packing)
    return out.contiguous(), (lse if lse.dtype == torch.float32 else lse.float())


def append_to_cache(k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                    cache_seqlens: Optional[Tensor]) -> Optional[Tensor]:
    """Writes k/v (B, S_new, Hkv, D) into the caches at rows [cache_seqlens[b], + S_new), in
    place (one scatter per cache, no host sync); returns the keys per row after the append
    (int32 (B,), None = the whole cache)."""
    if k is None:
        return None if cache_seqlens is None else cache_seqlens.to(torch.int32)
    new_len = k.shape[1]
    positions = cache_seqlens.long()[:, None] + torch.arange(new_len, device=k.device)
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    k_cache[rows, positions] = k
    v_cache[rows, positions] = v
    return (cache_seqlens + new_len).to(torch.int32)


def check_cache_seqlens_values(cache_seqlens: Optional[Tensor], cache_len: int, new_len: int) -> None:
    """Every row's filled length plus the appended keys must fit in the cache (a device
    sync on CUDA: the alternative is writing past the cache)."""
    if cache_seqlens is None or cache_seqlens.numel() == 0:
        return
    low, high = int(cache_seqlens.min()), int(cache_seqlens.max())
    if low < 0 or high + new_len > cache_len:
        raise ValueError(
            f"cache_seqlens + S_new must lie in [0, {cache_len}] (the cache length); got "
            f"cache_seqlens in [{low}, {high}] with S_new = {new_len}"
        )


# -------------------------------------------------------------------------- autograd


class ScalarOptions(NamedTuple):
    """The non-tensor options a forward op hands its backward op, by name."""

    causal: bool
    softmax_scale: float
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float
    deterministic: bool
    backend: str


def bias_grads_wanted(needs_input_grad: Sequence[bool], mask_index: int, attn_mask: Optional[Tensor]) -> BiasGrads:
    """Which learned-bias gradients autograd wants (attn_mask at mask_index, slopes next)."""
    mask = needs_input_grad[mask_index] and attn_mask is not None and attn_mask.is_floating_point()
    return BiasGrads(bool(mask), bool(needs_input_grad[mask_index + 1]))


def refuse_unserved_backward(op: str, q: Tensor, k: Tensor, attn_mask: Optional[Tensor],
                             alibi_slopes: Optional[Tensor], options: ScalarOptions, grads: BiasGrads) -> None:
    """An explicitly requested backend that cannot run this call's backward is refused at
    the forward (from setup_context, as autograd records the call), not after it.

    Eager calls only: while torch.compile traces, shapes are symbolic and the backend is
    chosen when the compiled graph runs, so a traced call is checked by its backward op."""
    if not isinstance(q.shape[-1], int):
        return
    requested = backends.requested_backend(options.backend)
    if requested == backends.AUTO:
        return  # auto falls back by itself
    params = params_from_schema(attn_mask, alibi_slopes, None, *options[:-1])
    backends.resolve_backend(call_summary(op, q, k, params, backward=True, grads=grads), requested)


def register(fwd_op, bwd_op, op: str, kind: str, packing_arity: int) -> tuple[EagerOp, EagerOp]:
    """Fake functions and autograd for a pair of attention custom ops with the schemas

        fwd(q, k, v, *packing_args, attn_mask, alibi_slopes, dropout_seed, *ScalarOptions)
        bwd(dout, q, k, v, out, lse, *packing_args, attn_mask, alibi_slopes, dropout_seed,
            <ScalarOptions but backend>, mask_grad, alibi_grad, backend)

    where ``packing_args`` (``packing_arity`` of them) describe the ``kind`` of packing.
    Returns the two ops as ``EagerOp`` (``_eager.py``): what the public function calls."""
    fake_packing = Packing(kind)
    bias_at = 3 + packing_arity  # attn_mask's position among the forward's inputs

    @fwd_op.register_fake
    def _(q, *args):
        return fwd_fake(q, fake_packing)

    @bwd_op.register_fake
    def _(dout, q, k, v, out, lse, *args):
        attn_mask, alibi_slopes = args[packing_arity], args[packing_arity + 1]
        params = AttentionParams(1.0, attn_mask=attn_mask, alibi_slopes=alibi_slopes)
        return bwd_fake(q, k, v, params, BiasGrads(args[-3], args[-2]))

    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        packing_args = inputs[3:bias_at]
        attn_mask, alibi_slopes, dropout_seed = inputs[bias_at:bias_at + 3]
        scalars = inputs[bias_at + 3:]
        ctx.options = ScalarOptions(*scalars)
        ctx.grads = bias_grads_wanted(ctx.needs_input_grad, bias_at, attn_mask)
        refuse_unserved_backward(op, q, k, attn_mask, alibi_slopes, ctx.options, ctx.grads)
        # tensors go through save_for_backward; plain ints (max_seqlen) stay on ctx
        ctx.packing_args = [None if isinstance(a, Tensor) else a for a in packing_args]
        packing_tensors = [a for a in packing_args if isinstance(a, Tensor)]
        ctx.save_for_backward(q, k, v, *output, attn_mask, alibi_slopes, dropout_seed, *packing_tensors)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, attn_mask, alibi_slopes, dropout_seed, *packing_tensors = ctx.saved_tensors
        saved = iter(packing_tensors)
        packing_args = [next(saved) if a is None else a for a in ctx.packing_args]
        dq, dk, dv, dmask, dslopes = eager_bwd(
            dout, q, k, v, out, lse, *packing_args, attn_mask, alibi_slopes, dropout_seed,
            mask_grad=ctx.grads.mask, alibi_grad=ctx.grads.alibi, **ctx.options._asdict(),
        )
        return (dq, dk, dv, *([None] * packing_arity), dmask if ctx.grads.mask else None,
                dslopes if ctx.grads.alibi else None, None, *([None] * len(ctx.options)))

    fwd_op.register_autograd(backward, setup_context=setup_context)
    eager_bwd = EagerOp(bwd_op, bwd_op._init_fn)
    return EagerOp(fwd_op, fwd_op._init_fn, setup_context, backward), eager_bwd


# ------------------------------------------------------------------------- validation


def check_qkv(q, k, v, *, q_ndim: int, layout: str) -> None:
    _checks.check_tensor("q", q, ndim=q_ndim)
    _checks.check_tensor("k", k, ndim=q_ndim)
    _checks.check_tensor("v", v, ndim=q_ndim)
    _checks.check_same_dtype("q", q, k=k, v=v)
    _checks.check_same_device("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {layout}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q_ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] < 1:
        raise ValueError("head_dim (the last dimension of q) must be >= 1")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"the number of query heads ({heads}) must be a multiple of the number of "
            f"key/value heads ({kv_heads})"
        )


def check_options(q, *, batch, seqlen_q, seqlen_k, causal, softmax_scale, window_size,
                  alibi_slopes, softcap, attn_mask, dropout_p, dropout_seed, deterministic,
                  backend):
    """Validates the shared options; returns (softmax_scale, window, softcap, dropout_p).

    Pure checks (no context read), so torch.compile traces them on every supported torch."""
    heads, head_dim = q.shape[-2], q.shape[-1]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    softmax_scale = _checks.check_float("softmax_scale", softmax_scale, low=0.0, high=float("inf"),
                                        high_inclusive=False)
    window = check_window(window_size)
    softcap = _checks.check_float("softcap", softcap, low=0.0, high=float("inf"), high_inclusive=False)
    dropout_p = _checks.check_float("dropout_p", dropout_p, low=0.0, high=1.0, high_inclusive=False)
    if alibi_slopes is not None:
        _checks.check_tensor("alibi_slopes", alibi_slopes)
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(
                f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        _checks.check_same_device("q", q, alibi_slopes=alibi_slopes)
    if attn_mask is not None:
        check_mask(q, attn_mask, (batch, heads, seqlen_q, seqlen_k))
    if dropout_seed is not None:
        if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int):
            raise TypeError(f"dropout_seed must be an int or None, got {type(dropout_seed).__name__}")
        if not 0 <= dropout_seed < 2**63:
            raise ValueError(f"dropout_seed must be in [0, 2**63), got {dropout_seed}")
    backends.check_name(backend)
    return softmax_scale, window, softcap, dropout_p


def check_window(window_size: Sequence[int]) -> tuple[int, int]:
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def check_mask(q: Tensor, attn_mask: object, full_shape: tuple) -> None:
    _checks.check_tensor("attn_mask", attn_mask, float_dtype=False)
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = may attend) or a float dtype, got {attn_mask.dtype}")
    _checks.check_same_device("q", q, attn_mask=attn_mask)
    shape = tuple(attn_mask.shape)
    ok = len(shape) <= 4 and all(
        size in (1, full) for size, full in zip(reversed(shape), reversed(full_shape))
    )
    if not ok:
        raise ValueError(f"attn_mask must be broadcastable to (B, H, Sq, Sk) = {full_shape}, got {shape}")


def seed_tensor(dropout_p: float, dropout_seed: Optional[int]) -> Optional[Tensor]:
    """The dropout seed as a CPU int64 scalar (a tensor, so torch.compile does not specialise)."""
    if dropout_p == 0:
        return None
    if dropout_seed is None:
        return torch.randint(0, SEED_LIMIT, (), dtype=torch.int64)
    return torch.tensor(dropout_seed, dtype=torch.int64)
