"""Tests of fast_attn.reference.attention against independent fp64 maths.

The oracle here works one query row at a time: it lists the keys the row may attend to
by spelling out the DESIGN.md conventions as plain conditions, then takes an explicit
max/exp/sum softmax over those keys only. It shares nothing with the reference's
vectorized masks, so agreement at fp64 round-off checks the maths, and comparing
autograd through both checks the gradients. The dropout hash is checked against a
plain-Python-int transcription of the formula in `dropout_keep_mask`'s docstring, which
is what other backends reimplement.
"""

import math
from typing import NamedTuple

import pytest
import torch

from fast_attn._dropout_hash import dropout_key, hash_counters
from fast_attn.reference.attention import (
    attention_ref,
    attention_varlen_ref,
    attention_with_kvcache_ref,
    dropout_keep_mask,
    dropout_threshold,
)

NEG_INF = float("-inf")
FP64_TOL = dict(atol=1e-10, rtol=1e-9)  # fp64 vs fp64: only summation order differs


class Shape(NamedTuple):
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int


def make_qkv(shape: Shape, dtype=torch.float64):
    """Fresh random q, k, v leaves requiring grad."""
    q = torch.randn(shape.batch, shape.seqlen_q, shape.heads, shape.head_dim, dtype=dtype)
    k = torch.randn(shape.batch, shape.seqlen_k, shape.kv_heads, shape.head_dim, dtype=dtype)
    v = torch.randn(shape.batch, shape.seqlen_k, shape.kv_heads, shape.head_dim, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def oracle_attention(
    q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
    softcap=0.0, attn_mask=None, dropout_p=0.0, keep=None, seqlens_k=None,
):
    """fp64 attention one query row at a time; returns out (B, Sq, H, Dv), lse (B, H, Sq)."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    left, right = window_size
    mask_values, bool_mask = None, False
    if attn_mask is not None:
        mask_values = attn_mask.expand(batch, heads, seqlen_q, seqlen_k).tolist()
        bool_mask = attn_mask.dtype == torch.bool
    keep_values = None if keep is None else keep.tolist()

    out_rows, lse_rows = [], []
    for b in range(batch):
        valid_k = seqlen_k if seqlens_k is None else int(seqlens_k[b])
        for h in range(heads):
            kv_head = h * kv_heads // heads
            slope = 0.0
            if alibi_slopes is not None:
                slope = float(alibi_slopes[h] if alibi_slopes.dim() == 1 else alibi_slopes[b, h])
            for i in range(seqlen_q):
                aligned = i + valid_k - seqlen_q  # the key straight "below" query i
                keys = []
                for j in range(valid_k):
                    if causal and j > aligned:
                        continue
                    if left >= 0 and j < aligned - left:
                        continue
                    if right >= 0 and j > aligned + right:
                        continue
                    if bool_mask and not mask_values[b][h][i][j]:
                        continue
                    if mask_values is not None and not bool_mask and mask_values[b][h][i][j] == NEG_INF:
                        continue
                    keys.append(j)
                if not keys:
                    out_rows.append(torch.zeros(v.shape[-1], dtype=torch.float64))
                    lse_rows.append(torch.tensor(NEG_INF, dtype=torch.float64))
                    continue
                index = torch.tensor(keys)
                logits = (k[b, index, kv_head] * q[b, i, h]).sum(-1) * scale
                if softcap > 0:
                    logits = softcap * torch.tanh(logits / softcap)
                distance = [abs(i + valid_k - seqlen_q - j) for j in keys]
                logits = logits - slope * torch.tensor(distance, dtype=torch.float64)
                if mask_values is not None and not bool_mask:
                    bias = [mask_values[b][h][i][j] for j in keys]
                    logits = logits + torch.tensor(bias, dtype=torch.float64)
                top = logits.max().detach()
                weights = torch.exp(logits - top)
                total = weights.sum()
                lse_rows.append(top + torch.log(total))
                probs = weights / total
                if keep_values is not None:
                    kept = torch.tensor([float(keep_values[b][h][i][j]) for j in keys], dtype=torch.float64)
                    probs = probs * kept / (1.0 - dropout_p)
                out_rows.append(probs @ v[b, index, kv_head])
    out = torch.stack(out_rows).view(batch, heads, seqlen_q, -1).transpose(1, 2)
    lse = torch.stack(lse_rows).view(batch, heads, seqlen_q)
    return out, lse


def grads_of(out, lse, inputs, dout, dlse):
    """Gradients of <out, dout> + <lse, dlse> (fully masked rows' -inf lse left out)."""
    loss = (out.double() * dout).sum() + (lse.masked_fill(lse.isinf(), 0.0) * dlse).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def check_against_oracle(shape: Shape, options: dict):
    """attention_ref in fp64 matches the oracle in out, lse and all input gradients."""
    q, k, v = make_qkv(shape)
    out, lse = attention_ref(q, k, v, **options)
    oracle_options = dict(options)
    seed = oracle_options.pop("dropout_seed", 0)
    if oracle_options.get("dropout_p", 0.0) > 0:
        oracle_options["keep"] = dropout_keep_mask(
            seed, shape.batch, shape.heads, shape.seqlen_q, shape.seqlen_k, oracle_options["dropout_p"]
        )
    out_expected, lse_expected = oracle_attention(q, k, v, **oracle_options)
    torch.testing.assert_close(out, out_expected, **FP64_TOL)
    torch.testing.assert_close(lse, lse_expected, **FP64_TOL)

    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = grads_of(out, lse, (q, k, v), dout, dlse)
    grads_expected = grads_of(out_expected, lse_expected, (q, k, v), dout, dlse)
    for name, grad, grad_expected in zip("qkv", grads, grads_expected):
        assert torch.isfinite(grad).all(), f"d{name} not finite"
        torch.testing.assert_close(grad, grad_expected, **FP64_TOL, msg=lambda m: f"d{name}: {m}")
    return out, lse


def bool_mask(*shape, p_keep=0.8):
    return torch.rand(*shape) < p_keep


def mask_shape(s: Shape, per_batch=True, per_head=True):
    """The score shape (B, H, Sq, Sk), with 1 for the dimensions a mask broadcasts over."""
    return (s.batch if per_batch else 1, s.heads if per_head else 1, s.seqlen_q, s.seqlen_k)


def float_mask(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# (shape, options factory): the factory runs inside the test, after the seed fixture.
ORACLE_CASES = [
    pytest.param(Shape(2, 17, 17, 3, 3, 64), lambda s: {}, id="plain"),
    pytest.param(Shape(2, 1, 203, 4, 4, 111), lambda s: {}, id="plain-decode-sq1"),
    pytest.param(Shape(2, 17, 113, 2, 2, 40), lambda s: dict(causal=True), id="causal-sq<sk"),
    pytest.param(Shape(2, 113, 17, 2, 2, 59), lambda s: dict(causal=True), id="causal-sq>sk"),
    pytest.param(Shape(1, 203, 203, 2, 1, 128), lambda s: dict(causal=True), id="causal-square-mqa"),
    pytest.param(Shape(1, 1, 17, 2, 2, 64), lambda s: dict(causal=True), id="causal-sq1"),
    pytest.param(Shape(2, 17, 113, 2, 2, 64), lambda s: dict(window_size=(8, -1)), id="window-left"),
    pytest.param(Shape(2, 113, 17, 2, 2, 64), lambda s: dict(window_size=(-1, 3)), id="window-right"),
    pytest.param(Shape(2, 17, 17, 2, 2, 40), lambda s: dict(window_size=(4, 2)), id="window-both"),
    pytest.param(Shape(1, 113, 203, 2, 2, 59), lambda s: dict(causal=True, window_size=(16, 5)),
                 id="causal-window"),
    pytest.param(Shape(2, 17, 17, 6, 2, 64), lambda s: {}, id="gqa"),
    pytest.param(Shape(2, 17, 113, 4, 1, 40), lambda s: dict(causal=True), id="mqa-causal"),
    pytest.param(Shape(2, 17, 113, 3, 3, 64), lambda s: dict(alibi_slopes=torch.rand(s.heads)),
                 id="alibi-h"),
    pytest.param(Shape(2, 113, 17, 3, 3, 64),
                 # A transposed (non-contiguous) slope tensor must work too.
                 lambda s: dict(alibi_slopes=torch.rand(s.heads, s.batch).t(), causal=True),
                 id="alibi-bh-causal"),
    pytest.param(Shape(2, 17, 17, 4, 2, 111),
                 lambda s: dict(alibi_slopes=torch.rand(s.heads), window_size=(5, 5)), id="gqa-alibi-window"),
    # softmax_scale=1 makes scores ~N(0, 64), so the cap of 2 really bends them.
    pytest.param(Shape(2, 17, 113, 2, 2, 64), lambda s: dict(softcap=2.0, softmax_scale=1.0), id="softcap"),
    pytest.param(Shape(2, 17, 113, 2, 2, 64),
                 lambda s: dict(softcap=2.0, softmax_scale=1.0, attn_mask=float_mask(*mask_shape(s))),
                 id="softcap-additive-mask"),
    pytest.param(Shape(2, 17, 113, 3, 3, 40),
                 lambda s: dict(attn_mask=bool_mask(*mask_shape(s, per_batch=False))),
                 id="bool-mask-over-batch"),
    pytest.param(Shape(2, 17, 113, 3, 3, 40),
                 lambda s: dict(attn_mask=bool_mask(*mask_shape(s, per_head=False))),
                 id="bool-mask-over-heads"),
    pytest.param(Shape(2, 17, 17, 3, 3, 40),
                 lambda s: dict(attn_mask=bool_mask(s.seqlen_q, s.seqlen_k), causal=True),
                 id="bool-mask-2d-causal"),
    pytest.param(Shape(2, 17, 17, 2, 2, 64),
                 lambda s: dict(attn_mask=float_mask(*mask_shape(s, per_head=False)).masked_fill(
                     bool_mask(*mask_shape(s, per_head=False), p_keep=0.3), NEG_INF)),
                 id="additive-mask-with-inf"),
    pytest.param(Shape(2, 17, 113, 4, 2, 59),
                 lambda s: dict(causal=True, window_size=(40, 0), alibi_slopes=torch.rand(s.batch, s.heads),
                                softcap=5.0, attn_mask=bool_mask(*mask_shape(s))),
                 id="causal-window-alibi-softcap-mask-gqa"),
    pytest.param(Shape(2, 17, 113, 2, 2, 64),
                 lambda s: dict(seqlens_k=torch.tensor([5, 113], dtype=torch.int32), causal=True,
                                alibi_slopes=torch.rand(s.heads), window_size=(-1, 2)),
                 id="seqlens_k-causal-alibi"),
    pytest.param(Shape(2, 17, 113, 4, 2, 64),
                 lambda s: dict(dropout_p=0.3, dropout_seed=1234, causal=True), id="dropout-gqa-causal"),
    pytest.param(Shape(2, 17, 113, 2, 2, 40),
                 lambda s: dict(dropout_p=0.5, dropout_seed=2**40 + 7, alibi_slopes=torch.rand(s.heads),
                                seqlens_k=torch.tensor([60, 9])),
                 id="dropout-alibi-seqlens_k"),
]


@pytest.mark.parametrize("shape, make_options", ORACLE_CASES)
def test_matches_oracle(shape, make_options):
    check_against_oracle(shape, make_options(shape))


def test_causal_sq_greater_than_sk_masks_top_rows():
    """Bottom-right causal with Sq > Sk: rows i < Sq - Sk see no key at all."""
    shape = Shape(2, 113, 17, 2, 2, 64)
    q, k, v = make_qkv(shape, dtype=torch.float32)
    out, lse = attention_ref(q, k, v, causal=True)
    blind_rows = shape.seqlen_q - shape.seqlen_k
    assert (out[:, :blind_rows] == 0).all()
    assert torch.isneginf(lse[:, :, :blind_rows]).all()
    assert torch.isfinite(lse[:, :, blind_rows:]).all()
    # The last row is aligned with the last key, so it sees every key.
    full, _ = attention_ref(q[:, -1:], k, v)
    torch.testing.assert_close(out[:, -1:], full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_fully_masked_rows_are_zero_with_zero_grads(dtype, dropout_p):
    """Rows masked by a bool mask, by an all -inf additive mask, or by seqlens_k == 0."""
    shape = Shape(3, 17, 33, 4, 2, 40)
    q, k, v = make_qkv(shape, dtype=dtype)
    mask = torch.randn(shape.batch, shape.heads, shape.seqlen_q, shape.seqlen_k)
    mask[0, :, 3] = NEG_INF  # batch 0: row 3 of every head by an additive -inf mask
    mask[1, 2, 5:9] = NEG_INF  # batch 1, head 2: rows 5..8
    seqlens_k = torch.tensor([33, 20, 0])  # batch 2: no valid key at all
    out, lse = attention_ref(q, k, v, attn_mask=mask, seqlens_k=seqlens_k, causal=True, dropout_p=dropout_p)
    masked = torch.zeros(shape.batch, shape.heads, shape.seqlen_q, dtype=torch.bool)
    masked[0, :, 3] = masked[1, 2, 5:9] = masked[2] = True

    assert (out.transpose(1, 2)[masked] == 0).all()
    assert torch.isneginf(lse[masked]).all()
    assert torch.isfinite(lse[~masked]).all() and torch.isfinite(out).all()
    (out.float().sum() + lse[~masked].sum()).backward()
    for name, tensor in zip("qkv", (q, k, v)):
        assert torch.isfinite(tensor.grad).all(), f"d{name} not finite"
    assert (q.grad.transpose(1, 2)[masked] == 0).all()
    assert (k.grad[2] == 0).all() and (v.grad[2] == 0).all()


def test_bool_and_additive_masks_agree_on_removed_keys():
    """A bool mask and an additive mask of 0/-inf remove the same keys."""
    shape = Shape(2, 17, 113, 2, 2, 64)
    q, k, v = make_qkv(shape, dtype=torch.float32)
    allowed = bool_mask(shape.batch, 1, shape.seqlen_q, shape.seqlen_k, p_keep=0.5)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, NEG_INF)
    out_bool, lse_bool = attention_ref(q, k, v, attn_mask=allowed)
    out_add, lse_add = attention_ref(q, k, v, attn_mask=additive)
    torch.testing.assert_close(out_bool, out_add)
    torch.testing.assert_close(lse_bool, lse_add)


# ---------------------------------------------------------------- dropout


def hash_formula(seed: int, idx: int) -> int:
    """dropout_keep_mask's docstring formula in plain Python ints, mod 2**32."""
    def fmix32(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) % 2**32
        x ^= x >> 13
        x = (x * 0xC2B2AE35) % 2**32
        return x ^ (x >> 16)

    key = fmix32(fmix32(0x9E3779B9 ^ (seed % 2**32)) ^ (seed >> 32))
    hashed = fmix32(fmix32(key ^ (idx % 2**32)) ^ (idx >> 32))
    return fmix32(hashed ^ key)


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**63 - 1])
def test_dropout_mask_follows_documented_formula(seed):
    batch, heads, seqlen_q, seqlen_k, dropout_p = 2, 3, 5, 7, 0.37
    keep = dropout_keep_mask(seed, batch, heads, seqlen_q, seqlen_k, dropout_p)
    threshold = math.floor(dropout_p * 2**32 + 0.5)
    assert dropout_threshold(dropout_p) == threshold
    expected = [
        hash_formula(seed, ((b * heads + h) * seqlen_q + i) * seqlen_k + j) >= threshold
        for b in range(batch) for h in range(heads) for i in range(seqlen_q) for j in range(seqlen_k)
    ]
    assert keep.flatten().tolist() == expected


def test_dropout_hash_uses_high_counter_bits():
    """Counters past 2**32 (masks over 4G elements) hash their high word too."""
    counters = [2**32 - 1, 2**32, 2**32 + 1, 3 * 2**40 + 17, 2**62 + 2**31]
    seed = 99
    hashed = hash_counters(dropout_key(seed), torch.tensor(counters, dtype=torch.int64))
    assert hashed.tolist() == [hash_formula(seed, idx) for idx in counters]
    # Same low word, different high word: different hash.
    assert hash_formula(seed, 5) != hash_formula(seed, 2**32 + 5)


def test_dropout_mask_is_deterministic_and_seeded():
    shape = (2, 4, 256, 512)  # 1M draws
    dropout_p = 0.3
    keep = dropout_keep_mask(7, *shape, dropout_p)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert torch.equal(keep, dropout_keep_mask(7, *shape, dropout_p))
    other = dropout_keep_mask(8, *shape, dropout_p)
    # Independent masks agree with probability p^2 + (1-p)^2; 5 sigma of 1M draws is 0.0025.
    agreement = (keep == other).double().mean().item()
    assert abs(agreement - (dropout_p**2 + (1 - dropout_p) ** 2)) < 0.0025
    assert dropout_keep_mask(7, *shape, 0.0).all()


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(dropout_p):
    keep = dropout_keep_mask(2024, 2, 4, 256, 512, dropout_p)
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / keep.numel())
    assert abs(keep.double().mean().item() - (1 - dropout_p)) < 5 * sigma
    # Neighbouring counters must not be correlated (a weak hash shows it here first).
    flat = keep.flatten().double()
    correlation = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    assert abs(correlation) < 5 / math.sqrt(keep.numel())


