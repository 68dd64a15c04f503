"""A Vision Transformer (Dosovitskiy et al., 2021) on fast_attn.

    images (B, C, H, W) -> Conv2d(kernel = stride = patch) -> (B, N, d_model) patches
                        -> [class token; patches] + learned positions -> dropout
                        -> n_layers x fast_attn.nn.TransformerEncoderLayer (pre-norm, GELU)
                        -> norm -> head(class token) -> logits (B, num_classes)

``N = (image_size / patch_size)^2``; images must be ``image_size`` square.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fast_attn import nn as fnn
from fast_attn.models.config import ModelConfig
from fast_attn.models.transformer import check_activation, encoder_layer

__all__ = ["ViT"]


class ViT(nn.Module):
    """``forward(images (B, C, H, W)) -> logits (B, num_classes)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_activation(cfg)
        self.cfg = cfg
        d = cfg.d_model
        self.n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, self.n_patches + 1, d) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(encoder_layer(cfg) for _ in range(cfg.n_layers))
        self.norm = fnn.LayerNorm(d, cfg.norm_eps, bias=cfg.bias) if cfg.norm_first else nn.Identity()
        self.head = nn.Linear(d, cfg.num_classes)

    def forward(self, images: Tensor) -> Tensor:
        size = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != size:
            raise ValueError(f"images must be (B, {', '.join(map(str, size))}), got {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, d_model)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, d_model)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)  # (B, N + 1, d_model)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])  # (B, num_classes)
