"""fast_attn.nn modules against their torch.nn twins holding the same weights.

Each drop-in is checked for: identical initialisation from the same seed, state_dict
round trips both ways with ``strict=True``, identical repr, and output and gradient
parity (inputs, parameters, float masks) in fp64 (torch.testing.assert_close defaults)
and fp32 (a tight rtol), over the options that change the computation. Sizes are small
and awkward (odd sequence lengths, L != S, 3 heads of dim 4). CUDA bf16 versions of the
key cases (marked ``gpu``) use the DESIGN.md tolerance rule with torch.nn in fp32 as the
oracle and torch.nn in bf16 as the baseline.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fast_attn.nn as fnn
from fast_attn.testing import GRAD_FACTOR, assert_close as rule_assert_close

# Mixed bool/float masks are a supported (deprecated) torch case; both sides warn.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = "cuda"  # the device of the gpu-marked tests

E, H = 12, 3  # embed_dim, heads (head_dim 4)
N, L, S = 2, 5, 7  # batch, target and source lengths
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


# ----------------------------------------------------------------------------- helpers


def _twins(torch_cls, fast_cls, *args, dtype=torch.float64, device="cpu", **kwargs):
    """(torch module, fast module) built from the same seed; asserts identical init."""
    torch.manual_seed(1234)
    ref = torch_cls(*args, **kwargs).to(device=device, dtype=dtype)
    torch.manual_seed(1234)
    fast = fast_cls(*args, **kwargs).to(device=device, dtype=dtype)
    ref_state, fast_state = ref.state_dict(), fast.state_dict()
    assert list(ref_state) == list(fast_state)
    for name in ref_state:
        torch.testing.assert_close(fast_state[name], ref_state[name], rtol=0, atol=0, msg=name)
    return ref, fast


def _leaves(tensors, dtype=None):
    """Fresh leaf copies (optionally cast to ``dtype``; requires_grad kept) for one
    module's run. A tensor passed under several names stays one tensor (self-attention
    passes query is key is value)."""
    out, copies = {}, {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            if id(t) not in copies:
                copy = t.detach().clone()
                if dtype is not None and copy.is_floating_point():
                    copy = copy.to(dtype)
                copies[id(t)] = copy.requires_grad_(t.requires_grad)
            t = copies[id(t)]
        out[name] = t
    return out


def _run(module, call, inputs, grad_seed=7):
    """Forward with ``call(module, **inputs)``, backward of a random projection of every
    tensor output; returns (outputs, input grads, parameter grads)."""
    module.zero_grad(set_to_none=True)
    outputs = call(module, **inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator(device="cpu").manual_seed(grad_seed)
    loss = 0
    for out in outputs:
        if out is not None and out.requires_grad:
            weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
            loss = loss + (out * weight).sum()
    if torch.is_tensor(loss):
        loss.backward()
    outputs = tuple(out.detach() if out is not None else None for out in outputs)
    input_grads = {k: v.grad for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad}
    param_grads = {k: p.grad for k, p in module.named_parameters()}
    return outputs, input_grads, param_grads


def _assert_parity(ref, fast, call, inputs, **tol):
    """Same outputs and gradients from ``call`` on the torch and fast modules."""
    ref_out, ref_in, ref_par = _run(ref, call, _leaves(inputs))
    fast_out, fast_in, fast_par = _run(fast, call, _leaves(inputs))
    assert len(ref_out) == len(fast_out)
    for i, (a, b) in enumerate(zip(fast_out, ref_out)):
        if b is None:
            assert a is None, f"output {i}: expected None"
            continue
        assert (a.shape, a.dtype) == (b.shape, b.dtype), f"output {i}"
        torch.testing.assert_close(a, b, msg=lambda m: f"output {i}: {m}", **tol)
    for grads_fast, grads_ref, kind in ((fast_in, ref_in, "input"), (fast_par, ref_par, "param")):
        assert grads_fast.keys() == grads_ref.keys()
        for name in grads_ref:
            if grads_ref[name] is None:
                assert grads_fast[name] is None or not grads_fast[name].any(), f"{kind} grad {name}"
                continue
            torch.testing.assert_close(grads_fast[name], grads_ref[name],
                                       msg=lambda m: f"{kind} grad {name}: {m}", **tol)


def _tol(dtype):
    return {} if dtype == torch.float64 else FP32_TOL


def _randn(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _blocked(*shape):
    """A bool mask in torch's convention (True = not allowed) that never blocks key 0,
    so no query row is fully masked."""
    mask = torch.rand(*shape) < 0.35
    mask[..., 0] = False
    return mask


def _additive(*shape, dtype=torch.float64, grad=False):
    """A float mask: random biases with -inf where ``_blocked`` blocks."""
    mask = torch.randn(*shape, dtype=dtype).masked_fill(_blocked(*shape), float("-inf"))
    return mask.requires_grad_(grad)


def _top_left_causal(rows, cols):
    """torch's causal mask for L x S in its bool convention (True = blocked): j > i."""
    return torch.ones(rows, cols, dtype=torch.bool).triu(1)


