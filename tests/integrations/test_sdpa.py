"""``fast_attn.integrations.sdpa.scaled_dot_product_attention`` against torch's SDPA (CPU).

The oracle is ``torch.nn.functional.scaled_dot_product_attention`` itself on fp64 inputs
(its math backend): outputs and the gradients of query, key, value and a float mask must
agree to fp64 rounding. Low-precision inputs follow the DESIGN.md tolerance rule with
torch's SDPA in the input dtype as the baseline.

Covered: top-left ``is_causal`` with ``L == S``, ``L < S`` and ``L > S``; bool and float
masks of several broadcast shapes, fully masked rows; ``enable_gqa`` and torch's head
broadcasting; ``scale`` (default, custom, 0, negative); 2-D, 3-D and 5-D inputs with
broadcast batch dims; that the kernel receives views, not copies; dropout statistics and
reproducibility (torch's dropout RNG differs, so values are not compared with torch);
the errors torch raises; the signature.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

from fast_attn.integrations import sdpa as sdpa_module
from fast_attn.integrations.sdpa import SDPAInputError, scaled_dot_product_attention
from fast_attn.testing import GRAD_FACTOR, assert_close

FP64_TOL = dict(rtol=1e-10, atol=1e-10)


def make_qkv(batch_shape=(2,), heads=4, kv_heads=4, seqlen_q=17, seqlen_k=17, head_dim=40,
             dtype=torch.float64):
    q = torch.randn(*batch_shape, heads, seqlen_q, head_dim, dtype=dtype)
    k = torch.randn(*batch_shape, kv_heads, seqlen_k, head_dim, dtype=dtype)
    v = torch.randn(*batch_shape, kv_heads, seqlen_k, head_dim, dtype=dtype)
    return q, k, v


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point())
            for t in tensors]


def check_against_torch(q, k, v, attn_mask=None, **kwargs):
    """Forward and gradients (query, key, value, float mask) against torch SDPA, fp64."""
    ours_in, torch_in = leaves(q, k, v, attn_mask), leaves(q, k, v, attn_mask)
    ours = scaled_dot_product_attention(*ours_in[:3], attn_mask=ours_in[3], **kwargs)
    expected = F.scaled_dot_product_attention(*torch_in[:3], attn_mask=torch_in[3], **kwargs)
    assert ours.shape == expected.shape
    assert ours.dtype == expected.dtype
    torch.testing.assert_close(ours, expected, **FP64_TOL)
    dout = torch.randn_like(expected)
    wanted = [i for i, t in enumerate(ours_in) if t is not None and t.requires_grad]
    ours_grads = torch.autograd.grad(ours, [ours_in[i] for i in wanted], dout)
    torch_grads = torch.autograd.grad(expected, [torch_in[i] for i in wanted], dout)
    for i, a, b in zip(wanted, ours_grads, torch_grads):
        torch.testing.assert_close(a, b, **FP64_TOL, msg=lambda m: f"grad of input {i}: {m}")
    return ours


# ------------------------------------------------------------------------ causal


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 17), (5, 17), (17, 5), (1, 13), (13, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch(seqlen_q, seqlen_k, is_causal):
    q, k, v = make_qkv(seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    check_against_torch(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(2, 4), (4, 2)])
def test_causal_is_top_left(seqlen_q, seqlen_k):
    """With one-hot values, row i of the output is row i of the attention matrix: the
    keys it uses are exactly j <= i, whatever L and S."""
    q = torch.randn(1, 1, seqlen_q, seqlen_k, dtype=torch.float64)
    k = torch.randn(1, 1, seqlen_k, seqlen_k, dtype=torch.float64)
    v = torch.eye(seqlen_k, dtype=torch.float64).view(1, 1, seqlen_k, seqlen_k)
    weights = scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0]  # (L, S)
    rows = torch.arange(seqlen_q).view(-1, 1)
    cols = torch.arange(seqlen_k).view(1, -1)
    assert torch.equal(weights > 0, cols <= rows)
    torch.testing.assert_close(weights.sum(-1), torch.ones(seqlen_q, dtype=torch.float64))


# ------------------------------------------------------------------------- masks


@pytest.mark.parametrize("mask_shape", [(17, 11), (2, 1, 17, 11), (4, 17, 11), (2, 4, 17, 11), (1, 11)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(mask_shape, kind):
    q, k, v = make_qkv(seqlen_q=17, seqlen_k=11)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True  # every row keeps a key: torch and we agree on fully masked rows below
    else:
        mask = torch.randn(mask_shape, dtype=torch.float64)
        mask = mask.masked_fill(torch.rand(mask_shape) < 0.2, float("-inf"))
        mask[..., 0] = 0.0
    check_against_torch(q, k, v, attn_mask=mask)


def test_float32_mask_with_float64_query():
    q, k, v = make_qkv(seqlen_q=9, seqlen_k=12)
    check_against_torch(q, k, v, attn_mask=torch.randn(9, 12, dtype=torch.float32))


def test_fully_masked_rows_give_zero():
    q, k, v = make_qkv(seqlen_q=7, seqlen_k=5)
    bool_mask = torch.ones(7, 5, dtype=torch.bool)
    bool_mask[3] = False
    float_mask = torch.zeros(7, 5, dtype=torch.float64)
    float_mask[[1, 4]] = float("-inf")
    for mask in (bool_mask, float_mask):
        q_in = q.clone().requires_grad_()
        out = scaled_dot_product_attention(q_in, k, v, attn_mask=mask)
        assert not out.isnan().any()
        dead = ~(mask if mask.dtype == torch.bool else mask.isfinite()).any(-1)  # (L,)
        assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
        (grad,) = torch.autograd.grad(out.sum(), q_in)
        assert torch.equal(grad[:, :, dead], torch.zeros_like(grad[:, :, dead]))
        # torch >= 2.5's math backend also gives 0 there (older versions gave NaN).
        check_against_torch(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------- heads and batch


@pytest.mark.parametrize("heads,kv_heads,enable_gqa", [(6, 2, True), (6, 1, True), (6, 6, True),
                                                        (6, 1, False), (1, 3, False)])
def test_head_counts(heads, kv_heads, enable_gqa):
    q, k, v = make_qkv(heads=heads, kv_heads=kv_heads, seqlen_q=13, seqlen_k=9)
    check_against_torch(q, k, v, enable_gqa=enable_gqa, is_causal=True)


def test_unbatched_inputs():
    q, k, v = make_qkv(batch_shape=(), seqlen_q=6, seqlen_k=10)  # (H, L, E)
    out = check_against_torch(q, k, v, is_causal=True)
    assert out.shape == (4, 6, 40)
    out = check_against_torch(q[0], k[0], v[0], attn_mask=torch.rand(6, 10) > 0.2)  # (L, E)
    assert out.shape == (6, 40)


def test_many_and_broadcast_batch_dims():
    q = torch.randn(2, 3, 4, 7, 16, dtype=torch.float64)
    k = torch.randn(2, 1, 2, 9, 16, dtype=torch.float64)
    v = torch.randn(1, 3, 2, 9, 16, dtype=torch.float64)
    mask = torch.randn(3, 1, 7, 9, dtype=torch.float64)
    out = check_against_torch(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == (2, 3, 4, 7, 16)


# ------------------------------------------------------------------------- scale


@pytest.mark.parametrize("scale", [None, 0.37])
def test_scale(scale):
    q, k, v = make_qkv(seqlen_q=11, seqlen_k=11)
    check_against_torch(q, k, v, scale=scale, is_causal=True)


def test_negative_scale():
    """The documented formula ``softmax(q k^T * scale) v`` (torch's CPU math backend takes
    sqrt(scale) and returns NaN here): equal to scale 0.5 on the negated query."""
    q, k, v = make_qkv(seqlen_q=11, seqlen_k=13)
    q_in, q_neg = leaves(q, -q)
    out = scaled_dot_product_attention(q_in, k, v, scale=-0.5, is_causal=True)
    expected = F.scaled_dot_product_attention(q_neg, k, v, scale=0.5, is_causal=True)
    torch.testing.assert_close(out, expected, **FP64_TOL)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, q_in, dout)
    (grad_neg,) = torch.autograd.grad(expected, q_neg, dout)
    torch.testing.assert_close(grad, -grad_neg, **FP64_TOL)


def test_scale_zero():
    # Not with is_causal: torch's math backend then computes 0 * -inf = NaN above the diagonal.
    q, k, v = make_qkv(seqlen_q=11, seqlen_k=8)
    check_against_torch(q, k, v, scale=0.0)


# ----------------------------------------------------------------- precision, views


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_tolerance_rule(dtype):
    q, k, v = make_qkv(seqlen_q=33, seqlen_k=47, head_dim=64, dtype=dtype)
    mask = torch.rand(33, 47) > 0.2
    mask[:, 0] = True
    ours_in, base_in, oracle_in = leaves(q, k, v), leaves(q, k, v), leaves(*(t.double() for t in (q, k, v)))
    ours = scaled_dot_product_attention(*ours_in, attn_mask=mask)
    baseline = F.scaled_dot_product_attention(*base_in, attn_mask=mask)
    oracle = F.scaled_dot_product_attention(*oracle_in, attn_mask=mask)
    assert ours.dtype == dtype
    assert_close(ours.detach(), oracle.detach(), baseline.detach(), name="out")
    dout = torch.randn_like(ours)
    for name, a, b, o in zip(
        "qkv",
        torch.autograd.grad(ours, ours_in, dout),
        torch.autograd.grad(baseline, base_in, dout),
        torch.autograd.grad(oracle, oracle_in, dout.double()),
    ):
        assert_close(a, o, b, factor=GRAD_FACTOR, name=f"d{name}")


def test_passes_views_and_returns_a_view(monkeypatch):
    """(B, H, S, D) inputs reach fast_attn.attention as (B, S, H, D) views of the same
    storage, and the result comes back as the (B, H, L, D) view of its output."""
    seen = {}
    real_attention = sdpa_module.attention

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v)
        seen["out"] = real_attention(q, k, v, **kwargs)
        return seen["out"]

    monkeypatch.setattr(sdpa_module, "attention", spy)
    q, k, v = make_qkv(heads=4, kv_heads=2, seqlen_q=8, seqlen_k=8)
    out = scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for name, original in (("q", q), ("k", k), ("v", v)):
        passed = seen[name]
        assert passed.data_ptr() == original.data_ptr(), name
        assert passed.shape == original.transpose(1, 2).shape, name
        assert passed.stride() == original.transpose(1, 2).stride(), name
    assert out.data_ptr() == seen["out"].data_ptr()


# ------------------------------------------------------------------------ dropout


def test_dropout_statistics_and_reproducibility():
    """k = 0 makes every weight 1/S; with one-hot values each output entry is one weight,
    so it is either 0 (dropped) or 1 / (S (1 - p)) (kept and rescaled)."""
    seqlen, p = 64, 0.3
    q = torch.randn(4, 2, seqlen, seqlen, dtype=torch.float64)
    k = torch.zeros(4, 2, seqlen, seqlen, dtype=torch.float64)
    v = torch.eye(seqlen, dtype=torch.float64).expand(4, 2, seqlen, seqlen)
    torch.manual_seed(1)
    out = scaled_dot_product_attention(q, k, v, dropout_p=p)
    kept_value = 1.0 / (seqlen * (1 - p))
    dropped = out == 0
    torch.testing.assert_close(out[~dropped], torch.full_like(out[~dropped], kept_value))
    rate = dropped.double().mean().item()
    assert abs(rate - p) < 0.02, rate  # 32768 Bernoulli draws: std 0.0025
    torch.manual_seed(1)
    assert torch.equal(scaled_dot_product_attention(q, k, v, dropout_p=p), out)
    assert not torch.equal(scaled_dot_product_attention(q, k, v, dropout_p=p), out)


def test_dropout_one_gives_zeros():
    q, k, v = leaves(*make_qkv(seqlen_q=5, seqlen_k=6))
    out = scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# ------------------------------------------------------------------------- errors


def _error_cases():
    q, k, v = make_qkv(heads=8, kv_heads=2, seqlen_q=5, seqlen_k=7, head_dim=8)
    k3, v3 = make_qkv(heads=8, kv_heads=3, seqlen_q=5, seqlen_k=7, head_dim=8)[1:]
    mask = torch.ones(5, 7, dtype=torch.bool)
    return {
        "mask_and_causal": ((q, k, v), dict(attn_mask=mask, is_causal=True, enable_gqa=True)),
        "heads_without_gqa": ((q, k, v), {}),
        "heads_not_divisible": ((q, k3, v3), dict(enable_gqa=True)),
        "dtype_mix": ((q, k, v.float()), dict(enable_gqa=True)),
        "int_mask": ((q, k, v), dict(attn_mask=mask.int(), enable_gqa=True)),
        "mask_dtype": ((q.float(), k.float(), v.float()), dict(attn_mask=mask.double(), enable_gqa=True)),
        "one_dim": ((q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}),
        "dropout_above_one": ((q, k, v), dict(dropout_p=1.5, enable_gqa=True)),
        "mask_shape": ((q, k, v), dict(attn_mask=torch.ones(5, 8, dtype=torch.bool), enable_gqa=True)),
        "head_dim_mix": ((q, k[..., :4], v), dict(enable_gqa=True)),
    }


# torch < 2.14 accepts an attn_mask with is_causal=True on CPU (2.14 raises); ours raises on every torch.
TORCH_ACCEPTS_MASK_AND_CAUSAL = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 14)


@pytest.mark.parametrize("case", sorted(_error_cases()))
def test_errors_like_torch(case):
    args, kwargs = _error_cases()[case]
    if not (case == "mask_and_causal" and TORCH_ACCEPTS_MASK_AND_CAUSAL):
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(RuntimeError):  # SDPAInputError is also a ValueError
        scaled_dot_product_attention(*args, **kwargs)


def test_error_type_is_both():
    assert issubclass(SDPAInputError, RuntimeError) and issubclass(SDPAInputError, ValueError)


def test_value_head_dim_differs_is_not_implemented():
    q, k, _ = make_qkv(seqlen_q=5, seqlen_k=7, head_dim=8)
    v = torch.randn(2, 4, 7, 12, dtype=torch.float64)
    assert F.scaled_dot_product_attention(q, k, v).shape == (2, 4, 5, 12)  # torch allows it
    with pytest.raises(NotImplementedError, match="Ev"):
        scaled_dot_product_attention(q, k, v)


def test_scale_is_keyword_only():
    q, k, v = make_qkv(seqlen_q=3, seqlen_k=3, head_dim=8)
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 1.0)
    with pytest.raises(TypeError):
        scaled_dot_product_attention(q, k, v, None, 0.0, False, 1.0)


# ---------------------------------------------------------------------- signature

# torch.nn.functional.scaled_dot_product_attention as documented (a builtin: inspect
# cannot read it): scaled_dot_product_attention(query, key, value, attn_mask=None,
# dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False).
TORCH_SDPA_SIGNATURE = [
    ("query", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
    ("key", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
    ("value", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
    ("attn_mask", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
    ("dropout_p", inspect.Parameter.POSITIONAL_OR_KEYWORD, 0.0),
    ("is_causal", inspect.Parameter.POSITIONAL_OR_KEYWORD, False),
    ("scale", inspect.Parameter.KEYWORD_ONLY, None),
    ("enable_gqa", inspect.Parameter.KEYWORD_ONLY, False),
]


def test_signature_matches_torch():
    params = inspect.signature(scaled_dot_product_attention).parameters.values()
    assert [(p.name, p.kind, p.default) for p in params] == TORCH_SDPA_SIGNATURE
