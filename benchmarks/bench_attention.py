"""Dense attention: forward, backward and forward + backward, ours against the peers.

FlashAttention's protocol (DESIGN.md): batch x seqlen = 16k tokens, hidden 2048 (head_dim
64 -> 32 heads, 128 -> 16, 256 -> 8), seqlen 512..16k, causal and not, self-attention
(sq = sk). FLOPs from ``formulas.attention_flops`` (causal halved, backward 2.5x).

Implementations: every fast_attn backend that declares the call (``fast_attn.backends``),
plus ``fast_attn:cuda-sm80``, the cuda backend with its Ampere kernels forced;
torch SDPA with the flash, cuDNN and memory-efficient backends (``sdpa_kernel``);
FlexAttention under ``torch.compile``; ``flash_attn.flash_attn_func`` when installed.
Each gets its natural layout, so no one pays for a transpose: fast_attn and flash_attn
take (B, S, H, D), SDPA and Flex (B, H, S, D). The forward is timed with inputs that
require grad (it saves what the backward needs, as in training; FlashAttention's protocol).

On CPU the shapes are small (the torch reference and SDPA's CPU flash kernel only).
"""

from __future__ import annotations

from typing import Optional

import dataclasses

import torch
import torch.nn.functional as F

from benchmarks import formulas
from benchmarks.common import (Case, Context, Work, autograd_passes, compile_fn, optional_import,
                               our_cases, peer_case)

OP = "attention"
COVERS = ("attention",)  # fast_attn ops this file benchmarks

TOKENS = 16 * 1024  # batch x seqlen, FlashAttention's protocol
HIDDEN = 2048  # heads x head_dim
HEAD_DIMS = (64, 128, 256)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (512, 2048, 8192)
CAUSAL = (False, True)
PASSES = formulas.PASSES

# FlexAttention compiles one kernel set per shape (4-6 s each on the H100, BASELINES.md):
# measured at d=128 only, the protocol's main line, to keep a full run under 10 minutes.
FLEX_HEAD_DIMS = (128,)

# The torch backend (the reference) materialises fp32 (B, H, Sq, Sk) scores, and its
# backward several more such tensors: skip shapes whose score matrix exceeds this.
REFERENCE_SCORE_LIMIT_BYTES = 2 * 2**30
FP32_BYTES = 4

CPU_TOKENS = 512
CPU_HIDDEN = 512
CPU_HEAD_DIMS = (64,)
CPU_SEQLENS = (128, 256)
CPU_QUICK_SEQLENS = (128,)

# SDPA backends by name; the enum members are looked up when a case runs (older torch
# lacks CUDNN_ATTENTION, which then gives an error row, not a crash).
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
SDPA_CPU_BACKENDS = ("flash",)
# SDPA's GPU kernels that take fp16/bf16 only (the memory-efficient one also takes fp32),
# and flash_attn's: --dtype fp32 skips them with this reason.
HALF_ONLY = {"flash", "cudnn", "flash_attn"}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_skip(ctx: Context, impl: str) -> Optional[str]:
    """Why ``impl`` does not run in ctx.dtype on a GPU (None if it does)."""
    if ctx.on_gpu and impl in HALF_ONLY and ctx.dtype not in HALF_DTYPES:
        return f"{impl} takes fp16/bf16 only, not {str(ctx.dtype).replace('torch.', '')}"
    return None  # the others are CUDA-only kernels


def configs(ctx: Context) -> list[dict]:
    """The protocol's shapes (small ones on CPU)."""
    if ctx.on_gpu:
        tokens, hidden, head_dims = TOKENS, HIDDEN, HEAD_DIMS
        seqlens = QUICK_SEQLENS if ctx.quick else SEQLENS
    else:
        tokens, hidden, head_dims = CPU_TOKENS, CPU_HIDDEN, CPU_HEAD_DIMS
        seqlens = CPU_QUICK_SEQLENS if ctx.quick else CPU_SEQLENS
    return [
        {"batch": tokens // seqlen, "seqlen": seqlen, "heads": hidden // head_dim,
         "head_dim": head_dim, "causal": causal}
        for head_dim in head_dims for causal in CAUSAL for seqlen in seqlens
    ]


def _work(shape: dict):
    def work(pass_: str) -> Work:
        return Work(flops=formulas.attention_flops(
            shape["batch"], shape["heads"], shape["seqlen"], shape["seqlen"],
            shape["head_dim"], shape["causal"], pass_))
    return work


