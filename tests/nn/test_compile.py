"""torch.compile(fullgraph=True) over the drop-in modules and the compatible functions,
checked against their eager results (forward and gradients).

Run on every torch the package declares (CI runs this module on 2.13 and 2.14; see
scripts/test_torch_compat.sh): nothing outside our custom ops may read a ContextVar or do
anything else Dynamo cannot trace.
"""

import pytest
import torch

import fast_attn
from fast_attn import nn as fnn

B, S, E, HEADS = 2, 9, 32, 4


def compiled(module_or_fn):
    torch._dynamo.reset()
    return torch.compile(module_or_fn, fullgraph=True, backend="eager")


def forward_and_grads(fn, inputs, params=()):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out.square().sum(), [*leaves, *params])
    return out.detach(), grads


def assert_same(fn, eager_fn, inputs, params=()):
    got, got_grads = forward_and_grads(fn, inputs, params)
    want, want_grads = forward_and_grads(eager_fn, inputs, params)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention(causal):
    module = fnn.MultiheadAttention(E, HEADS, batch_first=True)
    x = torch.randn(B, S, E)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(S) if causal else None

    def fn(x_):
        return module(x_, x_, x_, attn_mask=mask, is_causal=causal, need_weights=False)[0]

    assert_same(compiled(fn), fn, (x,), tuple(module.parameters()))


@pytest.mark.parametrize("factory", [
    lambda: fnn.LayerNorm(E),
    lambda: fnn.RMSNorm(E),
    lambda: fnn.FeedForward(E, 2 * E, activation="swiglu"),
    lambda: fnn.FeedForward(E, 2 * E, activation="gelu"),
    lambda: fnn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.0, batch_first=True, norm_first=True),
    lambda: fnn.TransformerDecoderLayer(E, HEADS, 2 * E, dropout=0.0, batch_first=True),
], ids=["layer_norm", "rms_norm", "ffn_swiglu", "ffn_gelu", "encoder_layer", "decoder_layer"])
def test_modules(factory):
    module = factory()
    x = torch.randn(B, S, E)
    if isinstance(module, fnn.TransformerDecoderLayer):
        memory = torch.randn(B, S + 2, E)

        def fn(x_):
            return module(x_, memory, tgt_is_causal=False)
    else:
        def fn(x_):
            return module(x_)

    assert_same(compiled(fn), fn, (x,), tuple(module.parameters()))


def test_flash_attn_and_sdpa_functions():
    q, k, v = torch.randn(B, S, HEADS, 16), torch.randn(B, S + 3, 2, 16), torch.randn(B, S + 3, 2, 16)

    def flash(q_, k_, v_):
        return fast_attn.flash_attn_func(q_, k_, v_, causal=True, window_size=(4, 0))

    def sdpa(q_, k_, v_):
        return fast_attn.scaled_dot_product_attention(
            q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), is_causal=True, enable_gqa=True)

    assert_same(compiled(flash), flash, (q, k, v))
    assert_same(compiled(sdpa), sdpa, (q, k, v))


def test_compiled_model_follows_use_backend_without_recompiling():
    """The backend is chosen when the op runs: a use_backend block outside the compiled
    function changes what runs, and the graph is reused."""
    x, w = torch.randn(5, E), torch.randn(E)
    counts = {"frames": 0}

    def counting_backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x_, w_: fast_attn.rms_norm(x_, w_), fullgraph=True, backend=counting_backend)
    expected = fn(x, w)
    with fast_attn.use_backend("torch"):
        torch.testing.assert_close(fn(x, w), expected)
    assert counts["frames"] == 1
