"""NestedTensor (padded-batch) inputs reach fast_attn.nn as varlen attention.

``torch.nn.TransformerEncoder`` in eval mode without grad turns a padded batch with a
``src_key_padding_mask`` into a NestedTensor (its "fast path"); after ``swap_modules``
our layers must run it through ``fast_attn.attention_varlen`` (counted with a
TorchDispatchMode over the ``fast_attn::`` ops) and give torch's output, padded
positions included. Also: the same model in training mode (padded batch and mask,
``fast_attn.attention``), NestedTensors given to ``MultiheadAttention`` and
``TransformerEncoderLayer`` directly (against torch per sequence), and the nested calls
that are still handed to torch.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fast_attn.nn as fnn
from fast_attn.nn import swap_modules

pytestmark = [
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]

E, HEADS, FF = 16, 4, 24  # even head count: torch's nested fast path needs it
LENGTHS = [11, 1, 6]  # a full-length, a one-token and a middle sequence
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


class CountFastAttnOps(TorchDispatchMode):
    """Counts the ``torch.ops.fast_attn.*`` calls made inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fast_attn":
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _padding_mask(lengths, seqlen=None):
    """bool (B, S), True = padding (torch's key_padding_mask convention), left aligned."""
    seqlen = max(lengths) if seqlen is None else seqlen
    return torch.arange(seqlen).view(1, -1) >= torch.tensor(lengths).view(-1, 1)


def _nested(x, lengths):
    """The NestedTensor torch's encoder builds from the padded x (B, S, E)."""
    return torch._nested_tensor_from_mask(x, ~_padding_mask(lengths, x.shape[1]), mask_check=False)


def _encoder(activation, dtype, final_norm=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, activation=activation, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(E) if final_norm else None)
    model = model.to(dtype)
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model, swap_modules(copy.deepcopy(model))


# ------------------------------------------------------------------- the encoder


@pytest.mark.parametrize("final_norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, {}), (torch.float32, FP32_TOL)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_nested_fast_path_runs_varlen(activation, dtype, tol, final_norm):
    ref, fast = _encoder(activation, dtype, final_norm)
    assert ref.use_nested_tensor and all(type(m) is fnn.TransformerEncoderLayer for m in fast.layers)
    ref.eval(), fast.eval()
    x = torch.randn(len(LENGTHS), max(LENGTHS), E, dtype=dtype)
    kpm = _padding_mask(LENGTHS)
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=kpm)
        with CountFastAttnOps() as ops:
            out = fast(x, src_key_padding_mask=kpm)
    assert ops.calls["attention_varlen_fwd"] == len(fast.layers), ops.calls
    assert ops.calls["attention_fwd"] == 0, ops.calls
    # Padded positions too: torch pads the nested result with zeros (then the final norm).
    torch.testing.assert_close(out, expected, **tol)
    padded = torch.zeros(E, dtype=dtype)
    if final_norm:
        padded = F.layer_norm(padded, (E,), ref.norm.weight, ref.norm.bias, ref.norm.eps)
    torch.testing.assert_close(expected[kpm], padded.expand(int(kpm.sum()), E), **tol)


def test_encoder_training_with_padding_mask_matches_torch():
    """Training mode: torch keeps the padded batch and the mask (no nesting); so do we,
    on fast_attn.attention. Outputs (every position) and gradients match torch."""
    ref, fast = _encoder("gelu", torch.float64)
    x = torch.randn(len(LENGTHS), max(LENGTHS), E, dtype=torch.float64)
    kpm = _padding_mask(LENGTHS)
    results = []
    for model in (ref, fast):
        model.train()
        xin = x.clone().requires_grad_()
        with CountFastAttnOps() as ops:
            out = model(xin, src_key_padding_mask=kpm)
            (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, E, dtype=out.dtype)).sum(), xin)
        results.append((out, grad, ops.calls))
    (out_ref, grad_ref, _), (out, grad, calls) = results
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert calls["attention_fwd"] == len(fast.layers) and calls["attention_varlen_fwd"] == 0, calls


