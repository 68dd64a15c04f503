"""The reference GPT's context-parallel hook: unset, the model runs as before; position ids
equal to the default positions change nothing; the hook refuses attention dropout."""

import pytest
import torch

from fast_attn.distributed.model import context_parallel_attention, disable_context_parallel, enable_context_parallel
from fast_attn.models import ModelConfig, build_model


@pytest.mark.parametrize("positions", ["rotary", "learned", "sinusoidal"])
def test_position_ids_equal_to_the_default_positions_change_nothing(positions):
    model = build_model(ModelConfig.from_name("gpt-tiny", positions=positions, n_layers=1, dropout=0.0)).eval()
    idx = torch.randint(0, 128, (2, 11))
    assert torch.equal(model(idx), model(idx, position_ids=torch.arange(11)))
    with pytest.raises(ValueError, match="position_ids must be"):
        model(idx, position_ids=torch.arange(10))


def test_enable_and_disable_set_every_attention_hook():
    model = build_model(ModelConfig.from_name("gpt-tiny", n_layers=2))
    hooks = lambda: [block.attn.attention_fn for block in model.blocks]  # noqa: E731
    assert hooks() == [None, None]
    enable_context_parallel(model, None, "ulysses", "contiguous")
    assert all(callable(h) for h in hooks())
    disable_context_parallel(model)
    assert hooks() == [None, None]
    with pytest.raises(TypeError, match="attention_fn"):
        enable_context_parallel(torch.nn.Linear(2, 2), None)


def test_the_hook_refuses_attention_dropout_and_unknown_schemes():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="attn_dropout=0.0"):
        context_parallel_attention(None, "ring")(x, x, x, causal=True, dropout_p=0.1)
    with pytest.raises(ValueError, match="scheme must be one of"):
        context_parallel_attention(None, "striped")
