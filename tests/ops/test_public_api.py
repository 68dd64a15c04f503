"""The public ops through ``fast_attn.*`` on CPU, against the fp64 reference oracle.

Every comparison uses the DESIGN.md tolerance rule (``fast_attn.testing.assert_close``):
the oracle is the reference on fp64 copies of the inputs, the baseline is the reference
computed in the input dtype (``upcast=False``); factor 2 for outputs, 3 for gradients.
Shapes are awkward on purpose: norm widths 1, 7, 1023 over a prime number of rows;
attention with Sq, Sk in {1, 17, 113} both ways, head dims 40, 59, 64, 111, GQA.

Also covered: ``(B, H, S, D)`` tensors passed as transposed views, the shape and dtype of
``return_lse``, ``dropout_mask`` recovering the mask a seeded call applied, and the three
ways of asking for the torch backend.
"""

import functools
import itertools
import math

import pytest
import torch

import fast_attn
from fast_attn import backends
from fast_attn.reference.attention import attention_ref, attention_varlen_ref, attention_with_kvcache_ref
from fast_attn.reference.ffn import bias_gelu_ref, geglu_ref, swiglu_ref
from fast_attn.reference.norm import layer_norm_ref, rms_norm_ref
from fast_attn.testing import GRAD_FACTOR, assert_close

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ROWS = 37  # prime


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def upcast(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def grads(outputs, inputs, grad_outputs):
    found = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found)]


def check_outputs_and_grads(name, actual_fn, ref_fn, inputs, differentiable=None):
    """Run ``actual_fn(*inputs)`` and ``ref_fn(*inputs, upcast)`` (tuples of outputs),
    compare outputs (factor 2) and the gradients of every input (factor 3) from random
    cotangents on the first ``differentiable`` outputs (all by default; attention's
    LSE carries no gradient)."""
    actual_in, base_in, oracle_in = leaves(*inputs), leaves(*inputs), upcast(inputs)
    actual = actual_fn(*actual_in)
    baseline = ref_fn(*base_in, upcast=False)
    oracle = ref_fn(*oracle_in, upcast=True)
    for i, (a, o, b) in enumerate(zip(actual, oracle, baseline)):
        assert a.dtype == b.dtype, f"{name} output {i}: dtype {a.dtype}, expected {b.dtype}"
        assert_close(a.detach(), o.detach(), b.detach(), name=f"{name} output {i}")
    count = len(actual) if differentiable is None else differentiable
    douts = [torch.randn_like(a) for a in actual[:count]]
    actual_g = grads(actual[:count], actual_in, douts)
    base_g = grads(baseline[:count], base_in, douts)
    oracle_g = grads(oracle[:count], oracle_in, [d.double() for d in douts])
    for i, (a, o, b) in enumerate(zip(actual_g, oracle_g, base_g)):
        assert_close(a, o, b, factor=GRAD_FACTOR, gradient=True, name=f"{name} grad of input {i}")


# --------------------------------------------------------------------------- attention

SEQLENS = (1, 17, 113)
HEAD_DIMS = (40, 59, 64, 111)
ATTENTION_SHAPES = [
    (sq, sk, HEAD_DIMS[i % len(HEAD_DIMS)], i % 2 == 1)  # (Sq, Sk, D, causal)
    for i, (sq, sk) in enumerate(itertools.product(SEQLENS, SEQLENS))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, head_dim, causal", ATTENTION_SHAPES,
    ids=[f"q{sq}-k{sk}-d{d}{'-causal' if c else ''}" for sq, sk, d, c in ATTENTION_SHAPES],
)
def test_attention_matches_oracle(seqlen_q, seqlen_k, head_dim, causal, dtype):
    batch, heads, kv_heads = 2, 4, 2
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)

    def actual(q_, k_, v_):
        return fast_attn.attention(q_, k_, v_, causal=causal, return_lse=True)

    def ref(q_, k_, v_, upcast):
        return attention_ref(q_, k_, v_, causal=causal, upcast=upcast)

    if seqlen_k == 1 and dtype == torch.float32:
        check_single_key_grads(actual, ref, (q, k, v))
        return
    check_outputs_and_grads("attention", actual, ref, (q, k, v), differentiable=1)


