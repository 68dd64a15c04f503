"""Reference attention in plain PyTorch: the oracle every backend is checked against.

What: `attention_ref` (dense batch), `attention_varlen_ref` (packed sequences with
cumulative lengths, FlashAttention-2's varlen layout) and `attention_with_kvcache_ref`
(decode against a KV cache), plus `dropout_keep_mask`, the counter-based dropout mask
that every backend reproduces bit for bit (its one implementation is
`fast_attn/_dropout_hash.py`, shared with the backends; its definition is below).

Algorithm: plain softmax attention, no tiling and no online softmax. The whole score
matrix `S = softmax_scale * Q K^T` is materialized per (batch, head), biased and masked,
normalized with `torch.softmax`, optionally dropped out, and multiplied by V. Autograd
differentiates it; no custom ops and no torch SDPA are used, so it runs on any device.

Conventions (see DESIGN.md; every backend keeps them):

- Layout `(batch, seqlen, heads, head_dim)`; K/V may have fewer heads than Q (GQA/MQA):
  query head `h` reads kv head `h // (heads // kv_heads)`.
- Scores, in this order: `s = softmax_scale * q.k`; with `softcap > 0`,
  `s = softcap * tanh(s / softcap)`; ALiBi adds `-slope * |i + Sk - Sq - j|`; a float
  `attn_mask` is added; then the causal, window, bool-mask (True = may attend) and
  `seqlens_k` masks remove keys. A key whose additive mask is `-inf` is removed too.
- Bottom-right alignment: query row `i` is aligned with key `i + Sk - Sq`. Causal keeps
  `j <= i + Sk - Sq`; `window_size=(left, right)` keeps
  `j in [i + Sk - Sq - left, i + Sk - Sq + right]`, -1 meaning unbounded on that side.
  With `seqlens_k`, `Sk` in these formulas is the row's valid key count. For
  Sq=2, Sk=5, causal (x = attended)::

        keys  0 1 2 3 4
      row 0:  x x x x .
      row 1:  x x x x x

  and for Sq=5, Sk=2 rows 0..2 see no key at all (fully masked).
- A fully masked query row gives output exactly 0, LSE `-inf`, and zero (never NaN)
  gradients.
- Softmax statistics are fp32 (fp64 for fp64 inputs); LSE is `(batch, heads, seqlen_q)`.

Limits: memory is O(batch * heads * seqlen_q * seqlen_k) for the scores (and again for
the dropout mask); the GQA path copies K and V to the query head count. Use it as an
oracle and fallback, not for long sequences. Inputs are not validated here: the op layer
(`fast_attn/ops/attention.py`) checks shapes, dtypes and devices before calling in.
"""

import math

import torch
from torch import Tensor

from fast_attn import _dropout_hash
from fast_attn._dropout_hash import dropout_threshold

__all__ = [
    "attention_ref",
    "attention_varlen_ref",
    "attention_with_kvcache_ref",
    "dropout_keep_mask",
    "dropout_threshold",
]

