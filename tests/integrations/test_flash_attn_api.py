"""The FlashAttention-2-compatible functions against flash_attn's documented semantics (CPU).

Expectations are built in this file from the formulas in flash_attn's docstrings (one
sequence at a time, plain einsum/softmax, bottom-right causal and window alignment,
``-slope * |i + Sk - Sq - j|`` ALiBi, rotary embedding as a complex multiplication) and,
for gradients, from torch's SDPA with an explicit bottom-right mask (fp64). Low-precision
inputs follow the DESIGN.md tolerance rule against ``fast_attn.reference``.

Covered: signature parity with flash_attn 2.6+ (names, order, defaults); packed
qkv/kv equal the unpacked calls (outputs and gradients); varlen equals per-sequence
calls; ``return_attn_probs`` (shapes, rows summing to 1, the negative-means-dropped
encoding and its agreement with the output and gradients, equality with the ``P @ I``
oracle, memory ``O(B * H * Sq * Sk)`` for a long Sk); ``window_size`` given as any
integer pair (tensor, numpy, list) in every function, and rejected otherwise;
``flash_attn_with_kvcache``
(in-place append, rotary interleaved and not, the query-position rule, cache_batch_idx,
LSE); the arguments that raise NotImplementedError.
"""

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fast_attn
from fast_attn.integrations.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from fast_attn.reference.attention import attention_ref, attention_varlen_ref
from fast_attn.testing import GRAD_FACTOR, assert_close

FP64_TOL = dict(rtol=1e-10, atol=1e-10)
NEG_INF = float("-inf")


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# ------------------------------------------------------------ expectations (this file)


