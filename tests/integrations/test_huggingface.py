"""``attn_implementation="fast_attn"`` in Hugging Face transformers against ``"eager"``.

Every model is random-initialised from a tiny config (hidden 32-64, 2 layers, vocab 100;
nothing is downloaded); the fast model is a deep copy of the eager one switched with
``set_attn_implementation``, so both hold the same weights. Outputs are compared in fp32
at the real (non-padded) tokens: at a padded query position of a causal model every key
is masked, where eager attention averages all keys and fast_attn gives 0 (documented).

Covered: a BERT encoder with right padding; GPT-2 with right padding and without a mask;
a Llama decoder with GQA and left padding (logits, parameter gradients, greedy generation
with a KV cache); a ViT; a Whisper encoder-decoder (cross-attention with Sq != Sk, decoder
padding); T5 (its learned relative bias arrives as ``position_bias``; its gradient);
Mistral's sliding window; Gemma 2's alternating sliding window with logit softcapping
(outputs and gradients); packed sequences (a mask with no recognised structure) and
``torch.compile(fullgraph=True)``. Each model test also checks which path the masks took
(the structure ``create_mask`` recognised, or the dense mask). ``attention_forward`` is
checked directly against transformers' eager formula for what the models above do not
reach (dense bool and float masks, top-left causal without a mask, a value head dim
unlike the query's, a broadcast batch, ``position_bias``, dropout only in training, the
errors). Registration: idempotent, ``unregister``, the error without transformers, and
that importing fast_attn does not import transformers.

The GPU test (``pytest -m gpu``) runs Llama and BERT in bf16 on the fast backends under
the DESIGN.md tolerance rule (eager in fp32 is the oracle, eager in bf16 the baseline).
"""

import copy
import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fast_attn.integrations import huggingface  # noqa: E402
from fast_attn.testing import GRAD_FACTOR, assert_close as rule_assert_close  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, same weights: only summation order may differ
VOCAB = 100
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def registered():
    huggingface.register()
    yield
    huggingface.register()  # a test that unregisters leaves the registry as it found it


@pytest.fixture
def calls(monkeypatch):
    """Records (causal, window, mask shape, mask dtype, Sq, Sk, H, Hkv) of each kernel call."""
    seen = []
    kernel = huggingface.attention

    def spy(q, k, v, **kwargs):
        mask = kwargs["attn_mask"]
        seen.append((kwargs["causal"], kwargs["window_size"],
                     None if mask is None else tuple(mask.shape),
                     None if mask is None else mask.dtype, q.shape[1], k.shape[1], q.shape[2],
                     k.shape[2]))
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(huggingface, "attention", spy)
    return seen


def twins(model):
    """(eager, fast): the same weights, eval mode."""
    model.eval().set_attn_implementation("eager")
    fast = copy.deepcopy(model)
    fast.set_attn_implementation(huggingface.IMPLEMENTATION)
    implementations = {getattr(m.config, "_attn_implementation", None) for m in fast.modules()
                       if hasattr(m, "config")}
    if implementations != {huggingface.IMPLEMENTATION}:
        # transformers 4.x kept some models (BERT) on per-class attention, outside the
        # registry, and some 5.x releases do not switch sub-configs (T5 in 5.18).
        pytest.skip(f"{type(model).__name__} takes no registered attention in transformers "
                    f"{transformers.__version__}")
    return model, fast


def token_batch(batch=3, seqlen=13, pad="left"):
    """Random ids and a padding mask: row 1 has 4 padded tokens, row 2 has 1."""
    ids = torch.randint(3, VOCAB, (batch, seqlen))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    for row, count in ((1, 4), (2, 1)):
        if pad == "left":
            mask[row, :count] = 0
        else:
            mask[row, seqlen - count:] = 0
    return ids, mask


def assert_at_tokens(actual, expected, mask):
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], **TOL)


def small(cls, **overrides):
    return cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               **overrides)


# ---------------------------------------------------------------------- models


def test_bert_encoder_with_padding(calls):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    eager, fast = twins(transformers.BertModel(config))
    ids, mask = token_batch(pad="right")
    expected, actual = eager(ids, attention_mask=mask), fast(ids, attention_mask=mask)
    assert_at_tokens(actual.last_hidden_state, expected.last_hidden_state, mask)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, **TOL)
    # Non-causal, and only the (B, 1, 1, Sk) padding vector reached the kernel.
    assert calls and all(c[:4] == (False, (-1, -1), (3, 1, 1, 13), torch.bool) for c in calls)