# ------------------------------------------------------------------ MultiheadAttention


def _mha_call(module, query, key, value, **options):
    return module(query, key, value, **options)


# (constructor kwargs, forward case) pairs; forward cases are built by _mha_inputs.
MHA_CASES = [
    ({}, "self"),
    ({"batch_first": True}, "self"),
    ({}, "cross"),
    ({"batch_first": True}, "cross_kv_shared"),
    ({"bias": False}, "self"),
    ({"kdim": 5, "vdim": 7}, "cross"),
    ({"kdim": 5, "vdim": 7, "batch_first": True}, "cross_kpm_bool"),
    ({"add_bias_kv": True}, "self_kpm_bool"),
    ({"add_zero_attn": True}, "cross_attn_float"),
    ({"add_bias_kv": True, "add_zero_attn": True, "batch_first": True}, "cross_both_bool"),
    ({}, "self_kpm_float"),
    ({"batch_first": True}, "self_attn_bool_2d"),
    ({}, "self_attn_float_2d_grad"),
    ({"batch_first": True}, "cross_attn_bool_3d"),
    ({}, "cross_attn_float_3d_grad"),
    ({}, "self_both_float"),
    ({"batch_first": True}, "self_both_mixed"),
    ({}, "self_causal"),
    ({"batch_first": True}, "self_causal_kpm"),
    ({}, "cross_causal_long_q"),
    ({"batch_first": True}, "cross_causal_short_q"),
    ({"add_bias_kv": True, "add_zero_attn": True}, "self_causal"),
    ({}, "unbatched"),
    ({"batch_first": True, "kdim": 5, "vdim": 7}, "unbatched_masks"),
]


