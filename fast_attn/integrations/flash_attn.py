"""FlashAttention-2's public functions, computed by fast_attn.

Code written for ``flash_attn`` (v2.6+, the versions with ``softcap``) runs by changing
its import::

    from fast_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Every function keeps flash_attn's name, parameter names, order and defaults, its tensor
layouts and its return values, and calls ``fast_attn.attention``,
``fast_attn.attention_varlen`` or ``fast_attn.attention_with_kvcache``; which backend runs
is chosen as for those (``fast_attn.use_backend``, ``FAST_ATTN_BACKEND``).

Semantics (FlashAttention-2's, which are fast_attn's): layout ``(batch, seqlen, heads,
head_dim)``; K/V may have fewer heads (GQA/MQA); ``causal`` is aligned bottom-right when
``seqlen_q != seqlen_k``; ``window_size=(left, right)`` keeps keys
``j in [i + Sk - Sq - left, i + Sk - Sq + right]``; ``softcap > 0`` caps the scaled scores
with ``softcap * tanh(s / softcap)``; ``alibi_slopes`` adds ``-slope * |i + Sk - Sq - j|``;
dropout scales kept entries by ``1 / (1 - dropout_p)``; a query row that sees no key
gets output 0.

``window_size`` may be any pair whose two items are integers (a tuple or list of ints,
numpy ints, ``torch.Size``, a 2-element integer tensor as in FlashAttention's own tests);
bools and floats raise ``TypeError``, another length ``ValueError``.

``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``. As in flash_attn this is
for testing only; here ``S_dmask`` holds the true attention probabilities
``softmax(scores)`` (before dropout and its rescaling), computed by the reference maths
(``fast_attn.reference.attention``) in a separate pass, with every entry that dropout
dropped negated (flash_attn's encoding: negative = dropped), so ``S_dmask.abs()`` are the
probabilities and ``S_dmask >= 0`` (or ``~S_dmask.signbit()`` where a probability is 0)
is the keep-mask. The separate pass takes the probabilities as the gradient of the
reference's LSE with respect to an additive zero mask (``d lse_i / d mask_ij = P_ij``),
so every score rule is the reference's own and the memory is ``O(B * H * Sq * Sk)``
(no ``Sk x Sk`` identity matrix as V). ``S_dmask`` carries no gradient and is in q's
dtype; the returned ``out`` and ``softmax_lse`` are those of the fast call (drawing the
dropout seed the same way, so a seeded call gives the same ``out`` with or without
``return_attn_probs``).

Differences from flash_attn 2.6+ (everything else is meant to match):

- Dtypes and devices: fp16/bf16 as in flash_attn, and also fp32/fp64; any device a
  fast_attn backend runs on (CPU through the reference ops). Head dims are those of the
  backend that runs the call.
- ``softmax_lse`` of a query row that sees no key is ``-inf`` (log 0); flash_attn's CUDA
  kernels write ``+inf`` there.
- ``S_dmask`` has shape ``(B, H, Sq, Sk)`` (varlen: ``(B, H, max_seqlen_q, max_seqlen_k)``,
  zero outside each sequence's ``Sq_b x Sk_b`` block) where flash_attn pads both sequence
  dims to multiples of 128; it holds normalised probabilities where flash_attn's are
  unnormalised ("possibly with different scaling"); and it is returned for
  ``dropout_p == 0`` too, where flash_attn 2.6+ returns an empty tensor.
- Dropout: the keep-mask is fast_attn's counter-based hash (``fast_attn.dropout_mask``)
  of a seed drawn from torch's default CPU generator (so ``torch.manual_seed`` makes a
  call reproducible); flash_attn uses Philox on the CUDA generator. Same statistics,
  different bits.
- ``deterministic`` is passed on to fast_attn (a bitwise-reproducible backward).
- ``flash_attn_varlen_func(block_table=...)`` and ``flash_attn_with_kvcache(cache_leftpad=...,
  block_table=...)`` (paged or left-padded KV caches) raise ``NotImplementedError``.
- ``flash_attn_with_kvcache``: ``num_splits`` is accepted and ignored (a performance hint);
  ``cache_batch_idx`` is honoured by appending into the selected cache rows in place and
  attending to a gathered copy of them (extra memory ``O(B * seqlen_cache)``); appending
  ``k``/``v`` requires ``cache_seqlens``; ``rotary_cos``/``rotary_sin`` may have any float
  dtype (flash_attn requires q's) and any rotary dim up to head_dim (flash_attn: a
  multiple of 16), and the rotation is computed in fp32 (fp64 for fp64 inputs).
- Bad input raises ``TypeError``/``ValueError``/``NotImplementedError`` naming the argument,
  where flash_attn raises ``RuntimeError`` (or asserts).
"""