def _inputs(shape: dict, ctx: Context, heads_first: bool) -> list[torch.Tensor]:
    """q, k, v requiring grad: (B, H, S, D) if ``heads_first`` else (B, S, H, D)."""
    b, s, h, d = shape["batch"], shape["seqlen"], shape["heads"], shape["head_dim"]
    size = (b, h, s, d) if heads_first else (b, s, h, d)
    return [torch.randn(size, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
            for _ in range(3)]


# ------------------------------------------------------------------------------ ours


def _ours(ctx: Context, shape: dict) -> list[Case]:
    import fast_attn
    from fast_attn import backends

    def call(pass_):
        feats = backends.features(causal=shape["causal"], backward=pass_ != formulas.FWD)
        return backends.Call("attention", ctx.device.type, ctx.dtype, feats, head_dim=shape["head_dim"])

    def make_forward(name):
        def forward(q, k, v):
            return fast_attn.attention(q, k, v, causal=shape["causal"], backend=name)
        return forward

    def extra_skip(name):
        score_bytes = shape["batch"] * shape["heads"] * shape["seqlen"] ** 2 * FP32_BYTES
        if name == "torch" and score_bytes > REFERENCE_SCORE_LIMIT_BYTES:
            return (f"the torch reference materialises {score_bytes / 2**30:.0f} GiB of fp32 "
                    f"scores (limit {REFERENCE_SCORE_LIMIT_BYTES / 2**30:.0f} GiB)")
        return None

    cases = our_cases(ctx, op=OP, shape=shape, passes=PASSES, work=_work(shape), call=call,
                      make_forward=make_forward, extra_skip=extra_skip,
                      make_inputs=lambda: _inputs(shape, ctx, heads_first=False))
    if "cuda" in ctx.backends:
        # The cuda backend's Ampere kernels forced on this GPU: the issue measures them
        # against SDPA's flash backend (FlashAttention-2, itself an Ampere-style kernel).
        sm80 = next(c for c in cases if c.impl == "fast_attn:cuda")
        cases.append(dataclasses.replace(sm80, impl="fast_attn:cuda-sm80", context=_force_sm80))
    return cases


def _force_sm80():
    from fast_attn import backends

    return backends.use_cuda_attention_arch("sm80")


# ----------------------------------------------------------------------------- peers


def _sdpa(ctx: Context, shape: dict) -> list[Case]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=shape["causal"])

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
                               work=_work(shape), forward=forward, skip=skip, context=context,
                               make_inputs=lambda: _inputs(shape, ctx, heads_first=True)))
    return cases


def _causal_mask(b, h, q_idx, kv_idx):
    """FlexAttention's mask_mod of causal attention (sq == sk here, so the top-left and
    bottom-right alignments agree)."""
    return q_idx >= kv_idx


def _flex(ctx: Context, shape: dict) -> Case:
    skip = None
    if not ctx.on_gpu:
        skip = "compiled peers run on GPU only (compiling dominates a CPU run)"
    elif shape["head_dim"] not in FLEX_HEAD_DIMS:
        skip = f"FlexAttention is measured at d in {FLEX_HEAD_DIMS} only (compile time)"

    def prepare():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = None
        if shape["causal"]:
            block_mask = create_block_mask(_causal_mask, None, None, shape["seqlen"],
                                           shape["seqlen"], device=ctx.device)
        compiled = compile_fn(flex_attention)

        def forward(q, k, v):
            return compiled(q, k, v, block_mask=block_mask)
        return autograd_passes(forward, _inputs(shape, ctx, heads_first=True), PASSES)

    return Case(OP, "flex:compiled", False, shape, PASSES, _work(shape), prepare, skip=skip,
                compiled=True)


def _flash_attn(ctx: Context, shape: dict) -> Case:
    module, why_not = optional_import("flash_attn") if ctx.on_gpu else (None, "flash_attn runs on CUDA only")
    why_not = why_not or _dtype_skip(ctx, "flash_attn")

    def forward(q, k, v):
        return module.flash_attn_func(q, k, v, causal=shape["causal"])

    return peer_case(ctx, op=OP, impl="flash_attn", shape=shape, passes=PASSES, work=_work(shape),
                     forward=forward, skip=why_not,
                     make_inputs=lambda: _inputs(shape, ctx, heads_first=False))


def cases(ctx: Context) -> list[Case]:
    result = []
    for shape in configs(ctx):
        result += _ours(ctx, shape)
        result += _sdpa(ctx, shape)
        result.append(_flex(ctx, shape))
        result.append(_flash_attn(ctx, shape))
    return result
