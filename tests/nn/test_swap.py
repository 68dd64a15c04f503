"""swap_modules: torch.nn layers replaced in place by fast_attn.nn ones sharing their state.

The main check swaps a whole ``torch.nn.Transformer`` and compares outputs and gradients
with a deep copy of the original (fp64: torch.testing.assert_close defaults; fp32: a tight
rtol; CUDA bf16 under ``gpu``: the DESIGN.md rule). The others check that parameters are
shared (not copied), that training mode, hooks and optimizers carry over, and which
modules are left alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fast_attn.nn as fnn
from fast_attn.nn import swap_modules
from fast_attn.testing import GRAD_FACTOR, assert_close as rule_assert_close

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = "cuda"  # the device of the gpu-marked tests
pytestmark = [
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]

D_MODEL, SRC_LEN, TGT_LEN, BATCH = 32, 11, 9, 3
FAST_TYPES = {
    nn.MultiheadAttention: fnn.MultiheadAttention,
    nn.LayerNorm: fnn.LayerNorm,
    nn.TransformerEncoderLayer: fnn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: fnn.TransformerDecoderLayer,
}


def _transformer(dtype=torch.float64, device="cpu", **kwargs):
    torch.manual_seed(0)
    options = dict(d_model=D_MODEL, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                   dim_feedforward=64, dropout=0.0)
    options.update(kwargs)
    model = nn.Transformer(**options).to(device=device, dtype=dtype)
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def _transformer_inputs(dtype=torch.float64, device="cpu", batch_first=False):
    def seq(length):
        shape = (BATCH, length, D_MODEL) if batch_first else (length, BATCH, D_MODEL)
        return torch.randn(shape, dtype=dtype, device=device)

    src_kpm = torch.zeros(BATCH, SRC_LEN, dtype=torch.bool, device=device)
    src_kpm[1, -3:] = True  # the second sequence is 3 tokens shorter
    return {
        "src": seq(SRC_LEN),
        "tgt": seq(TGT_LEN),
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(TGT_LEN, device=device, dtype=dtype),
        "src_key_padding_mask": src_kpm,
        "memory_key_padding_mask": src_kpm,
    }


def _forward_backward(model, inputs, seed=3):
    """Output and every parameter's gradient (by name) of a random projection."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    gen = torch.Generator().manual_seed(seed)
    (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, {}), (torch.float32, {"rtol": 1e-5, "atol": 1e-5})],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_swap_transformer_parity(dtype, tol, norm_first):
    model = _transformer(dtype, norm_first=norm_first)
    reference = copy.deepcopy(model)
    inputs = _transformer_inputs(dtype)
    params_before = dict(model.named_parameters())

    assert swap_modules(model) is model
    for name, module in model.named_modules():
        ref_type = type(reference.get_submodule(name))
        assert type(module) is FAST_TYPES.get(ref_type, ref_type), name
    # The very same Parameter objects, under the same names.
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is params_before[n] for n in params_before)
    assert model.state_dict().keys() == reference.state_dict().keys()

    out, grads = _forward_backward(model, inputs)
    ref_out, ref_grads = _forward_backward(reference, inputs)
    torch.testing.assert_close(out, ref_out, **tol)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m: f"{name}: {m}", **tol)