@pytest.mark.parametrize("seed, dropout_p", [(-1, 0.1), (2**63, 0.1), (0, 1.0), (0, -0.1)])
def test_dropout_mask_rejects_bad_arguments(seed, dropout_p):
    with pytest.raises(ValueError):
        dropout_keep_mask(seed, 1, 1, 1, 1, dropout_p)


def test_dropout_zero_is_no_dropout_and_seed_matters():
    q, k, v = make_qkv(Shape(2, 17, 33, 2, 2, 64), dtype=torch.float32)
    out, _ = attention_ref(q, k, v)
    out_p0, _ = attention_ref(q, k, v, dropout_p=0.0, dropout_seed=5)
    assert torch.equal(out, out_p0)
    out_a, lse_a = attention_ref(q, k, v, dropout_p=0.2, dropout_seed=5)
    out_b, lse_b = attention_ref(q, k, v, dropout_p=0.2, dropout_seed=6)
    assert not torch.allclose(out_a, out_b)
    assert torch.equal(lse_a, lse_b)  # lse is of the un-dropped scores
    torch.testing.assert_close(lse_a, attention_ref(q, k, v)[1])


def test_dropout_fwd_bwd_consistent():
    """gradcheck passes only if backward sees the forward's mask; grads are reproducible."""
    q, k, v = make_qkv(Shape(1, 4, 6, 2, 1, 5))

    def fn(q, k, v):
        return attention_ref(q, k, v, dropout_p=0.4, dropout_seed=11, window_size=(2, 1))

    assert torch.autograd.gradcheck(fn, (q, k, v))
    out, lse = fn(q, k, v)
    dout = torch.randn_like(out)
    first = torch.autograd.grad((out * dout).sum(), (q, k, v))
    out, lse = fn(q, k, v)
    second = torch.autograd.grad((out * dout).sum(), (q, k, v))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- gradcheck, dtypes