def test_encoder_zero_length_sequence():
    """An all-padding row is a zero-length nested sequence: output is torch's there too."""
    ref, fast = _encoder("relu", torch.float64)
    ref.eval(), fast.eval()
    lengths = [7, 0, 3]
    x = torch.randn(3, 7, E, dtype=torch.float64)
    kpm = _padding_mask(lengths)
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=kpm)
        with CountFastAttnOps() as ops:
            out = fast(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(out, expected)
    assert ops.calls["attention_varlen_fwd"] == len(fast.layers), ops.calls


# --------------------------------------------------------- layers given NestedTensors


def _mha_twins(**kwargs):
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(E, HEADS, batch_first=True, **kwargs).double()
    with torch.no_grad():
        ref.in_proj_bias.normal_() if ref.in_proj_bias is not None else None
    return ref, fnn.MultiheadAttention.from_torch(copy.deepcopy(ref))


def test_mha_nested_self_attention_matches_torch_fast_path():
    ref, fast = _mha_twins()
    ref.eval(), fast.eval()
    x = torch.randn(len(LENGTHS), max(LENGTHS), E, dtype=torch.float64)
    nt = _nested(x, LENGTHS)
    with torch.no_grad():
        expected, _ = ref(nt, nt, nt, need_weights=False)
        with CountFastAttnOps() as ops:
            out, weights = fast(nt, nt, nt, need_weights=False)
    assert out.is_nested and weights is None
    assert ops.calls == Counter(attention_varlen_fwd=1), ops.calls
    for got, want in zip(out.unbind(), expected.unbind()):
        torch.testing.assert_close(got, want)


def test_mha_nested_cross_attention_with_grad_matches_torch_per_sequence():
    """Queries and keys of different lengths, in training mode (dropout 0) with gradients,
    where torch's MultiheadAttention refuses NestedTensors: each sequence equals torch's
    unbatched call, gradients included."""
    ref, fast = _mha_twins()
    q_lengths, k_lengths = [5, 1, 8], [9, 4, 1]
    q_pad = torch.randn(3, 8, E, dtype=torch.float64)
    k_pad = torch.randn(3, 9, E, dtype=torch.float64)
    q_seqs = [q_pad[b, :n].clone().requires_grad_() for b, n in enumerate(q_lengths)]
    k_seqs = [k_pad[b, :n].clone().requires_grad_() for b, n in enumerate(k_lengths)]
    q_nt = torch.nested.as_nested_tensor(q_seqs)
    k_nt = torch.nested.as_nested_tensor(k_seqs)
    with CountFastAttnOps() as ops:
        out, _ = fast(q_nt, k_nt, k_nt, need_weights=False)
    assert ops.calls["attention_varlen_fwd"] == 1, ops.calls
    outs = out.unbind()
    dout = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, [*q_seqs, *k_seqs, fast.in_proj_weight], dout)
    for b in range(3):
        want, _ = ref(q_seqs[b], k_seqs[b], k_seqs[b], need_weights=False)
        torch.testing.assert_close(outs[b], want)
    expected_grads = torch.autograd.grad(
        [ref(q_seqs[b], k_seqs[b], k_seqs[b], need_weights=False)[0] for b in range(3)],
        [*q_seqs, *k_seqs, ref.in_proj_weight], dout)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_encoder_layer_nested_matches_torch_per_sequence(norm_first):
    torch.manual_seed(5)
    ref = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=norm_first).double()
    fast = fnn.TransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    x = torch.randn(len(LENGTHS), max(LENGTHS), E, dtype=torch.float64)
    with CountFastAttnOps() as ops:
        out = fast(_nested(x, LENGTHS))
    assert out.is_nested and ops.calls["attention_varlen_fwd"] == 1, ops.calls
    for b, (got, n) in enumerate(zip(out.unbind(), LENGTHS)):
        torch.testing.assert_close(got, ref(x[b, :n]))


def test_nested_calls_torch_still_serves():
    """need_weights=True and NestedTensors with a mask go to torch's forward unchanged."""
    ref, fast = _mha_twins()
    ref.eval(), fast.eval()
    x = torch.randn(len(LENGTHS), max(LENGTHS), E, dtype=torch.float64)
    nt = _nested(x, LENGTHS)
    with torch.no_grad():
        expected = ref(nt, nt, nt, need_weights=True)
        with CountFastAttnOps() as ops:
            out = fast(nt, nt, nt, need_weights=True)
    assert not ops.calls
    torch.testing.assert_close(out[1], expected[1])
    for got, want in zip(out[0].unbind(), expected[0].unbind()):
        torch.testing.assert_close(got, want)
