"""The reference models: config presets, shapes, masks, KV-cache generation, torch.nn twin.

Sizes are tiny and odd (sequence lengths 7, 11, 13) so the suite runs in seconds on CPU;
the big presets are only built on the meta device, to check their parameter counts
against the published models.
"""

import math

import pytest
import torch
from torch import nn

from fast_attn.models import GPT, PRESETS, Bert, ModelConfig, Transformer, ViT, build_model
from fast_attn.models.gpt import apply_rotary, rotary_tables
from fast_attn.models.transformer import sinusoidal_positions


def tiny(name: str, **overrides) -> ModelConfig:
    """A preset shrunk to test size (overrides win)."""
    small = dict(d_model=32, n_heads=4, n_layers=2, n_decoder_layers=2, d_ff=48, dropout=0.0,
                 max_seq_len=32)
    if name.startswith("vit"):
        small.update(image_size=16, patch_size=4, in_channels=3, num_classes=5)
    if not name.startswith("vit"):
        small.update(vocab_size=23)
    return ModelConfig.from_name(name, **{**small, **overrides})


# ------------------------------------------------------------------------------ config


def test_presets_build_on_meta_with_published_parameter_counts():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            model = build_model(ModelConfig.from_name(name))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts["gpt2-small"] == 124_439_808  # Hugging Face GPT2LMHeadModel (tied)
    assert counts["bert-base"] == 109_514_298  # BertForMaskedLM
    assert counts["vit-b16"] == 86_567_656  # timm vit_base_patch16_224
    assert 60e6 < counts["transformer-base"] < 66e6  # the paper: 65M (its vocabulary differs)


def test_from_name_applies_overrides_and_never_overwrites_a_set_field():
    cfg = ModelConfig.from_name("gpt2-small", d_model=256, n_heads=4)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers) == (256, 4, 12)
    assert cfg.d_ff == 1024  # derived from the overridden width
    assert ModelConfig.from_name("gpt2-small", d_model=256, n_heads=4, d_ff=100).d_ff == 100
    assert ModelConfig.from_name("transformer-base", d_model=1024, n_heads=16).d_ff == 2048  # preset's
    assert ModelConfig.from_name("gpt-tiny", n_kv_heads=2).n_kv_heads == 2
    assert ModelConfig.from_name("gpt-tiny").n_kv_heads == 4
    assert ModelConfig.from_name("GPT2-Small") == ModelConfig.from_name("gpt2-small")
    assert ModelConfig(**cfg.to_dict()) == cfg


def test_paper_preset_is_the_paper_base_model():
    cfg = ModelConfig.from_name("transformer-base")
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.n_decoder_layers) == (512, 8, 2048, 6, 6)
    assert (cfg.norm_first, cfg.positions, cfg.dropout, cfg.activation) == (False, "sinusoidal", 0.1, "relu")


@pytest.mark.parametrize("bad", [dict(arch="rnn"), dict(d_model=30, n_heads=4), dict(n_kv_heads=3),
                                 dict(norm="batchnorm"), dict(positions="alibi"),
                                 dict(positions="rotary", d_model=36, n_heads=4 * 3)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        ModelConfig.from_name("gpt-tiny", **bad)


def test_from_name_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="gpt-tiny"):
        ModelConfig.from_name("gpt-huge")
    with pytest.raises(TypeError, match="n_experts"):
        ModelConfig.from_name("gpt-tiny", n_experts=8)


# ------------------------------------------------------------------------- transformer


def test_sinusoidal_positions_match_the_paper_formula():
    pe = sinusoidal_positions(13, 10)
    pos, i = 7, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 10)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 10)), abs=1e-6)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_a_torch_nn_transformer_twin(norm_first):
    cfg = tiny("transformer-tiny", norm_first=norm_first, activation="gelu")
    model = Transformer(cfg)
    twin = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_decoder_layers, cfg.d_ff,
                          dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first)
    if not norm_first:  # the paper has no final norm after a post-norm stack; torch adds one
        twin.encoder.norm, twin.decoder.norm = nn.Identity(), nn.Identity()
    renamed = {k.replace("encoder_layers", "encoder.layers").replace("decoder_layers", "decoder.layers")
                .replace("encoder_norm", "encoder.norm").replace("decoder_norm", "decoder.norm"): v
               for k, v in model.state_dict().items()}
    missing, unexpected = twin.load_state_dict(renamed, strict=False)
    assert not missing and set(unexpected) <= {"src_embed.weight", "tgt_embed.weight", "lm_head.weight"}

    src, tgt = torch.randint(3, cfg.vocab_size, (3, 11)), torch.randint(3, cfg.vocab_size, (3, 7))
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[1, 8:], pad[2, 4:] = True, True
    # Training mode (dropout is 0) keeps torch off its nested-tensor inference path.
    src_x, tgt_x = model.embed(src, model.src_embed), model.embed(tgt, model.tgt_embed)
    memory = twin.encoder(src_x, src_key_padding_mask=pad)
    out = twin.decoder(tgt_x, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(7),
                       tgt_is_causal=True, memory_key_padding_mask=pad)
    expected = out @ model.lm_head.weight.T
    torch.testing.assert_close(model(src, tgt, pad), expected, rtol=1e-5, atol=1e-5)