def naive_attention(q, k, v, *, causal=False, window=(-1, -1), scale=None, softcap=0.0,
                    alibi=None):
    """One sequence by flash_attn's documented formulas.

    q: (Sq, H, D); k, v: (Sk, Hkv, D); alibi: (H,) or None.
    Returns out (Sq, H, D), probs (H, Sq, Sk), lse (H, Sq) (-inf for rows without keys).
    """
    seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[:2]
    scale = head_dim ** -0.5 if scale is None else scale
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(seqlen_q).view(-1, 1)
    j = torch.arange(seqlen_k).view(1, -1)
    diag = i + seqlen_k - seqlen_q  # the key aligned with query i (bottom-right)
    if alibi is not None:
        scores = scores - alibi.view(-1, 1, 1) * (diag - j).abs()
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if causal:
        keep &= j <= diag
    if window[0] >= 0:
        keep &= j >= diag - window[0]
    if window[1] >= 0:
        keep &= j <= diag + window[1]
    scores = scores.masked_fill(~keep, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # (H, Sq)
    alive = keep.any(-1).view(1, -1, 1)
    probs = torch.where(alive, torch.exp(scores - lse.unsqueeze(-1)), torch.zeros_like(scores))
    probs = probs.nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, probs, lse


def bottom_right_mask(seqlen_q, seqlen_k):
    """flash_attn's causal mask as a bool (Sq, Sk) mask (True = keep)."""
    i = torch.arange(seqlen_q).view(-1, 1)
    return torch.arange(seqlen_k).view(1, -1) <= i + seqlen_k - seqlen_q


def rotary_reference(x, angles, interleaved):
    """Rotate features of x (S, H, D) by ``angles`` (S, R/2) as complex multiplications:
    pair m is (x[2m], x[2m+1]) interleaved, else (x[m], x[m + R/2])."""
    rotary_dim = 2 * angles.shape[-1]
    part = x[..., :rotary_dim]
    if interleaved:
        z = torch.view_as_complex(part.reshape(*part.shape[:-1], rotary_dim // 2, 2).contiguous())
    else:
        z = torch.complex(part[..., : rotary_dim // 2], part[..., rotary_dim // 2 :])
    z = z * torch.polar(torch.ones_like(angles), angles).unsqueeze(1)  # (S, 1, R/2)
    rotated = torch.view_as_real(z).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


# -------------------------------------------------------------------------- signatures

_DENSE_OPTIONS = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
_REQUIRED = inspect.Parameter.empty

# FlashAttention 2.6+'s documented signatures (flash_attn/flash_attn_interface.py).
FA2_SIGNATURES = {
    flash_attn_func: [("q", _REQUIRED), ("k", _REQUIRED), ("v", _REQUIRED), *_DENSE_OPTIONS],
    flash_attn_qkvpacked_func: [("qkv", _REQUIRED), *_DENSE_OPTIONS],
    flash_attn_kvpacked_func: [("q", _REQUIRED), ("kv", _REQUIRED), *_DENSE_OPTIONS],
    flash_attn_varlen_func: [
        ("q", _REQUIRED), ("k", _REQUIRED), ("v", _REQUIRED), ("cu_seqlens_q", _REQUIRED),
        ("cu_seqlens_k", _REQUIRED), ("max_seqlen_q", _REQUIRED), ("max_seqlen_k", _REQUIRED),
        *_DENSE_OPTIONS, ("block_table", None),
    ],
    flash_attn_varlen_qkvpacked_func: [
        ("qkv", _REQUIRED), ("cu_seqlens", _REQUIRED), ("max_seqlen", _REQUIRED), *_DENSE_OPTIONS,
    ],
    flash_attn_varlen_kvpacked_func: [
        ("q", _REQUIRED), ("kv", _REQUIRED), ("cu_seqlens_q", _REQUIRED),
        ("cu_seqlens_k", _REQUIRED), ("max_seqlen_q", _REQUIRED), ("max_seqlen_k", _REQUIRED),
        *_DENSE_OPTIONS,
    ],
    flash_attn_with_kvcache: [
        ("q", _REQUIRED), ("k_cache", _REQUIRED), ("v_cache", _REQUIRED), ("k", None),
        ("v", None), ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
        ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
        ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None),
        ("num_splits", 0), ("return_softmax_lse", False),
    ],
}


@pytest.mark.parametrize("function", list(FA2_SIGNATURES), ids=lambda f: f.__name__)
def test_signature_matches_flash_attn(function):
    params = inspect.signature(function).parameters.values()
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert [(p.name, p.default) for p in params] == FA2_SIGNATURES[function]


# ------------------------------------------------------------------ flash_attn_func

DENSE_CASES = {
    "plain": dict(seqlen_q=17, seqlen_k=17),
    "causal_q_short": dict(seqlen_q=5, seqlen_k=17, causal=True),
    "causal_q_long": dict(seqlen_q=17, seqlen_k=5, causal=True),  # rows 0..11 see no key
    "window": dict(seqlen_q=13, seqlen_k=19, window=(4, 2)),
    "causal_window_gqa": dict(seqlen_q=19, seqlen_k=13, causal=True, window=(3, 0), kv_heads=2),
    "softcap_scale": dict(seqlen_q=11, seqlen_k=11, softcap=2.5, scale=0.7),
    "alibi_mqa": dict(seqlen_q=7, seqlen_k=23, alibi=True, kv_heads=1, causal=True),
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_flash_attn_func_matches_documented_maths(case):
    spec = DENSE_CASES[case]
    batch, heads, head_dim = 2, 6, 24
    kv_heads = spec.get("kv_heads", heads)
    q = rand(batch, spec["seqlen_q"], heads, head_dim)
    k = rand(batch, spec["seqlen_k"], kv_heads, head_dim)
    v = rand(batch, spec["seqlen_k"], kv_heads, head_dim)
    alibi = torch.rand(heads, dtype=torch.float32) if spec.get("alibi") else None
    options = dict(causal=spec.get("causal", False), window_size=spec.get("window", (-1, -1)),
                   softmax_scale=spec.get("scale"), softcap=spec.get("softcap", 0.0),
                   alibi_slopes=alibi)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, **options)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (batch, heads, spec["seqlen_q"]) and lse.dtype == torch.float32
    assert probs.shape == (batch, heads, spec["seqlen_q"], spec["seqlen_k"])
    assert torch.equal(flash_attn_func(q, k, v, **options), out)
    for b in range(batch):
        exp_out, exp_probs, exp_lse = naive_attention(
            q[b], k[b], v[b], causal=options["causal"], window=options["window_size"],
            scale=options["softmax_scale"], softcap=options["softcap"],
            alibi=None if alibi is None else alibi.double(),
        )
        torch.testing.assert_close(out[b], exp_out, **FP64_TOL)
        torch.testing.assert_close(probs[b], exp_probs, **FP64_TOL)
        torch.testing.assert_close(lse[b], exp_lse.float(), rtol=1e-6, atol=1e-6)
    # Rows of the attention matrix sum to 1, or to 0 where the row keeps no key.
    sums = probs.sum(-1)
    assert torch.allclose(sums, (lse > NEG_INF).double(), atol=1e-12)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(9, 9), (5, 12), (12, 5)])
def test_gradients_match_torch_sdpa(seqlen_q, seqlen_k):
    """flash_attn_func (bottom-right causal, GQA) against torch SDPA given the same
    bottom-right mask as a bool mask, in fp64: outputs and dq, dk, dv."""
    q, k, v = rand(2, seqlen_q, 6, 16), rand(2, seqlen_k, 2, 16), rand(2, seqlen_k, 2, 16)
    ours_in, torch_in = leaves(q, k, v), leaves(q, k, v)
    out = flash_attn_func(*ours_in, causal=True, softmax_scale=0.3)
    expected = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in torch_in), attn_mask=bottom_right_mask(seqlen_q, seqlen_k),
        scale=0.3, enable_gqa=True,
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, **FP64_TOL)
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, ours_in, dout),
                          torch.autograd.grad(expected, torch_in, dout)):
        torch.testing.assert_close(a, b, **FP64_TOL, msg=lambda m: f"d{name}: {m}")