def check_single_key_grads(actual_fn, ref_fn, inputs):
    """One key per row: P = 1 and every gradient but dv is exactly 0, so the rule's floor
    (ulps of an oracle of 0) would demand exact cancellation. A flash backward forms dS
    from rowsum(dO * O) - rowsum(dO * V) and keeps fp32 roundings of |dO| |V| per row,
    summed over Sq rows into dk: bound the error by fp32 ulps of that magnitude."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    out, lse = actual_fn(*leaves)
    oracle_in = [t.detach().double().requires_grad_() for t in inputs]
    oracle_out, oracle_lse = ref_fn(*oracle_in, upcast=True)
    torch.testing.assert_close(out.double(), oracle_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), oracle_lse.double(), atol=1e-6, rtol=1e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(oracle_out, oracle_in, dout.double())
    q, k, v = inputs
    magnitude = float(dout.abs().max() * v.abs().max() * q.abs().max() * q.shape[-1] * q.shape[1])
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        error = float((g.double() - w).abs().max())
        assert error <= 16 * torch.finfo(torch.float32).eps * magnitude, f"{name}: {error} vs {magnitude}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_all_options_matches_oracle(dtype):
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = 3, 17, 29, 6, 2, 59
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    options = dict(
        causal=True, window_size=(11, 3), alibi_slopes=torch.rand(batch, heads), softcap=4.0,
        attn_mask=torch.randn(1, heads, seqlen_q, seqlen_k), softmax_scale=0.2,
    )

    def actual(q_, k_, v_):
        return (fast_attn.attention(q_, k_, v_, **options),)

    def ref(q_, k_, v_, upcast):
        return (attention_ref(q_, k_, v_, **options, upcast=upcast)[0],)

    check_outputs_and_grads("attention", actual, ref, (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_varlen_matches_oracle(dtype):
    heads, kv_heads, head_dim = 4, 1, 40
    lens_q, lens_k = [17, 0, 1, 29], [23, 5, 0, 17]
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32)
    q = torch.randn(sum(lens_q), heads, head_dim, dtype=dtype)
    k = torch.randn(sum(lens_k), kv_heads, head_dim, dtype=dtype)
    v = torch.randn(sum(lens_k), kv_heads, head_dim, dtype=dtype)
    shape = (cu_q, cu_k, max(lens_q), max(lens_k))

    def actual(q_, k_, v_):
        return fast_attn.attention_varlen(q_, k_, v_, *shape, causal=True, return_lse=True)

    def ref(q_, k_, v_, upcast):
        return attention_varlen_ref(q_, k_, v_, *shape, causal=True, upcast=upcast)

    check_outputs_and_grads("attention_varlen", actual, ref, (q, k, v), differentiable=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_with_kvcache_matches_oracle(dtype):
    batch, cache_len, new_len, heads, kv_heads, head_dim = 3, 31, 2, 4, 2, 64
    q = torch.randn(batch, new_len, heads, head_dim, dtype=dtype)
    k_cache = torch.randn(batch, cache_len, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn(batch, cache_len, kv_heads, head_dim, dtype=dtype)
    k_new = torch.randn(batch, new_len, kv_heads, head_dim, dtype=dtype)
    v_new = torch.randn(batch, new_len, kv_heads, head_dim, dtype=dtype)
    cache_seqlens = torch.tensor([0, 13, cache_len - new_len], dtype=torch.int32)
    options = dict(causal=True, alibi_slopes=torch.rand(heads), softcap=3.0)

    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    caches64 = (k_cache.double(), v_cache.double())
    out, lse = fast_attn.attention_with_kvcache(
        q, *caches[0], k_new, v_new, cache_seqlens, return_lse=True, **options
    )
    base_out, base_lse = attention_with_kvcache_ref(
        q, *caches[1], k_new, v_new, cache_seqlens, upcast=False, **options
    )
    oracle_out, oracle_lse = attention_with_kvcache_ref(
        q.double(), *caches64, k_new.double(), v_new.double(), cache_seqlens, **options
    )
    assert_close(out, oracle_out, base_out)
    assert_close(lse, oracle_lse, base_lse, name="lse")
    for got, ref in zip(caches[0], caches[1]):
        assert torch.equal(got, ref), "the new k/v must be written into the cache"
    for b, start in enumerate(cache_seqlens.tolist()):
        assert torch.equal(caches[0][0][b, start : start + new_len], k_new[b])


# ------------------------------------------------------------------------------- norms

NORM_WIDTHS = (1, 7, 1023)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", NORM_WIDTHS)
@pytest.mark.parametrize("affine_residual", [True, False], ids=["weight-bias-residual", "plain"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_matches_oracle(op, affine_residual, width, dtype):
    x = torch.randn(ROWS, width, dtype=dtype)
    weight = torch.randn(width, dtype=dtype) if affine_residual else None
    bias = torch.randn(width, dtype=dtype) if affine_residual and op == "layer_norm" else None
    residual = torch.randn(ROWS, width, dtype=dtype) if affine_residual else None
    names = [n for n, t in (("x", x), ("w", weight), ("b", bias), ("r", residual)) if t is not None]
    inputs = [t for t in (x, weight, bias, residual) if t is not None]

    def unpack(tensors):
        found = dict(zip(names, tensors))
        return found["x"], found.get("w"), found.get("b"), found.get("r")

    def actual(*tensors):
        x_, w_, b_, r_ = unpack(tensors)
        if op == "layer_norm":
            result = fast_attn.layer_norm(x_, w_, b_, residual=r_)
        else:
            result = fast_attn.rms_norm(x_, w_, residual=r_)
        return result if isinstance(result, tuple) else (result,)

    def ref(*tensors, upcast):
        x_, w_, b_, r_ = unpack(tensors)
        if op == "layer_norm":
            result = layer_norm_ref(x_, w_, b_, 1e-5, r_, upcast=upcast)
        else:
            result = rms_norm_ref(x_, w_, 1e-6, r_, upcast=upcast)
        return (result.y,) if r_ is None else (result.y, result.h)

    check_outputs_and_grads(op, actual, ref, inputs)


def test_norm_leading_dims_and_strided_rows():
    base = torch.randn(3, 11, 53, dtype=torch.float32)
    x = base[..., 2:49]  # rows strided by 53, last dim contiguous
    weight, bias = torch.randn(47), torch.randn(47)
    y = fast_attn.layer_norm(x, weight, bias)
    assert y.shape == x.shape
    oracle = layer_norm_ref(x.double(), weight.double(), bias.double()).y
    assert_close(y, oracle, layer_norm_ref(x, weight, bias, upcast=False).y)


# --------------------------------------------------------------------------------- ffn

FFN_CASES = ["bias_gelu-none", "bias_gelu-tanh", "swiglu", "geglu-none", "geglu-tanh"]


def ffn_public(op, approximate, a, b):
    if op == "bias_gelu":
        return (fast_attn.bias_gelu(a, b, approximate=approximate),)
    if op == "swiglu":
        return (fast_attn.swiglu(a, b),)
    return (fast_attn.geglu(a, b, approximate=approximate),)


def ffn_reference(op, approximate, a, b, upcast):
    if op == "bias_gelu":
        return (bias_gelu_ref(a, b, approximate, upcast=upcast),)
    if op == "swiglu":
        return (swiglu_ref(a, b, upcast=upcast),)
    return (geglu_ref(a, b, approximate, upcast=upcast),)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FFN_CASES)
def test_ffn_matches_oracle(case, dtype):
    op, _, approximate = case.partition("-")
    shape = (1, ROWS, 1023)
    a = torch.randn(shape, dtype=dtype) * 3  # reach both tails of the activation
    b = torch.randn(shape[-1:] if op == "bias_gelu" else shape, dtype=dtype)
    check_outputs_and_grads(
        case, functools.partial(ffn_public, op, approximate), functools.partial(ffn_reference, op, approximate), (a, b)
    )


def test_bias_gelu_without_bias():
    x = torch.randn(ROWS, 7, dtype=torch.bfloat16)
    y = fast_attn.bias_gelu(x)
    assert_close(y, bias_gelu_ref(x.double()), bias_gelu_ref(x, upcast=False))


# ----------------------------------------------------------------------- layout & lse


def test_attention_bhsd_transposed_views():
    batch, heads, seqlen_q, seqlen_k, head_dim = 2, 3, 17, 23, 40
    q_bhsd = torch.randn(batch, heads, seqlen_q, head_dim)
    k_bhsd = torch.randn(batch, heads, seqlen_k, head_dim)
    v_bhsd = torch.randn(batch, heads, seqlen_k, head_dim)
    views = leaves(q_bhsd, k_bhsd, v_bhsd)
    copies = leaves(*(t.transpose(1, 2).contiguous() for t in (q_bhsd, k_bhsd, v_bhsd)))
    dout = torch.randn(batch, seqlen_q, heads, head_dim)

    out_view = fast_attn.attention(*(t.transpose(1, 2) for t in views), causal=True)
    out_copy = fast_attn.attention(*copies, causal=True)
    assert out_view.shape == (batch, seqlen_q, heads, head_dim)
    torch.testing.assert_close(out_view, out_copy)
    grads_view = torch.autograd.grad(out_view, views, dout)
    grads_copy = torch.autograd.grad(out_copy, copies, dout)
    for view, g_view, g_copy in zip(views, grads_view, grads_copy):
        assert g_view.shape == view.shape
        torch.testing.assert_close(g_view.transpose(1, 2), g_copy)
    for view, original in zip(views, (q_bhsd, k_bhsd, v_bhsd)):
        assert torch.equal(view, original), "inputs must not be written"


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_return_lse_shape_and_dtype(dtype):
    batch, seqlen_q, seqlen_k, heads, head_dim = 2, 5, 13, 3, 8
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, 1, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, 1, head_dim, dtype=dtype)

    out, lse = fast_attn.attention(q, k, v, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, seqlen_q)
    oracle_lse = attention_ref(q.double(), k.double(), v.double())[1]
    torch.testing.assert_close(lse.double(), oracle_lse, atol=1e-2, rtol=1e-2)

    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 13], dtype=torch.int32)
    out_v, lse_v = fast_attn.attention_varlen(q[0], k[0], v[0], cu_q, cu_k, 3, 7, return_lse=True)
    assert out_v.dtype == dtype and out_v.shape == q[0].shape
    assert lse_v.dtype == torch.float32 and lse_v.shape == (heads, seqlen_q)

    out_c, lse_c = fast_attn.attention_with_kvcache(q, k.clone(), v.clone(), return_lse=True)
    assert out_c.dtype == dtype and out_c.shape == q.shape
    assert lse_c.dtype == torch.float32 and lse_c.shape == (batch, heads, seqlen_q)
    torch.testing.assert_close(lse_c, lse)

    assert isinstance(fast_attn.attention(q, k, v), torch.Tensor)


# ----------------------------------------------------------------------------- dropout


def attention_by_hand(q, k, v, keep, dropout_p):
    """softmax(q k^T / sqrt(D)) * keep / (1 - p) @ v, fp64, (B, S, H, D) in and out."""
    group = q.shape[2] // k.shape[2]
    q_, k_, v_ = (t.transpose(1, 2).double() for t in (q, k, v))
    k_, v_ = k_.repeat_interleave(group, dim=1), v_.repeat_interleave(group, dim=1)
    probs = torch.softmax(q_ @ k_.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return ((probs * keep / (1.0 - dropout_p)) @ v_).transpose(1, 2)


def test_dropout_mask_recovers_the_applied_mask():
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = 2, 17, 23, 4, 2, 11
    dropout_p, seed = 0.3, 2**40 + 12345
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=torch.float64)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=torch.float64)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=torch.float64)

    out = fast_attn.attention(q, k, v, dropout_p=dropout_p, dropout_seed=seed)
    keep = fast_attn.dropout_mask(seed, batch, heads, seqlen_q, seqlen_k, dropout_p)
    assert keep.dtype == torch.bool and keep.shape == (batch, heads, seqlen_q, seqlen_k)
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.05
    torch.testing.assert_close(out, attention_by_hand(q, k, v, keep, dropout_p), rtol=1e-12, atol=1e-12)

    other = fast_attn.attention(q, k, v, dropout_p=dropout_p, dropout_seed=seed + 1)
    assert not torch.allclose(other, out), "a different seed must drop different entries"


def test_dropout_varlen_uses_the_padded_mask():
    heads, head_dim, dropout_p, seed = 3, 8, 0.25, 77
    lens_q, lens_k = [5, 3], [7, 4]
    cu_q = torch.tensor([0, 5, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 11], dtype=torch.int32)
    q = torch.randn(8, heads, head_dim, dtype=torch.float64)
    k = torch.randn(11, heads, head_dim, dtype=torch.float64)
    v = torch.randn(11, heads, head_dim, dtype=torch.float64)

    out = fast_attn.attention_varlen(q, k, v, cu_q, cu_k, 5, 7, dropout_p=dropout_p, dropout_seed=seed)
    keep = fast_attn.dropout_mask(seed, 2, heads, 5, 7, dropout_p)
    for b in range(2):
        rows = slice(cu_q[b], cu_q[b + 1])
        cols = slice(cu_k[b], cu_k[b + 1])
        expected = attention_by_hand(
            q[rows][None], k[cols][None], v[cols][None], keep[b : b + 1, :, : lens_q[b], : lens_k[b]], dropout_p
        )[0]
        torch.testing.assert_close(out[rows], expected, rtol=1e-12, atol=1e-12)


def test_dropout_without_seed_follows_manual_seed():
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    torch.manual_seed(5)
    first = fast_attn.attention(q, k, v, dropout_p=0.5)
    second = fast_attn.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    again = fast_attn.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


# ---------------------------------------------------------------------- torch backend

WAYS = ["per_call", "use_backend", "env"]


@pytest.fixture
def chosen(monkeypatch):
    """Records (op, requested, chosen) for every backend resolution the ops make."""
    record = []
    resolve = backends.resolve_backend

    def spy(call, per_call="auto"):
        name = resolve(call, per_call)
        record.append((call.op, backends.requested_backend(per_call), name))
        return name

    monkeypatch.setattr(backends, "resolve_backend", spy)
    return record


def run_ops_on_torch(way, monkeypatch):
    """attention, layer_norm and swiglu (forward and backward), asking for "torch" ``way``."""
    monkeypatch.delenv("FAST_ATTN_BACKEND", raising=False)
    per_call = "torch" if way == "per_call" else "auto"
    if way == "env":
        monkeypatch.setenv("FAST_ATTN_BACKEND", "torch")
    q, k, v = leaves(*(torch.randn(2, 7, 2, 5) for _ in range(3)))
    x, w = leaves(torch.randn(5, 13), torch.randn(13))
    gate, up = leaves(torch.randn(3, 11), torch.randn(3, 11))
    block = fast_attn.use_backend("torch") if way == "use_backend" else fast_attn.use_backend("auto")
    with block:
        outputs = (
            fast_attn.attention(q, k, v, causal=True, backend=per_call),
            fast_attn.layer_norm(x, w, backend=per_call),
            fast_attn.swiglu(gate, up, backend=per_call),
        )
        sum(o.square().sum() for o in outputs).backward()
    expected = (
        attention_ref(q, k, v, causal=True)[0],
        layer_norm_ref(x, w).y,
        swiglu_ref(gate, up),
    )
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want)
    return q.grad, x.grad, gate.grad


@pytest.mark.parametrize("way", WAYS)
def test_torch_backend_on_request(way, chosen, monkeypatch):
    grads_ = run_ops_on_torch(way, monkeypatch)
    assert all(g is not None and torch.isfinite(g).all() for g in grads_)
    ops = {op for op, _, _ in chosen}
    assert ops == {"attention", "layer_norm", "swiglu"}
    # one resolution per forward and per backward, and attention's check at the forward
    # that the requested backend can also run its backward
    assert [op for op, _, _ in chosen].count("attention") == 3
    assert len(chosen) == 7, chosen
    assert all(requested == "torch" and name == "torch" for _, requested, name in chosen), chosen


def test_learned_additive_mask_and_alibi_slopes_get_their_gradients():
    """A float attn_mask / alibi_slopes that require grad (a learned bias) are differentiated."""
    q = torch.randn(2, 17, 4, 40, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 23, 2, 40, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 23, 2, 40, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(1, 4, 17, 23, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2, 4, requires_grad=True)
    grad_out = torch.randn(2, 17, 4, 40, dtype=torch.float64)
    out = fast_attn.attention(q, k, v, causal=True, attn_mask=mask, alibi_slopes=slopes)
    ours = torch.autograd.grad(out, (q, k, v, mask, slopes), grad_out)
    ref_out, _ = attention_ref(q, k, v, causal=True, attn_mask=mask, alibi_slopes=slopes)
    expected = torch.autograd.grad(ref_out, (q, k, v, mask, slopes), grad_out)
    for name, a, b in zip(("dq", "dk", "dv", "dmask", "dslopes"), ours, expected):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, msg=name)
    assert ours[3].abs().sum() > 0 and ours[4].abs().sum() > 0


@pytest.mark.skipif(not fast_attn.available_backends()["triton"], reason="needs triton (GPU or TRITON_INTERPRET=1)")
def test_explicit_backend_without_the_backward_is_refused_at_the_forward():
    """Triton has no learned-mask gradient: asked for by name with a mask that requires
    grad, the call fails at the forward (nothing computed for nothing), with the reason."""
    q, k, v = (torch.randn(1, 5, 2, 16, dtype=torch.float32) for _ in range(3))
    mask = torch.zeros(1, 2, 5, 5, requires_grad=True)
    with pytest.raises(NotImplementedError, match="triton backend's attention does not support feature 'mask_grad'"):
        fast_attn.attention(q, k, v, attn_mask=mask, backend="triton")
    with fast_attn.use_backend("triton"), pytest.raises(NotImplementedError, match="mask_grad"):
        fast_attn.attention(q, k, v, attn_mask=mask)
    # without grad the same call runs; under auto a learned mask goes to a backend that can
    with torch.no_grad():
        fast_attn.attention(q, k, v, attn_mask=mask, backend="triton")
    out = fast_attn.attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert mask.grad is not None