def test_transformer_shapes_tying_and_separate_target_vocabulary():
    model = Transformer(tiny("transformer-tiny"))
    assert model.tgt_embed is model.src_embed and model.lm_head.weight is model.src_embed.weight
    assert model(torch.randint(0, 23, (2, 13)), torch.randint(0, 23, (2, 5))).shape == (2, 5, 23)
    model = Transformer(tiny("transformer-tiny", tgt_vocab_size=17, tie_embeddings=False))
    assert model.tgt_embed is not model.src_embed and model.lm_head.weight is not model.tgt_embed.weight
    assert model(torch.randint(0, 23, (2, 13)), torch.randint(0, 17, (2, 5))).shape == (2, 5, 17)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_is_causal_and_ignores_source_padding(norm_first):
    model = Transformer(tiny("transformer-tiny", norm_first=norm_first)).eval()
    src, tgt = torch.randint(3, 23, (2, 9)), torch.randint(3, 23, (2, 7))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 5:] = True
    logits = model(src, tgt, pad)
    changed = tgt.clone()
    changed[:, 4] = (tgt[:, 4] + 1 - 3) % 20 + 3  # a different token at position 4
    after = model(src, changed, pad)
    torch.testing.assert_close(after[:, :4], logits[:, :4])
    assert not torch.allclose(after[:, 4:], logits[:, 4:])
    # What the pads hold, and how many follow, does not matter.
    src2 = torch.cat([src, torch.randint(3, 23, (2, 4))], dim=1)
    src2[0, 5:9] = torch.randint(3, 23, (4,))
    pad2 = torch.cat([pad, torch.ones(2, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(src2, tgt, pad2), logits, rtol=1e-5, atol=1e-5)


def test_transformer_generate_is_greedy_decoding():
    model = Transformer(tiny("transformer-tiny")).eval()
    src = torch.randint(3, 23, (3, 6))
    out = model.generate(src, 5, bos_id=1)
    assert out.shape == (3, 6) and (out[:, 0] == 1).all()
    torch.testing.assert_close(model(src, out[:, :-1]).argmax(-1), out[:, 1:])  # each step's argmax
    eos = int(out[0, 1])  # treat row 0's first token as EOS: decoding repeats it once it appears
    stopped = model.generate(src, 5, bos_id=1, eos_id=eos)
    assert (stopped[0, 1:] == eos).all()


def test_transformer_rejects_overlong_sequences_and_glu_activations():
    model = Transformer(tiny("transformer-tiny"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="activation"):
        Transformer(tiny("transformer-tiny", activation="swiglu"))


# -------------------------------------------------------------------------------- GPT

GPT_VARIANTS = [
    dict(positions="learned"),
    dict(positions="rotary", n_kv_heads=2, norm="rmsnorm", activation="swiglu", bias=False),
    dict(positions="sinusoidal", n_kv_heads=1, activation="gelu_tanh", tie_embeddings=False),
]


@pytest.mark.parametrize("variant", GPT_VARIANTS, ids=lambda v: v["positions"])
def test_gpt_shapes_and_causality(variant):
    model = GPT(tiny("gpt-tiny", **variant)).eval()
    idx = torch.randint(0, 23, (2, 13))
    logits = model(idx)
    assert logits.shape == (2, 13, 23)
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 23
    after = model(changed)
    torch.testing.assert_close(after[:, :9], logits[:, :9])
    assert not torch.allclose(after[:, 9:], logits[:, 9:])


@pytest.mark.parametrize("variant", GPT_VARIANTS, ids=lambda v: v["positions"])
def test_gpt_kv_cache_logits_match_the_full_forward(variant):
    model = GPT(tiny("gpt-tiny", **variant)).double().eval()
    idx = torch.randint(0, 23, (3, 11))
    full = model(idx)
    cache = model.new_kv_cache(3, 16)
    with torch.no_grad():  # the KV-cache op is forward only
        prefill = model(idx[:, :7], cache)  # rows 0..6 of the cache
        steps = [model(idx[:, t:t + 1], cache, start_pos=t) for t in range(7, 11)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full)


@pytest.mark.parametrize("variant", GPT_VARIANTS, ids=lambda v: v["positions"])
def test_gpt_generate_with_cache_equals_without_cache(variant):
    model = GPT(tiny("gpt-tiny", **variant)).double().eval()
    prompt = torch.randint(0, 23, (3, 5))
    greedy = model.generate(prompt, 20, temperature=0)
    assert greedy.shape == (3, 25) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, 20, temperature=0, use_cache=False))
    sampled = [model.generate(prompt, 12, temperature=0.9, top_k=5, use_cache=use_cache,
                              generator=torch.Generator().manual_seed(3)) for use_cache in (True, False)]
    assert torch.equal(*sampled)


def test_gpt_generate_respects_max_seq_len():
    model = GPT(tiny("gpt-tiny", max_seq_len=16)).eval()
    prompt = torch.randint(0, 23, (1, 10))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 7)
    assert model.generate(prompt, 12, use_cache=False).shape == (1, 22)  # slides the window


