"""The ``fast_attn::*`` custom ops under PyTorch's own checkers, on CPU.

- ``torch.library.opcheck`` on every op (schema, autograd registration, fake function
  against the real kernel including strides, AOT dispatch with dynamic shapes), with
  small awkward inputs: odd sizes, GQA, transposed views, empty key sets, and every
  optional tensor both present and None.
- ``torch.compile(fullgraph=True)`` of every public function matches eager; attention
  and layer_norm are also compiled through a loss and differentiated.
- ``torch.autograd.gradcheck`` in float64 of every differentiable public function.
- Fully masked attention rows: output 0, LSE -inf, zero and finite gradients.
"""

import pytest
import torch

import fast_attn
from fast_attn.ops import attention as attn_ops
from fast_attn.ops import attention_kvcache as kvcache_ops
from fast_attn.ops import attention_varlen as varlen_ops
from fast_attn.ops import ffn as ffn_ops
from fast_attn.ops import norm as norm_ops

B, SQ, SK, H, HKV, D = 2, 5, 7, 6, 3, 11
SCALE = D**-0.5


def grad_leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def transposed_leaf(*shape):
    """A (B, S, H, D) leaf that is a transposed view of a contiguous (B, H, S, D) tensor."""
    b, s, h, d = shape
    return torch.randn(b, h, s, d).transpose(1, 2).requires_grad_()


def columns_leaf(rows, width, requires_grad=True):
    """A (rows, width) tensor whose last dimension is not contiguous (a transposed view)."""
    return torch.randn(width, rows).t().requires_grad_(requires_grad)


def opcheck(op, args):
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------- opcheck: attention

# Trailing options: causal, softmax_scale, window_left, window_right, softcap, dropout_p,
# deterministic, backend.
ATTENTION_FWD_CASES = {
    "no-optional-tensors": lambda: (
        transposed_leaf(B, SQ, H, D), grad_leaf(B, SK, HKV, D), grad_leaf(B, SK, HKV, D),
        None, None, None, True, SCALE, -1, -1, 0.0, 0.0, False, "auto",
    ),
    "bool-mask-alibi-dropout": lambda: (
        grad_leaf(B, SQ, H, D), grad_leaf(B, SK, HKV, D), grad_leaf(B, SK, HKV, D),
        torch.rand(SQ, SK) > 0.3, torch.rand(H), torch.tensor(987654321), False, SCALE,
        3, 1, 2.5, 0.3, False, "auto",
    ),
    "additive-mask-batch-alibi": lambda: (
        grad_leaf(B, SQ, H, D), grad_leaf(B, SK, 1, D), grad_leaf(B, SK, 1, D),
        torch.randn(B, 1, SQ, SK, requires_grad=True), torch.rand(B, H, requires_grad=True), None,
        True, 0.7, -1, 2, 0.0, 0.0, True, "torch",
    ),
    "no-keys": lambda: (
        transposed_leaf(B, SQ, H, D), grad_leaf(B, 0, HKV, D), grad_leaf(B, 0, HKV, D),
        None, None, None, False, SCALE, -1, -1, 0.0, 0.0, False, "auto",
    ),
}


@pytest.mark.parametrize("case", ATTENTION_FWD_CASES)
def test_opcheck_attention_fwd(case):
    opcheck(attn_ops.attention_fwd, ATTENTION_FWD_CASES[case]())


@pytest.mark.parametrize("case", ["no-optional-tensors", "bool-mask-alibi-dropout", "additive-mask-batch-alibi"])
def test_opcheck_attention_bwd(case):
    q, k, v, *rest = (t.detach() if isinstance(t, torch.Tensor) else t for t in ATTENTION_FWD_CASES[case]())
    out, lse = attn_ops.attention_fwd(q, k, v, *rest)
    *options, backend = rest
    mask = options[0]
    mask_grad = mask is not None and mask.is_floating_point()  # also exercise the dmask output
    bias_grads = (mask_grad, options[1] is not None)
    opcheck(attn_ops.attention_bwd, (torch.randn_like(out), q, k, v, out, lse, *options, *bias_grads, backend))


def varlen_packing():
    """Four sequences, q lengths (2, 0, 4, 3), k lengths (3, 2, 0, 5): empty on both sides."""
    cu_q = torch.tensor([0, 2, 2, 6, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 5, 5, 10], dtype=torch.int32)
    return cu_q, cu_k, 4, 5