def test_swap_preserves_training_mode_and_device_dtype():
    model = _transformer()
    model.train()
    model.encoder.layers[1].eval()  # a mixed state must survive too
    modes = {name: m.training for name, m in model.named_modules()}
    swap_modules(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model.eval()
    assert not any(m.training for m in model.modules())


def test_swap_eval_nested_tensor_path(monkeypatch):
    """batch_first encoder in eval + no_grad with padding: torch.nn.TransformerEncoder
    hands the layers NestedTensors; the swapped layers run them as varlen attention
    (fast_attn.attention_varlen, not torch's forward) and give torch's result."""
    model = _transformer(batch_first=True).eval()
    reference = copy.deepcopy(model)
    swap_modules(model)
    assert model.encoder.use_nested_tensor
    nested_inputs, torch_calls, varlen_calls = [], [], []
    fast_forward = fnn.TransformerEncoderLayer.forward

    def spy(self, src, *args, **kwargs):
        nested_inputs.append(src.is_nested)
        return fast_forward(self, src, *args, **kwargs)

    def count(name, calls):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return original[name](*args, **kwargs)
        return wrapper

    import fast_attn.nn.attention as fnn_attention
    original = {"torch": nn.TransformerEncoderLayer.forward, "varlen": fnn_attention.attention_varlen}
    monkeypatch.setattr(fnn.TransformerEncoderLayer, "forward", spy)
    monkeypatch.setattr(nn.TransformerEncoderLayer, "forward", count("torch", torch_calls))
    monkeypatch.setattr(fnn_attention, "attention_varlen", count("varlen", varlen_calls))
    inputs = _transformer_inputs(batch_first=True)
    with torch.no_grad():
        out = model(**inputs)
    assert nested_inputs == [True, True]
    assert torch_calls == [] and varlen_calls == ["varlen", "varlen"]
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(out, reference(**inputs))


def test_optimizer_built_before_swap_keeps_training_the_model():
    model = _transformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    swap_modules(model)
    inputs = _transformer_inputs()
    before = model(**inputs).detach()
    model(**inputs).square().mean().backward()
    optimizer.step()
    assert not torch.allclose(model(**inputs), before)


def test_swap_keeps_hooks():
    model = _transformer()
    seen = []
    norm = model.decoder.layers[0].norm2
    norm.register_forward_hook(lambda mod, args, out: seen.append(type(mod)))
    model.encoder.layers[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(type(mod)))
    swap_modules(model)
    model(**_transformer_inputs())
    assert seen == [fnn.MultiheadAttention, fnn.LayerNorm]


def test_include_filters_by_class_or_name():
    model = _transformer()
    swap_modules(model, include=[nn.LayerNorm])
    assert type(model.encoder.norm) is fnn.LayerNorm
    assert type(model.encoder.layers[0]) is nn.TransformerEncoderLayer
    assert type(model.encoder.layers[0].norm1) is fnn.LayerNorm
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention

    model = _transformer()
    reference = copy.deepcopy(model)
    swap_modules(model, include=["MultiheadAttention"])
    assert type(model.decoder.layers[1].multihead_attn) is fnn.MultiheadAttention
    assert type(model.decoder.layers[1]) is nn.TransformerDecoderLayer
    inputs = _transformer_inputs()
    torch.testing.assert_close(model(**inputs), reference(**inputs))

    # A layer is swapped whole: its attention and norms come along.
    model = _transformer()
    swap_modules(model, include=["TransformerEncoderLayer"])
    layer = model.encoder.layers[0]
    assert type(layer) is fnn.TransformerEncoderLayer and type(layer.norm1) is fnn.LayerNorm
    assert type(model.encoder.norm) is nn.LayerNorm
    assert type(model.decoder.layers[0]) is nn.TransformerDecoderLayer

    with pytest.raises(ValueError, match="include"):
        swap_modules(_transformer(), include=[nn.Linear])
    with pytest.raises(ValueError, match="include"):
        swap_modules(_transformer(), include=["Linear"])


def test_swap_rms_norm_shared_modules_and_root():
    torch.manual_seed(0)
    norm = nn.RMSNorm(D_MODEL, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
    model = nn.Sequential(nn.Linear(D_MODEL, D_MODEL), norm, nn.GELU(), norm).double()  # shared norm
    reference = copy.deepcopy(model)
    swap_modules(model)
    assert type(model[1]) is fnn.RMSNorm and model[1] is model[3]
    assert model[1].weight is norm.weight
    x = torch.randn(4, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x))

    root = nn.LayerNorm(D_MODEL)
    swapped = swap_modules(root)
    assert type(swapped) is fnn.LayerNorm and swapped.weight is root.weight


def test_subclasses_are_left_alone():
    class ScaledLayerNorm(nn.LayerNorm):
        def forward(self, input):
            return 2 * super().forward(input)

    model = nn.Sequential(ScaledLayerNorm(D_MODEL), nn.LayerNorm(D_MODEL))
    swap_modules(model)
    assert type(model[0]) is ScaledLayerNorm and type(model[1]) is fnn.LayerNorm
    with pytest.raises(TypeError, match="Module"):
        swap_modules(lambda x: x)


def test_swapped_layers_use_fused_ops(monkeypatch):
    """Pre-norm layers fuse the residual add into the next LayerNorm, GELU layers fuse
    linear1's bias into bias_gelu, attention goes through fast_attn.attention."""
    import fast_attn.nn.attention as attention_module
    import fast_attn.nn.feedforward as feedforward_module
    import fast_attn.nn.transformer as transformer_module

    calls = []

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append((name, "residual" in kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(transformer_module, "layer_norm")
    spy(feedforward_module, "bias_gelu")
    spy(attention_module, "attention")
    model = _transformer(norm_first=True, activation=F.gelu)
    swap_modules(model)
    model(**_transformer_inputs(), tgt_is_causal=True)
    # Per encoder layer: 1 attention, 1 fused add+norm, 1 bias_gelu; per decoder layer: 2, 2, 1.
    assert calls.count(("attention", False)) == 2 + 2 * 2
    assert calls.count(("layer_norm", True)) == 2 + 2 * 2
    assert calls.count(("bias_gelu", False)) == 2 + 2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("norm_first", [False, True])
def test_swap_transformer_gpu_bf16(norm_first):
    """DESIGN.md rule: the swapped model in bf16 against the original in fp32 (oracle)
    and in bf16 (baseline), for the output and every parameter gradient."""
    options = dict(d_model=256, nhead=4, dim_feedforward=1024, norm_first=norm_first, activation="gelu")
    oracle_model = _transformer(torch.float32, GPU, **options)
    baseline_model = copy.deepcopy(oracle_model).to(torch.bfloat16)
    fast_model = swap_modules(copy.deepcopy(baseline_model))
    torch.manual_seed(0)
    src = torch.randn(113, 4, 256, device=GPU)
    tgt = torch.randn(57, 4, 256, device=GPU)
    kpm = torch.zeros(4, 113, dtype=torch.bool, device=GPU)
    kpm[1, -17:] = True
    runs = []
    models = ((fast_model, torch.bfloat16), (oracle_model, torch.float32), (baseline_model, torch.bfloat16))
    for model, dtype in models:
        inputs = {"src": src.to(dtype), "tgt": tgt.to(dtype), "src_key_padding_mask": kpm,
                  "memory_key_padding_mask": kpm,
                  "tgt_mask": nn.Transformer.generate_square_subsequent_mask(57, device=GPU, dtype=dtype)}
        runs.append(_forward_backward(model, inputs))
    (out, grads), (o_out, o_grads), (b_out, b_grads) = runs
    rule_assert_close(out, o_out, b_out, name="output")
    for name in o_grads:
        rule_assert_close(grads[name], o_grads[name], b_grads[name], factor=GRAD_FACTOR, name=f"grad {name}")
