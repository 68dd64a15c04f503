"""The encoder-decoder of "Attention Is All You Need" (Vaswani et al., 2017) on fast_attn.

    src (B, S) -> embed * sqrt(d_model) + PE -> N x [self-attn, FFN]          -> memory
    tgt (B, T) -> embed * sqrt(d_model) + PE -> N x [masked self-attn,
                                                     cross-attn over memory, FFN] -> logits

Each sub-layer is ``fast_attn.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
(torch.nn's signatures and weights, fused attention and norms inside): post-norm
``norm(x + sublayer(x))`` as in the paper (``norm_first=False``), or pre-norm
``x + sublayer(norm(x))`` with a final norm after each stack. The positional encoding is
the paper's sinusoid ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(...)``.
With ``tgt_vocab_size=None`` source and target share one embedding; with
``tie_embeddings`` the output projection reuses the target embedding (the paper does both).

Padding masks follow torch's convention: bool ``(B, S)``, True marks a padding token.
The decoder's self-attention is causal; target padding needs no mask since a causal query
never sees the pads to its right (pads only ever sit at the end).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fast_attn import nn as fnn
from fast_attn.models.config import ModelConfig

__all__ = ["Transformer", "sinusoidal_positions", "encoder_layer", "check_activation"]


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """The paper's fixed positional encoding, ``(max_len, d_model)`` fp32."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return pe


def check_activation(cfg: ModelConfig) -> None:
    if cfg.activation not in ("relu", "gelu"):
        raise ValueError(f"{cfg.arch} models take activation 'relu' or 'gelu', got {cfg.activation!r}")


def encoder_layer(cfg: ModelConfig) -> fnn.TransformerEncoderLayer:
    """One batch-first encoder layer (self-attention + FFN) as the config says."""
    return fnn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.activation,
                                       cfg.norm_eps, batch_first=True, norm_first=cfg.norm_first,
                                       bias=cfg.bias)


def causal_mask(length: int, device) -> Tensor:
    """torch's causal ``attn_mask``: bool ``(L, L)``, True above the diagonal (blocked)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu_(1)


class Transformer(nn.Module):
    """Encoder-decoder: ``forward(src, tgt) -> logits (B, T, tgt_vocab)`` (teacher forcing)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_activation(cfg)
        self.cfg = cfg
        d, tgt_vocab = cfg.d_model, cfg.tgt_vocab_size or cfg.vocab_size
        self.src_embed = nn.Embedding(cfg.vocab_size, d)
        self.tgt_embed = self.src_embed if cfg.tgt_vocab_size is None else nn.Embedding(tgt_vocab, d)
        self.register_buffer("pe", sinusoidal_positions(cfg.max_seq_len, d), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(encoder_layer(cfg) for _ in range(cfg.n_layers))
        self.decoder_layers = nn.ModuleList(
            fnn.TransformerDecoderLayer(d, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.activation, cfg.norm_eps,
                                        batch_first=True, norm_first=cfg.norm_first, bias=cfg.bias)
            for _ in range(cfg.n_decoder_layers))
        # Pre-norm leaves the residual stream unnormalised: one final norm per stack.
        norm = lambda: fnn.LayerNorm(d, cfg.norm_eps, bias=cfg.bias) if cfg.norm_first else nn.Identity()  # noqa: E731
        self.encoder_norm, self.decoder_norm = norm(), norm()
        self.lm_head = nn.Linear(d, tgt_vocab, bias=False)
        # Embeddings ~ N(0, 1/d): times sqrt(d) they enter at unit scale, and tied they
        # give unit-scale logits (fairseq's choice; the paper does not say).
        for emb in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(emb.weight, std=d ** -0.5)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight

    def embed(self, tokens: Tensor, table: nn.Embedding) -> Tensor:
        """``(B, S)`` ids -> ``(B, S, d_model)``: scaled embedding + sinusoid, dropped out."""
        seqlen = tokens.shape[1]
        if seqlen > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seqlen} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = table(tokens) * math.sqrt(self.cfg.d_model) + self.pe[:seqlen]
        return self.drop(x)

    def encode(self, src: Tensor, src_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``src (B, S)`` -> memory ``(B, S, d_model)``."""
        x = self.embed(src, self.src_embed)
        for layer in self.encoder_layers:
            x = layer(x, src_key_padding_mask=src_padding_mask)
        return self.encoder_norm(x)

    def decode(self, tgt: Tensor, memory: Tensor, src_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``tgt (B, T)`` and memory -> logits ``(B, T, tgt_vocab)``; position t sees tgt[:t+1]."""
        x = self.embed(tgt, self.tgt_embed)
        mask = causal_mask(tgt.shape[1], tgt.device)
        for layer in self.decoder_layers:
            x = layer(x, memory, tgt_mask=mask, tgt_is_causal=True,
                      memory_key_padding_mask=src_padding_mask)
        return self.lm_head(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt: Tensor, src_padding_mask: Optional[Tensor] = None) -> Tensor:
        return self.decode(tgt, self.encode(src, src_padding_mask), src_padding_mask)

    @torch.no_grad()
    def generate(self, src: Tensor, max_new_tokens: int, bos_id: int, eos_id: Optional[int] = None,
                 src_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Greedy decoding: ``(B, 1 + n)`` tokens starting with ``bos_id``; stops early once
        every row has produced ``eos_id`` (later positions of finished rows repeat it)."""
        memory = self.encode(src, src_padding_mask)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            next_id = self.decode(out, memory, src_padding_mask)[:, -1].argmax(-1)  # (B,)
            if eos_id is not None:
                next_id = next_id.masked_fill(done, eos_id)
                done |= next_id == eos_id
            out = torch.cat([out, next_id[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return out