VARLEN_FWD_CASES = {
    "no-optional-tensors": lambda: (
        grad_leaf(9, H, D), grad_leaf(10, HKV, D), grad_leaf(10, HKV, D), *varlen_packing(),
        None, None, None, True, SCALE, -1, -1, 0.0, 0.0, False, "auto",
    ),
    "mask-alibi-dropout": lambda: (
        grad_leaf(9, H, D), grad_leaf(10, HKV, D), grad_leaf(10, HKV, D), *varlen_packing(),
        torch.rand(4, 1, 4, 5) > 0.2, torch.rand(4, H), torch.tensor(31337), False, SCALE,
        2, -1, 3.0, 0.25, False, "auto",
    ),
}


@pytest.mark.parametrize("case", VARLEN_FWD_CASES)
def test_opcheck_attention_varlen_fwd(case):
    opcheck(varlen_ops.attention_varlen_fwd, VARLEN_FWD_CASES[case]())


@pytest.mark.parametrize("case", VARLEN_FWD_CASES)
def test_opcheck_attention_varlen_bwd(case):
    q, k, v, *rest = (t.detach() if isinstance(t, torch.Tensor) else t for t in VARLEN_FWD_CASES[case]())
    out, lse = varlen_ops.attention_varlen_fwd(q, k, v, *rest)
    *options, backend = rest
    mask = options[4]
    bias_grads = (mask is not None and mask.is_floating_point(), options[5] is not None)
    opcheck(varlen_ops.attention_varlen_bwd, (torch.randn_like(out), q, k, v, out, lse, *options, *bias_grads, backend))


@pytest.mark.parametrize("append", [True, False], ids=["append-k-v", "no-k-v"])
def test_opcheck_attention_with_kvcache(append):
    q = torch.randn(B, 2, H, D)
    k_cache, v_cache = torch.randn(B, 9, HKV, D), torch.randn(B, 9, HKV, D)
    if append:
        new = (torch.randn(B, 2, HKV, D), torch.randn(B, 2, HKV, D), torch.tensor([0, 7], dtype=torch.int32))
        options = (torch.rand(H), True, SCALE, 4, 0, 2.0, "auto")
    else:
        new = (None, None, None)
        options = (None, False, SCALE, -1, -1, 0.0, "auto")
    opcheck(kvcache_ops.attention_with_kvcache_op, (q, k_cache, v_cache, *new, *options))


# -------------------------------------------------------------------- opcheck: norms

ROWS, N = 13, 7


def norm_fwd_args(op, case):
    """(x, weight, [bias,] residual, eps, backend) for layer_norm_fwd / rms_norm_fwd."""
    if case == "weight-bias-residual":
        x, weight, bias, residual = grad_leaf(3, 5, N), grad_leaf(N), grad_leaf(N), grad_leaf(3, 5, N)
    elif case == "no-optional-tensors":
        x, weight, bias, residual = grad_leaf(ROWS, N), None, None, None
    else:  # "transposed-x"
        x, weight, bias, residual = columns_leaf(ROWS, N), grad_leaf(N), None, None
    if op == "layer_norm":
        return x, weight, bias, residual, 1e-5, "auto"
    return x, weight, residual, 1e-6, "auto"


NORM_FWD = {"layer_norm": norm_ops.layer_norm_fwd, "rms_norm": norm_ops.rms_norm_fwd}
NORM_CASES = ["weight-bias-residual", "no-optional-tensors", "transposed-x"]


@pytest.mark.parametrize("case", NORM_CASES)
@pytest.mark.parametrize("op", NORM_FWD)
def test_opcheck_norm_fwd(op, case):
    opcheck(NORM_FWD[op], norm_fwd_args(op, case))


@pytest.mark.parametrize("with_params", [True, False], ids=["dh-weight-bias", "no-dh-no-weight"])
def test_opcheck_layer_norm_bwd(with_params):
    x = torch.randn(ROWS, N)
    weight, bias = (torch.randn(N), torch.randn(N)) if with_params else (None, None)
    _, _, mean, rstd = norm_ops.layer_norm_fwd(x, weight, bias, None, 1e-5, "auto")
    dh = torch.randn(ROWS, N) if with_params else None
    opcheck(norm_ops.layer_norm_bwd, (torch.randn(ROWS, N), dh, x, weight, bias, mean, rstd, 1e-5, "auto"))