def test_gradcheck_causal_alibi_softcap():
    q, k, v = make_qkv(Shape(1, 3, 5, 2, 1, 4))
    slopes = torch.rand(2)

    def fn(q, k, v):
        return attention_ref(q, k, v, causal=True, alibi_slopes=slopes, softcap=1.5, softmax_scale=0.9)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


@pytest.mark.parametrize(
    "dtype, lse_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
     (torch.float64, torch.float64)],
)
def test_output_dtypes_and_layout(dtype, lse_dtype):
    shape = Shape(2, 17, 33, 4, 2, 59)
    q, k, v = make_qkv(shape, dtype=dtype)
    for upcast in (True, False):
        out, lse = attention_ref(q, k, v, causal=True, upcast=upcast)
        assert out.dtype == dtype and out.shape == (2, 17, 4, 59) and out.is_contiguous()
        assert lse.dtype == lse_dtype and lse.shape == (2, 4, 17)


def test_fp32_upcast_close_to_fp64():
    shape = Shape(2, 113, 203, 4, 2, 64)
    q, k, v = make_qkv(shape, dtype=torch.float32)
    options = dict(causal=True, alibi_slopes=torch.rand(4), softcap=10.0)
    out, lse = attention_ref(q, k, v, **options)
    out64, lse64 = attention_ref(q.double(), k.double(), v.double(), **options)
    torch.testing.assert_close(out, out64.float(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lse64.float(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_false_is_the_low_precision_baseline(dtype):
    """upcast=False stays in the input dtype, so its error vs fp64 exceeds upcast=True's."""
    shape = Shape(2, 113, 203, 4, 2, 128)
    q, k, v = make_qkv(shape, dtype=dtype)
    options = dict(causal=True, alibi_slopes=torch.rand(4))
    out64, _ = attention_ref(q.double(), k.double(), v.double(), **options)
    out_up, lse_up = attention_ref(q, k, v, upcast=True, **options)
    out_low, lse_low = attention_ref(q, k, v, upcast=False, **options)
    assert out_low.dtype == dtype and lse_low.dtype == torch.float32
    error_up = (out_up.double() - out64).abs().max().item()
    error_low = (out_low.double() - out64).abs().max().item()
    assert error_low > error_up > 0
    grads64 = torch.autograd.grad(out64.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads64)
    for upcast_out in (out_up, out_low):
        grads = torch.autograd.grad(upcast_out.float().sum(), (q, k, v))
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- seqlens_k


def test_seqlens_k_equals_truncated_keys_and_ignores_tail():
    """Row b sees exactly k[b, :seqlens_k[b]]; NaN past it changes nothing."""
    shape = Shape(3, 17, 113, 4, 2, 64)
    q, k, v = make_qkv(shape)
    seqlens_k = torch.tensor([17, 60, 1], dtype=torch.int32)
    with torch.no_grad():
        for b, length in enumerate(seqlens_k.tolist()):
            k[b, length:] = float("nan")
            v[b, length:] = float("nan")
    slopes = torch.rand(shape.batch, shape.heads)
    options = dict(causal=True, window_size=(10, -1), softcap=3.0)
    out, lse = attention_ref(q, k, v, seqlens_k=seqlens_k, alibi_slopes=slopes, **options)
    (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    for b, length in enumerate(seqlens_k.tolist()):
        out_b, lse_b = attention_ref(
            q[b : b + 1], k[b : b + 1, :length], v[b : b + 1, :length], alibi_slopes=slopes[b], **options
        )
        torch.testing.assert_close(out[b : b + 1], out_b, **FP64_TOL)
        torch.testing.assert_close(lse[b : b + 1], lse_b, **FP64_TOL)
        assert (k.grad[b, length:] == 0).all() and (v.grad[b, length:] == 0).all()
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------- varlen


def pack(padded, lengths):
    """(B, S, ...) padded -> (sum(lengths), ...) packed."""
    return torch.cat([padded[b, :length] for b, length in enumerate(lengths)])


def cu_seqlens(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def test_varlen_matches_oracle_per_sequence():
    """Each packed sequence is attended on its own, with its own bottom-right alignment."""
    lengths_q = [17, 0, 5, 1, 3]
    lengths_k = [113, 7, 17, 1, 0]  # sequence 1 has no queries, sequence 4 no keys
    heads, kv_heads, head_dim = 4, 2, 40
    q = torch.randn(sum(lengths_q), heads, head_dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(len(lengths_q), heads)
    options = dict(causal=True, window_size=(20, -1), softcap=4.0)
    out, lse = attention_varlen_ref(
        q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_q), max(lengths_k),
        alibi_slopes=slopes, **options,
    )
    assert out.shape == q.shape and lse.shape == (heads, sum(lengths_q)) and lse.dtype == torch.float64

    expected_out, expected_lse = [], []
    q_start = k_start = 0
    for b, (length_q, length_k) in enumerate(zip(lengths_q, lengths_k)):
        if length_q == 0:
            k_start += length_k
            continue
        out_b, lse_b = oracle_attention(
            q[q_start : q_start + length_q].unsqueeze(0), k[k_start : k_start + length_k].unsqueeze(0),
            v[k_start : k_start + length_k].unsqueeze(0), alibi_slopes=slopes[b], **options,
        )
        expected_out.append(out_b[0])
        expected_lse.append(lse_b[0])
        q_start, k_start = q_start + length_q, k_start + length_k
    expected_out, expected_lse = torch.cat(expected_out), torch.cat(expected_lse, dim=-1)
    torch.testing.assert_close(out, expected_out, **FP64_TOL)
    torch.testing.assert_close(lse, expected_lse, **FP64_TOL)
    assert (out[-3:] == 0).all() and torch.isneginf(lse[:, -3:]).all()  # the key-less sequence

    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = grads_of(out, lse, (q, k, v), dout, dlse)
    grads_expected = grads_of(expected_out, expected_lse, (q, k, v), dout, dlse)
    for grad, grad_expected in zip(grads, grads_expected):
        torch.testing.assert_close(grad, grad_expected, **FP64_TOL)


@pytest.mark.parametrize(
    "lengths_q, lengths_k, make_options",
    [
        # Queries of different lengths: only alignment-free options match the padded call.
        pytest.param([7, 0, 12, 3], [30, 5, 0, 19],
                     lambda b, h, sq, sk: dict(attn_mask=float_mask(b, h, sq, sk)),
                     id="ragged-q-additive-mask"),
        # Equal query lengths: causal, window and ALiBi line up with seqlens_k in the padded call.
        pytest.param([4, 4, 4], [30, 4, 11],
                     lambda b, h, sq, sk: dict(causal=True, window_size=(6, -1),
                                               alibi_slopes=torch.rand(b, h),
                                               attn_mask=bool_mask(1, h, sq, sk)),
                     id="equal-q-causal-alibi-window"),
    ],
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.35])
def test_varlen_equals_padded_dense(lengths_q, lengths_k, make_options, dropout_p):
    batch, heads, kv_heads, head_dim = len(lengths_q), 4, 1, 64
    max_q, max_k = max(lengths_q), max(lengths_k)
    q_pad, k_pad, v_pad = make_qkv(Shape(batch, max_q, max_k, heads, kv_heads, head_dim))
    options = dict(make_options(batch, heads, max_q, max_k), dropout_p=dropout_p, dropout_seed=31337)

    out, lse = attention_varlen_ref(
        pack(q_pad, lengths_q), pack(k_pad, lengths_k), pack(v_pad, lengths_k),
        cu_seqlens(lengths_q), cu_seqlens(lengths_k), max_q, max_k, **options,
    )
    out_pad, lse_pad = attention_ref(q_pad, k_pad, v_pad, seqlens_k=torch.tensor(lengths_k), **options)
    expected_out = pack(out_pad, lengths_q)
    expected_lse = pack(lse_pad.transpose(1, 2), lengths_q).transpose(0, 1)
    torch.testing.assert_close(out, expected_out, **FP64_TOL)
    torch.testing.assert_close(lse, expected_lse, **FP64_TOL)

    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = grads_of(out, lse, (q_pad, k_pad, v_pad), dout, dlse)
    grads_expected = grads_of(expected_out, expected_lse, (q_pad, k_pad, v_pad), dout, dlse)
    for grad, grad_expected in zip(grads, grads_expected):
        torch.testing.assert_close(grad, grad_expected, **FP64_TOL)


def test_varlen_all_sequences_empty():
    q = torch.randn(0, 2, 8)
    k = v = torch.randn(3, 2, 8)
    out, lse = attention_varlen_ref(q, k, v, cu_seqlens([0, 0]), cu_seqlens([1, 2]), 0, 2)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0) and lse.dtype == torch.float32


# ---------------------------------------------------------------- kv cache


@pytest.mark.parametrize("new_len, seqlen_q", [(1, 1), (3, 3), (0, 2)])
def test_kvcache_appends_in_place_and_attends_to_prefix(new_len, seqlen_q):
    batch, cache_len, heads, kv_heads, head_dim = 3, 64, 4, 2, 40
    k_cache = torch.randn(batch, cache_len, kv_heads, head_dim, dtype=torch.float64)
    v_cache = torch.randn(batch, cache_len, kv_heads, head_dim, dtype=torch.float64)
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=torch.float64)
    k_new = torch.randn(batch, new_len, kv_heads, head_dim, dtype=torch.float64) if new_len else None
    v_new = torch.randn(batch, new_len, kv_heads, head_dim, dtype=torch.float64) if new_len else None
    cache_seqlens = torch.tensor([0, 10, 60], dtype=torch.int32)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slopes = torch.rand(heads)
    options = dict(causal=True, window_size=(24, -1), softcap=6.0)

    out, lse = attention_with_kvcache_ref(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, alibi_slopes=slopes, **options
    )
    for b, start in enumerate(cache_seqlens.tolist()):
        end = start + new_len
        if new_len:
            assert torch.equal(k_cache[b, start:end], k_new[b])
            assert torch.equal(v_cache[b, start:end], v_new[b])
        assert torch.equal(k_cache[b, :start], k_before[b, :start])
        assert torch.equal(k_cache[b, end:], k_before[b, end:])
        assert torch.equal(v_cache[b, end:], v_before[b, end:])
        # Independent check: the oracle over the concatenated prefix and new keys.
        keys = k_before[b : b + 1, :start]
        values = v_before[b : b + 1, :start]
        if new_len:
            keys = torch.cat([keys, k_new[b : b + 1]], dim=1)
            values = torch.cat([values, v_new[b : b + 1]], dim=1)
        out_b, lse_b = oracle_attention(q[b : b + 1], keys, values, alibi_slopes=slopes, **options)
        torch.testing.assert_close(out[b : b + 1], out_b, **FP64_TOL)
        torch.testing.assert_close(lse[b : b + 1], lse_b, **FP64_TOL)


def test_kvcache_int_and_none_seqlens():
    batch, cache_len, heads, head_dim = 2, 32, 2, 64
    k_cache = torch.randn(batch, cache_len, heads, head_dim)
    v_cache = torch.randn(batch, cache_len, heads, head_dim)
    q = torch.randn(batch, 1, heads, head_dim)

    # None: the whole cache is valid and nothing is written.
    k_before = k_cache.clone()
    out, lse = attention_with_kvcache_ref(q, k_cache, v_cache, causal=True)
    expected_out, expected_lse = attention_ref(q, k_cache, v_cache, causal=True)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)
    assert torch.equal(k_cache, k_before)

    # An int: the same length for every row; garbage (even NaN) past it is ignored.
    k_cache[:, 9:] = float("nan")
    v_cache[:, 9:] = float("nan")
    k_new, v_new = torch.randn(batch, 1, heads, head_dim), torch.randn(batch, 1, heads, head_dim)
    out, lse = attention_with_kvcache_ref(q, k_cache, v_cache, k_new, v_new, 8, causal=True)
    expected_out, expected_lse = attention_ref(q, k_cache[:, :9], v_cache[:, :9], causal=True)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)
    assert torch.equal(k_cache[:, 8:9], k_new)
