"""``ModelConfig``: one dataclass for every reference model, with named presets.

    cfg = ModelConfig.from_name("gpt2-small")                       # a preset
    cfg = ModelConfig.from_name("transformer-tiny", vocab_size=16)  # a preset, overridden
    cfg = ModelConfig(arch="gpt", d_model=256, n_layers=4)          # from scratch

``from_name`` starts from the preset and applies the caller's overrides on top; derived
fields (``d_ff``, ``n_kv_heads``) are filled in ``__post_init__`` only when left as None,
so a value the caller set is never overwritten. Fields a model does not use are ignored
(``n_decoder_layers`` outside the encoder-decoder, the image fields outside the ViT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

__all__ = ["ModelConfig", "PRESETS"]

ARCHS = ("transformer", "gpt", "bert", "vit")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("sinusoidal", "learned", "rotary")


@dataclass
class ModelConfig:
    """Hyper-parameters of the reference models (``fast_attn.models``).

    arch: "transformer" (encoder-decoder), "gpt" (decoder-only), "bert" (encoder-only)
        or "vit" (encoder over image patches); ``build_model`` picks the class from it.
    vocab_size: tokens of the (source) vocabulary; ignored by the ViT.
    tgt_vocab_size: the encoder-decoder's target vocabulary; None shares the source one
        (and its embedding, as in the paper).
    d_model, n_heads: width and attention heads; ``d_model % n_heads == 0``.
    n_kv_heads: key/value heads of the GPT (GQA when fewer than n_heads); None = n_heads.
    n_layers: layers of the encoder (transformer, bert, vit) or of the GPT.
    n_decoder_layers: layers of the encoder-decoder's decoder.
    d_ff: hidden width of the feed-forward block; None = 4 * d_model.
    max_seq_len: longest sequence (learned positions, rotary and sinusoidal tables).
    dropout: dropout on embeddings, attention weights and residual branches.
    attn_dropout: the GPT's dropout on attention weights; None = dropout.
    activation: feed-forward activation: "relu" or "gelu" (all archs), "gelu_tanh",
        "swiglu", "geglu" (GPT only).
    norm: "layernorm" or "rmsnorm" (GPT only; the others use torch.nn's layers' LayerNorm).
    norm_first: pre-norm blocks (True) or post-norm as in the paper (False).
    positions: "sinusoidal" (paper), "learned" or "rotary" (GPT only).
    rope_base: rotary base frequency.
    tie_embeddings: share the token embedding with the output projection.
    bias: biases in the linear layers and norms.
    norm_eps: epsilon of every norm.
    type_vocab_size: BERT's segment (token type) vocabulary.
    image_size, patch_size, in_channels: the ViT's input (square images).
    num_classes: the ViT's classifier outputs.
    """

    arch: str = "gpt"
    vocab_size: int = 256
    tgt_vocab_size: Optional[int] = None
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: Optional[int] = None
    n_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: Optional[int] = None
    max_seq_len: int = 512
    dropout: float = 0.1
    attn_dropout: Optional[float] = None
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_first: bool = True
    positions: str = "learned"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    norm_eps: float = 1e-5
    type_vocab_size: int = 2
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.attn_dropout is None:
            self.attn_dropout = self.dropout
        for name, value, allowed in (("arch", self.arch, ARCHS), ("norm", self.norm, NORMS),
                                     ("positions", self.positions, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rotary" and self.head_dim % 2 != 0:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """The preset ``name`` (see ``PRESETS``) with ``overrides`` applied on top."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"ModelConfig has no field(s) {unknown}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        """The fields as a plain dict (``ModelConfig(**d)`` rebuilds it); for checkpoints."""
        return asdict(self)


PRESETS: dict[str, dict] = {
    # "Attention Is All You Need", base model: shared 37k BPE vocabulary, post-norm.
    "transformer-base": dict(arch="transformer", vocab_size=37000, d_model=512, n_heads=8,
                             n_layers=6, n_decoder_layers=6, d_ff=2048, dropout=0.1,
                             activation="relu", norm_first=False, positions="sinusoidal"),
    "transformer-tiny": dict(arch="transformer", vocab_size=64, d_model=64, n_heads=4,
                             n_layers=2, n_decoder_layers=2, d_ff=256, max_seq_len=128,
                             dropout=0.0, activation="relu", norm_first=False,
                             positions="sinusoidal"),
    "gpt-tiny": dict(arch="gpt", vocab_size=128, d_model=128, n_heads=4, n_layers=4,
                     max_seq_len=256, dropout=0.1, positions="rotary"),
    "gpt2-small": dict(arch="gpt", vocab_size=50257, d_model=768, n_heads=12, n_layers=12,
                       max_seq_len=1024, dropout=0.1, activation="gelu_tanh", positions="learned"),
    "bert-tiny": dict(arch="bert", vocab_size=30522, d_model=128, n_heads=2, n_layers=2,
                      max_seq_len=512, dropout=0.1, norm_first=False, norm_eps=1e-12),
    "bert-base": dict(arch="bert", vocab_size=30522, d_model=768, n_heads=12, n_layers=12,
                      max_seq_len=512, dropout=0.1, norm_first=False, norm_eps=1e-12),
    # DeiT-Tiny's shape; ViT-B/16 as in "An Image is Worth 16x16 Words".
    "vit-tiny": dict(arch="vit", d_model=192, n_heads=3, n_layers=12, image_size=224,
                     patch_size=16, dropout=0.0, norm_eps=1e-6),
    "vit-b16": dict(arch="vit", d_model=768, n_heads=12, n_layers=12, image_size=224,
                    patch_size=16, dropout=0.0, norm_eps=1e-6),
}