@pytest.mark.parametrize("with_params", [True, False], ids=["dh-weight", "no-dh-no-weight"])
def test_opcheck_rms_norm_bwd(with_params):
    x = torch.randn(3, 5, N)
    weight = torch.randn(N) if with_params else None
    _, _, _, rstd = norm_ops.rms_norm_fwd(x, weight, None, 1e-6, "auto")
    dh = torch.randn(3, 5, N) if with_params else None
    opcheck(norm_ops.rms_norm_bwd, (torch.randn(3, 5, N), dh, x, weight, rstd, 1e-6, "auto"))


# ---------------------------------------------------------------------- opcheck: ffn

FFN_FWD_CASES = {
    "bias_gelu-bias-none": lambda: (ffn_ops.bias_gelu_fwd, (grad_leaf(3, 5, N), grad_leaf(N), "none", "auto")),
    "bias_gelu-no-bias-tanh": lambda: (ffn_ops.bias_gelu_fwd, (grad_leaf(ROWS, N), None, "tanh", "auto")),
    "bias_gelu-transposed-x": lambda: (ffn_ops.bias_gelu_fwd, (columns_leaf(ROWS, N), grad_leaf(N), "none", "auto")),
    "swiglu": lambda: (ffn_ops.swiglu_fwd, (grad_leaf(3, 5, N), grad_leaf(3, 5, N), "auto")),
    "swiglu-transposed-gate": lambda: (ffn_ops.swiglu_fwd, (columns_leaf(ROWS, N), grad_leaf(ROWS, N), "auto")),
    "geglu-none": lambda: (ffn_ops.geglu_fwd, (grad_leaf(ROWS, N), grad_leaf(ROWS, N), "none", "auto")),
    "geglu-tanh": lambda: (ffn_ops.geglu_fwd, (grad_leaf(3, 5, N), grad_leaf(3, 5, N), "tanh", "auto")),
}


@pytest.mark.parametrize("case", FFN_FWD_CASES)
def test_opcheck_ffn_fwd(case):
    opcheck(*FFN_FWD_CASES[case]())


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_opcheck_bias_gelu_bwd(with_bias):
    bias = torch.randn(N) if with_bias else None
    args = (torch.randn(ROWS, N), torch.randn(ROWS, N), bias, "tanh" if with_bias else "none", "auto")
    opcheck(ffn_ops.bias_gelu_bwd, args)


def test_opcheck_swiglu_bwd():
    opcheck(ffn_ops.swiglu_bwd, (torch.randn(ROWS, N), torch.randn(ROWS, N), torch.randn(ROWS, N), "auto"))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opcheck_geglu_bwd(approximate):
    args = (torch.randn(3, 5, N), torch.randn(3, 5, N), torch.randn(3, 5, N), approximate, "auto")
    opcheck(ffn_ops.geglu_bwd, args)


# ------------------------------------------------------------------- torch.compile

def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


