"""A decoder-only GPT on fast_attn ops, with KV-cache generation (nanoGPT / gpt-fast style).

    idx (B, T) -> token embedding (+ learned or sinusoidal positions)
               -> n_layers x Block: x = x + attn(norm1(x)); x = x + mlp(norm2(x))
               -> norm_f -> lm_head -> logits (B, T, vocab)

Attention is ``fast_attn.attention(causal=True)`` in training and
``fast_attn.attention_with_kvcache`` when generating: each step appends its keys/values to
a preallocated ``(B, max_len, n_kv_heads, head_dim)`` cache in place and attends over the
filled part (bottom-right causal alignment makes the prompt's prefill the same call).
Rotary positions (``positions="rotary"``) rotate q and k before they reach the cache
(``fast_attn.nn.RotaryEmbedding`` on the ``fast_attn.rotary`` op), pairing dimension i
with i + head_dim/2 (GPT-NeoX's "rotate half" layout).
The residual add in the middle of each block is fused into norm2
(``fast_attn.layer_norm(..., residual=)`` / ``rms_norm``); the MLP is
``fast_attn.nn.FeedForward`` (fused bias+GELU, SwiGLU or GeGLU).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fast_attn import attention, attention_with_kvcache, layer_norm, rms_norm, rotary
from fast_attn import nn as fnn
from fast_attn.models.config import ModelConfig
from fast_attn.models.transformer import sinusoidal_positions
from fast_attn.nn.rotary import rotary_tables as _module_tables

__all__ = ["GPT", "rotary_tables", "apply_rotary"]

INIT_STD = 0.02  # GPT-2's initialisation


def rotary_tables(max_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """(cos, sin), each ``(max_len, head_dim / 2)`` fp32: angle ``pos * base^(-2i/head_dim)``
    (the tables of ``fast_attn.nn.RotaryEmbedding``)."""
    return _module_tables(max_len, head_dim, base)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates ``x (B, S, H, D)`` by the angles of its positions, ``cos``/``sin (S, D/2)``."""
    return rotary(x, cos, sin)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return fnn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return fnn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def add_norm(norm: nn.Module, branch: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """``(norm(residual + branch), residual + branch)`` in one fused pass (two when the
    dtypes differ, as under autocast: a bf16 branch on an fp32 residual stream)."""
    if branch.dtype != residual.dtype:
        h = residual + branch
        return norm(h), h
    if isinstance(norm, nn.RMSNorm):
        return rms_norm(branch, norm.weight, norm.eps, residual=residual)
    return layer_norm(branch, norm.weight, norm.bias, norm.eps, residual=residual)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention on ``(B, S, d_model)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=cfg.bias)  # W_q | W_k | W_v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)  # W_o
        self.dropout = cfg.attn_dropout
        # Context parallelism (fast_attn.distributed.model) routes the training-time
        # attention of a sequence shard here; None = fast_attn.attention.
        self.attention_fn: Optional[Callable] = None

    def forward(self, x: Tensor, rope: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]],
                cache: Optional[tuple[Tensor, Tensor]] = None, start_pos: int = 0) -> Tensor:
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # (B, S, H, D)
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, S, Hkv, D)
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, S, Hkv, D)
        if rope is not None:  # (q, k) -> (q, k) rotated at this call's positions
            q, k = rope(q, k)
        if cache is None:
            attend = attention if self.attention_fn is None else self.attention_fn
            y = attend(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:  # writes k, v into rows [start_pos, start_pos + S) of the cache, then attends
            q, k, v = (t.to(cache[0].dtype) for t in (q, k, v))  # autocast may give bf16
            y = attention_with_kvcache(q, cache[0], cache[1], k, v, cache_seqlens=start_pos, causal=True)
        return self.proj(y.flatten(2))  # (B, S, d_model)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = fnn.FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, bias=cfg.bias, dropout=cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope, cache=None, start_pos: int = 0) -> Tensor:
        a = self.drop(self.attn(self.norm1(x), rope, cache, start_pos))
        h, x = add_norm(self.norm2, a, x)  # norm2(x + a), x + a
        return x + self.drop(self.mlp(h))


class GPT(nn.Module):
    """Decoder-only language model: ``forward(idx) -> logits (B, T, vocab)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        # Non-persistent tables (no state_dict entries): checkpoints load either way.
        self.rotary = (fnn.RotaryEmbedding(cfg.head_dim, cfg.rope_base, max_seq_len=cfg.max_seq_len)
                       if cfg.positions == "rotary" else None)
        if cfg.positions == "sinusoidal":
            self.register_buffer("pe", sinusoidal_positions(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers)
            for proj in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(proj.weight, std=INIT_STD / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, kv_cache: Optional[list] = None, start_pos: int = 0,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """``idx (B, T)`` at positions ``start_pos .. start_pos + T - 1`` -> ``(B, T, vocab)``.

        ``kv_cache`` (from ``new_kv_cache``) is filled in place; without it the call sees
        only ``idx`` (and ``start_pos`` just offsets the positions). ``position_ids``
        (int64 ``(T,)``, no cache) gives each token's position instead: a context-parallel
        rank holds a shard of the sequence (``fast_attn.distributed.shard_positions``)."""
        seqlen = idx.shape[1]
        if position_ids is None:
            if start_pos + seqlen > self.cfg.max_seq_len:
                raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len={self.cfg.max_seq_len}")
            positions = slice(start_pos, start_pos + seqlen)
        else:
            if kv_cache is not None or tuple(position_ids.shape) != (seqlen,):
                raise ValueError(f"position_ids must be ({seqlen},) without kv_cache, got "
                                 f"{tuple(position_ids.shape)}{' with kv_cache' if kv_cache is not None else ''}")
            positions = position_ids
        x = self.wte(idx)  # (B, T, d_model)
        rope = None
        if self.cfg.positions == "learned":
            x = x + self.wpe.weight[positions]
        elif self.cfg.positions == "sinusoidal":
            x = x + self.pe[positions]
        elif position_ids is None:
            rope = functools.partial(self.rotary, seqlen_offset=start_pos)
        else:
            rope = functools.partial(self.rotary, position_ids=position_ids)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if kv_cache is None else kv_cache[i], start_pos)
        return self.lm_head(self.norm_f(x))

    def new_kv_cache(self, batch: int, max_len: int) -> list[tuple[Tensor, Tensor]]:
        """Empty per-layer ``(k_cache, v_cache)``, each ``(batch, max_len, n_kv_heads, head_dim)``."""
        weight = self.wte.weight
        shape = (batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim)
        return [(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in self.blocks]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Extends ``idx (B, T)`` by ``max_new_tokens`` sampled tokens -> ``(B, T + n)``.

        ``temperature=0`` is greedy decoding; ``top_k`` keeps the k likeliest tokens. With
        ``use_cache`` each step runs one token through the KV cache and ``T + n`` must fit
        in ``max_seq_len``; without it every step reruns the (last ``max_seq_len``) tokens.
        Call ``model.eval()`` first: dropout stays on in training mode.
        """
        if use_cache:
            if idx.shape[1] + max_new_tokens > self.cfg.max_seq_len:
                raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                                 f"max_seq_len={self.cfg.max_seq_len}; use_cache=False slides the window")
            cache = self.new_kv_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
            logits = self(idx, cache)[:, -1]  # prefill: the prompt fills rows [0, T)
        for step in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -self.cfg.max_seq_len:])[:, -1]
            next_id = _sample(logits, temperature, top_k, generator)  # (B, 1)
            if use_cache and step + 1 < max_new_tokens:
                logits = self(next_id, cache, start_pos=idx.shape[1])[:, -1]
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def _sample(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
    """``logits (B, vocab)`` -> next token ids ``(B, 1)``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