def test_low_precision_tolerance_rule():
    q, k, v = (rand(2, 33, 4, 64, dtype=torch.bfloat16), rand(2, 47, 2, 64, dtype=torch.bfloat16),
               rand(2, 47, 2, 64, dtype=torch.bfloat16))
    options = dict(causal=True, window_size=(20, 3), softcap=5.0)
    ours_in, base_in, oracle_in = leaves(q, k, v), leaves(q, k, v), leaves(q.double(), k.double(), v.double())
    ours = flash_attn_func(*ours_in, **options)
    baseline = attention_ref(*base_in, upcast=False, **options)[0]
    oracle = attention_ref(*oracle_in, **options)[0]
    assert_close(ours.detach(), oracle.detach(), baseline.detach(), name="out")
    dout = torch.randn_like(ours)
    for name, a, b, o in zip("qkv", torch.autograd.grad(ours, ours_in, dout),
                             torch.autograd.grad(baseline, base_in, dout),
                             torch.autograd.grad(oracle, oracle_in, dout.double())):
        assert_close(a, o, b, factor=GRAD_FACTOR, name=f"d{name}")


def test_negative_softcap_is_off_and_deterministic_is_accepted():
    q, k, v = rand(1, 7, 2, 8), rand(1, 9, 2, 8), rand(1, 9, 2, 8)
    assert torch.equal(flash_attn_func(q, k, v, softcap=-1.0), flash_attn_func(q, k, v))
    ins = leaves(q, k, v)
    flash_attn_func(*ins, deterministic=True, causal=True).sum().backward()
    assert all(t.grad is not None for t in ins)


# ------------------------------------------------------------------------- packing


