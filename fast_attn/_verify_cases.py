"""The cases ``python -m fast_attn.verify`` checks: every op with its features, awkward shapes.

A case builds fresh random inputs and knows how to run them through the public API (on
a given backend) and through the reference (for the oracle and the baseline of the
tolerance rule). Outputs and gradients are compared by ``fast_attn.verify``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

import fast_attn
from fast_attn.reference.attention import attention_ref, attention_varlen_ref, attention_with_kvcache_ref
from fast_attn.reference.ffn import bias_gelu_ref, geglu_ref, swiglu_ref
from fast_attn.reference.norm import layer_norm_ref, rms_norm_ref


@dataclass
class Case:
    """One op call: ``run(inputs, backend)`` vs ``ref(inputs, upcast)``; both return outputs."""

    op: str  # the backends.OPS name, for capability look-ups
    label: str
    make: Callable[[torch.dtype, torch.device, torch.Generator], dict]
    run: Callable[[dict, str], tuple]
    ref: Callable[[dict, bool], tuple]
    grad_inputs: tuple = ()  # names of the inputs to differentiate
    quick: bool = True  # part of --quick
    features: frozenset = field(default_factory=frozenset)  # for capability look-ups
    head_dim: int = 0


def _randn(gen, device, dtype, *shape) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _attention_case(label, *, batch=2, seqlen_q=113, seqlen_k=203, heads=4, kv_heads=4,
                    head_dim=64, quick=True, **options) -> Case:
    def make(dtype, device, gen):
        inputs = {
            "q": _randn(gen, device, dtype, batch, seqlen_q, heads, head_dim),
            "k": _randn(gen, device, dtype, batch, seqlen_k, kv_heads, head_dim),
            "v": _randn(gen, device, dtype, batch, seqlen_k, kv_heads, head_dim),
        }
        if options.get("alibi"):
            inputs["alibi_slopes"] = torch.rand(heads, generator=gen).to(device)
        if options.get("mask") == "bool":
            mask = torch.rand(batch, 1, seqlen_q, seqlen_k, generator=gen) > 0.3
            mask[:, :, 0] = False  # a fully masked row
            inputs["attn_mask"] = mask.to(device)
        elif options.get("mask") == "additive":
            inputs["attn_mask"] = _randn(gen, device, torch.float32, 1, heads, seqlen_q, seqlen_k)
        return inputs

    kwargs = {
        key: options[key] for key in ("causal", "window_size", "softcap", "dropout_p") if key in options
    }
    if "dropout_p" in kwargs:
        kwargs["dropout_seed"] = 1234

    def extra(inputs):
        return {name: inputs[name] for name in ("alibi_slopes", "attn_mask") if name in inputs}

    def run(inputs, backend):
        return (fast_attn.attention(inputs["q"], inputs["k"], inputs["v"], **extra(inputs),
                                    **kwargs, backend=backend),)

    def ref(inputs, upcast):
        return (attention_ref(inputs["q"], inputs["k"], inputs["v"], **extra(inputs), **kwargs,
                              upcast=upcast)[0],)

    feats = fast_attn.backends.features(
        causal=kwargs.get("causal", False),
        window="window_size" in kwargs,
        alibi=bool(options.get("alibi")),
        softcap=kwargs.get("softcap", 0) > 0,
        bool_mask=options.get("mask") == "bool",
        additive_mask=options.get("mask") == "additive",
        dropout="dropout_p" in kwargs,
        gqa=kv_heads != heads,
        backward=True,
    )
    return Case("attention", label, make, run, ref, ("q", "k", "v"), quick, feats, head_dim)


def _varlen_case() -> Case:
    seqlens_q, seqlens_k, heads, head_dim = [17, 0, 113], [203, 5, 113], 4, 40

    def make(dtype, device, gen):
        cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)  # noqa: E731
        return {
            "q": _randn(gen, device, dtype, sum(seqlens_q), heads, head_dim),
            "k": _randn(gen, device, dtype, sum(seqlens_k), 2, head_dim),
            "v": _randn(gen, device, dtype, sum(seqlens_k), 2, head_dim),
            "cu_seqlens_q": cu(seqlens_q),
            "cu_seqlens_k": cu(seqlens_k),
        }

    def args(inputs):
        return (inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens_q"],
                inputs["cu_seqlens_k"], max(seqlens_q), max(seqlens_k))

    def run(inputs, backend):
        return (fast_attn.attention_varlen(*args(inputs), causal=True, backend=backend),)

    def ref(inputs, upcast):
        return (attention_varlen_ref(*args(inputs), causal=True, upcast=upcast)[0],)

    feats = frozenset({"causal", "gqa", "backward"})
    return Case("attention_varlen", "varlen causal GQA d=40, a zero-length sequence", make, run, ref,
                ("q", "k", "v"), True, feats, head_dim)


def _kvcache_case() -> Case:
    batch, cache_len, new_len, heads, kv_heads, head_dim = 3, 239, 1, 8, 2, 128

    def make(dtype, device, gen):
        return {
            "q": _randn(gen, device, dtype, batch, 1, heads, head_dim),
            "k_cache": _randn(gen, device, dtype, batch, cache_len, kv_heads, head_dim),
            "v_cache": _randn(gen, device, dtype, batch, cache_len, kv_heads, head_dim),
            "k": _randn(gen, device, dtype, batch, new_len, kv_heads, head_dim),
            "v": _randn(gen, device, dtype, batch, new_len, kv_heads, head_dim),
            "cache_seqlens": torch.tensor([0, 100, 238], dtype=torch.int32, device=device),
        }

    def args(inputs):
        # The op writes into the caches: give every run its own copy.
        return (inputs["q"], inputs["k_cache"].clone(), inputs["v_cache"].clone(), inputs["k"],
                inputs["v"], inputs["cache_seqlens"])

    def run(inputs, backend):
        with torch.no_grad():
            return (fast_attn.attention_with_kvcache(*args(inputs), causal=True, backend=backend),)

    def ref(inputs, upcast):
        return (attention_with_kvcache_ref(*args(inputs), causal=True, upcast=upcast)[0],)

    return Case("attention_with_kvcache", "kv-cache decode, GQA d=128", make, run, ref, (), True,
                frozenset({"causal", "gqa"}), head_dim)


def _norm_case(op, rows, width, *, weight=True, bias=True, residual=False, quick=True) -> Case:
    def make(dtype, device, gen):
        inputs = {"x": _randn(gen, device, dtype, rows, width)}
        if weight:
            inputs["weight"] = _randn(gen, device, dtype, width)
        if bias and op == "layer_norm":
            inputs["bias"] = _randn(gen, device, dtype, width)
        if residual:
            inputs["residual"] = _randn(gen, device, dtype, rows, width)
        return inputs

    public = fast_attn.layer_norm if op == "layer_norm" else fast_attn.rms_norm

    def run(inputs, backend):
        out = public(**inputs, backend=backend)
        return out if isinstance(out, tuple) else (out,)

    def ref(inputs, upcast):
        fn = layer_norm_ref if op == "layer_norm" else rms_norm_ref
        result = fn(**inputs, upcast=upcast)
        return (result.y, result.h) if residual else (result.y,)

    names = tuple(inputs_name for inputs_name in ("x", "weight", "bias", "residual")
                  if {"x": True, "weight": weight, "bias": bias and op == "layer_norm",
                      "residual": residual}[inputs_name])
    feats = fast_attn.backends.features(weight=weight, bias=bias and op == "layer_norm",
                                        residual=residual, backward=True)
    parts = [f"{rows}x{width}"] + [n for n in names[1:]]
    return Case(op, " ".join(parts), make, run, ref, names, quick, feats)


def _activation_case(op, rows, width, approximate="none", quick=True) -> Case:
    def make(dtype, device, gen):
        if op == "bias_gelu":
            return {"x": _randn(gen, device, dtype, rows, width), "bias": _randn(gen, device, dtype, width)}
        return {"gate": _randn(gen, device, dtype, rows, width), "up": _randn(gen, device, dtype, rows, width)}

    def run(inputs, backend):
        if op == "bias_gelu":
            return (fast_attn.bias_gelu(inputs["x"], inputs["bias"], approximate, backend=backend),)
        if op == "swiglu":
            return (fast_attn.swiglu(inputs["gate"], inputs["up"], backend=backend),)
        return (fast_attn.geglu(inputs["gate"], inputs["up"], approximate, backend=backend),)

    def ref(inputs, upcast):
        if op == "bias_gelu":
            return (bias_gelu_ref(inputs["x"], inputs["bias"], approximate, upcast),)
        if op == "swiglu":
            return (swiglu_ref(inputs["gate"], inputs["up"], upcast),)
        return (geglu_ref(inputs["gate"], inputs["up"], approximate, upcast),)

    names = ("x", "bias") if op == "bias_gelu" else ("gate", "up")
    feats = fast_attn.backends.features(bias=op == "bias_gelu", gelu_tanh=approximate == "tanh",
                                        backward=True)
    label = f"{rows}x{width}" + (f" {approximate}" if op != "swiglu" else "")
    return Case(op, label, make, run, ref, names, quick, feats)


def all_cases() -> list:
    """Every case, in report order; ``case.quick`` marks the --quick subset."""
    return [
        _attention_case("plain Sq=113 Sk=203 d=64"),
        _attention_case("causal Sq<Sk", causal=True),
        _attention_case("causal Sq>Sk (masked rows)", seqlen_q=203, seqlen_k=113, causal=True),
        _attention_case("window (32, 7)", window_size=(32, 7), quick=False),
        _attention_case("GQA 8/2 + ALiBi d=111", heads=8, kv_heads=2, head_dim=111, alibi=True),
        _attention_case("MQA 4/1 causal d=40", kv_heads=1, head_dim=40, causal=True, quick=False),
        _attention_case("softcap + additive mask", softcap=30.0, mask="additive"),
        _attention_case("bool mask, fully masked row", mask="bool", quick=False),
        _attention_case("dropout 0.17", dropout_p=0.17),
        _attention_case("Sq=1 Sk=1", seqlen_q=1, seqlen_k=1, quick=False),
        _attention_case("d=256 causal", head_dim=256, seqlen_q=128, seqlen_k=217, causal=True, quick=False),
        _varlen_case(),
        _kvcache_case(),
        _norm_case("layer_norm", 37, 1023),
        _norm_case("layer_norm", 41, 4096, residual=True),
        _norm_case("layer_norm", 7, 1, weight=False, bias=False, quick=False),
        _norm_case("rms_norm", 37, 1023),
        _norm_case("rms_norm", 41, 4096, residual=True),
        _norm_case("rms_norm", 13, 7, weight=False, quick=False),
        _activation_case("bias_gelu", 37, 1023),
        _activation_case("bias_gelu", 37, 1023, "tanh"),
        _activation_case("swiglu", 37, 4096),
        _activation_case("geglu", 37, 1023, "tanh"),
        _activation_case("geglu", 13, 7, quick=False),
    ]