def test_gpt2_decoder_with_padding(calls):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64)
    eager, fast = twins(transformers.GPT2LMHeadModel(config))
    ids, mask = token_batch(pad="right")
    assert_at_tokens(fast(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits, mask)
    assert calls and all(c[:3] == (True, (-1, -1), (3, 1, 1, 13)) for c in calls)
    calls.clear()
    torch.testing.assert_close(fast(ids).logits, eager(ids).logits, **TOL)
    assert calls and all(c[:3] == (True, (-1, -1), None) for c in calls)  # no mask at all


def test_llama_gqa_with_left_padding(calls):
    eager, fast = twins(transformers.LlamaForCausalLM(small(transformers.LlamaConfig)))
    ids, mask = token_batch(pad="left")
    assert_at_tokens(fast(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits, mask)
    # Causal flag + padding vector; K/V reach the kernel with their 2 heads (no repeat_kv).
    assert calls and all(c[:3] == (True, (-1, -1), (3, 1, 1, 13)) and c[6:] == (4, 2) for c in calls)


@pytest.mark.parametrize("model_name", ["llama", "gemma2"])
def test_gradients(model_name):
    if model_name == "llama":
        model = transformers.LlamaForCausalLM(small(transformers.LlamaConfig))
    else:
        model = transformers.Gemma2ForCausalLM(gemma2_config())
    eager, fast = twins(model)
    ids, mask = token_batch(pad="left")
    weight = torch.randn(*ids.shape, VOCAB) * mask[..., None]  # real tokens only
    for m in (eager, fast):
        (m(ids, attention_mask=mask).logits * weight).sum().backward()
    fast_params = dict(fast.named_parameters())
    checked = 0
    for name, param in eager.named_parameters():
        if param.grad is not None:
            # fp32 on both sides, summed in different orders (the torch backend's attention
            # runs ATen's flash kernel, or chunked maths with softcap): embedding gradients,
            # sums over every token, move by up to ~2e-5 (gemma2 tied embeddings)
            torch.testing.assert_close(fast_params[name].grad, param.grad, rtol=1e-4, atol=3e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
            checked += 1
    assert checked > 10


def test_llama_generate_with_kv_cache(calls):
    eager, fast = twins(transformers.LlamaForCausalLM(small(transformers.LlamaConfig)))
    ids, mask = token_batch(pad="left")
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                   return_dict_in_generate=True, output_logits=True)
    expected, actual = eager.generate(ids, **options), fast.generate(ids, **options)
    assert torch.equal(actual.sequences, expected.sequences)
    for a, e in zip(actual.logits, expected.logits):
        torch.testing.assert_close(a, e, **TOL)
    # Decode steps: one query row over the cache, non-causal, padding vector only.
    decode = [c for c in calls if c[4] == 1]
    assert decode and all(c[:2] == (False, (-1, -1)) and c[2][2] == 1 for c in decode)


def test_vit(calls):
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    eager, fast = twins(transformers.ViTModel(config))
    pixels = torch.randn(2, 3, 32, 32)
    expected, actual = eager(pixel_values=pixels), fast(pixel_values=pixels)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **TOL)
    assert calls and all(c[:3] == (False, (-1, -1), None) and c[4] == 17 for c in calls)


def test_whisper_encoder_decoder(calls):
    config = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=15, max_target_positions=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    eager, fast = twins(transformers.WhisperModel(config))
    features = torch.randn(3, 16, 30)  # (B, mel bins, 2 * max_source_positions)
    ids, mask = token_batch(seqlen=9, pad="right")
    inputs = dict(input_features=features, decoder_input_ids=ids, decoder_attention_mask=mask)
    expected, actual = eager(**inputs), fast(**inputs)
    torch.testing.assert_close(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, **TOL)
    assert_at_tokens(actual.last_hidden_state, expected.last_hidden_state, mask)
    shapes = {(c[0], c[4], c[5]) for c in calls}
    # Encoder self-attention, causal decoder self-attention, cross-attention (Sq != Sk).
    assert shapes == {(False, 15, 15), (True, 9, 9), (False, 9, 15)}


def test_mistral_sliding_window(calls):
    config = small(transformers.MistralConfig, sliding_window=4)
    eager, fast = twins(transformers.MistralForCausalLM(config))
    ids, mask = token_batch(pad="right")
    assert_at_tokens(fast(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits, mask)
    # transformers' window keeps keys j > i - 4: left 3 of the kernel's window, plus padding.
    assert calls and all(c[:3] == (True, (3, 0), (3, 1, 1, 13)) for c in calls)
    calls.clear()
    torch.testing.assert_close(fast(ids).logits, eager(ids).logits, **TOL)
    assert calls and all(c[:3] == (True, (3, 0), None) for c in calls)


def test_t5_relative_position_bias(calls):
    """T5 passes its learned relative bias as ``position_bias``: outputs and its gradient."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   dropout_rate=0.0, decoder_start_token_id=0)
    eager, fast = twins(transformers.T5Model(config))
    ids, mask = token_batch(pad="right")
    decoder_ids, decoder_mask = token_batch(seqlen=9, pad="right")
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                  decoder_attention_mask=decoder_mask)
    expected, actual = eager(**inputs), fast(**inputs)
    assert_at_tokens(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, mask)
    assert_at_tokens(actual.last_hidden_state, expected.last_hidden_state, decoder_mask)
    for out in (expected, actual):
        (out.last_hidden_state * decoder_mask[..., None]).square().sum().backward()
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    torch.testing.assert_close(fast.get_parameter(name).grad, eager.get_parameter(name).grad,
                               rtol=1e-4, atol=1e-5)
    assert {c[3] for c in calls} == {torch.float32}  # one additive mask: bias + padding


def gemma2_config():
    return transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=0.5,
        final_logit_softcapping=None, layer_types=["sliding_attention", "full_attention"],
    )


def test_gemma2_softcap_and_sliding_window(calls):
    eager, fast = twins(transformers.Gemma2ForCausalLM(gemma2_config()))
    ids, mask = token_batch(pad="left")
    assert_at_tokens(fast(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits, mask)
    assert {c[:2] for c in calls} == {(True, (3, 0)), (True, (-1, -1))}


# ---------------------------------------------------------------------- masks


def test_masks_without_a_known_structure_take_the_dense_path(calls):
    """Packed sequences (found from position_ids) give a block-diagonal causal mask."""
    eager, fast = twins(transformers.LlamaForCausalLM(small(transformers.LlamaConfig)))
    ids = torch.randint(3, VOCAB, (2, 12))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    expected = eager(ids, position_ids=position_ids, use_cache=False).logits
    actual = fast(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, **TOL)
    assert calls and all(c[:4] == (False, (-1, -1), (2, 1, 12, 12), torch.bool) for c in calls)


def test_compiles_fullgraph(calls):
    """Under torch.compile no structure is recorded: the dense mask, no graph break."""
    eager, fast = twins(transformers.LlamaForCausalLM(small(transformers.LlamaConfig)))
    ids, mask = token_batch(pad="left")
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    actual = compiled(ids, attention_mask=mask, use_cache=False).logits
    assert_at_tokens(actual, eager(ids, attention_mask=mask, use_cache=False).logits, mask)
    assert calls and all(c[:3] == (False, (-1, -1), (3, 1, 13, 13)) for c in calls)


class _Module(torch.nn.Module):
    """Stands for the calling attention module: attention_forward reads is_causal and training."""

    def __init__(self, is_causal=False):
        super().__init__()
        self.is_causal = is_causal


def eager_attention(query, key, value, mask, scaling, softcap=None):
    """transformers' eager attention (Gemma 2's, with repeat_kv and softcap), fp64."""
    query, key, value = (x.double() for x in (query, key, value))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(2, 3) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        scores = scores + mask.double()
    return (scores.softmax(-1) @ value).transpose(1, 2)  # (B, Sq, H, Dv)


def qkv(batch=2, heads=4, kv_heads=2, seqlen_q=7, seqlen_k=7, head_dim=16, value_dim=16):
    return (torch.randn(batch, heads, seqlen_q, head_dim), torch.randn(batch, kv_heads, seqlen_k, head_dim),
            torch.randn(batch, kv_heads, seqlen_k, value_dim))


def check(out, expected):
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_dense_masks(kind):
    q, k, v = qkv(seqlen_q=9, seqlen_k=11)
    keep = torch.rand(2, 1, 9, 11) > 0.4
    keep[..., 0] = True  # no fully masked row
    mask = keep if kind == "bool" else torch.randn(2, 1, 9, 11).masked_fill(~keep, torch.finfo(torch.float32).min)
    out, weights = huggingface.attention_forward(_Module(), q, k, v, mask, scaling=0.3, softcap=2.0)
    assert weights is None
    check(out, eager_attention(q, k, v, mask, 0.3, softcap=2.0))


@pytest.mark.parametrize("seqlen_k", [5, 7, 12])
def test_causal_without_mask_is_top_left(seqlen_k):
    """SDPA's is_causal: query i keeps keys j <= i, whatever Sk (Sk > Sq: static-cache prefill)."""
    q, k, v = qkv(seqlen_q=7, seqlen_k=seqlen_k)
    out, _ = huggingface.attention_forward(_Module(is_causal=True), q, k, v, None)
    top_left = torch.arange(seqlen_k).view(1, -1) <= torch.arange(7).view(-1, 1)
    check(out, eager_attention(q, k, v, top_left, 16 ** -0.5))
    out, _ = huggingface.attention_forward(_Module(is_causal=True), q, k, v, None, is_causal=False)
    check(out, eager_attention(q, k, v, None, 16 ** -0.5))


def test_sliding_window_without_mask():
    q, k, v = qkv(seqlen_q=9, seqlen_k=9)
    out, _ = huggingface.attention_forward(_Module(is_causal=True), q, k, v, None, sliding_window=3)
    rows, cols = torch.arange(9).view(-1, 1), torch.arange(9).view(1, -1)
    check(out, eager_attention(q, k, v, (cols <= rows) & (cols > rows - 3), 0.25))


@pytest.mark.parametrize("value_dim", [8, 24])
def test_value_head_dim_unlike_query(value_dim):
    q, k, v = qkv(value_dim=value_dim)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True
    out, _ = huggingface.attention_forward(_Module(), q, k, v, mask)
    check(out, eager_attention(q, k, v, mask, 16 ** -0.5))


def test_broadcast_batch_of_queries():
    q, k, v = qkv(batch=3)
    q = q[:1]  # learned queries shared by the batch
    out, _ = huggingface.attention_forward(_Module(), q, k, v, None, scaling=0.5)
    check(out, eager_attention(q.expand(3, -1, -1, -1), k, v, None, 0.5))


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_position_bias(mask_kind):
    q, k, v = qkv(seqlen_q=6, seqlen_k=8)
    bias = torch.randn(1, 4, 6, 8)
    mask = None
    if mask_kind is not None:
        mask = torch.rand(2, 1, 6, 8) > 0.3
        mask[..., 0] = True
        if mask_kind == "float":
            mask = torch.zeros(2, 1, 6, 8).masked_fill(~mask, torch.finfo(torch.float32).min)
    out, _ = huggingface.attention_forward(_Module(), q, k, v, mask, scaling=1.0, position_bias=bias)
    additive = bias if mask is None else (
        torch.where(mask, bias, float("-inf")) if mask.dtype == torch.bool else bias + mask)
    check(out, eager_attention(q, k, v, additive, 1.0))


def test_position_bias_with_causal_prefill():
    """No mask, causal, Sk > Sq: the keys and the bias are both cut to the first Sq keys."""
    q, k, v = qkv(seqlen_q=6, seqlen_k=10)
    bias = torch.randn(1, 4, 6, 10)
    out, _ = huggingface.attention_forward(_Module(is_causal=True), q, k, v, None, position_bias=bias)
    top_left = torch.arange(10).view(1, -1) <= torch.arange(6).view(-1, 1)
    check(out, eager_attention(q, k, v, torch.where(top_left, bias, float("-inf")), 0.25))


def test_rejects_a_2d_mask():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4-D attention_mask"):
        huggingface.attention_forward(_Module(), q, k, v, torch.ones(2, 7, dtype=torch.bool))


def test_dropout_only_in_training():
    q, k, v = qkv()
    module = _Module()
    module.eval()
    out, _ = huggingface.attention_forward(module, q, k, v, None, dropout=0.5)
    check(out, eager_attention(q, k, v, None, 0.25))
    module.train()
    out, _ = huggingface.attention_forward(module, q, k, v, None, dropout=0.5)
    assert not torch.allclose(out.double(), eager_attention(q, k, v, None, 0.25))


def test_unsupported_keywords():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="s_aux"):
        huggingface.attention_forward(_Module(), q, k, v, None, s_aux=torch.zeros(4))
    with pytest.warns(UserWarning, match="output_attentions"):
        huggingface.attention_forward(_Module(), q, k, v, None, output_attentions=True)