def _mha_inputs(case, ctor, dtype, seqlen_k=S):
    """Forward inputs for a named case (sequence-first or batch-first per ``ctor``)."""
    kdim, vdim = ctor.get("kdim", E), ctor.get("vdim", E)
    batch_first = ctor.get("batch_first", False)
    opts = {}

    def seq(length, dim):
        return _randn(N, length, dim, dtype=dtype) if batch_first else _randn(length, N, dim, dtype=dtype)

    if case.startswith("unbatched"):
        query = _randn(L, E, dtype=dtype)
        key, value = _randn(S, kdim, dtype=dtype), _randn(S, vdim, dtype=dtype)
        if case == "unbatched_masks":
            opts = {"key_padding_mask": _blocked(S), "attn_mask": _blocked(H, L, S)}
        return {"query": query, "key": key, "value": value, **opts}
    if case.startswith("self"):
        if kdim != E or vdim != E:
            raise ValueError("self-attention needs kdim == vdim == embed_dim")
        query = key = value = seq(L, E)
        seqlen_k = L
    elif case == "cross_kv_shared":
        query, key = seq(L, E), seq(seqlen_k, kdim)
        value = key
    elif case == "cross_causal_long_q":
        query, key, value = seq(L + 3, E), seq(L, kdim), seq(L, vdim)
        seqlen_k = L
    elif case == "cross_causal_short_q":
        query, key, value = seq(L, E), seq(S, kdim), seq(S, vdim)
    else:
        query, key, value = seq(L, E), seq(seqlen_k, kdim), seq(seqlen_k, vdim)
    rows = query.shape[1] if batch_first else query.shape[0]
    if "kpm_bool" in case or "both_bool" in case:
        opts["key_padding_mask"] = _blocked(N, seqlen_k)
    if "kpm_float" in case or "both_float" in case or "both_mixed" in case:
        opts["key_padding_mask"] = _additive(N, seqlen_k, dtype=dtype)
    if "attn_bool_2d" in case or "both_bool" in case or "both_mixed" in case:
        opts["attn_mask"] = _blocked(rows, seqlen_k)
    if "attn_float_2d" in case or "both_float" in case:
        opts["attn_mask"] = _additive(rows, seqlen_k, dtype=dtype, grad="grad" in case)
    if "attn_float" in case and "2d" not in case and "3d" not in case:
        opts["attn_mask"] = _additive(rows, seqlen_k, dtype=dtype)
    if "attn_bool_3d" in case:
        opts["attn_mask"] = _blocked(N * H, rows, seqlen_k)
    if "attn_float_3d" in case:
        opts["attn_mask"] = _additive(N * H, rows, seqlen_k, dtype=dtype, grad="grad" in case)
    if "causal" in case:
        if case.startswith("self"):
            opts["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(rows, dtype=dtype)
        else:
            opts["attn_mask"] = _top_left_causal(rows, seqlen_k)
        opts["is_causal"] = True
        if "kpm" in case:
            opts["key_padding_mask"] = _blocked(N, seqlen_k)
    return {"query": query, "key": key, "value": value, **opts}


@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)],
                         ids=["fast", "weights_avg", "weights_per_head"])
@pytest.mark.parametrize("ctor,case", MHA_CASES,
                         ids=["-".join([case, *(f"{k}={v}" for k, v in ctor.items())])
                              for ctor, case in MHA_CASES])
def test_mha_parity_fp64(ctor, case, need_weights, average):
    ref, fast = _twins(nn.MultiheadAttention, fnn.MultiheadAttention, E, H, **ctor)
    inputs = _mha_inputs(case, ctor, torch.float64)
    inputs.update(need_weights=need_weights, average_attn_weights=average)
    _assert_parity(ref, fast, _mha_call, inputs)


@pytest.mark.parametrize("ctor,case", [
    ({}, "self_kpm_bool"),
    ({"batch_first": True, "kdim": 5, "vdim": 7}, "cross_attn_float_3d_grad"),
    ({"add_bias_kv": True, "add_zero_attn": True}, "self_causal"),
    ({"batch_first": True}, "cross_causal_short_q"),
])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_parity_fp32(ctor, case, need_weights):
    ref, fast = _twins(nn.MultiheadAttention, fnn.MultiheadAttention, E, H, dtype=torch.float32, **ctor)
    inputs = _mha_inputs(case, ctor, torch.float32)
    inputs["need_weights"] = need_weights
    _assert_parity(ref, fast, _mha_call, inputs, **FP32_TOL)