def assert_same(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_compile_attention_causal_softcap_alibi():
    q, k, v = torch.randn(B, SQ, H, D), torch.randn(B, SK, HKV, D), torch.randn(B, SK, HKV, D)
    slopes = torch.rand(H)

    def fn(q_, k_, v_, slopes_):
        return fast_attn.attention(q_, k_, v_, causal=True, softcap=3.0, alibi_slopes=slopes_, return_lse=True)

    assert_same(compiled(fn)(q, k, v, slopes), fn(q, k, v, slopes))


def test_compile_attention_dropout_forward_backward():
    inputs = [grad_leaf(B, SQ, H, D), grad_leaf(B, SK, HKV, D), grad_leaf(B, SK, HKV, D)]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    dout = torch.randn(B, SQ, H, D)

    def fn(q_, k_, v_):
        out = fast_attn.attention(q_, k_, v_, causal=True, dropout_p=0.3, dropout_seed=2024)
        return out, (out * dout).sum()

    out_c, loss_c = compiled(fn)(*inputs)
    out_e, loss_e = fn(*twins)
    torch.testing.assert_close(out_c, out_e)
    loss_c.backward()
    loss_e.backward()
    assert_same([t.grad for t in inputs], [t.grad for t in twins])


def test_compile_attention_varlen():
    q, k, v = torch.randn(9, H, D), torch.randn(10, HKV, D), torch.randn(10, HKV, D)
    cu_q, cu_k, max_q, max_k = varlen_packing()

    def fn(q_, k_, v_, cu_q_, cu_k_):
        return fast_attn.attention_varlen(q_, k_, v_, cu_q_, cu_k_, max_q, max_k, causal=True,
                                          window_size=(2, -1), return_lse=True)

    assert_same(compiled(fn)(q, k, v, cu_q, cu_k), fn(q, k, v, cu_q, cu_k))


def test_compile_attention_with_kvcache():
    q = torch.randn(B, 1, H, D)
    k_cache, v_cache = torch.randn(B, 9, HKV, D), torch.randn(B, 9, HKV, D)
    k_new, v_new = torch.randn(B, 1, HKV, D), torch.randn(B, 1, HKV, D)
    cache_seqlens = torch.tensor([3, 8], dtype=torch.int32)

    def fn(q_, k_cache_, v_cache_, k_, v_, seqlens_):
        return fast_attn.attention_with_kvcache(q_, k_cache_, v_cache_, k_, v_, seqlens_, causal=True)

    caches_c = (k_cache.clone(), v_cache.clone())
    caches_e = (k_cache.clone(), v_cache.clone())
    out_c = compiled(fn)(q, *caches_c, k_new, v_new, cache_seqlens)
    out_e = fn(q, *caches_e, k_new, v_new, cache_seqlens)
    torch.testing.assert_close(out_c, out_e)
    assert_same(caches_c, caches_e)
    assert torch.equal(caches_c[0][1, 8], k_new[1, 0]), "the compiled call must write the cache"


def test_compile_layer_norm_residual_forward_backward():
    inputs = [grad_leaf(3, 5, N), grad_leaf(N), grad_leaf(N), grad_leaf(3, 5, N)]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    dy, dh = torch.randn(3, 5, N), torch.randn(3, 5, N)

    def fn(x_, w_, b_, r_):
        y, h = fast_attn.layer_norm(x_, w_, b_, residual=r_)
        return y, h, (y * dy).sum() + (h * dh).sum()

    *outs_c, loss_c = compiled(fn)(*inputs)
    *outs_e, loss_e = fn(*twins)
    assert_same(outs_c, outs_e)
    loss_c.backward()
    loss_e.backward()
    assert_same([t.grad for t in inputs], [t.grad for t in twins])


def test_compile_rms_norm():
    x, weight = torch.randn(ROWS, N), torch.randn(N)

    def fn(x_, w_):
        return fast_attn.rms_norm(x_, w_, eps=1e-5)

    torch.testing.assert_close(compiled(fn)(x, weight), fn(x, weight))


def test_compile_bias_gelu():
    x, bias = torch.randn(ROWS, N), torch.randn(N)

    def fn(x_, b_):
        return fast_attn.bias_gelu(x_, b_, approximate="tanh")

    torch.testing.assert_close(compiled(fn)(x, bias), fn(x, bias))


def test_compile_swiglu():
    gate, up = torch.randn(ROWS, N), torch.randn(ROWS, N)
    torch.testing.assert_close(compiled(fast_attn.swiglu)(gate, up), fast_attn.swiglu(gate, up))


def test_compile_geglu():
    gate, up = torch.randn(ROWS, N), torch.randn(ROWS, N)

    def fn(g_, u_):
        return fast_attn.geglu(g_, u_, approximate="none")

    torch.testing.assert_close(compiled(fn)(gate, up), fn(gate, up))


# ------------------------------------------------------------------------- gradcheck


def f64(*shape):
    return grad_leaf(*shape, dtype=torch.float64)


def gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_gradcheck_attention_all_features(mask):
    sq, sk, heads, kv_heads, dim = 3, 5, 4, 2, 3
    if mask == "bool":
        attn_mask = torch.rand(2, 1, sq, sk) > 0.3
    else:
        attn_mask = torch.randn(1, heads, sq, sk, dtype=torch.float64)
    slopes = torch.rand(heads)

    def fn(q_, k_, v_):
        return fast_attn.attention(q_, k_, v_, causal=True, window_size=(2, 0), alibi_slopes=slopes,
                                   softcap=1.5, attn_mask=attn_mask)

    gradcheck(fn, (f64(2, sq, heads, dim), f64(2, sk, kv_heads, dim), f64(2, sk, kv_heads, dim)))


def test_gradcheck_attention_dropout():
    def fn(q_, k_, v_):
        return fast_attn.attention(q_, k_, v_, dropout_p=0.4, dropout_seed=11)

    gradcheck(fn, (f64(1, 4, 2, 3), f64(1, 6, 1, 3), f64(1, 6, 1, 3)))


def test_gradcheck_attention_varlen_zero_length_sequence():
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32)  # sequence 1: no queries
    cu_k = torch.tensor([0, 3, 4, 4], dtype=torch.int32)  # sequence 2: no keys

    def fn(q_, k_, v_):
        return fast_attn.attention_varlen(q_, k_, v_, cu_q, cu_k, 3, 3, causal=True)

    gradcheck(fn, (f64(5, 2, 3), f64(4, 1, 3), f64(4, 1, 3)))