def test_create_mask_records_structures():
    from transformers.masking_utils import (
        causal_mask_function,
        chunked_causal_mask_function,
        sliding_window_causal_mask_function,
    )

    from transformers import masking_utils
    from transformers.masking_utils import sdpa_mask

    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, :3] = False
    common = dict(batch_size=2, kv_length=10, attention_mask=padding)
    if "cache_position" in inspect.signature(sdpa_mask).parameters:  # transformers 4.x
        common["cache_position"] = torch.arange(10)
    else:
        common["q_length"] = 10

    def layout(**kwargs):
        mask = huggingface.create_mask(**{**common, **kwargs})
        return getattr(mask, "_fast_attn_layout")

    causal = layout(mask_function=causal_mask_function)
    assert (causal.causal, causal.window) == (True, (-1, -1))
    assert torch.equal(causal.padding.view(2, 10), padding)
    sliding = layout(mask_function=sliding_window_causal_mask_function(4), local_size=4)
    assert (sliding.causal, sliding.window) == (True, (3, 0))
    chunked = layout(mask_function=chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)),
                     local_size=4)
    assert chunked is None  # the dense mask is passed on
    bidirectional = getattr(masking_utils, "sliding_window_bidirectional_mask_function", None)
    if bidirectional is not None:  # transformers >= 5
        window = layout(mask_function=bidirectional(3), local_size=3)
        assert (window.causal, window.window) == (False, (3, 3))