def test_mha_eval_mode_matches_torch_fast_path():
    """torch's own inference fast path (eval, no grad, batch_first self-attention)."""
    ref, fast = _twins(nn.MultiheadAttention, fnn.MultiheadAttention, E, 4, batch_first=True)  # even heads
    ref.eval(), fast.eval()
    x = torch.randn(N, L, E, dtype=torch.float64)
    kpm = _blocked(N, L)
    with torch.no_grad():
        for need_weights in (False, True):
            a = ref(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
            b = fast(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
            torch.testing.assert_close(b[0], a[0])
            if need_weights:
                torch.testing.assert_close(b[1], a[1])


def test_mha_output_layout_matches_torch():
    """Sequence-first outputs are contiguous (L, N, E) like torch's."""
    ref, fast = _twins(nn.MultiheadAttention, fnn.MultiheadAttention, E, H)
    x = torch.randn(L, N, E, dtype=torch.float64)
    out, weights = fast(x, x, x)
    assert out.shape == (L, N, E) and out.is_contiguous() and weights.shape == (N, L, L)


def test_mha_dropout_only_in_training():
    torch.manual_seed(0)
    fast = fnn.MultiheadAttention(E, H, dropout=0.5).double()
    ref = nn.MultiheadAttention(E, H, dropout=0.5).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(L, N, E, dtype=torch.float64)
    fast.train()
    for need_weights in (False, True):
        trained = fast(x, x, x, need_weights=need_weights)[0]
        assert not torch.allclose(trained, fast.eval()(x, x, x, need_weights=need_weights)[0])
        fast.train()
    # need_weights returns the dropped-out weights, as torch does: rows no longer sum to 1.
    _, weights = fast(x, x, x, average_attn_weights=False)
    assert (weights == 0).any()
    fast.eval(), ref.eval()
    torch.testing.assert_close(fast(x, x, x)[0], ref(x, x, x)[0])


def test_mha_fully_masked_rows_are_zero_not_nan():
    """Documented difference: torch's need_weights path gives NaN here, fast_attn gives 0."""
    fast = fnn.MultiheadAttention(E, H, batch_first=True).double()
    x = torch.randn(N, L, E, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True  # every key of sequence 1 is padding
    for need_weights in (False, True):
        out, weights = fast(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[1], fast.out_proj.bias.expand(L, E))
        if need_weights:
            assert (weights[1] == 0).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        x.grad = None


def test_mha_is_causal_needs_a_mask():
    for module in (fnn.MultiheadAttention(E, H), nn.MultiheadAttention(E, H)):
        x = torch.randn(L, N, E)
        with pytest.raises(RuntimeError, match="attn_mask"):
            module(x, x, x, is_causal=True, need_weights=False)


@pytest.mark.parametrize("bad", ["attn_mask_shape", "kpm_shape", "mask_dtype", "query_dim", "embed_dim"])
def test_mha_bad_input(bad):
    fast = fnn.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    kwargs = {}
    if bad == "attn_mask_shape":
        kwargs["attn_mask"] = torch.zeros(L, L + 1)
    elif bad == "kpm_shape":
        kwargs["key_padding_mask"] = torch.zeros(N + 1, L, dtype=torch.bool)
    elif bad == "mask_dtype":
        kwargs["attn_mask"] = torch.zeros(L, L, dtype=torch.int64)
    elif bad == "query_dim":
        x = torch.randn(1, L, N, E)
    elif bad == "embed_dim":
        x = torch.randn(L, N, E + 1)
    error = TypeError if bad == "mask_dtype" else ValueError
    with pytest.raises(error):
        fast(x, x, x, **kwargs)


def test_mha_mismatched_mask_types_warn_like_torch():
    fast = fnn.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    with pytest.warns(UserWarning, match="mismatched"):
        fast(x, x, x, key_padding_mask=_blocked(N, L), attn_mask=torch.zeros(L, L))


@pytest.mark.parametrize("ctor", [{}, {"bias": False}, {"kdim": 5, "vdim": 7}, {"add_bias_kv": True},
                                  {"add_zero_attn": True, "batch_first": True, "dropout": 0.1}])
def test_mha_state_dict_round_trip(ctor):
    ref, fast = _twins(nn.MultiheadAttention, fnn.MultiheadAttention, E, H, **ctor)
    assert type(fast.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert repr(fast) == repr(ref)
    _check_round_trip(ref, fast)


def _check_round_trip(ref, fast):
    """Load fast <- torch and torch <- fast with strict=True; the tensors must arrive."""
    for src, dst in ((ref, fast), (fast, ref)):
        state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
        src.load_state_dict(state, strict=True)
        dst.load_state_dict(src.state_dict(), strict=True)
        for name, value in dst.state_dict().items():
            torch.testing.assert_close(value, state[name], rtol=0, atol=0)


# ------------------------------------------------------------------------------ norms


NORM_SHAPES = [(E,), (3, E)]  # normalized_shape: one or several trailing dims


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=["1d", "2d"])
@pytest.mark.parametrize("options", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_layer_norm_parity(dtype, shape, options):
    ref, fast = _twins(nn.LayerNorm, fnn.LayerNorm, shape, dtype=dtype, **options)
    _randomize(ref, fast)
    x = torch.randn(N, L, *shape, dtype=dtype, requires_grad=True)
    _assert_parity(ref, fast, lambda m, input: m(input), {"input": x}, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=["1d", "2d"])
@pytest.mark.parametrize("options", [{}, {"elementwise_affine": False}, {"eps": 1e-3}])
def test_rms_norm_parity(dtype, shape, options):
    ref, fast = _twins(nn.RMSNorm, fnn.RMSNorm, shape, dtype=dtype, **options)
    _randomize(ref, fast)
    x = torch.randn(N, L, *shape, dtype=dtype, requires_grad=True)
    _assert_parity(ref, fast, lambda m, x: m(x), {"x": x}, **_tol(dtype))


def _randomize(ref, fast):
    """Non-trivial weights (the default init is ones/zeros) shared by both modules."""
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    fast.load_state_dict(ref.state_dict(), strict=True)


def test_norms_state_dict_and_repr():
    for ref, fast in (
        _twins(nn.LayerNorm, fnn.LayerNorm, (3, E), eps=1e-6, bias=False),
        _twins(nn.LayerNorm, fnn.LayerNorm, E),
        _twins(nn.RMSNorm, fnn.RMSNorm, E),
        _twins(nn.RMSNorm, fnn.RMSNorm, (3, E), eps=1e-6),
    ):
        assert repr(fast) == repr(ref)
        assert isinstance(fast, type(ref))
        _check_round_trip(ref, fast)


def test_norm_bad_shape():
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.LayerNorm((3, E))(torch.randn(N, 4, E))
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.RMSNorm(E)(torch.randn(N, E + 1))


# ------------------------------------------------------------------------ FeedForward


def _feed_forward_reference(module, x):
    """Plain PyTorch maths of FeedForward (documented layout: gate first, then up)."""
    h = F.linear(x, module.fc1.weight, module.fc1.bias)
    if module.activation == "gelu":
        h = F.gelu(h)
    elif module.activation == "gelu_tanh":
        h = F.gelu(h, approximate="tanh")
    elif module.activation == "relu":
        h = F.relu(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        h = (F.silu(gate) if module.activation == "swiglu" else F.gelu(gate)) * up
    return F.linear(h, module.fc2.weight, module.fc2.bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "swiglu", "geglu"])
def test_feed_forward_matches_reference(activation, bias, dtype):
    module = fnn.FeedForward(E, 17, activation=activation, bias=bias, dtype=dtype)
    fc1_out = 34 if activation in ("swiglu", "geglu") else 17
    expected_keys = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    if not bias:
        expected_keys = ["fc1.weight", "fc2.weight"]
    assert list(module.state_dict()) == expected_keys
    assert module.fc1.weight.shape == (fc1_out, E) and module.fc2.weight.shape == (E, 17)
    x = torch.randn(N, L, E, dtype=dtype, requires_grad=True)
    out = module(x)
    grads = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    x_ref = x.detach().clone().requires_grad_()
    expected = _feed_forward_reference(module, x_ref)
    grads_ref = torch.autograd.grad(expected.sum(), [x_ref, *module.parameters()])
    torch.testing.assert_close(out, expected, **_tol(dtype))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **_tol(dtype))


def test_feed_forward_options():
    module = fnn.FeedForward(E, 17, activation="swiglu", dropout=0.5).double()
    assert repr(module) == (
        "FeedForward(\n  d_model=12, d_hidden=17, activation='swiglu'\n"
        "  (fc1): Linear(in_features=12, out_features=34, bias=True)\n"
        "  (dropout): Dropout(p=0.5, inplace=False)\n"
        "  (fc2): Linear(in_features=17, out_features=12, bias=True)\n)"
    )
    x = torch.randn(N, L, E, dtype=torch.float64)
    module.eval()
    torch.testing.assert_close(module(x), _feed_forward_reference(module, x))
    module.train()
    assert not torch.allclose(module(x), _feed_forward_reference(module, x))
    before = module.fc1.weight.clone()
    module.reset_parameters()
    assert not torch.equal(before, module.fc1.weight)
    with pytest.raises(ValueError, match="activation"):
        fnn.FeedForward(E, 17, activation="tanh")


def test_feed_forward_keeps_fc1_hooks():
    """A hook on fc1 must fire: the fused bias+GELU path yields to the module call."""
    module = fnn.FeedForward(E, 17).double()
    seen = []
    module.fc1.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    x = torch.randn(N, L, E, dtype=torch.float64)
    torch.testing.assert_close(module(x), _feed_forward_reference(module, x))
    assert seen == [(N, L, 17)]


# ---------------------------------------------------------- encoder and decoder layers


# name: (activation factory, mask mode used with it)
ACTIVATIONS = {
    "relu": (lambda: F.relu, "none"),
    "gelu_str": (lambda: "gelu", "causal"),
    "gelu_fn": (lambda: F.gelu, "all"),
    "gelu_tanh_module": (lambda: nn.GELU(approximate="tanh"), "causal"),
    "silu_callable": (lambda: (lambda t: F.silu(t)), "all"),
}


def _layer_inputs(kind, batch_first, dtype, masks):
    """Layer inputs; ``masks``: "none", "causal" (causal mask + is_causal hint: the causal
    fast path) or "all" (causal mask and hint, padding masks, a float memory mask)."""
    def seq(length):
        shape = (N, length, E) if batch_first else (length, N, E)
        return _randn(*shape, dtype=dtype)

    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
    if kind == "encoder":
        inputs = {"src": seq(L)}
        if masks != "none":
            inputs.update(src_mask=causal, is_causal=True)
        if masks == "all":
            inputs["src_key_padding_mask"] = _blocked(N, L)
        return inputs
    inputs = {"tgt": seq(L), "memory": seq(S)}
    if masks != "none":
        inputs.update(tgt_mask=causal, tgt_is_causal=True)
    if masks == "all":
        inputs.update(memory_mask=_additive(L, S, dtype=dtype), tgt_key_padding_mask=_blocked(N, L),
                      memory_key_padding_mask=_blocked(N, S))
    return inputs


def _layer_call(module, **inputs):
    return module(**inputs)


LAYERS = {
    "encoder": (nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer),
    "decoder": (nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer),
}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_layer_parity_fp64(kind, norm_first, activation):
    batch_first = activation in ("gelu_str", "silu_callable")
    make_activation, masks = ACTIVATIONS[activation]
    ref, fast = _twins(*LAYERS[kind], E, H, dim_feedforward=19, dropout=0.0, activation=make_activation(),
                       batch_first=batch_first, norm_first=norm_first)
    _randomize_layer(ref, fast)
    inputs = _layer_inputs(kind, batch_first, torch.float64, masks)
    _assert_parity(ref, fast, _layer_call, inputs)


@pytest.mark.parametrize("options", [
    {"norm_first": True, "batch_first": True},
    {"norm_first": False, "bias": False},
    {"norm_first": True, "layer_norm_eps": 1e-3, "activation": "gelu"},
])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_layer_parity_fp32(kind, options):
    ref, fast = _twins(*LAYERS[kind], E, H, dim_feedforward=19, dropout=0.0, dtype=torch.float32, **options)
    _randomize_layer(ref, fast)
    inputs = _layer_inputs(kind, options.get("batch_first", False), torch.float32, "all")
    _assert_parity(ref, fast, _layer_call, inputs, **FP32_TOL)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_layer_unbatched(kind, norm_first):
    ref, fast = _twins(*LAYERS[kind], E, H, dim_feedforward=19, dropout=0.0, norm_first=norm_first,
                       activation="gelu")
    if kind == "encoder":
        inputs = {"src": _randn(L, E), "src_key_padding_mask": _blocked(L)}
    else:
        inputs = {"tgt": _randn(L, E), "memory": _randn(S, E), "memory_key_padding_mask": _blocked(S)}
    _assert_parity(ref, fast, _layer_call, inputs)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_eval_matches_torch_fast_path(norm_first):
    """Under eval + no_grad torch runs its fused encoder-layer kernel; compare with that."""
    ref, fast = _twins(nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, E, 4, dim_feedforward=19,
                       batch_first=True, norm_first=norm_first, activation="gelu")
    ref.eval(), fast.eval()
    x = torch.randn(N, L, E, dtype=torch.float64)
    kpm = _blocked(N, L)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, src_key_padding_mask=kpm)[kpm.logical_not()],
                                   ref(x, src_key_padding_mask=kpm)[kpm.logical_not()])


def test_layer_dropout_only_in_training():
    fast = fnn.TransformerEncoderLayer(E, H, dim_feedforward=19, dropout=0.3).double()
    x = torch.randn(L, N, E, dtype=torch.float64)
    assert not torch.allclose(fast(x), fast(x))
    fast.eval()
    torch.testing.assert_close(fast(x), fast(x))


def test_layer_children_and_hooks():
    fast = fnn.TransformerDecoderLayer(E, H, dim_feedforward=19, norm_first=True, activation="gelu").double()
    assert type(fast.self_attn) is fnn.MultiheadAttention
    assert type(fast.multihead_attn) is fnn.MultiheadAttention
    assert all(type(getattr(fast, f"norm{i}")) is fnn.LayerNorm for i in (1, 2, 3))
    assert type(fast.linear1) is nn.Linear and fast.activation is F.gelu
    assert isinstance(fast, nn.TransformerDecoderLayer)
    # Hooks on fused children still fire (the layer falls back to the module calls).
    seen = []
    for name in ("norm2", "norm3", "linear1"):
        getattr(fast, name).register_forward_hook(lambda mod, args, out, name=name: seen.append(name))
    fast(torch.randn(L, N, E, dtype=torch.float64), torch.randn(S, N, E, dtype=torch.float64))
    assert sorted(seen) == ["linear1", "norm2", "norm3"]


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("options", [{}, {"norm_first": True, "bias": False, "batch_first": True}])
def test_layer_state_dict_round_trip(kind, options):
    ref, fast = _twins(*LAYERS[kind], E, H, dim_feedforward=19, **options)
    assert repr(fast) == repr(ref)
    _check_round_trip(ref, fast)


def _randomize_layer(ref, fast):
    """Non-zero biases and non-unit norm weights, shared by both layers."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_()
    fast.load_state_dict(ref.state_dict(), strict=True)


# ---------------------------------------------------------------------- GPU (bf16)


def _gpu_rule(fast_bf16, ref_fp32, ref_bf16, call, inputs):
    """DESIGN.md rule: the fast module in bf16 against torch.nn in fp32 (oracle) and
    torch.nn in bf16 (baseline), for outputs and gradients (inputs and parameters)."""
    runs = []
    for module, dtype in ((fast_bf16, torch.bfloat16), (ref_fp32, torch.float32), (ref_bf16, torch.bfloat16)):
        runs.append(_run(module, call, _leaves(inputs, dtype)))
    (out, in_g, par_g), (o_out, o_in, o_par), (b_out, b_in, b_par) = runs
    for i, (a, o, b) in enumerate(zip(out, o_out, b_out)):
        if o is not None:
            rule_assert_close(a, o, b, name=f"output {i}")
    for grads, oracle, base in ((in_g, o_in, b_in), (par_g, o_par, b_par)):
        for name in oracle:
            if oracle[name] is not None:
                rule_assert_close(grads[name], oracle[name], base[name], factor=GRAD_FACTOR,
                                  name=f"grad {name}")


def _gpu_triplet(torch_cls, fast_cls, *args, **kwargs):
    ref32, fast = _twins(torch_cls, fast_cls, *args, dtype=torch.float32, device=GPU, **kwargs)
    ref16, _ = _twins(torch_cls, fast_cls, *args, dtype=torch.bfloat16, device=GPU, **kwargs)
    ref16.load_state_dict(ref32.state_dict())
    return fast.to(torch.bfloat16), ref32, ref16


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["self_causal", "self_kpm_bool", "cross_attn_float_3d",
                                  "cross_causal_short_q"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_gpu_bf16(case, need_weights):
    embed, heads = 256, 4  # head_dim 64: a size every fast kernel serves
    fast, ref32, ref16 = _gpu_triplet(nn.MultiheadAttention, fnn.MultiheadAttention, embed, heads,
                                      batch_first=True)
    torch.manual_seed(0)
    seqlen_q, seqlen_k = 113, (113 if case.startswith("self") else 203)
    q = torch.randn(4, seqlen_q, embed, device=GPU, requires_grad=True)
    kv = q if case.startswith("self") else torch.randn(4, seqlen_k, embed, device=GPU, requires_grad=True)
    inputs = {"query": q, "key": kv, "value": kv, "need_weights": need_weights}
    if case == "self_causal":
        inputs.update(attn_mask=_top_left_causal(seqlen_q, seqlen_q).to(GPU), is_causal=True)
    elif case == "self_kpm_bool":
        inputs["key_padding_mask"] = _blocked(4, seqlen_k).to(GPU)
    elif case == "cross_attn_float_3d":
        inputs["attn_mask"] = _additive(4 * heads, seqlen_q, seqlen_k, dtype=torch.float32).to(GPU)
    else:
        inputs.update(attn_mask=_top_left_causal(seqlen_q, seqlen_k).to(GPU), is_causal=True)
    _gpu_rule(fast, ref32, ref16, _mha_call, inputs)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_layers_gpu_bf16(kind, norm_first):
    fast, ref32, ref16 = _gpu_triplet(*LAYERS[kind], 256, 4, dim_feedforward=1024, dropout=0.0,
                                      activation="gelu", batch_first=True, norm_first=norm_first)
    torch.manual_seed(0)
    x = torch.randn(4, 113, 256, device=GPU, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(113, device=GPU)
    if kind == "encoder":
        inputs = {"src": x, "src_mask": causal, "is_causal": True}
    else:
        memory = torch.randn(4, 203, 256, device=GPU, requires_grad=True)
        inputs = {"tgt": x, "memory": memory, "tgt_mask": causal, "tgt_is_causal": True,
                  "memory_key_padding_mask": _blocked(4, 203).to(GPU)}
    _gpu_rule(fast, ref32, ref16, _layer_call, inputs)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_norms_gpu_bf16(cls):
    fast, ref32, ref16 = _gpu_triplet(getattr(nn, cls), getattr(fnn, cls), 1023)
    with torch.no_grad():
        ref32.weight.normal_()
    ref16.load_state_dict(ref32.state_dict())
    fast.load_state_dict(ref32.state_dict())
    x = torch.randn(8, 203, 1023, device=GPU, requires_grad=True)
    name = "input" if cls == "LayerNorm" else "x"
    _gpu_rule(fast, ref32, ref16, lambda m, **kw: m(kw[name]), {name: x})


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_feed_forward_gpu_bf16(activation):
    torch.manual_seed(0)
    module = fnn.FeedForward(256, 688, activation=activation, device=GPU)
    x = torch.randn(4, 113, 256, device=GPU)
    oracle = _feed_forward_reference(module, x)
    baseline = _feed_forward_reference(module.to(torch.bfloat16), x.bfloat16())
    rule_assert_close(module(x.bfloat16()), oracle, baseline)