def layer_norm_with_residual(x, weight, bias, residual):
    return fast_attn.layer_norm(x, weight, bias, residual=residual)


def rms_norm_with_residual(x, weight, residual):
    return fast_attn.rms_norm(x, weight, residual=residual)


NORM_GRADCHECK = {
    "layer_norm-weight-bias-residual": (layer_norm_with_residual, [(3, 5), (5,), (5,), (3, 5)]),
    "layer_norm-plain": (fast_attn.layer_norm, [(3, 5)]),
    "rms_norm-weight-residual": (rms_norm_with_residual, [(3, 5), (5,), (3, 5)]),
    "rms_norm-plain": (fast_attn.rms_norm, [(3, 5)]),
}


@pytest.mark.parametrize("case", NORM_GRADCHECK)
def test_gradcheck_norm(case):
    fn, shapes = NORM_GRADCHECK[case]
    gradcheck(fn, tuple(f64(*shape) for shape in shapes))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_bias_gelu(approximate):
    def fn(x_, b_):
        return fast_attn.bias_gelu(x_, b_, approximate=approximate)

    x = (torch.randn(3, 5, dtype=torch.float64) * 2).requires_grad_()
    gradcheck(fn, (x, f64(5)))


def test_gradcheck_swiglu():
    gradcheck(fast_attn.swiglu, (f64(3, 5), f64(3, 5)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_geglu(approximate):
    def fn(g_, u_):
        return fast_attn.geglu(g_, u_, approximate=approximate)

    gradcheck(fn, (f64(3, 5), f64(3, 5)))


# ------------------------------------------------------------------ fully masked rows


def fully_masked_case(kind):
    """(q, k, v, options, rows): ``rows`` (B, H, Sq) bool marks the rows that see no key."""
    batch, sq, sk, heads = 2, 7, 4, 2
    q, k, v = grad_leaf(batch, sq, heads, D), grad_leaf(batch, sk, heads, D), grad_leaf(batch, sk, heads, D)
    rows = torch.zeros(batch, heads, sq, dtype=torch.bool)
    if kind == "causal":  # bottom-right: query i sees keys j <= i + Sk - Sq
        options = dict(causal=True)
        rows[:, :, : sq - sk] = True
    elif kind == "bool-mask":
        mask = torch.rand(batch, heads, sq, sk) > 0.3
        mask[:, :, 0] = True
        mask[0, 1, 2] = False
        mask[1, :, 5] = False
        options = dict(attn_mask=mask)
        rows = ~mask.any(dim=-1)
    else:  # "additive-mask": -inf on every key of some rows
        mask = torch.randn(batch, heads, sq, sk)
        mask[0, :, 4] = float("-inf")
        mask[1, 0, 6] = float("-inf")
        options = dict(attn_mask=mask)
        rows[0, :, 4] = True
        rows[1, 0, 6] = True
    return q, k, v, options, rows


@pytest.mark.parametrize("kind", ["causal", "bool-mask", "additive-mask"])
def test_fully_masked_rows(kind):
    q, k, v, options, rows = fully_masked_case(kind)
    assert rows.any() and not rows.all()
    out, lse = fast_attn.attention(q, k, v, return_lse=True, **options)
    rows_bshd = rows.transpose(1, 2)  # (B, Sq, H)
    assert torch.equal(out[rows_bshd], torch.zeros_like(out[rows_bshd]))
    assert torch.isfinite(out).all()
    assert torch.isneginf(lse[rows]).all() and torch.isfinite(lse[~rows]).all()
    (out * torch.randn_like(out)).sum().backward()
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(tensor.grad).all(), f"d{name} has non-finite entries"
    assert torch.equal(q.grad[rows_bshd], torch.zeros_like(q.grad[rows_bshd]))
    assert q.grad[~rows_bshd].abs().sum() > 0


def test_fully_masked_rows_varlen_sequence_without_keys():
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 5], dtype=torch.int32)  # sequence 0 has no keys
    q, k, v = grad_leaf(7, H, D), grad_leaf(5, HKV, D), grad_leaf(5, HKV, D)
    out, lse = fast_attn.attention_varlen(q, k, v, cu_q, cu_k, 4, 5, return_lse=True)
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and out[3:].abs().sum() > 0
    assert torch.isneginf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()
    (out * torch.randn_like(out)).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:3], torch.zeros_like(q.grad[:3]))