# ---------------------------------------------------------------------- registration


def test_register_is_idempotent_and_unregister_removes():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    huggingface.register()
    huggingface.register()
    assert AttentionInterface._global_mapping["fast_attn"] is huggingface.attention_forward
    assert AttentionMaskInterface._global_mapping["fast_attn"] is huggingface.create_mask
    huggingface.unregister()
    huggingface.unregister()
    assert "fast_attn" not in AttentionInterface._global_mapping
    assert "fast_attn" not in AttentionMaskInterface._global_mapping
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises((ValueError, KeyError)):
        model.set_attn_implementation("fast_attn")


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"fast_attn\[hf\]"):
        huggingface.register()


def test_importing_fast_attn_does_not_import_transformers():
    code = ("import sys, fast_attn, fast_attn.integrations.huggingface; "
            "sys.exit(int('transformers' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_gpu_bf16(model_name):
    """bf16 on the fast backends: eager fp32 is the oracle, eager bf16 the baseline."""
    if model_name == "llama":  # head_dim 64: a size every fast kernel serves
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=256)
        model, pad = transformers.LlamaForCausalLM(config), "left"
    else:
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=512,
                                         max_position_embeddings=256)
        model, pad = transformers.BertModel(config), "right"
    oracle, _ = twins(model.cuda())
    baseline = copy.deepcopy(oracle).to(torch.bfloat16)
    fast = copy.deepcopy(baseline)
    fast.set_attn_implementation(huggingface.IMPLEMENTATION)
    ids, mask = token_batch(batch=4, seqlen=203, pad=pad)
    ids, mask = ids.cuda(), mask.cuda()
    outputs, grads = [], []
    for m in (fast, oracle, baseline):
        out = m(ids, attention_mask=mask)
        out = (out.logits if model_name == "llama" else out.last_hidden_state).float()
        (out * mask[..., None]).square().mean().backward()
        outputs.append(out[mask.bool()])
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    rule_assert_close(*outputs, name="output")
    for name in grads[1]:
        rule_assert_close(grads[0][name], grads[1][name], grads[2][name], factor=GRAD_FACTOR,
                          name=f"grad {name}")