from __future__ import annotations

import operator
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from fast_attn.ops import _checks
from fast_attn.ops.attention import attention, dropout_mask
from fast_attn.ops.attention_kvcache import attention_with_kvcache
from fast_attn.ops.attention_varlen import attention_varlen
from fast_attn.ops.rotary import rotary
from fast_attn.reference.attention import attention_ref, attention_varlen_ref

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

_SEED_LIMIT = 2**62  # dropout seeds are drawn in [0, 2**62), as fast_attn.attention draws them


# ---------------------------------------------------------------------------- helpers


def _window_size(window_size: object) -> tuple[int, int]:
    """flash_attn's ``window_size`` as the pair of Python ints ``fast_attn.attention`` takes.

    FlashAttention only reads ``window_size[0]`` and ``window_size[1]`` (its own tests pass
    a 2-element int tensor), so anything whose two items ``operator.index`` takes is
    accepted: a tuple or list of ints, numpy ints, ``torch.Size``, a 1-D integer tensor of
    two elements (read on the host: a sync for a CUDA tensor). Bools and floats are
    rejected rather than silently truncated; the range (>= -1) is checked by fast_attn.
    """
    expected = "a pair of ints (left, right): a tuple, list or 2-element integer tensor"
    if isinstance(window_size, Tensor):
        if (window_size.dim() != 1 or window_size.dtype == torch.bool
                or window_size.is_floating_point() or window_size.is_complex()):
            raise TypeError(
                f"window_size must be {expected}; got a {window_size.dim()}-D "
                f"{window_size.dtype} tensor"
            )
        items = window_size.tolist()
    elif isinstance(window_size, (str, bytes)):
        raise TypeError(f"window_size must be {expected}; got {window_size!r}")
    else:
        try:
            items = list(window_size)
        except TypeError:
            raise TypeError(f"window_size must be {expected}; got {window_size!r}") from None
    if len(items) != 2:
        raise ValueError(f"window_size must have 2 items (left, right); got {len(items)}: {window_size!r}")
    pair = []
    for item in items:
        # operator.index takes True and a bool tensor as 1: a bool here is a caller's bug.
        if isinstance(item, bool) or (isinstance(item, Tensor) and item.dtype == torch.bool):
            raise TypeError(f"window_size items must be ints, got a bool in {window_size!r}")
        try:
            pair.append(operator.index(item))
        except TypeError:
            raise TypeError(
                f"window_size items must be ints, got {type(item).__name__} {item!r} in {window_size!r}"
            ) from None
    return pair[0], pair[1]


def _options(softmax_scale, causal, window_size, softcap, alibi_slopes) -> dict:
    """flash_attn's options as fast_attn keyword arguments (validated by fast_attn)."""
    if isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and softcap < 0:
        softcap = 0.0  # flash_attn: softcap <= 0 means off; fast_attn takes 0 for off
    return dict(causal=causal, softmax_scale=softmax_scale, window_size=_window_size(window_size),
                softcap=softcap, alibi_slopes=alibi_slopes)


def _draw_seed(dropout_p) -> Optional[int]:
    """The dropout seed of a call whose keep-mask we must know (return_attn_probs)."""
    if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and dropout_p > 0:
        return int(torch.randint(0, _SEED_LIMIT, (), dtype=torch.int64))
    return None