def test_qkvpacked_equals_unpacked():
    qkv = rand(2, 13, 3, 4, 16)
    options = dict(causal=True, window_size=(5, -1), softmax_scale=0.4)
    packed = leaves(qkv)[0]
    unpacked = leaves(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    out_p, lse_p, probs_p = flash_attn_qkvpacked_func(packed, return_attn_probs=True, **options)
    out_u, lse_u, probs_u = flash_attn_func(*unpacked, return_attn_probs=True, **options)
    for a, b in ((out_p, out_u), (lse_p, lse_u), (probs_p, probs_u)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dout = torch.randn_like(out_p)
    (dqkv,) = torch.autograd.grad(out_p, packed, dout)
    expected = torch.stack(torch.autograd.grad(out_u, unpacked, dout), dim=2)
    assert dqkv.shape == qkv.shape
    torch.testing.assert_close(dqkv, expected, rtol=0, atol=0)


def test_kvpacked_equals_unpacked():
    q, kv = rand(2, 9, 6, 16), rand(2, 14, 2, 3, 16)  # GQA: 3 K/V heads
    options = dict(causal=True, alibi_slopes=torch.rand(6))
    q_p, kv_p = leaves(q, kv)
    q_u, k_u, v_u = leaves(q, kv[:, :, 0], kv[:, :, 1])
    out_p = flash_attn_kvpacked_func(q_p, kv_p, **options)
    out_u = flash_attn_func(q_u, k_u, v_u, **options)
    torch.testing.assert_close(out_p, out_u, rtol=0, atol=0)
    dout = torch.randn_like(out_p)
    dq_p, dkv = torch.autograd.grad(out_p, (q_p, kv_p), dout)
    dq_u, dk_u, dv_u = torch.autograd.grad(out_u, (q_u, k_u, v_u), dout)
    torch.testing.assert_close(dq_p, dq_u, rtol=0, atol=0)
    torch.testing.assert_close(dkv, torch.stack((dk_u, dv_u), dim=2), rtol=0, atol=0)


@pytest.mark.parametrize("packing", ["qkv", "kv"])
def test_varlen_packed_equals_unpacked(packing):
    lengths = [4, 11, 1]
    cu = torch.tensor([0, 4, 15, 16], dtype=torch.int32)
    if packing == "qkv":
        qkv = rand(16, 3, 4, 8)
        out = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lengths), causal=True)
        q, k, v = qkv.unbind(1)
    else:
        q, kv = rand(16, 4, 8), rand(16, 2, 2, 8)
        out = flash_attn_varlen_kvpacked_func(q, kv, cu, cu, max(lengths), max(lengths), causal=True)
        k, v = kv.unbind(1)
    expected = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# -------------------------------------------------------------------------- varlen


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 1))])
def test_varlen_equals_per_sequence_calls(causal, window):
    lengths_q, lengths_k = [5, 0, 17, 3], [7, 3, 17, 1]
    heads, kv_heads, head_dim = 4, 2, 16
    cu_q, cu_k = cumulative(lengths_q), cumulative(lengths_k)
    q = rand(sum(lengths_q), heads, head_dim)
    k, v = rand(sum(lengths_k), kv_heads, head_dim), rand(sum(lengths_k), kv_heads, head_dim)
    alibi = torch.rand(len(lengths_q), heads)  # (B, H): indexed by sequence
    options = dict(causal=causal, window_size=window, softcap=3.0)
    packed = leaves(q, k, v)
    out, lse, probs = flash_attn_varlen_func(*packed, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                             alibi_slopes=alibi, return_attn_probs=True, **options)
    assert out.shape == q.shape
    assert lse.shape == (heads, q.shape[0])
    assert probs.shape == (len(lengths_q), heads, max(lengths_q), max(lengths_k))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, packed, dout)
    for b in range(len(lengths_q)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        pieces = leaves(q[qs].unsqueeze(0), k[ks].unsqueeze(0), v[ks].unsqueeze(0))
        out_b, lse_b, probs_b = flash_attn_func(*pieces, alibi_slopes=alibi[b],
                                                return_attn_probs=True, **options)
        torch.testing.assert_close(out[qs], out_b[0], **FP64_TOL)
        torch.testing.assert_close(lse[:, qs], lse_b[0])
        block = probs[b, :, : lengths_q[b], : lengths_k[b]]
        torch.testing.assert_close(block, probs_b[0], **FP64_TOL)
        outside = probs[b].clone()
        outside[:, : lengths_q[b], : lengths_k[b]] = 0
        assert not outside.any()
        if lengths_q[b]:
            grads_b = torch.autograd.grad(out_b, pieces, dout[qs].unsqueeze(0))
            for name, packed_grad, grad_b, rows in zip("qkv", grads, grads_b, (qs, ks, ks)):
                torch.testing.assert_close(packed_grad[rows], grad_b[0], **FP64_TOL,
                                           msg=lambda m: f"seq {b} d{name}: {m}")


def test_varlen_block_table_not_implemented():
    q, cu = rand(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))


# ------------------------------------------------------------------- dropout encoding


def test_attn_probs_encode_dropout():
    """S_dmask's magnitudes are the un-dropped probabilities, its negative entries the
    dropped ones, and the output (and its gradients) are those of
    ``(|S| * kept / (1 - p)) @ V``: the mask reported is the mask applied."""
    p = 0.25
    q, k, v = rand(2, 24, 3, 16), rand(2, 40, 3, 16), rand(2, 40, 3, 16)
    ins = leaves(q, k, v)
    torch.manual_seed(7)
    out, lse, s_dmask = flash_attn_func(*ins, dropout_p=p, causal=True, return_attn_probs=True)
    _, lse_plain, probs_plain = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    torch.testing.assert_close(s_dmask.abs(), probs_plain, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_plain, rtol=0, atol=0)
    kept = ~s_dmask.signbit()  # (B, H, Sq, Sk); -0.0 marks a dropped zero-probability entry
    rate = 1 - kept.double().mean().item()
    assert abs(rate - p) < 0.03, rate  # 5760 draws: std 0.006

    def expected_out(q_, k_, v_):
        rows = []
        for b in range(q_.shape[0]):
            _, probs, _ = naive_attention(q_[b], k_[b], v_[b], causal=True)
            dropped = probs * kept[b] / (1 - p)  # (H, Sq, Sk)
            rows.append(torch.einsum("hqk,khd->qhd", dropped, v_[b]))
        return torch.stack(rows)

    ref_ins = leaves(q, k, v)
    expected = expected_out(*ref_ins)
    torch.testing.assert_close(out, expected, **FP64_TOL)
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, ins, dout),
                          torch.autograd.grad(expected, ref_ins, dout)):
        torch.testing.assert_close(a, b, **FP64_TOL, msg=lambda m: f"d{name}: {m}")
    torch.manual_seed(7)
    assert torch.equal(flash_attn_func(q, k, v, dropout_p=p, causal=True), out.detach())


