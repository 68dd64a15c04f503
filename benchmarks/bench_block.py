"""One pre-norm transformer block: a training step (forward + backward) and inference.

The block (BASELINES.md): ``torch.nn.TransformerEncoderLayer(1024, 16, 4096,
norm_first=True, activation="gelu", batch_first=True, dropout=0)``, batch 8 x 2048
tokens, causal. Pass "fwd+bwd" is the training step (train mode, parameter gradients
included; no optimizer step); pass "fwd" is inference (eval mode, ``torch.no_grad()``,
where torch may take its fused "fast path"). Throughput is tokens/s (no ceiling).

Peers: the torch layer eager and under ``torch.compile``. Ours: the same block, with
the same weights, built from fast_attn ops (``_FastBlock``: ``layer_norm`` with the fused
residual add, ``attention``, ``bias_gelu``, torch's matmuls), each op on the backend
``"auto"`` picks (the note of each row says which), eager and under ``torch.compile``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import formulas
from benchmarks.common import Bench, Case, Context, Work, compile_fn

OP = "block"
COVERS = ()  # composes ops benchmarked elsewhere
TRAIN, INFER = formulas.FWD_BWD, formulas.FWD
PASSES = (TRAIN, INFER)

GPU_SHAPE = {"batch": 8, "seqlen": 2048, "d_model": 1024, "heads": 16, "ffn_dim": 4096, "causal": True}
CPU_SHAPE = {"batch": 2, "seqlen": 128, "d_model": 256, "heads": 4, "ffn_dim": 1024, "causal": True}
GELU_APPROXIMATE = "none"  # nn.TransformerEncoderLayer's activation="gelu" is the exact erf GELU


class _FastBlock(nn.Module):
    """``nn.TransformerEncoderLayer(norm_first=True, activation="gelu")`` (causal, no
    dropout) from fast_attn ops, holding its own copy of ``layer``'s parameters::

        y = LN1(x); a = out_proj(attention(qkv_proj(y)))
        y2, h = LN2(a + x), a + x             # one fused layer_norm(residual=x)
        out = h + linear2(gelu(linear1(y2)))  # the bias + GELU fused
    """

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        layer = copy.deepcopy(layer)
        self.heads = layer.self_attn.num_heads
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.in_proj_weight, self.in_proj_bias = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
        self.out_proj = layer.self_attn.out_proj
        self.linear1, self.linear2 = layer.linear1, layer.linear2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import fast_attn

        batch, seqlen, d_model = x.shape
        y = fast_attn.layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        qkv = F.linear(y, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3E)
        q, k, v = qkv.view(batch, seqlen, 3, self.heads, d_model // self.heads).unbind(2)  # (B, S, H, D) views
        attn = fast_attn.attention(q, k, v, causal=True)
        a = self.out_proj(attn.reshape(batch, seqlen, d_model))
        y2, h = fast_attn.layer_norm(a, self.norm2.weight, self.norm2.bias, self.norm2.eps, residual=x)
        hidden = fast_attn.bias_gelu(F.linear(y2, self.linear1.weight), self.linear1.bias,
                                     approximate=GELU_APPROXIMATE)
        return h + self.linear2(hidden)


def _shape(ctx: Context) -> dict:
    return dict(GPU_SHAPE if ctx.on_gpu else CPU_SHAPE)


def _torch_layer(shape: dict, ctx: Context) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        shape["d_model"], shape["heads"], shape["ffn_dim"], dropout=0.0, activation="gelu",
        batch_first=True, norm_first=True, device=ctx.device, dtype=ctx.dtype)


def _work(shape: dict):
    return lambda pass_: Work(tokens=shape["batch"] * shape["seqlen"])


def _passes(module: nn.Module, forward, x: torch.Tensor) -> dict:
    """Train step (train mode, gradients of x and every parameter reset before each call)
    and inference (eval mode, no_grad)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def train() -> Bench:
        module.train()
        dout = torch.randn_like(x)
        return Bench(lambda: forward(x).backward(dout), [x] + params)

    def infer() -> Bench:
        module.eval()

        def run():
            with torch.no_grad():
                return forward(x)
        return Bench(run)
    return {TRAIN: train, INFER: infer}


def _auto_backends(shape: dict, ctx: Context) -> str:
    """Which backend "auto" gives each op of the block, for the rows' notes."""
    from fast_attn import backends

    calls = {
        "attention": backends.features(causal=True),
        "layer_norm": backends.features(weight=True, bias=True, residual=True),
        "bias_gelu": backends.features(bias=True),
    }
    parts = []
    for op, feats in calls.items():
        chosen = []
        for backward in (False, True):
            call = backends.Call(op, ctx.device.type, ctx.dtype, feats | backends.features(backward=backward),
                                 head_dim=shape["d_model"] // shape["heads"] if op == "attention" else 0)
            try:
                chosen.append(backends.select_backend(call, "auto", ctx.statuses))
            except NotImplementedError:
                chosen.append("none")
        fwd, bwd = chosen
        parts.append(f"{op}->{fwd}" if fwd == bwd else f"{op}->{fwd}/{bwd} (fwd/bwd)")
    return "auto: " + ", ".join(parts)


def cases(ctx: Context) -> list[Case]:
    shape = _shape(ctx)
    work = _work(shape)

    def make_x():
        return torch.randn(shape["batch"], shape["seqlen"], shape["d_model"], device=ctx.device,
                           dtype=ctx.dtype, requires_grad=True)

    def torch_prepare(compiled: bool):
        def prepare():
            layer = _torch_layer(shape, ctx)
            mask = nn.Transformer.generate_square_subsequent_mask(shape["seqlen"], device=ctx.device,
                                                                  dtype=ctx.dtype)
            run = compile_fn(layer) if compiled else layer
            return _passes(layer, lambda x: run(x, src_mask=mask, is_causal=True), make_x())
        return prepare

    def ours_prepare(compiled: bool):
        def prepare():
            block = _FastBlock(_torch_layer(shape, ctx))
            run = compile_fn(block) if compiled else block
            return _passes(block, run, make_x())
        return prepare

    compile_skip = None if ctx.on_gpu else "compiled peers run on GPU only (compiling dominates a CPU run)"
    ours_note = _auto_backends(shape, ctx)
    return [
        Case(OP, "fast_attn:auto", True, shape, PASSES, work, ours_prepare(False), note=ours_note),
        Case(OP, "fast_attn:auto+compile", True, shape, PASSES, work, ours_prepare(True),
             skip=compile_skip, note=ours_note, compiled=True),
        Case(OP, "torch:eager", False, shape, PASSES, work, torch_prepare(False)),
        Case(OP, "torch.compile", False, shape, PASSES, work, torch_prepare(True), skip=compile_skip,
             compiled=True),
    ]