def _encode_dropout(probs: Tensor, dropout_p: float, seed: Optional[int]) -> Tensor:
    """flash_attn's S_dmask encoding: entries that dropout dropped are negated."""
    if seed is None:
        return probs
    batch, heads, seqlen_q, seqlen_k = probs.shape
    keep = dropout_mask(seed, batch, heads, seqlen_q, seqlen_k, dropout_p, device=probs.device)
    return torch.where(keep, probs, -probs)


def _unpack(name: str, packed: object, *, ndim: int, dim: int, count: int, layout: str) -> tuple:
    """Views of the ``count`` tensors stacked along ``dim`` of a packed qkv/kv tensor."""
    _checks.check_tensor(name, packed, ndim=ndim)
    if packed.shape[dim] != count:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(dim)


# ----------------------------------------------------------------- attention probabilities


def _lse_grad_probs(q: Tensor, mask_shape: tuple, lse_of: Callable[[Tensor], Tensor]) -> Tensor:
    """The softmax probabilities of a reference call, as the gradient of its LSE.

    ``lse_of(mask)`` runs the reference with ``mask`` as its additive ``attn_mask``
    (added after softcap and ALiBi, before the causal/window masks). Row i's
    ``lse_i = log sum_j exp(s_ij + mask_ij)``, so ``d lse_i / d mask_ij = softmax(s_i)_j``
    at ``mask = 0``: masked keys get 0 (their scores are -inf), a fully masked row gets 0
    (the reference zeroes its LSE's gradient), and one backward of ``sum(lse)`` yields
    every row at once. The memory is that of the reference's scores,
    ``O(B * H * Sq * Sk)``; the caller passes a one-column V so nothing is ``O(Sk^2)``.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32  # the reference's
    # Under inference_mode no graph is recorded: leave it for this private backward.
    with torch.inference_mode(False), torch.enable_grad():
        mask = torch.zeros(mask_shape, dtype=compute, device=q.device, requires_grad=True)
        (probs,) = torch.autograd.grad(lse_of(mask).sum(), mask)
    return probs.to(q.dtype)


def _detached(options: dict) -> dict:
    alibi = options["alibi_slopes"]
    return dict(options, alibi_slopes=alibi.detach() if isinstance(alibi, Tensor) else alibi)


def _dense_probs(q: Tensor, k: Tensor, options: dict, dropout_p: float, seed) -> Tensor:
    """S_dmask of a dense call: the probabilities (B, H, Sq, Sk), dropped entries negated."""
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    q, k = q.detach(), k.detach()
    values = k.new_zeros(batch, seqlen_k, kv_heads, 1)  # only the LSE is used
    options = _detached(options)

    def lse_of(mask: Tensor) -> Tensor:
        return attention_ref(q, k, values, attn_mask=mask, **options)[1]  # (B, H, Sq)

    probs = _lse_grad_probs(q, (batch, heads, seqlen_q, seqlen_k), lse_of)
    return _encode_dropout(probs, dropout_p, seed)


def _varlen_probs(q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                  max_seqlen_q: int, max_seqlen_k: int, options: dict, dropout_p: float,
                  seed) -> Tensor:
    """S_dmask of a varlen call, padded: (B, H, max_seqlen_q, max_seqlen_k), sequence b in
    ``[b, :, :Sq_b, :Sk_b]`` and zeros elsewhere; dropped entries negated.

    The reference reads sequence b's mask from ``attn_mask[b, :, :Sq_b, :Sk_b]``, so the
    gradient with respect to the padded mask is already this layout (zeros elsewhere).
    """
    batch = cu_seqlens_q.numel() - 1
    heads = q.shape[1]
    q, k = q.detach(), k.detach()
    values = k.new_zeros(k.shape[0], k.shape[1], 1)  # only the LSE is used
    options = _detached(options)

    def lse_of(mask: Tensor) -> Tensor:
        return attention_varlen_ref(q, k, values, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, attn_mask=mask, **options)[1]  # (H, total_q)

    probs = _lse_grad_probs(q, (batch, heads, max_seqlen_q, max_seqlen_k), lse_of)
    return _encode_dropout(probs, dropout_p, seed)


# ------------------------------------------------------------------------- dense calls


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
           deterministic, return_attn_probs):
    options = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    if not return_attn_probs:
        return attention(q, k, v, dropout_p=dropout_p, deterministic=deterministic, **options)
    seed = _draw_seed(dropout_p)
    out, lse = attention(q, k, v, dropout_p=dropout_p, dropout_seed=seed,
                         deterministic=deterministic, return_lse=True, **options)
    return out, lse, _dense_probs(q, k, options, dropout_p, seed)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention-2's ``flash_attn_func``: attention over a dense batch.

    Set ``dropout_p`` to 0.0 for evaluation. Causal with ``Sq != Sk`` is aligned to the
    bottom-right corner (1 = keep)::

        Sq=2, Sk=5:  1 1 1 1 0        Sq=5, Sk=2:  0 0
                     1 1 1 1 1                     0 0
                                                   0 0
                                                   1 0
                                                   1 1

    A row that keeps no key gives output 0.

    Args:
        q: ``(B, Sq, H, D)``.
        k, v: ``(B, Sk, Hkv, D)`` with ``H % Hkv == 0``: query heads
            ``[g * H/Hkv, (g+1) * H/Hkv)`` share K/V head g.
        dropout_p: dropout probability on the attention matrix.
        softmax_scale: scale of ``Q K^T``; defaults to ``1 / sqrt(D)``.
        causal: causal mask, bottom-right aligned.
        window_size: ``(left, right)``: keep keys
            ``j in [i + Sk - Sq - left, i + Sk - Sq + right]``; -1 = unbounded.
        softcap: > 0 applies ``softcap * tanh(s / softcap)`` to the scaled scores.
        alibi_slopes: fp32 ``(H,)`` or ``(B, H)``; adds ``-slope * |i + Sk - Sq - j|``.
        deterministic: ask for a bitwise-reproducible backward.
        return_attn_probs: also return the LSE and the probabilities (testing only).

    Returns:
        ``out (B, Sq, H, D)``; with ``return_attn_probs``, ``(out, softmax_lse, S_dmask)``:
        ``softmax_lse`` fp32 ``(B, H, Sq)``, the log-sum-exp of each row of the scaled
        (capped, biased) scores; ``S_dmask`` ``(B, H, Sq, Sk)`` in q's dtype, the
        probabilities with dropped entries negated (see the module docstring).
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # <= 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention-2's ``flash_attn_qkvpacked_func``: ``flash_attn_func`` on a stacked QKV.

    Args:
        qkv: ``(B, S, 3, H, D)``; q, k, v are ``qkv[:, :, 0]``, ``[:, :, 1]``, ``[:, :, 2]``
            (views, no copy; the gradient comes back as one ``(B, S, 3, H, D)`` tensor).
        The other arguments and the return values are those of ``flash_attn_func``.
    """
    q, k, v = _unpack("qkv", qkv, ndim=5, dim=2, count=3, layout="(B, S, 3, H, D)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention-2's ``flash_attn_kvpacked_func``: ``flash_attn_func`` with stacked K/V.

    Args:
        q: ``(B, Sq, H, D)``.
        kv: ``(B, Sk, 2, Hkv, D)``; k, v are ``kv[:, :, 0]`` and ``kv[:, :, 1]`` (views).
        The other arguments and the return values are those of ``flash_attn_func``.
    """
    k, v = _unpack("kv", kv, ndim=5, dim=2, count=2, layout="(B, Sk, 2, Hkv, D)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


# ------------------------------------------------------------------------ varlen calls


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs):
    options = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    packing = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if not return_attn_probs:
        return attention_varlen(q, k, v, *packing, dropout_p=dropout_p,
                                deterministic=deterministic, **options)
    seed = _draw_seed(dropout_p)
    out, lse = attention_varlen(q, k, v, *packing, dropout_p=dropout_p, dropout_seed=seed,
                                deterministic=deterministic, return_lse=True, **options)
    return out, lse, _varlen_probs(q, k, *packing, options, dropout_p, seed)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """FlashAttention-2's ``flash_attn_varlen_func``: sequences packed without padding.

    Sequence b is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` against the same slice (by
    ``cu_seqlens_k``) of k and v; causal and window alignment is per sequence.

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, Hkv, D)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)``, cumulative sequence lengths from 0.
        max_seqlen_q, max_seqlen_k: int, the longest query / key sequence.
        block_table: paged KV caches are not supported: must be None.
        The other arguments are those of ``flash_attn_func``.

    Returns:
        ``out (total_q, H, D)``; with ``return_attn_probs``, ``(out, softmax_lse, S_dmask)``
        with ``softmax_lse`` fp32 ``(H, total_q)`` and ``S_dmask``
        ``(B, H, max_seqlen_q, max_seqlen_k)`` (sequence b in its top-left
        ``Sq_b x Sk_b`` block, zeros elsewhere).
    """
    if block_table is not None:
        raise NotImplementedError(
            "flash_attn_varlen_func: block_table (a paged KV cache) is not supported by "
            "fast_attn; pass k and v packed by cu_seqlens_k"
        )
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention-2's ``flash_attn_varlen_qkvpacked_func``.

    Args:
        qkv: ``(total, 3, H, D)``; q, k, v are ``qkv[:, 0]``, ``[:, 1]``, ``[:, 2]`` (views).
        cu_seqlens: int32 ``(B + 1,)`` for queries and keys alike; max_seqlen: int.
        The other arguments and the return values are those of ``flash_attn_varlen_func``.
    """
    q, k, v = _unpack("qkv", qkv, ndim=4, dim=1, count=3, layout="(total, 3, H, D)")
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention-2's ``flash_attn_varlen_kvpacked_func``.

    Args:
        q: ``(total_q, H, D)``; kv: ``(total_k, 2, Hkv, D)`` (k, v are ``kv[:, 0]``,
            ``kv[:, 1]``, views).
        The other arguments and the return values are those of ``flash_attn_varlen_func``.
    """
    k, v = _unpack("kv", kv, ndim=4, dim=1, count=2, layout="(total_k, 2, Hkv, D)")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


# ---------------------------------------------------------------------- KV-cache calls


def _check_append(cache_seqlens: object, batch: int, cache_len: int, new_len: int,
                  device: torch.device) -> Tensor:
    """cache_seqlens of a call that writes or rotates at positions ``cache_seqlens + i``,
    checked before anything is indexed with it (reads its values: a sync on CUDA)."""
    if cache_seqlens is None:
        raise ValueError(
            "cache_seqlens is required when appending k/v or applying rotary embedding: "
            "it gives the position of the first new key"
        )
    _checks.check_tensor("cache_seqlens", cache_seqlens, ndim=1, float_dtype=False)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32 (or a Python int), got {cache_seqlens.dtype}")
    _checks.check_shape("cache_seqlens", cache_seqlens, (batch,), "(B,)")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on q's device ({device}), got {cache_seqlens.device}")
    if batch:
        low, high = int(cache_seqlens.min()), int(cache_seqlens.max())
        if low < 0 or high + new_len > cache_len:
            raise ValueError(
                f"cache_seqlens + seqlen_new must lie in [0, {cache_len}] (the cache length); "
                f"got cache_seqlens in [{low}, {high}] with seqlen_new = {new_len}"
            )
    return cache_seqlens


def _apply_rotary(q, k, k_cache, rotary_cos, rotary_sin, cache_seqlens, interleaved,
                  per_token_q) -> tuple[Tensor, Tensor]:
    """flash_attn's rotary embedding before the append: new key i of row b is rotated at
    position ``cache_seqlens[b] + i``; query i at ``cache_seqlens[b] + i`` when causal or
    local (``per_token_q``), else every query at ``cache_seqlens[b]``."""
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k is None:
        raise ValueError(
            "rotary_cos/rotary_sin rotate the keys being appended: pass k and v as well "
            "(flash_attn applies rotary embedding only when appending)"
        )
    for name, table in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _checks.check_tensor(name, table, ndim=2)
        _checks.check_same_device("q", q, **{name: table})
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_tensor("k", k, ndim=4)
    _checks.check_tensor("k_cache", k_cache, ndim=4)
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(
            f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}, "
            f"got {tuple(rotary_sin.shape)}"
        )
    seqlen_ro, half = rotary_cos.shape
    head_dim, cache_len = q.shape[-1], k_cache.shape[1]
    if half < 1 or 2 * half > head_dim:
        raise ValueError(
            f"rotary_cos must have shape (seqlen_ro, rotary_dim / 2) with 2 <= rotary_dim <= "
            f"head_dim ({head_dim}), got {tuple(rotary_cos.shape)}"
        )
    if seqlen_ro < cache_len:
        raise ValueError(
            f"rotary_cos/rotary_sin must have at least seqlen_cache ({cache_len}) rows, got {seqlen_ro}"
        )
    batch, seqlen_q = q.shape[0], q.shape[1]
    new_len = k.shape[1]
    start = _check_append(cache_seqlens, batch, cache_len, new_len, q.device).long()  # (B,)
    if per_token_q:
        last = int(start.max()) + seqlen_q - 1 if start.numel() and seqlen_q else 0
        if last >= seqlen_ro:
            raise ValueError(
                f"query positions cache_seqlens + i reach {last}, past the {seqlen_ro} rows "
                "of rotary_cos/rotary_sin"
            )
        q = rotary(q, rotary_cos, rotary_sin, interleaved=interleaved, seqlen_offsets=start)
    else:  # every query of row b at position start_b: its Sq x H vectors as the heads of one position
        flat = q.reshape(batch, 1, seqlen_q * q.shape[2], head_dim)
        q = rotary(flat, rotary_cos, rotary_sin, interleaved=interleaved, seqlen_offsets=start).view(q.shape)
    # new key i of row b at position start_b + i
    return q, rotary(k, rotary_cos, rotary_sin, interleaved=interleaved, seqlen_offsets=start)


def _attend_gathered(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, options):
    """flash_attn's ``cache_batch_idx``: batch row b reads and appends to cache row
    ``cache_batch_idx[b]``. Writes k/v into those rows in place, then attends to a gathered
    copy of them. With repeated indices the appended values of any one row may win."""
    batch = q.shape[0]
    _checks.check_tensor("k_cache", k_cache, ndim=4)
    _checks.check_tensor("v_cache", v_cache, ndim=4)
    _checks.check_tensor("cache_batch_idx", cache_batch_idx, ndim=1, float_dtype=False)
    if cache_batch_idx.dtype != torch.int32:
        raise TypeError(f"cache_batch_idx must be int32, got {cache_batch_idx.dtype}")
    _checks.check_shape("cache_batch_idx", cache_batch_idx, (batch,), "(B,)")
    _checks.check_same_device("k_cache", k_cache, q=q, v_cache=v_cache,
                              cache_batch_idx=cache_batch_idx)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape (B_cache, S_cache, Hkv, D), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    index = cache_batch_idx.long()
    if batch and (int(index.min()) < 0 or int(index.max()) >= k_cache.shape[0]):
        raise ValueError(
            f"cache_batch_idx must index the {k_cache.shape[0]} cache rows, got values in "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (both None or both tensors)")
    seqlens = cache_seqlens
    if k is not None:
        _checks.check_tensor("k", k, ndim=4)
        _checks.check_tensor("v", v, ndim=4)
        new_len = k.shape[1]
        expected = (batch, new_len, k_cache.shape[2], k_cache.shape[3])
        _checks.check_shape("k", k, expected, "(B, seqlen_new, Hkv, D)")
        _checks.check_shape("v", v, expected, "(B, seqlen_new, Hkv, D)")
        _checks.check_same_dtype("k_cache", k_cache, v_cache=v_cache, k=k, v=v)
        _checks.check_same_device("k_cache", k_cache, k=k, v=v)
        lengths = _check_append(cache_seqlens, batch, k_cache.shape[1], new_len, q.device)
        rows = index.view(batch, 1).expand(batch, new_len)  # (B, S_new)
        cols = lengths.long().view(batch, 1) + torch.arange(new_len, device=q.device)
        k_cache[rows, cols] = k
        v_cache[rows, cols] = v
        seqlens = lengths + new_len
    k_rows = k_cache.index_select(0, index)  # (B, S_cache, Hkv, D): a copy
    v_rows = v_cache.index_select(0, index)
    return attention_with_kvcache(q, k_rows, v_rows, None, None, seqlens, return_lse=True, **options)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """FlashAttention-2's ``flash_attn_with_kvcache``: one decoding step against a KV cache.

    If k and v are given they are written into k_cache/v_cache IN PLACE at rows
    ``[cache_seqlens[b], cache_seqlens[b] + seqlen_new)``, then q attends to the first
    ``cache_seqlens[b] + seqlen_new`` keys of each row (causal and window aligned to that
    length, bottom-right). With rotary_cos/rotary_sin, the new keys are rotated at positions
    ``cache_seqlens[b] + i`` before they are written, and the queries at
    ``cache_seqlens[b] + i`` if causal or local, else all at ``cache_seqlens[b]``.
    Forward only, like flash_attn: runs under ``torch.no_grad()``.

    Args:
        q: ``(B, Sq, H, D)``.
        k_cache, v_cache: ``(B_cache, seqlen_cache, Hkv, D)``; ``B_cache = B`` unless
            cache_batch_idx is given.
        k, v: ``(B, seqlen_new, Hkv, D)`` to append, or None.
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)`` with
            ``seqlen_ro >= seqlen_cache`` and ``rotary_dim <= D``; need k and v.
        cache_seqlens: int or int32 ``(B,)``: filled rows per sequence before the append;
            None means every row is full (then k and v must be None).
        cache_batch_idx: int32 ``(B,)``: row b uses cache row ``cache_batch_idx[b]``.
        cache_leftpad, block_table: not supported: must be None.
        rotary_interleaved: rotate features (0, 1), (2, 3), ... (True) or
            (0, R/2), (1, R/2 + 1), ... (False, GPT-NeoX style).
        num_splits: accepted for compatibility and ignored.
        return_softmax_lse: also return the fp32 LSE ``(B, H, Sq)``.
        The other arguments are those of ``flash_attn_func``.

    Returns:
        ``out (B, Sq, H, D)``, or ``(out, softmax_lse)`` with ``return_softmax_lse``.
    """
    if cache_leftpad is not None:
        raise NotImplementedError(
            "flash_attn_with_kvcache: cache_leftpad (caches whose rows start after index 0) "
            "is not supported by fast_attn; store each row's keys from index 0"
        )
    if block_table is not None:
        raise NotImplementedError(
            "flash_attn_with_kvcache: block_table (a paged KV cache) is not supported by "
            "fast_attn; pass contiguous (B, seqlen_cache, Hkv, D) caches"
        )
    options = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    _checks.check_tensor("q", q, ndim=4)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    with torch.no_grad():  # flash_attn has no backward for this function either
        if rotary_cos is not None or rotary_sin is not None:
            local = options["window_size"] != (-1, -1)
            q, k = _apply_rotary(q, k, k_cache, rotary_cos, rotary_sin, cache_seqlens,
                                 rotary_interleaved, per_token_q=bool(causal) or local)
        if cache_batch_idx is None:
            out, lse = attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens,
                                              return_lse=True, **options)
        else:
            out, lse = _attend_gathered(q, k_cache, v_cache, k, v, cache_seqlens,
                                        cache_batch_idx, options)
    return (out, lse) if return_softmax_lse else out
