"""An encoder-only BERT (Devlin et al., 2019) on fast_attn, with padding masks.

    idx (B, S) -> token + position + segment embeddings -> LayerNorm -> dropout
               -> n_layers x fast_attn.nn.TransformerEncoderLayer (post-norm, GELU)
               -> hidden (B, S, d_model)
    mlm_logits(hidden): dense -> GELU -> LayerNorm -> tied decoder -> (B, S, vocab)

``padding_mask`` is bool ``(B, S)``, True marking padding (torch's ``key_padding_mask``
convention): no query attends to a padded key, so the hidden states of the real tokens
do not depend on what the pads hold or on how many there are.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from fast_attn import bias_gelu
from fast_attn import nn as fnn
from fast_attn.models.config import ModelConfig
from fast_attn.models.transformer import check_activation, encoder_layer

__all__ = ["Bert"]


class Bert(nn.Module):
    """``forward(idx, padding_mask=None, token_type_ids=None) -> hidden (B, S, d_model)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_activation(cfg)
        self.cfg = cfg
        d = cfg.d_model
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, d)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, d)
        self.embed_norm = fnn.LayerNorm(d, cfg.norm_eps, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(encoder_layer(cfg) for _ in range(cfg.n_layers))
        self.final_norm = fnn.LayerNorm(d, cfg.norm_eps, bias=cfg.bias) if cfg.norm_first else nn.Identity()
        self.mlm_dense = nn.Linear(d, d, bias=cfg.bias)
        self.mlm_norm = fnn.LayerNorm(d, cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=cfg.bias)
        for emb in (self.tok_embed, self.pos_embed, self.type_embed):
            nn.init.normal_(emb.weight, std=0.02)  # BERT's initializer_range
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    def forward(self, idx: Tensor, padding_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> Tensor:
        seqlen = idx.shape[1]
        if seqlen > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seqlen} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_embed(idx) + self.pos_embed.weight[:seqlen]  # (B, S, d_model)
        x = x + (self.type_embed.weight[0] if token_type_ids is None else self.type_embed(token_type_ids))
        x = self.drop(self.embed_norm(x))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding_mask)
        return self.final_norm(x)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Masked-language-model head: ``(B, S, d_model) -> (B, S, vocab)``."""
        h = F.linear(hidden, self.mlm_dense.weight)
        h = bias_gelu(h, self.mlm_dense.bias)  # fused bias add + exact GELU
        return self.lm_head(self.mlm_norm(h))
