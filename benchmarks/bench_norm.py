"""LayerNorm and RMSNorm: forward and backward, ours against the peers.

Shape (BASELINES.md): 16384 rows, width N in {1024, 4096, 8192}, with a weight (and a bias
for LayerNorm) in the input dtype. Memory-bound: GB/s from ``formulas.norm_bytes`` (x and
y forward; x, dy and dx backward; plus the (N,) parameters and their gradients), against
the copy ceiling. The forward is timed with inputs that require grad, as in training.

Implementations: every fast_attn backend that declares the call; torch eager
(``F.layer_norm`` / ``F.rms_norm``); the same under ``torch.compile``; Liger-Kernel's
``LigerLayerNormFunction`` / ``LigerRMSNormFunction`` when installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import formulas
from benchmarks.common import Case, Context, Work, optional_import, our_cases, peer_case

COVERS = ("layer_norm", "rms_norm")
OPS = COVERS
PASSES = (formulas.FWD, formulas.BWD)

ROWS = 16384
WIDTHS = (1024, 4096, 8192)
CPU_ROWS = 256
CPU_WIDTHS = (1024, 4096)
CPU_QUICK_WIDTHS = (1024,)
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}  # torch.nn's defaults (LayerNorm; RMSNorm as Llama)


def configs(ctx: Context) -> list[dict]:
    if ctx.on_gpu:
        rows, widths = ROWS, WIDTHS  # cheap: the quick run keeps every width
    else:
        rows, widths = CPU_ROWS, (CPU_QUICK_WIDTHS if ctx.quick else CPU_WIDTHS)
    return [{"rows": rows, "width": n} for n in widths]


def _work(op: str, shape: dict, ctx: Context):
    element_size = torch.empty((), dtype=ctx.dtype).element_size()

    def work(pass_: str) -> Work:
        return Work(bytes=formulas.norm_bytes(shape["rows"], shape["width"], element_size, pass_,
                                              bias=op == "layer_norm"))
    return work


def _inputs(op: str, shape: dict, ctx: Context) -> list[torch.Tensor]:
    """x (rows, N), weight (N,) (, bias (N,)), all requiring grad."""
    rows, width = shape["rows"], shape["width"]
    x = torch.randn(rows, width, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(width, device=ctx.device, dtype=ctx.dtype)).requires_grad_()
    tensors = [x, weight]
    if op == "layer_norm":
        tensors.append((0.1 * torch.randn(width, device=ctx.device, dtype=ctx.dtype)).requires_grad_())
    return tensors


def _eager(op: str):
    """torch's own op: what a model written against torch.nn runs."""
    width_of = lambda x: (x.shape[-1],)  # noqa: E731
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, width_of(x), w, b, EPS[op])
    if hasattr(F, "rms_norm"):
        return lambda x, w: F.rms_norm(x, width_of(x), w, EPS[op])

    def rms_norm(x, w):  # torch < 2.4 has no F.rms_norm: the usual composite
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + EPS[op])).to(x.dtype) * w
    return rms_norm


def _liger(op: str):
    """(forward, None) with Liger-Kernel's autograd Function, or (None, why not)."""
    module_name = {"layer_norm": "liger_kernel.ops.layer_norm", "rms_norm": "liger_kernel.ops.rms_norm"}[op]
    module, why_not = optional_import(module_name)
    if module is None:
        return None, why_not
    if op == "layer_norm":
        return (lambda x, w, b: module.LigerLayerNormFunction.apply(x, w, b, EPS[op])), None
    return (lambda x, w: module.LigerRMSNormFunction.apply(x, w, EPS[op])), None


def _cases_for(op: str, ctx: Context, shape: dict) -> list[Case]:
    import fast_attn
    from fast_attn import backends

    work = _work(op, shape, ctx)
    make_inputs = lambda: _inputs(op, shape, ctx)  # noqa: E731
    public = getattr(fast_attn, op)

    def call(pass_):
        feats = backends.features(weight=True, bias=op == "layer_norm", backward=pass_ != formulas.FWD)
        return backends.Call(op, ctx.device.type, ctx.dtype, feats)

    def make_forward(name):
        return lambda *tensors: public(*tensors, eps=EPS[op], backend=name)

    cases = our_cases(ctx, op=op, shape=shape, passes=PASSES, work=work, call=call,
                      make_forward=make_forward, make_inputs=make_inputs)
    common = dict(op=op, shape=shape, passes=PASSES, work=work, make_inputs=make_inputs)
    cases.append(peer_case(ctx, impl="torch:eager", forward=_eager(op), **common))
    cases.append(peer_case(ctx, impl="torch.compile", forward=_eager(op), compiled=True, **common))
    liger, why_not = _liger(op) if ctx.on_gpu else (None, "Liger-Kernel runs on CUDA only")
    cases.append(peer_case(ctx, impl="liger", forward=liger, skip=why_not, **common))
    return cases


def cases(ctx: Context) -> list[Case]:
    return [case for op in OPS for shape in configs(ctx) for case in _cases_for(op, ctx, shape)]