def test_varlen_attn_probs_encode_dropout():
    p = 0.3
    lengths = [6, 13]
    cu = cumulative(lengths)
    q, k, v = rand(19, 2, 8), rand(19, 2, 8), rand(19, 2, 8)
    out, _, s_dmask = flash_attn_varlen_func(q, k, v, cu, cu, 13, 13, dropout_p=p,
                                             return_attn_probs=True)
    for b, length in enumerate(lengths):
        rows = slice(cu[b], cu[b + 1])
        block = s_dmask[b, :, :length, :length]  # (H, S_b, S_b)
        _, probs, _ = naive_attention(q[rows], k[rows], v[rows])
        torch.testing.assert_close(block.abs(), probs, **FP64_TOL)
        kept = probs * ~block.signbit() / (1 - p)
        torch.testing.assert_close(out[rows], torch.einsum("hqk,khd->qhd", kept, v[rows]), **FP64_TOL)


# ------------------------------------------------------- attention probabilities


def identity_probs(q, k, dropout_p=0.0, seed=None, **options):
    """S_dmask as it was first computed: the reference attending to the identity matrix as
    V (``P @ I = P``), ``(B, H, Sq, Sk)`` with dropped entries negated. O(Sk^2) memory:
    small shapes only."""
    batch, seqlen_k, kv_heads = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(seqlen_k, dtype=q.dtype).view(1, seqlen_k, 1, seqlen_k)
    rows, _ = attention_ref(q, k, eye.expand(batch, seqlen_k, kv_heads, seqlen_k), **options)
    probs = rows.transpose(1, 2)  # (B, H, Sq, Sk)
    if dropout_p == 0.0:
        return probs
    keep = fast_attn.dropout_mask(seed, *probs.shape, dropout_p)
    return torch.where(keep, probs, -probs)


PROBS_CASES = {
    "plain": dict(),
    "causal_gqa": dict(causal=True, kv_heads=1),
    "window_softcap": dict(window_size=(3, 1), softcap=2.0),
    "alibi_causal": dict(causal=True, alibi=True),
    "dropout": dict(causal=True, dropout_p=0.3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(7, 13), (13, 7)])
@pytest.mark.parametrize("case", PROBS_CASES)
def test_attn_probs_equal_identity_oracle(case, seqlen_q, seqlen_k, dtype):
    """S_dmask (from the LSE's gradient) equals the P @ I computation, masks, softcap,
    ALiBi, GQA, fully masked rows (Sq > Sk, causal) and the dropout signs included."""
    spec = dict(PROBS_CASES[case])
    kv_heads, alibi = spec.pop("kv_heads", 2), spec.pop("alibi", False)
    dropout_p = spec.pop("dropout_p", 0.0)
    if alibi:
        spec["alibi_slopes"] = torch.rand(2, 4)  # (B, H), fp32 as flash_attn requires
    q = rand(2, seqlen_q, 4, 8, dtype=dtype)
    k, v = rand(2, seqlen_k, kv_heads, 8, dtype=dtype), rand(2, seqlen_k, kv_heads, 8, dtype=dtype)
    torch.manual_seed(5)
    _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=dropout_p, return_attn_probs=True, **spec)
    seed = None
    if dropout_p:
        torch.manual_seed(5)  # the seed the call drew
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    expected = identity_probs(q, k, dropout_p, seed, **spec)
    # exp(s - lse) vs softmax(s): the same value to a rounding of the compute dtype.
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(s_dmask, expected, rtol=tol, atol=tol)
    assert torch.equal(s_dmask.signbit(), expected.signbit())
    assert not s_dmask.requires_grad