def dropout_keep_mask(
    seed: int,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    device=None,
) -> Tensor:
    """The dropout keep mask, bool `(batch, heads, seqlen_q, seqlen_k)`, True = kept.

    A pure function of `(seed, b, h, i, j)`, so forward and backward (and every backend)
    regenerate the same mask without storing it. Exact definition, all arithmetic on
    uint32 with wrap-around (`&` below is bitwise and, `^` xor, `>>` logical shift)::

        fmix32(x):  x ^= x >> 16;  x *= 0x85EBCA6B;  x ^= x >> 13;
                    x *= 0xC2B2AE35;  x ^= x >> 16
        key   = fmix32(fmix32(0x9E3779B9 ^ seed_lo) ^ seed_hi)     # once per call
        idx   = ((b * heads + h) * seqlen_q + i) * seqlen_k + j     # 64-bit counter
        hash  = fmix32(fmix32(key ^ idx_lo) ^ idx_hi)
        hash  = fmix32(hash ^ key)
        keep  = hash >= floor(dropout_p * 2**32 + 0.5)              # dropout_threshold

    where `seed_lo = seed & 0xFFFFFFFF`, `seed_hi = seed >> 32`, and likewise for idx.
    `h` is the query head (GQA does not share masks between query heads). The final
    round re-injects the key so that masks of two seeds are not index permutations of
    each other. The seed is folded into a 32-bit key, so distinct seeds share a mask
    with probability about 2**-32 per pair.

    Args:
        seed: non-negative int below 2**63.
        batch, heads, seqlen_q, seqlen_k: the mask's shape; for varlen calls these are
            the padded sizes (`max_seqlen_q`, `max_seqlen_k`).
        dropout_p: drop probability in [0, 1); 0 gives an all-True mask.
        device: where to build the mask (default CPU).
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout seed must be an int in [0, 2**63), got {seed}")
    return _dropout_hash.keep_mask(seed, batch, heads, seqlen_q, seqlen_k, dropout_p, device)


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: float | None,
    window_size: tuple[int, int],
    alibi_slopes: Tensor | None,
    softcap: float,
    attn_mask: Tensor | None,
    dropout_p: float,
    dropout_keep: Tensor | None,
    seqlens_k: Tensor | None,
    upcast: bool,
) -> tuple[Tensor, Tensor]:
    """`attention_ref` with the dropout keep mask passed in (varlen slices a padded one)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    device = q.device
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if q.dtype == torch.float64:
        compute_dtype = stats_dtype = torch.float64
    else:
        compute_dtype = torch.float32 if upcast else q.dtype
        stats_dtype = torch.float32

    # (B, S, H, D) -> (B, H, S, D); GQA/MQA: each kv head serves `group` query heads.
    group = heads // kv_heads
    q_t = q.transpose(1, 2).to(compute_dtype)
    k_t = k.transpose(1, 2).to(compute_dtype).repeat_interleave(group, dim=1)
    v_t = v.transpose(1, 2).to(compute_dtype).repeat_interleave(group, dim=1)

    # Key positions and, per query row, the key it is aligned with (bottom-right).
    if seqlens_k is None:
        valid_k = torch.full((batch,), seqlen_k, dtype=torch.int64, device=device)
    else:
        valid_k = seqlens_k.to(device=device, dtype=torch.int64)
    cols = torch.arange(seqlen_k, device=device).view(1, 1, 1, seqlen_k)
    rows = torch.arange(seqlen_q, device=device).view(1, 1, seqlen_q, 1)
    diag = rows + valid_k.view(batch, 1, 1, 1) - seqlen_q  # (B, 1, Sq, 1)
    key_valid = cols < valid_k.view(batch, 1, 1, 1)  # (B, 1, 1, Sk)
    if seqlens_k is not None:
        # Keys past seqlens_k are unwritten cache rows that may hold inf/NaN; zero them
        # so 0 * NaN cannot leak into the output (via P @ V) or into dQ (via dS @ K).
        k_t = k_t.masked_fill(~key_valid.transpose(-1, -2), 0.0)
        v_t = v_t.masked_fill(~key_valid.transpose(-1, -2), 0.0)

    scores = torch.matmul(q_t, k_t.transpose(-1, -2)) * softmax_scale  # (B, H, Sq, Sk)
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        bias_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        slopes = alibi_slopes.to(device=device, dtype=bias_dtype)
        slopes = slopes.reshape(-1, heads, 1, 1)  # (H,) or (B, H) -> (1 or B, H, 1, 1)
        distance = (diag - cols).abs().to(bias_dtype)  # (B, 1, Sq, Sk)
        scores = scores + (-slopes * distance).to(compute_dtype)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.to(device=device, dtype=compute_dtype)

    keep = key_valid
    if causal:
        keep = keep & (cols <= diag)
    window_left, window_right = window_size
    if window_left >= 0:
        keep = keep & (cols >= diag - window_left)
    if window_right >= 0:
        keep = keep & (cols <= diag + window_right)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask.to(device)
    scores = scores.masked_fill(~keep, float("-inf"))

    # A row with no key left would be 0/0 in the softmax and NaN in its backward: give it
    # finite scores here and zero its outputs below; masked_fill also zeroes its gradient.
    fully_masked = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, H, Sq, 1)
    scores = scores.masked_fill(fully_masked, 0.0)
    lse = torch.logsumexp(scores.to(stats_dtype), dim=-1)
    lse = lse.masked_fill(fully_masked.squeeze(-1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(fully_masked, 0.0)

    if dropout_p > 0.0:
        probs = probs * dropout_keep.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs, v_t)  # (B, H, Sq, Dv)
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.contiguous()


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
    softcap: float = 0.0,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    seqlens_k: Tensor | None = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Softmax attention over a dense batch, differentiable by autograd.

    Args:
        q: `(B, Sq, H, D)`.
        k, v: `(B, Sk, Hkv, D)` with `H % Hkv == 0` (v may have its own head dim Dv).
        causal: keep keys `j <= i + Sk - Sq` (bottom-right aligned).
        softmax_scale: defaults to `1 / sqrt(D)`.
        window_size: `(left, right)`: keep `j` in `[i + Sk - Sq - left, i + Sk - Sq + right]`;
            -1 = unbounded on that side.
        alibi_slopes: fp32 `(H,)` or `(B, H)`; adds `-slope * |i + Sk - Sq - j|`.
        softcap: if > 0, scores become `softcap * tanh(scores / softcap)` (before ALiBi).
        attn_mask: broadcastable to `(B, H, Sq, Sk)`; bool (True = may attend) removes
            keys, float is added to the scores after ALiBi.
        dropout_p: drop probability in [0, 1) applied to the normalized probabilities
            (`out = (P * keep / (1 - p)) @ V`); LSE is of the un-dropped scores.
        dropout_seed: seed of `dropout_keep_mask`; ignored when dropout_p == 0.
        seqlens_k: int `(B,)`: row b uses only keys `j < seqlens_k[b]`, and `Sk` in the
            causal, window and ALiBi formulas becomes `seqlens_k[b]`. Keys past it are
            never read into the result, even if they hold NaN.
        upcast: True computes in fp32 (fp64 stays fp64) and casts the output back;
            False computes matmuls and softmax in the input dtype (the low-precision
            baseline of the tolerance rule).

    Returns:
        `(out, lse)`: out `(B, Sq, H, Dv)` in q.dtype; lse `(B, H, Sq)` fp32 (fp64 for
        fp64 inputs), the natural-log log-sum-exp of each row's scores. Fully masked
        rows give out 0 and lse `-inf`.
    """
    dropout_keep = None
    if dropout_p > 0.0:
        batch, seqlen_q, heads, _ = q.shape
        dropout_keep = dropout_keep_mask(
            dropout_seed, batch, heads, seqlen_q, k.shape[1], dropout_p, device=q.device
        )
    return _attention(
        q, k, v,
        causal=causal, softmax_scale=softmax_scale, window_size=window_size,
        alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=attn_mask,
        dropout_p=dropout_p, dropout_keep=dropout_keep, seqlens_k=seqlens_k, upcast=upcast,
    )


def attention_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
    softcap: float = 0.0,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Softmax attention over packed variable-length sequences (FlashAttention-2 layout).

    Sequence b is `q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]` against the matching slice of
    k/v, attended on its own with its own `Sq_b`, `Sk_b` for bottom-right alignment.
    Zero-length sequences are allowed: `Sq_b = 0` contributes no rows; `Sk_b = 0` with
    `Sq_b > 0` gives fully masked rows (out 0, lse `-inf`).

    Args:
        q: `(total_q, H, D)`; k, v: `(total_k, Hkv, D)`.
        cu_seqlens_q, cu_seqlens_k: int `(B + 1,)`, non-decreasing, starting at 0.
        max_seqlen_q, max_seqlen_k: the padded sizes: they fix the coordinates of
            `attn_mask` and of the dropout mask.
        alibi_slopes: `(H,)` or `(B, H)`, indexed by sequence.
        attn_mask: broadcastable to `(B, H, max_seqlen_q, max_seqlen_k)`; sequence b
            uses `[b, :, :Sq_b, :Sk_b]`.
        dropout_p, dropout_seed: sequence b uses
            `dropout_keep_mask(seed, B, H, max_seqlen_q, max_seqlen_k, p)[b, :, :Sq_b, :Sk_b]`,
            so the result equals the padded dense call with the same seed.
        The other options are those of `attention_ref`.

    Returns:
        `(out, lse)`: out `(total_q, H, Dv)` in q.dtype; lse `(H, total_q)` fp32 (fp64
        for fp64 inputs).
    """
    heads = q.shape[1]
    batch = cu_seqlens_q.numel() - 1
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(batch, heads, max_seqlen_q, max_seqlen_k)
    dropout_keep = None
    if dropout_p > 0.0:
        dropout_keep = dropout_keep_mask(
            dropout_seed, batch, heads, max_seqlen_q, max_seqlen_k, dropout_p, device=q.device
        )

    out_pieces, lse_pieces = [], []
    for b in range(batch):
        q_start, q_end = starts_q[b], starts_q[b + 1]
        k_start, k_end = starts_k[b], starts_k[b + 1]
        seqlen_q, seqlen_k = q_end - q_start, k_end - k_start
        if seqlen_q == 0:
            continue
        slopes = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes = alibi_slopes[b]
        out_b, lse_b = _attention(
            q[q_start:q_end].unsqueeze(0),
            k[k_start:k_end].unsqueeze(0),
            v[k_start:k_end].unsqueeze(0),
            causal=causal, softmax_scale=softmax_scale, window_size=window_size,
            alibi_slopes=slopes, softcap=softcap,
            attn_mask=None if mask is None else mask[b : b + 1, :, :seqlen_q, :seqlen_k],
            dropout_p=dropout_p,
            dropout_keep=None if dropout_keep is None else dropout_keep[b : b + 1, :, :seqlen_q, :seqlen_k],
            seqlens_k=None, upcast=upcast,
        )
        out_pieces.append(out_b[0])
        lse_pieces.append(lse_b[0])

    if not out_pieces:  # every sequence is empty
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros((0, heads, v.shape[-1])), q.new_zeros((heads, 0), dtype=lse_dtype)
    return torch.cat(out_pieces, dim=0), torch.cat(lse_pieces, dim=-1)


def attention_with_kvcache_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
    softcap: float = 0.0,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Attention against a KV cache, appending new keys/values first (forward only).

    Writes `k`, `v` into `k_cache`, `v_cache` IN PLACE at rows
    `[cache_seqlens[b], cache_seqlens[b] + S_new)` (the caller guarantees they fit), then
    attends q to the first `cache_seqlens[b] + S_new` keys of each row with
    `attention_ref(..., seqlens_k=cache_seqlens + S_new)`: causal, window and ALiBi are
    aligned to that length (bottom-right), and cache rows past it are ignored.

    Args:
        q: `(B, Sq, H, D)`.
        k_cache, v_cache: `(B, S_cache, Hkv, D)`.
        k, v: `(B, S_new, Hkv, D)` or both None.
        cache_seqlens: int32 `(B,)` tensor, a Python int (same for every row), or None
            (the whole cache is valid; k and v must then be None).
        The options are those of `attention_ref` (no dropout, no attn_mask).

    Returns:
        `(out, lse)` as `attention_ref`: `(B, Sq, H, D)` and `(B, H, Sq)`.
    """
    batch, cache_len = k_cache.shape[0], k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = cache_len
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    new_len = 0
    if k is not None:
        new_len = k.shape[1]
        for b, start in enumerate(cache_seqlens.tolist()):
            k_cache[b, start : start + new_len] = k[b]
            v_cache[b, start : start + new_len] = v[b]
    return attention_ref(
        q, k_cache, v_cache,
        causal=causal, softmax_scale=softmax_scale, window_size=window_size,
        alibi_slopes=alibi_slopes, softcap=softcap,
        seqlens_k=cache_seqlens.to(device=q.device, dtype=torch.int64) + new_len,
        upcast=upcast,
    )
