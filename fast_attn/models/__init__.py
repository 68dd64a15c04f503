"""fast_attn.models: reference transformers built from fast_attn.nn layers and fast_attn ops.

    from fast_attn.models import ModelConfig, build_model
    model = build_model(ModelConfig.from_name("gpt-tiny", vocab_size=65))

- ``Transformer``: the encoder-decoder of "Attention Is All You Need" (post- or pre-norm);
- ``GPT``: decoder-only, learned/sinusoidal/rotary positions, KV-cache ``generate``;
- ``Bert``: encoder-only with padding masks and an MLM head;
- ``ViT``: patch embedding, class token, learned positions.

``python -m fast_attn.models.train`` trains them on built-in tasks (see its ``--help``).
"""

from torch import nn

from fast_attn.models.bert import Bert
from fast_attn.models.config import PRESETS, ModelConfig
from fast_attn.models.gpt import GPT
from fast_attn.models.transformer import Transformer
from fast_attn.models.vit import ViT

__all__ = ["Bert", "GPT", "ModelConfig", "PRESETS", "Transformer", "ViT", "build_model"]

_ARCH_CLASSES = {"transformer": Transformer, "gpt": GPT, "bert": Bert, "vit": ViT}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg.arch`` names, freshly initialised."""
    return _ARCH_CLASSES[cfg.arch](cfg)