def test_varlen_attn_probs_equal_identity_oracle():
    lengths_q, lengths_k = [5, 0, 9, 3], [7, 4, 2, 3]
    cu_q, cu_k = cumulative(lengths_q), cumulative(lengths_k)
    q, k = rand(17, 4, 8), rand(16, 2, 8)
    options = dict(causal=True, softcap=3.0, window_size=(4, 0))
    _, _, s_dmask = flash_attn_varlen_func(q, k, k, cu_q, cu_k, 9, 7, return_attn_probs=True,
                                           **options)
    assert s_dmask.shape == (4, 4, 9, 7)
    expected = torch.zeros_like(s_dmask)
    for b, (sq, sk) in enumerate(zip(lengths_q, lengths_k)):
        q_b, k_b = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]]
        expected[b, :, :sq, :sk] = identity_probs(q_b[None], k_b[None], **options)[0]
    torch.testing.assert_close(s_dmask, expected, **FP64_TOL)


def test_attn_probs_under_inference_mode_and_grad():
    q, k, v = rand(1, 6, 2, 8), rand(1, 9, 2, 8), rand(1, 9, 2, 8)
    _, _, expected = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    with torch.inference_mode():
        _, _, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    ins = leaves(q, k, v)
    out, _, probs = flash_attn_func(*ins, causal=True, return_attn_probs=True)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    assert not probs.requires_grad and out.requires_grad


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op creates (backward ops included:
    the autograd engine carries the mode), whatever allocator or device holds them."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("api", ["dense", "varlen"])
def test_attn_probs_memory_is_linear_in_sk(api):
    """A long Sk with one query: no tensor beyond the O(B * H * Sq * Sk) probabilities and
    the O(B * H * Sk * D) copy of K the reference makes; the identity-matrix V was
    (B, H, Sk, Sk), 256x larger here."""
    batch, heads, head_dim, seqlen_k = 1, 4, 8, 2048
    q, k = rand(batch, 1, heads, head_dim, dtype=torch.float32), rand(batch, seqlen_k, heads, head_dim, dtype=torch.float32)
    with LargestTensor() as mode:
        if api == "dense":
            _, _, probs = flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
        else:
            cu_q, cu_k = cumulative([1]), cumulative([seqlen_k])
            _, _, probs = flash_attn_varlen_func(q[0], k[0], k[0], cu_q, cu_k, 1, seqlen_k,
                                                 causal=True, return_attn_probs=True)
    assert probs.shape == (batch, heads, 1, seqlen_k)
    bound = batch * heads * seqlen_k * max(1, head_dim)
    assert mode.largest <= bound < heads * seqlen_k * seqlen_k // 64, mode.largest


# ---------------------------------------------------------------------- window_size

WINDOW_FORMS = {
    "tuple": (5, 2),
    "list": [5, 2],
    "int64_tensor": torch.tensor([5, 2]),
    "int32_tensor": torch.tensor([5, 2], dtype=torch.int32),
    "numpy_ints": (np.int64(5), np.int32(2)),
    "numpy_array": np.array([5, 2]),
    "torch_size": torch.Size([5, 2]),
}


def _window_calls(window_size):
    """Every flash_attn function that takes window_size, called with it (same inputs)."""
    torch.manual_seed(11)
    q, kv = rand(2, 9, 4, 8), rand(2, 9, 2, 2, 8)
    qkv = torch.stack((q, q.flip(1), q.roll(1, 1)), dim=2)
    cu = cumulative([9, 9])
    flat = dict(q=q.flatten(0, 1), kv=kv.flatten(0, 1), qkv=qkv.flatten(0, 1))
    k_cache, v_cache = rand(2, 12, 2, 8), rand(2, 12, 2, 8)
    seqlens = torch.tensor([9, 3], dtype=torch.int32)
    w = dict(window_size=window_size)
    return {
        "func": flash_attn_func(q, *kv.unbind(2), **w),
        "qkvpacked": flash_attn_qkvpacked_func(qkv, **w),
        "kvpacked": flash_attn_kvpacked_func(q, kv, **w),
        "varlen": flash_attn_varlen_func(flat["q"], *flat["kv"].unbind(1), cu, cu, 9, 9, **w),
        "varlen_qkvpacked": flash_attn_varlen_qkvpacked_func(flat["qkv"], cu, 9, **w),
        "varlen_kvpacked": flash_attn_varlen_kvpacked_func(flat["q"], flat["kv"], cu, cu, 9, 9, **w),
        "with_kvcache": flash_attn_with_kvcache(q[:, :2], k_cache, v_cache, cache_seqlens=seqlens, **w),
    }


