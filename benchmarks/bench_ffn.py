"""Feed-forward activations: bias+GELU, SwiGLU, GeGLU, forward and backward.

Shapes: 16384 tokens x the FFN's hidden width, 4096 (d_model 1024) and 16384 (d_model
4096), as BASELINES.md's silu(a) * b rows. Memory-bound: GB/s from
``formulas.bias_gelu_bytes`` / ``formulas.glu_bytes`` against the copy ceiling. GELU is
the tanh approximation (``approximate="tanh"``), the one Liger's GeGLU implements and
BASELINES.md measured. The forward is timed with inputs that require grad, as in training.

Implementations: every fast_attn backend that declares the call; torch eager
(``F.gelu(x + b)``, ``F.silu(g) * u``, ``F.gelu(g) * u``); the same under
``torch.compile``; Liger-Kernel's ``LigerSiLUMulFunction`` / ``LigerGELUMulFunction`` when
installed (Liger has no bias+GELU kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import formulas
from benchmarks.common import Case, Context, Work, optional_import, our_cases, peer_case

COVERS = ("bias_gelu", "swiglu", "geglu")
OPS = COVERS
PASSES = (formulas.FWD, formulas.BWD)

TOKENS = 16384
WIDTHS = (4096, 16384)
QUICK_WIDTHS = (4096,)
CPU_TOKENS = 256
CPU_WIDTHS = (1024,)
GELU_APPROXIMATE = "tanh"

# Liger's kernels by op: (module, autograd Function).
LIGER = {"swiglu": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
         "geglu": ("liger_kernel.ops.geglu", "LigerGELUMulFunction")}


def configs(ctx: Context) -> list[dict]:
    if ctx.on_gpu:
        tokens, widths = TOKENS, (QUICK_WIDTHS if ctx.quick else WIDTHS)
    else:
        tokens, widths = CPU_TOKENS, CPU_WIDTHS
    return [{"tokens": tokens, "width": n} for n in widths]


def _work(op: str, shape: dict, ctx: Context):
    element_size = torch.empty((), dtype=ctx.dtype).element_size()

    def work(pass_: str) -> Work:
        if op == "bias_gelu":
            return Work(bytes=formulas.bias_gelu_bytes(shape["tokens"], shape["width"], element_size, pass_))
        return Work(bytes=formulas.glu_bytes(shape["tokens"], shape["width"], element_size, pass_))
    return work


def _inputs(op: str, shape: dict, ctx: Context) -> list[torch.Tensor]:
    """bias_gelu: x (tokens, N), bias (N,); GLUs: gate, up (tokens, N); all requiring grad."""
    size = (shape["tokens"], shape["width"])
    first = torch.randn(size, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    if op == "bias_gelu":
        second = torch.randn(shape["width"], device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    else:
        second = torch.randn(size, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    return [first, second]


def _eager(op: str):
    if op == "bias_gelu":
        return lambda x, bias: F.gelu(x + bias, approximate=GELU_APPROXIMATE)
    if op == "swiglu":
        return lambda gate, up: F.silu(gate) * up
    return lambda gate, up: F.gelu(gate, approximate=GELU_APPROXIMATE) * up


def _ours_forward(op: str, name: str):
    import fast_attn

    if op == "bias_gelu":
        return lambda x, bias: fast_attn.bias_gelu(x, bias, approximate=GELU_APPROXIMATE, backend=name)
    if op == "swiglu":
        return lambda gate, up: fast_attn.swiglu(gate, up, backend=name)
    return lambda gate, up: fast_attn.geglu(gate, up, approximate=GELU_APPROXIMATE, backend=name)


def _cases_for(op: str, ctx: Context, shape: dict) -> list[Case]:
    from fast_attn import backends

    work = _work(op, shape, ctx)
    make_inputs = lambda: _inputs(op, shape, ctx)  # noqa: E731

    def call(pass_):
        feats = backends.features(bias=op == "bias_gelu", gelu_tanh=op != "swiglu",
                                  backward=pass_ != formulas.FWD)
        return backends.Call(op, ctx.device.type, ctx.dtype, feats)

    cases = our_cases(ctx, op=op, shape=shape, passes=PASSES, work=work, call=call,
                      make_forward=lambda name: _ours_forward(op, name), make_inputs=make_inputs)
    common = dict(op=op, shape=shape, passes=PASSES, work=work, make_inputs=make_inputs)
    cases.append(peer_case(ctx, impl="torch:eager", forward=_eager(op), **common))
    cases.append(peer_case(ctx, impl="torch.compile", forward=_eager(op), compiled=True, **common))
    if op in LIGER:
        module_name, function = LIGER[op]
        module, why_not = optional_import(module_name) if ctx.on_gpu else (None, "Liger-Kernel runs on CUDA only")
        forward = getattr(module, function).apply if module is not None else None
        cases.append(peer_case(ctx, impl="liger", forward=forward, skip=why_not, **common))
    return cases


def cases(ctx: Context) -> list[Case]:
    return [case for op in OPS for shape in configs(ctx) for case in _cases_for(op, ctx, shape)]