def test_gpt_top_k_one_is_greedy():
    model = GPT(tiny("gpt-tiny")).eval()
    prompt = torch.randint(0, 23, (2, 4))
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_k=1), model.generate(prompt, 6, temperature=0))


def test_gpt_trains_and_generates_under_autocast():
    model = GPT(tiny("gpt-tiny", positions="rotary"))
    idx = torch.randint(0, 23, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx).float().square().mean().backward()
        out = model.eval().generate(idx, 4, temperature=0)
    assert out.shape == (2, 13) and model.wte.weight.grad is not None


def test_rotary_scores_depend_only_on_the_offset():
    cos, sin = rotary_tables(32, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()

    def score(i, j):
        return (apply_rotary(q, cos[i:i + 1], sin[i:i + 1]) * apply_rotary(k, cos[j:j + 1], sin[j:j + 1])).sum()

    torch.testing.assert_close(score(9, 4), score(20, 15))
    torch.testing.assert_close(apply_rotary(q, cos[5:6], sin[5:6]).norm(), q.norm())
    torch.testing.assert_close(score(3, 3), (q * k).sum())


# ------------------------------------------------------------------------------- BERT


def test_bert_padding_masks_hide_the_pads():
    model = Bert(tiny("bert-tiny")).eval()
    idx = torch.randint(0, 23, (2, 11))
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 6:] = True
    hidden = model(idx, pad)
    assert hidden.shape == (2, 11, 32) and model.mlm_logits(hidden).shape == (2, 11, 23)
    alone = model(idx[1:, :6])  # the padded row, unpadded
    torch.testing.assert_close(hidden[1:, :6], alone, rtol=1e-5, atol=1e-5)
    scrambled = idx.clone()
    scrambled[1, 6:] = torch.randint(0, 23, (5,))
    torch.testing.assert_close(model(scrambled, pad)[:, :6], hidden[:, :6])
    assert not torch.allclose(model(idx)[1, :6], hidden[1, :6])  # without the mask they count


def test_bert_token_types_and_tied_head():
    model = Bert(tiny("bert-tiny")).eval()
    idx = torch.randint(0, 23, (2, 7))
    types = torch.zeros(2, 7, dtype=torch.long)
    torch.testing.assert_close(model(idx, token_type_ids=types), model(idx))
    types[:, 4:] = 1
    assert not torch.allclose(model(idx, token_type_ids=types), model(idx))
    assert model.lm_head.weight is model.tok_embed.weight


# -------------------------------------------------------------------------------- ViT


def test_vit_shapes_and_input_checks():
    model = ViT(tiny("vit-tiny"))
    assert model.n_patches == 16 and model.pos_embed.shape == (1, 17, 32)
    assert model(torch.randn(3, 3, 16, 16)).shape == (3, 5)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(3, 3, 15, 16))


def test_vit_class_token_sees_every_patch():
    model = ViT(tiny("vit-tiny"))
    images = torch.randn(1, 3, 16, 16, requires_grad=True)
    model(images).sum().backward()
    per_patch = images.grad.abs().unfold(2, 4, 4).unfold(3, 4, 4).sum(dim=(0, 1, 4, 5))  # (4, 4)
    assert (per_patch > 0).all()


# ---------------------------------------------------------------------------- all


@pytest.mark.parametrize("name", ["transformer-tiny", "gpt-tiny", "bert-tiny", "vit-tiny"])
def test_every_parameter_gets_a_finite_gradient(name):
    cfg = tiny(name, dropout=0.1)
    model = build_model(cfg).train()
    if cfg.arch == "transformer":
        out = model(torch.randint(0, 23, (2, 9)), torch.randint(0, 23, (2, 7)))
    elif cfg.arch == "gpt":
        out = model(torch.randint(0, 23, (2, 9)))
    elif cfg.arch == "bert":
        out = model.mlm_logits(model(torch.randint(0, 23, (2, 9))))
    else:
        out = model(torch.randn(2, 3, 16, 16))
    out.square().mean().backward()
    for name_, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name_