@pytest.mark.parametrize("form", WINDOW_FORMS)
def test_window_size_accepts_any_integer_pair(form):
    """FlashAttention's own tests pass window_size as a 2-element int tensor: every
    function takes it (and numpy ints, lists, torch.Size) as the tuple."""
    expected = _window_calls((5, 2))
    got = _window_calls(WINDOW_FORMS[form])
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    # The window did act: a full window gives another result.
    assert not torch.equal(_window_calls((-1, -1))["func"], expected["func"])


def test_window_size_tensor_with_kvcache_rotary_is_local():
    """flash_attn_with_kvcache rotates every query at its own position when the window is
    local: a tensor window must count as local exactly like the tuple."""
    q, k_cache, v_cache = rand(1, 3, 2, 8), rand(1, 10, 2, 8), rand(1, 10, 2, 8)
    k_new, v_new = rand(1, 3, 2, 8), rand(1, 3, 2, 8)
    _, cos, sin = rotary_tables(10, 8)
    seqlens = torch.tensor([4], dtype=torch.int32)
    outs = []
    for window in ((2, 0), torch.tensor([2, 0])):
        outs.append(flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k_new, v_new, cos, sin,
                                            cache_seqlens=seqlens, window_size=window))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("bad,error", [
    ((True, 1), TypeError),
    ((2.0, 1), TypeError),
    (torch.tensor([2.0, 1.0]), TypeError),
    (torch.tensor([True, False]), TypeError),
    (torch.tensor([[2, 1]]), TypeError),
    ((torch.tensor(True), 1), TypeError),
    (np.array([2.0, 1.0]), TypeError),
    (3, TypeError),
    ("ab", TypeError),
    ((1, 2, 3), ValueError),
    (torch.tensor([2, 1, 0]), ValueError),
    ((-2, 0), ValueError),
], ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__)
def test_window_size_rejects_non_integer_pairs(bad, error):
    q, k = rand(1, 4, 2, 8), rand(1, 4, 2, 8)
    cu = cumulative([4])
    calls = [
        lambda: flash_attn_func(q, k, k, window_size=bad),
        lambda: flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 4, 4, window_size=bad),
        lambda: flash_attn_with_kvcache(q, k, k, window_size=bad),
    ]
    for call in calls:
        with pytest.raises(error, match="window_size"):
            call()


# ------------------------------------------------------------------------ KV cache


def rotary_tables(seqlen_ro, rotary_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(seqlen_ro, dtype=torch.float64).view(-1, 1) * inv_freq  # (S_ro, R/2)
    return angles, angles.cos(), angles.sin()


def expected_decode(q, k_rows, v_rows, k_new, v_new, seqlens, *, causal, window, angles=None,
                    interleaved=True):
    """Each batch row by hand: rotate, append, attend. Returns out, lse, new cache rows."""
    k_rows, v_rows = k_rows.clone(), v_rows.clone()
    outs, lses = [], []
    per_token_q = causal or window != (-1, -1)
    for b, start in enumerate(seqlens):
        q_b, k_b = q[b], k_new[b]
        if angles is not None:
            k_b = rotary_reference(k_b, angles[start : start + k_b.shape[0]], interleaved)
            q_pos = start + torch.arange(q_b.shape[0]) if per_token_q else torch.full((q_b.shape[0],), start)
            q_b = rotary_reference(q_b, angles[q_pos], interleaved)
        k_rows[b, start : start + k_b.shape[0]] = k_b
        v_rows[b, start : start + k_b.shape[0]] = v_new[b]
        end = start + k_b.shape[0]
        out, _, lse = naive_attention(q_b, k_rows[b, :end], v_rows[b, :end], causal=causal, window=window)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses), k_rows, v_rows


