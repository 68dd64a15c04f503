"""``fast_attn.nn.RotaryEmbedding``: the GPT-NeoX / Llama conventions, offsets, position ids,
state_dict (tables are non-persistent buffers), errors, and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import pytest
import torch

from fast_attn import nn as fnn
from fast_attn.models.config import ModelConfig
from fast_attn.models.gpt import GPT
from fast_attn.reference.rotary import rotary_ref


def llama_rotate(x, dim, base, positions):
    """Hugging Face Llama's formulation: full-width cos/sin of cat(freqs, freqs), rotate_half."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # (S, 1, dim)
    rot, rest = x[..., :dim].float(), x[..., dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_matches_the_llama_formulation(base):
    rope = fnn.RotaryEmbedding(16, base=base, max_seq_len=64)
    q, k = torch.randn(2, 11, 4, 16), torch.randn(2, 11, 2, 16)
    got_q, got_k = rope(q, k, seqlen_offset=7)
    positions = torch.arange(7, 18)
    torch.testing.assert_close(got_q, llama_rotate(q, 16, base, positions))
    torch.testing.assert_close(got_k, llama_rotate(k, 16, base, positions))


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_offsets_and_position_ids(interleaved):
    rope = fnn.RotaryEmbedding(8, interleaved=interleaved, max_seq_len=32)
    q, k = torch.randn(3, 5, 3, 12, dtype=torch.float16), torch.randn(3, 5, 1, 12, dtype=torch.float16)
    offsets = torch.tensor([0, 9, 27], dtype=torch.int32)
    got_q, got_k = rope(q, k, seqlen_offset=offsets)
    for got, x in ((got_q, q), (got_k, k)):
        torch.testing.assert_close(got, rotary_ref(x, rope.cos, rope.sin, interleaved, offsets), atol=2e-3, rtol=0)
        assert torch.equal(got[..., 8:], x[..., 8:])
    ids = torch.tensor([4, 0, 30, 2, 2])
    by_ids, _ = rope(q, k, position_ids=ids)
    torch.testing.assert_close(by_ids, rotary_ref(q, rope.cos[ids], rope.sin[ids], interleaved), atol=2e-3, rtol=0)


def test_tables_are_non_persistent_buffers():
    rope = fnn.RotaryEmbedding(8, max_seq_len=10)
    assert rope.cos.shape == rope.sin.shape == (10, 4) and rope.cos.dtype == torch.float32
    assert rope.state_dict() == {} and {name for name, _ in rope.named_buffers()} == {"cos", "sin"}
    rope.load_state_dict({}, strict=True)
    model = GPT(ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_seq_len=8,
                            positions="rotary"))
    assert not [key for key in model.state_dict() if "rotary" in key or "cos" in key]


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim must be an even int"):
        fnn.RotaryEmbedding(7)
    with pytest.raises(ValueError, match="max_seq_len must be an int"):
        fnn.RotaryEmbedding(8, max_seq_len=0)
    rope = fnn.RotaryEmbedding(8, max_seq_len=6)
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="either seqlen_offset or position_ids"):
        rope(q, q, seqlen_offset=1, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match=r"seqlen_offsets \+ S must lie in \[0, 6\]"):
        rope(q, q, seqlen_offset=3)


def test_compile_fullgraph_matches_eager():
    rope = fnn.RotaryEmbedding(12, max_seq_len=40)

    def fn(q, k, offset):
        q, k = rope(q, k, seqlen_offset=offset)
        return q.sum(-1, keepdim=True) * k

    q, k = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 1, 16)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for offset in (3, torch.tensor([0, 20])):
        leaves = [t.clone().requires_grad_() for t in (q, k, q, k)]
        got, want = compiled(leaves[0], leaves[1], offset), fn(leaves[2], leaves[3], offset)
        torch.testing.assert_close(got, want)
        dy = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, leaves[:2], dy), torch.autograd.grad(want, leaves[2:], dy)):
            torch.testing.assert_close(a, b)
