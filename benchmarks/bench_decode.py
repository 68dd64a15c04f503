"""Decode: one query token per sequence attending over a full KV cache (forward only).

Shape (BASELINES.md): batch 8, 32 query heads, 8 KV heads (GQA), head_dim 128, cache
length 4k..128k. Decode is bound by reading the cache: throughput is GB/s of K and V
read (``formulas.decode_bytes``), against the copy ceiling.

Implementations: every fast_attn backend that declares ``attention_with_kvcache`` with
GQA; torch SDPA (flash and cuDNN backends, ``enable_gqa=True``, no K/V expansion);
FlexAttention under ``torch.compile`` (its decoding kernel); ``flash_attn_with_kvcache``
when installed. Timed under ``torch.no_grad()``. Nothing is appended to the cache (the
append is a separate, tiny write; the protocol measures the attention).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks import formulas
from benchmarks.common import (Case, Context, Work, autograd_passes, compile_fn, optional_import,
                               our_cases, peer_case)

OP = "decode"
COVERS = ("attention_with_kvcache",)

BATCH, HEADS, KV_HEADS, HEAD_DIM = 8, 32, 8, 128
CACHE_LENS = (4096, 16384, 65536, 131072)
QUICK_CACHE_LENS = (4096, 32768, 131072)
PASSES = (formulas.FWD,)

# The torch reference expands K and V to every query head in fp32: skip caches whose
# expanded copy exceeds this.
REFERENCE_KV_LIMIT_BYTES = 4 * 2**30
FP32_BYTES = 4

CPU_BATCH = 1
CPU_CACHE_LENS = (512, 2048)
CPU_QUICK_CACHE_LENS = (512,)

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
SDPA_CPU_BACKENDS = ("flash",)
# SDPA's GPU kernels that take fp16/bf16 only (the memory-efficient one also takes fp32),
# and flash_attn's: --dtype fp32 skips them with this reason.
HALF_ONLY = {"flash", "cudnn", "flash_attn"}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_skip(ctx: Context, impl: str) -> Optional[str]:
    """Why ``impl`` does not run in ctx.dtype on a GPU (None if it does)."""
    if ctx.on_gpu and impl in HALF_ONLY and ctx.dtype not in HALF_DTYPES:
        return f"{impl} takes fp16/bf16 only, not {str(ctx.dtype).replace('torch.', '')}"
    return None


def configs(ctx: Context) -> list[dict]:
    if ctx.on_gpu:
        batch, lens = BATCH, (QUICK_CACHE_LENS if ctx.quick else CACHE_LENS)
    else:
        batch, lens = CPU_BATCH, (CPU_QUICK_CACHE_LENS if ctx.quick else CPU_CACHE_LENS)
    return [{"batch": batch, "cache_len": n, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM}
            for n in lens]


def _work(shape: dict, ctx: Context):
    element_size = torch.empty((), dtype=ctx.dtype).element_size()

    def work(pass_: str) -> Work:
        return Work(bytes=formulas.decode_bytes(shape["batch"], shape["cache_len"],
                                                shape["kv_heads"], shape["head_dim"], element_size))
    return work


def _inputs(shape: dict, ctx: Context, heads_first: bool) -> list[torch.Tensor]:
    """q (one token), k_cache, v_cache: (B, H, S, D) if ``heads_first`` else (B, S, H, D)."""
    b, n, h, hkv, d = (shape[k] for k in ("batch", "cache_len", "heads", "kv_heads", "head_dim"))

    def make(seqlen, heads):
        size = (b, heads, seqlen, d) if heads_first else (b, seqlen, heads, d)
        return torch.randn(size, device=ctx.device, dtype=ctx.dtype)
    return [make(1, h), make(n, hkv), make(n, hkv)]


def _ours(ctx: Context, shape: dict) -> list[Case]:
    import fast_attn
    from fast_attn import backends

    def call(pass_):
        return backends.Call("attention_with_kvcache", ctx.device.type, ctx.dtype,
                             backends.features(gqa=True), head_dim=shape["head_dim"])

    def make_forward(name):
        def forward(q, k_cache, v_cache):
            return fast_attn.attention_with_kvcache(q, k_cache, v_cache, backend=name)
        return forward

    def extra_skip(name):
        expanded = 2 * shape["batch"] * shape["cache_len"] * shape["heads"] * shape["head_dim"] * FP32_BYTES
        if name == "torch" and expanded > REFERENCE_KV_LIMIT_BYTES:
            return (f"the torch reference expands K and V to {expanded / 2**30:.0f} GiB in fp32 "
                    f"(limit {REFERENCE_KV_LIMIT_BYTES / 2**30:.0f} GiB)")
        return None

    return our_cases(ctx, op=OP, shape=shape, passes=PASSES, work=_work(shape, ctx), call=call,
                     make_forward=make_forward, extra_skip=extra_skip, no_grad_fwd=True,
                     make_inputs=lambda: _inputs(shape, ctx, heads_first=False))


def _sdpa(ctx: Context, shape: dict) -> list[Case]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    cases = []
    for short, member in SDPA_BACKENDS.items():
        def context(member=member):
            backend = getattr(SDPBackend, member, None)
            if backend is None:
                raise RuntimeError(f"this torch has no SDPBackend.{member}")
            return sdpa_kernel(backend)

        skip = None if ctx.on_gpu or short in SDPA_CPU_BACKENDS else f"SDPA's {short} backend is a CUDA kernel"
        skip = skip or _dtype_skip(ctx, short)
        cases.append(peer_case(ctx, op=OP, impl=f"sdpa:{short}", shape=shape, passes=PASSES,
                               work=_work(shape, ctx), forward=forward, skip=skip, context=context,
                               no_grad_fwd=True, make_inputs=lambda: _inputs(shape, ctx, heads_first=True)))
    return cases


def _flex(ctx: Context, shape: dict) -> Case:
    def prepare():
        from torch.nn.attention.flex_attention import flex_attention

        compiled = compile_fn(flex_attention)

        def forward(q, k, v):
            return compiled(q, k, v, enable_gqa=True)
        return autograd_passes(forward, _inputs(shape, ctx, heads_first=True), PASSES,
                               no_grad_fwd=True)

    skip = None if ctx.on_gpu else "compiled peers run on GPU only (compiling dominates a CPU run)"
    return Case(OP, "flex:compiled", False, shape, PASSES, _work(shape, ctx), prepare, skip=skip,
                compiled=True)


def _flash_attn(ctx: Context, shape: dict) -> Case:
    module, why_not = optional_import("flash_attn") if ctx.on_gpu else (None, "flash_attn runs on CUDA only")
    why_not = why_not or _dtype_skip(ctx, "flash_attn")

    def forward(q, k_cache, v_cache):
        return module.flash_attn_with_kvcache(q, k_cache, v_cache)

    return peer_case(ctx, op=OP, impl="flash_attn", shape=shape, passes=PASSES, work=_work(shape, ctx),
                     forward=forward, skip=why_not, no_grad_fwd=True,
                     make_inputs=lambda: _inputs(shape, ctx, heads_first=False))


def cases(ctx: Context) -> list[Case]:
    result = []
    for shape in configs(ctx):
        result += _ours(ctx, shape)
        result += _sdpa(ctx, shape)
        result.append(_flex(ctx, shape))
        result.append(_flash_attn(ctx, shape))
    return result