@pytest.mark.parametrize("rotary", [None, "interleaved", "neox"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (4, 0))])
def test_with_kvcache_append_and_rotary(rotary, causal, window):
    batch, cache_len, heads, kv_heads, head_dim, new_len = 3, 20, 4, 2, 16, 3
    seqlens = [0, 5, 17]
    q = rand(batch, new_len, heads, head_dim)
    k_new, v_new = rand(batch, new_len, kv_heads, head_dim), rand(batch, new_len, kv_heads, head_dim)
    k_cache, v_cache = rand(batch, cache_len, kv_heads, head_dim), rand(batch, cache_len, kv_heads, head_dim)
    angles = cos = sin = None
    if rotary is not None:
        angles, cos, sin = rotary_tables(24, rotary_dim=8)  # rotary_dim 8 < head_dim 16
    exp_out, exp_lse, exp_k, exp_v = expected_decode(
        q, k_cache, v_cache, k_new, v_new, seqlens, causal=causal, window=window, angles=angles,
        interleaved=rotary == "interleaved",
    )
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), causal=causal,
        window_size=window, rotary_interleaved=rotary == "interleaved", return_softmax_lse=True,
    )
    torch.testing.assert_close(out, exp_out, **FP64_TOL)
    torch.testing.assert_close(lse, exp_lse.float())
    torch.testing.assert_close(k_cache, exp_k, **FP64_TOL)  # appended in place, rest untouched
    torch.testing.assert_close(v_cache, exp_v, rtol=0, atol=0)


def test_with_kvcache_cache_batch_idx():
    cache_batch, batch, cache_len, heads, head_dim = 5, 3, 12, 2, 8
    index = torch.tensor([3, 0, 4], dtype=torch.int32)
    seqlens = [2, 7, 0]
    q = rand(batch, 2, heads, head_dim)
    k_new, v_new = rand(batch, 2, heads, head_dim), rand(batch, 2, heads, head_dim)
    k_cache = rand(cache_batch, cache_len, heads, head_dim)
    v_cache = rand(cache_batch, cache_len, heads, head_dim)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    angles, cos, sin = rotary_tables(cache_len, rotary_dim=head_dim)
    exp_out, _, exp_k, exp_v = expected_decode(
        q, k_cache[index.long()], v_cache[index.long()], k_new, v_new, seqlens, causal=True,
        window=(-1, -1), angles=angles, interleaved=False,
    )
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                  cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
                                  cache_batch_idx=index, causal=True, rotary_interleaved=False)
    torch.testing.assert_close(out, exp_out, **FP64_TOL)
    torch.testing.assert_close(k_cache[index.long()], exp_k, **FP64_TOL)
    torch.testing.assert_close(v_cache[index.long()], exp_v, rtol=0, atol=0)
    for untouched in (1, 2):
        assert torch.equal(k_cache[untouched], k_before[untouched])
        assert torch.equal(v_cache[untouched], v_before[untouched])


def test_with_kvcache_without_append():
    q, k_cache, v_cache = rand(2, 1, 4, 8), rand(2, 9, 2, 8), rand(2, 9, 2, 8)
    full = flash_attn_with_kvcache(q, k_cache, v_cache)  # cache_seqlens None: every row filled
    torch.testing.assert_close(full, flash_attn_func(q, k_cache, v_cache), **FP64_TOL)
    partial = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, causal=True)
    torch.testing.assert_close(partial, flash_attn_func(q, k_cache[:, :6], v_cache[:, :6], causal=True),
                               **FP64_TOL)


def test_with_kvcache_is_forward_only_like_flash_attn():
    q = rand(1, 1, 2, 8).requires_grad_()
    out = flash_attn_with_kvcache(q, rand(1, 4, 2, 8), rand(1, 4, 2, 8))
    assert not out.requires_grad


@pytest.mark.parametrize("argument", ["cache_leftpad", "block_table"])
def test_with_kvcache_unsupported_arguments(argument):
    q, cache = rand(1, 1, 2, 8), rand(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match=argument):
        flash_attn_with_kvcache(q, cache, cache.clone(), **{argument: torch.zeros(1, 1, dtype=torch.int32)})


def test_with_kvcache_rotary_errors():
    q, cache = rand(1, 1, 2, 8), rand(1, 6, 2, 8)
    _, cos, sin = rotary_tables(6, rotary_dim=8)
    with pytest.raises(ValueError, match="pass k and v"):
        flash_attn_with_kvcache(q, cache, cache.clone(), rotary_cos=cos, rotary_sin=sin, cache_seqlens=2)
    with pytest.raises(ValueError, match="rows"):
        flash_attn_with_kvcache(q, cache, cache.clone(), rand(1, 1, 2, 8), rand(1, 1, 2, 8),
                                rotary_cos=cos[:4], rotary_sin=sin[:4], cache_seqlens=2)
