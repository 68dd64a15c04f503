"""python -m benchmarks overhead: what the op layer costs on the host, per call, and
fast_attn.nn against torch.nn on a whole encoder.

    python -m benchmarks overhead                # about 3 minutes on 2 idle CPU cores
    python -m benchmarks overhead --quick        # under a minute: smaller encoder, fewer samples
    python -m benchmarks overhead --out DIR      # default benchmarks/results/<date>-<cpu or gpu>-overhead/

One run measures, on ``cuda`` when there is a GPU and on ``cpu`` otherwise:

1. **Tiny ops.** Each public op on a tiny input (attention (B, S, H, D) = (1, 8, 2, 16),
   plain and causal; norms and FFN ops on (8, 64)), where the kernel's work is negligible
   and the wall time per call is the host cost of the op layer. Each is timed against its
   torch counterpart in the same run: ``F.scaled_dot_product_attention`` on (B, H, S, D)
   views, ``F.layer_norm``, ``F.rms_norm``, ``F.gelu(x + b)``, ``F.silu(g) * u``,
   ``F.gelu(g) * u``; forward alone (inputs without grad) and forward+backward (inputs
   and parameters require grad, ``out.backward(grad)`` with a preallocated ``grad``).
   fast_attn is timed with ``backend="auto"`` and with ``backend="torch"``.
2. **The floor.** A bare ``torch.library.custom_op`` defined here (``fa_bench::identity_like``:
   ``x.clone()``, a fake function, and a registered backward that calls the same op on
   the gradient, as fast_attn's ops call a backward op), forward and forward+backward,
   and the same clone in plain torch. It is the least any custom-op layer can cost.
3. **The encoder.** ``nn.TransformerEncoder`` of post-norm (torch's default
   ``norm_first=False``) ``nn.TransformerEncoderLayer(d_model=512, nhead=8,
   dim_feedforward=2048, dropout=0.0, activation=relu, batch_first=True)`` x 4, batch
   4 x 512 tokens, fp32, causal (``mask=generate_square_subsequent_mask(512),
   is_causal=True``): inference (eval, no_grad) and a training step (forward + backward,
   no optimizer) of torch.nn against a deep copy given to ``fast_attn.nn.swap_modules``.
   dropout is 0 so both compute the same maths and their outputs can be compared (the
   max abs differences are reported, so a silent fallback or a wrong answer shows). In
   eval mode torch.nn takes its own fused inference path (``_transformer_encoder_layer_fwd``);
   that is what a torch.nn user gets, so it is the reference. The fast_attn op calls of
   one step are counted with a ``TorchDispatchMode`` (every ``fast_attn::*`` op that
   reaches dispatch, backward ops included), with the wall time spent inside them.

Timing. Tiny cases: ``torch.set_num_threads(1)`` (less noise from a shared machine),
warm-up calls, then samples of many calls in a loop (the time of one sample divided by
its calls; as many calls as make a sample last about 20 ms, 10 to 200, the same for
every implementation of a case); the median of 21 samples (15 with ``--quick``) is
reported with the 20th and 80th percentiles.
The implementations of one case are interleaved sample by sample, in rotating order,
so a change of machine load hits all of them alike. On a GPU each sample is bracketed by
``torch.cuda.synchronize()``, so a sample is host-bound only while the GPU keeps up.
The encoder runs with torch's default thread count, one warm-up step per model (the
counted step for fast_attn) and a few interleaved timed steps.

Targets printed beside the ratios (DESIGN.md): a public op costs at most 1.5x its
torch counterpart; the op layer on the torch backend at most 1.3x the bare custom op
(this ratio also contains the op's own tiny compute, which the clone does not do: the
"added" columns give fast_attn's time minus torch's beside the floor's custom op minus
plain clone); fast_attn.nn at least as fast as torch.nn (speed-up >= 1.0x).

Sizes: ``--quick`` shrinks the encoder to 2 layers, d_model 256, 4 heads, dim_feedforward
1024, batch 2 x 256 and takes fewer calls per sample; ``--smoke`` (for the tests only)
shrinks everything further so the command runs in seconds. Writes ``overhead.json`` and
``report.md`` and prints the same tables, with the machine (CPU model, cores, threads,
load average at start and end: other processes on the machine skew these numbers).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import common

SCHEMA = "fast_attn.benchmarks.overhead/1"

TINY_THREADS = 1  # tiny cases: one thread, so the 2nd core's load cannot stretch them
ATTN_SHAPE = (1, 8, 2, 16)  # (B, S, H, D)
ROWS, WIDTH = 8, 64  # norm and FFN inputs: (rows, N)
LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-6
# Tiny cases in fp32 on CPU (CPU bf16 is emulated and slow); bf16 on a GPU, the dtype
# the fused kernels serve (fp32 attention is outside the GPU kernels' dtypes).
TINY_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}

TARGET_OP_VS_TORCH = 1.5  # public op time / torch counterpart time, at most
TARGET_LAYER_VS_FLOOR = 1.3  # op on backend="torch" / bare custom op, at most
TARGET_NN_SPEEDUP = 1.0  # torch.nn time / fast_attn.nn time, at least

FAST_ATTN_NAMESPACE = "fast_attn"
US = 1e6  # seconds -> microseconds


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder stack: torch.nn.TransformerEncoder defaults except the fields set here."""

    layers: int
    d_model: int
    nhead: int
    dim_feedforward: int
    batch: int
    seqlen: int
    dropout: float = 0.0  # 0: torch.nn and fast_attn.nn compute the same maths
    norm_first: bool = False  # torch's default: post-norm
    activation: str = "relu"  # torch's default


@dataclass(frozen=True)
class Preset:
    """How much to measure. A tiny case's calls per sample are chosen from its slowest
    implementation so that one sample lasts about ``sample_target_s`` (between
    ``min_calls`` and ``max_calls``): a 5 us op gets many calls, a 5 ms one a few, and
    the whole run keeps its budget. Warm-up: ``warmup_calls`` calls per implementation,
    or fewer once ``warmup_s`` is spent. The encoder: ``encoder_steps`` timed steps per
    model and mode, after one warm-up step each."""

    sample_target_s: float
    min_calls: int
    max_calls: int
    samples: int
    warmup_calls: int
    warmup_s: float
    encoder: EncoderConfig
    encoder_steps: int


PRESETS = {
    # about 25 s of tiny cases (16 of them, 3 implementations each) and 2 minutes of encoder
    "full": Preset(0.02, 10, 200, 21, 50, 0.1, EncoderConfig(4, 512, 8, 2048, 4, 512), 3),
    "quick": Preset(0.008, 5, 100, 15, 20, 0.05, EncoderConfig(2, 256, 4, 1024, 2, 256), 3),
    # --smoke, for the tests: seconds, not a measurement
    "smoke": Preset(0.001, 2, 10, 5, 2, 0.01, EncoderConfig(1, 64, 4, 128, 2, 32), 2),
}
MIN_WARMUP_CALLS = 3  # even a slow call is warmed up (first-call caches, allocator) this often


# ------------------------------------------------------------------------ the floor op


@torch.library.custom_op("fa_bench::identity_like", mutates_args=())
def identity_like(x: Tensor) -> Tensor:
    """The least a custom op can do that still returns a new tensor."""
    return x.clone()


@identity_like.register_fake
def _(x):
    return torch.empty_like(x)


def _identity_like_bwd(ctx, grad):
    # a second custom-op call, as fast_attn's registered backwards call their *_bwd op
    return identity_like(grad)


identity_like.register_autograd(_identity_like_bwd)


# ------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats_us(seconds: Sequence[float]) -> dict:
    """Median and 20th/80th percentiles in microseconds, and the sample count."""
    median, p20, p80 = (_quantile(seconds, q) * US for q in common.QUANTILES)
    return {"median_us": median, "p20_us": p20, "p80_us": p80, "samples": len(seconds)}


def _warm_up(fn: Callable[[], object], preset: Preset, sync: Callable[[], None]) -> float:
    """Runs ``fn`` ``preset.warmup_calls`` times (fewer once ``warmup_s`` is spent, at
    least MIN_WARMUP_CALLS); returns the median seconds of one of those calls."""
    seconds = []
    started = time.perf_counter()
    while len(seconds) < preset.warmup_calls and (
            len(seconds) < MIN_WARMUP_CALLS or time.perf_counter() - started < preset.warmup_s):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return _quantile(seconds, 0.5)


def time_interleaved(fns: Mapping[str, Callable[[], object]], preset: Preset,
                     sync: Callable[[], None]) -> tuple[dict, int]:
    """({name: stats} of the time per call of each function, calls per sample). Every
    function gets the same calls per sample; sample i times each function once,
    starting with function i mod n."""
    names = list(fns)
    slowest = max(_warm_up(fns[name], preset, sync) for name in names)
    calls = min(preset.max_calls, max(preset.min_calls, math.ceil(preset.sample_target_s / max(slowest, 1e-9))))
    per_call: dict = {name: [] for name in names}
    for index in range(preset.samples):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            per_call[name].append((time.perf_counter() - start) / calls)
    return {name: _stats_us(values) for name, values in per_call.items()}, calls


# -------------------------------------------------------------------------- tiny cases


@dataclass
class TinyOp:
    """One public op on a tiny input: its inputs (``make(requires_grad)``), its torch
    counterpart and its fast_attn call, each ``fn(*inputs)``."""

    op: str
    shape: dict
    make: Callable[[bool], tuple]
    torch_fn: Callable
    ours_fn: Callable  # ours_fn(*inputs, backend=...)


def _tiny_ops(device: torch.device, dtype: torch.dtype) -> list[TinyOp]:
    import fast_attn

    def tensors(*shapes):
        def make(requires_grad: bool) -> tuple:
            return tuple(torch.randn(s, device=device, dtype=dtype, requires_grad=requires_grad) for s in shapes)
        return make

    batch, seqlen, heads, head_dim = ATTN_SHAPE
    attn_shape = {"batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": head_dim}
    rows = {"rows": ROWS, "width": WIDTH}
    qkv = tensors(ATTN_SHAPE, ATTN_SHAPE, ATTN_SHAPE)
    matrix = (ROWS, WIDTH)
    ops = []
    for causal in (False, True):
        ops.append(TinyOp(
            "attention causal" if causal else "attention", attn_shape, qkv,
            # SDPA takes (B, H, S, D): transposed views of the same (B, S, H, D) tensors
            lambda q, k, v, c=causal: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=c),
            lambda q, k, v, c=causal, backend="auto": fast_attn.attention(q, k, v, causal=c, backend=backend)))
    ops += [
        TinyOp("layer_norm", rows, tensors(matrix, (WIDTH,), (WIDTH,)),
               lambda x, w, b: F.layer_norm(x, (WIDTH,), w, b, LAYER_NORM_EPS),
               lambda x, w, b, backend="auto": fast_attn.layer_norm(x, w, b, LAYER_NORM_EPS, backend=backend)),
        TinyOp("rms_norm", rows, tensors(matrix, (WIDTH,)),
               lambda x, w: F.rms_norm(x, (WIDTH,), w, RMS_NORM_EPS),
               lambda x, w, backend="auto": fast_attn.rms_norm(x, w, RMS_NORM_EPS, backend=backend)),
        TinyOp("bias_gelu", rows, tensors(matrix, (WIDTH,)),
               lambda x, b: F.gelu(x + b),
               lambda x, b, backend="auto": fast_attn.bias_gelu(x, b, backend=backend)),
        TinyOp("swiglu", rows, tensors(matrix, matrix),
               lambda g, u: F.silu(g) * u,
               lambda g, u, backend="auto": fast_attn.swiglu(g, u, backend=backend)),
        TinyOp("geglu", rows, tensors(matrix, matrix),
               lambda g, u: F.gelu(g) * u,
               lambda g, u, backend="auto": fast_attn.geglu(g, u, backend=backend)),
    ]
    return ops


def _step(forward: Callable[[], Tensor], inputs: Sequence[Tensor], backward: bool) -> Callable[[], object]:
    """The timed call: ``forward()``, or forward then ``out.backward(grad)`` with a grad
    preallocated from one trial call; input grads are reset so nothing accumulates."""
    if not backward:
        return forward
    grad = torch.randn_like(forward())

    def fwd_bwd():
        for tensor in inputs:
            tensor.grad = None
        forward().backward(grad)

    return fwd_bwd


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _ratio(numerator: Optional[dict], denominator: Optional[dict]) -> Optional[float]:
    if not numerator or not denominator or denominator["median_us"] <= 0:
        return None
    return numerator["median_us"] / denominator["median_us"]


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def measure_floor(device: torch.device, dtype: torch.dtype, preset: Preset) -> dict:
    """The bare custom op against the same clone in plain torch, fwd and fwd+bwd."""
    sync = _sync(device)
    floor = {}
    for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
        x = torch.randn(ROWS, WIDTH, device=device, dtype=dtype, requires_grad=backward)
        fns = {"plain_torch": _step(lambda: x.clone(), (x,), backward),
               "bare_custom_op": _step(lambda: identity_like(x), (x,), backward)}
        timings, calls = time_interleaved(fns, preset, sync)
        floor[pass_] = {"timings": timings, "calls_per_sample": calls,
                        "ratio": _ratio(timings["bare_custom_op"], timings["plain_torch"]),
                        "added_us": timings["bare_custom_op"]["median_us"] - timings["plain_torch"]["median_us"]}
    return floor


def measure_tiny_ops(device: torch.device, dtype: torch.dtype, preset: Preset, floor: Mapping) -> list[dict]:
    """One row per (op, pass): torch, fast_attn auto and fast_attn on backend="torch"."""
    sync = _sync(device)
    rows = []
    for case in _tiny_ops(device, dtype):
        for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
            row = {"op": case.op, "pass": pass_, "shape": case.shape, "dtype": str(dtype).replace("torch.", ""),
                   "status": "ok", "note": "", "timings": {}, "calls_per_sample": None,
                   "max_abs_diff": None}
            try:
                inputs = case.make(backward)
                row["max_abs_diff"] = _max_abs_diff(_as_bshd(case, case.torch_fn(*inputs)), case.ours_fn(*inputs))
                fns = {
                    "torch": _step(lambda: case.torch_fn(*inputs), inputs, backward),
                    "fast_attn": _step(lambda: case.ours_fn(*inputs), inputs, backward),
                    "fast_attn:torch": _step(lambda: case.ours_fn(*inputs, backend="torch"), inputs, backward),
                }
                row["timings"], row["calls_per_sample"] = time_interleaved(fns, preset, sync)
            except Exception as exc:  # one failing op must not hide the others
                row["status"], row["note"] = "error", _error_text(exc)
            timings = row["timings"]
            bare = floor[pass_]["timings"]["bare_custom_op"]
            row["ratio_vs_torch"] = _ratio(timings.get("fast_attn"), timings.get("torch"))
            row["ratio_torch_backend_vs_torch"] = _ratio(timings.get("fast_attn:torch"), timings.get("torch"))
            row["ratio_layer_vs_floor"] = _ratio(timings.get("fast_attn:torch"), bare)
            row["added_us_vs_torch"] = (timings["fast_attn:torch"]["median_us"] - timings["torch"]["median_us"]
                                        if row["status"] == "ok" else None)
            rows.append(row)
    return rows


def _as_bshd(case: TinyOp, out: Tensor) -> Tensor:
    """SDPA's (B, H, S, D) output in fast_attn's (B, S, H, D) layout, to compare them."""
    return out.transpose(1, 2) if case.op.startswith("attention") else out


# ----------------------------------------------------------------------------- encoder


class OpCounter(TorchDispatchMode):
    """Counts the ``fast_attn::*`` ops that reach dispatch, and the wall time inside them
    (synchronized on a GPU). A dispatch mode sees the ops called from Python and from the
    autograd engine (backward ops), not the aten ops inside them."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.sync = _sync(device)
        self.calls: dict = {}
        self.seconds: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != FAST_ATTN_NAMESPACE:
            return func(*args, **(kwargs or {}))
        self.sync()
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.sync()
        name = func.name()
        self.calls[name] = self.calls.get(name, 0) + 1
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out


def _encoder_models(config: EncoderConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    import fast_attn.nn

    layer = nn.TransformerEncoderLayer(config.d_model, config.nhead, config.dim_feedforward,
                                       dropout=config.dropout, activation=config.activation,
                                       batch_first=True, norm_first=config.norm_first, device=device)
    reference = nn.TransformerEncoder(layer, config.layers)
    ours = fast_attn.nn.swap_modules(copy.deepcopy(reference))
    return reference, ours


def _grads(model: nn.Module) -> list:
    return [p.grad for p in model.parameters()]


def measure_encoder(device: torch.device, preset: Preset) -> dict:
    """Inference and training-step times of torch.nn and fast_attn.nn, the fast_attn op
    calls of one step of each, and the max abs differences of outputs (and grads)."""
    config = preset.encoder
    sync = _sync(device)
    models = dict(zip(("torch.nn", "fast_attn.nn"), _encoder_models(config, device)))
    x = torch.randn(config.batch, config.seqlen, config.d_model, device=device)
    mask = nn.Transformer.generate_square_subsequent_mask(config.seqlen, device=device)
    grad = torch.randn_like(x)

    def inference(model):
        model.eval()
        with torch.no_grad():
            return model(x, mask=mask, is_causal=True)

    def training(model):
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(x, mask=mask, is_causal=True)
        out.backward(grad)
        return out

    result = {"config": asdict(config), "tokens": config.batch * config.seqlen}
    for mode, step in (("inference", inference), ("training", training)):
        # The warm-up step: plain for torch.nn, counted for fast_attn.nn.
        reference_out = step(models["torch.nn"]).detach()
        reference_grads = _grads(models["torch.nn"])
        counter = OpCounter(device)
        start = time.perf_counter()
        with counter:
            ours_out = step(models["fast_attn.nn"]).detach()
        sync()
        counted_s = time.perf_counter() - start
        entry = {
            "max_abs_diff": _max_abs_diff(reference_out, ours_out),
            "fast_attn_calls": dict(sorted(counter.calls.items())),
            "fast_attn_calls_total": sum(counter.calls.values()),
            "fast_attn_op_seconds": {k: counter.seconds[k] for k in sorted(counter.seconds)},
            "counted_step_s": counted_s,
        }
        if mode == "training":
            entry["grad_max_abs_diff"] = max(
                _max_abs_diff(a, b) for a, b in zip(reference_grads, _grads(models["fast_attn.nn"])))
        steps: dict = {name: [] for name in models}
        for index in range(preset.encoder_steps):
            names = list(models) if index % 2 == 0 else list(models)[::-1]
            for name in names:
                sync()
                start = time.perf_counter()
                step(models[name])
                sync()
                steps[name].append(time.perf_counter() - start)
        entry["timings_ms"] = {name: {k.replace("_us", "_ms"): v / 1e3 if k.endswith("_us") else v
                                      for k, v in _stats_us(values).items()}
                               for name, values in steps.items()}
        torch_ms = entry["timings_ms"]["torch.nn"]["median_ms"]
        ours_ms = entry["timings_ms"]["fast_attn.nn"]["median_ms"]
        entry["speedup"] = torch_ms / ours_ms if ours_ms > 0 else None
        result[mode] = entry
    return result


# ------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _loadavg() -> Optional[list]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _dirty_files() -> Optional[list]:
    """Tracked files with uncommitted changes when the run started: the code measured is
    the commit plus these (others may edit the same checkout)."""
    import subprocess

    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=common.REPO_ROOT,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in result.stdout.splitlines()] if result.returncode == 0 else None


def default_out(env: Mapping) -> Path:
    date = datetime.date.today().isoformat()
    where = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-") if env["gpu"] else "cpu"
    return common.REPO_ROOT / "benchmarks" / "results" / f"{date}-{where}-overhead"


# ----------------------------------------------------------------------------- reports


def _us(stats: Optional[dict]) -> str:
    return "" if not stats else f"{stats['median_us']:.1f} [{stats['p20_us']:.1f}-{stats['p80_us']:.1f}]"


def _x(value: Optional[float], target: Optional[str] = None, ok: Optional[bool] = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.2f}x"
    if target is not None:
        text += f" ({'ok' if ok else 'MISS'}, {target})"
    return text


def _table(header: Sequence[str], lines: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines])


def _sections(result: Mapping, markdown: bool) -> list[str]:
    """The report's sections, as printed text or Markdown."""
    heading = (lambda text: f"## {text}") if markdown else (lambda text: f"== {text}")
    out = []
    floor = result["floor"]
    out += [heading("the floor: a bare torch.library.custom_op (fa_bench::identity_like, x.clone()) "
                    "[us per call: median [p20-p80]]"), "",
            _table(["pass", "plain torch clone", "bare custom op", "custom op / plain", "added us", "calls/sample"],
                   [[p, _us(f["timings"]["plain_torch"]), _us(f["timings"]["bare_custom_op"]), _x(f["ratio"]),
                     f"{f['added_us']:.1f}", f["calls_per_sample"]] for p, f in floor.items()], markdown), ""]
    lines = []
    for row in result["ops"]:
        t = row["timings"]
        if row["status"] != "ok":
            lines.append([row["op"], row["pass"], "err", "", "", "", "", "", "", row["note"]])
            continue
        lines.append([
            row["op"], row["pass"], _us(t["torch"]), _us(t["fast_attn"]), _us(t["fast_attn:torch"]),
            _x(row["ratio_vs_torch"], f"<= {TARGET_OP_VS_TORCH}x", row["ratio_vs_torch"] <= TARGET_OP_VS_TORCH),
            _x(row["ratio_layer_vs_floor"], f"<= {TARGET_LAYER_VS_FLOOR}x",
               row["ratio_layer_vs_floor"] <= TARGET_LAYER_VS_FLOOR),
            f"{row['added_us_vs_torch']:.1f}", f"{row['max_abs_diff']:.1e}", row["calls_per_sample"]])
    out += [heading(f"tiny ops, {TINY_THREADS} thread [us per call: median [p20-p80]]"), "",
            _table(["op", "pass", "torch", "fast_attn (auto)", "fast_attn (torch backend)",
                    "fast_attn / torch", "torch backend / bare custom op", "added us vs torch", "max abs diff", "calls/sample"],
                   lines, markdown), ""]
    enc = result["encoder"]
    cfg = enc["config"]
    lines = []
    for mode in ("inference", "training"):
        e = enc[mode]
        t = e["timings_ms"]
        ops_s = sum(e["fast_attn_op_seconds"].values())
        lines.append([
            mode, f"{t['torch.nn']['median_ms']:.0f} [{t['torch.nn']['p20_ms']:.0f}-{t['torch.nn']['p80_ms']:.0f}]",
            f"{t['fast_attn.nn']['median_ms']:.0f} [{t['fast_attn.nn']['p20_ms']:.0f}-"
            f"{t['fast_attn.nn']['p80_ms']:.0f}]",
            _x(e["speedup"], f">= {TARGET_NN_SPEEDUP}x", e["speedup"] is not None and e["speedup"] >= TARGET_NN_SPEEDUP),
            f"{e['max_abs_diff']:.1e}" + (f" / {e['grad_max_abs_diff']:.1e}" if "grad_max_abs_diff" in e else ""),
            ", ".join(f"{k.split('::')[-1]} {v}" for k, v in e["fast_attn_calls"].items()) or "none",
            f"{ops_s:.2f} of {e['counted_step_s']:.2f}",
        ])
    out += [heading(f"fast_attn.nn vs torch.nn: TransformerEncoder x{cfg['layers']} (d_model {cfg['d_model']}, "
                    f"nhead {cfg['nhead']}, ff {cfg['dim_feedforward']}, "
                    f"{'pre' if cfg['norm_first'] else 'post'}-norm, {cfg['activation']}, dropout {cfg['dropout']}), "
                    f"batch {cfg['batch']} x {cfg['seqlen']}, causal, fp32, "
                    f"{result['machine']['threads_encoder']} threads [ms per step: median [p20-p80]]"), "",
            _table(["step", "torch.nn", "fast_attn.nn", "speed-up (torch / ours)", "max abs diff (out / grads)",
                    "fast_attn calls in one step", "s inside fast_attn ops (counted step)"], lines, markdown), ""]
    return out


def _machine_lines(result: Mapping) -> list[str]:
    m, env, settings = result["machine"], result["env"], result["settings"]
    device = f"{env['gpu']} ({env['sm_count']} SMs)" if env["gpu"] else "CPU"
    return [
        f"device: {device}; CPU {m['cpu_model']}, {m['cpu_count']} cores",
        f"software: torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
        f"fast_attn {env['fast_attn']} ({env['git_commit']}"
        + (f"; uncommitted changes in {', '.join(m['git_dirty_files'])}" if m.get("git_dirty_files") else "") + ")",
        f"threads: {m['threads_tiny']} for the tiny cases (torch.set_num_threads), {m['threads_encoder']} for the encoder",
        f"load average (1/5/15 min): {m['loadavg_start']} at start, {m['loadavg_end']} at end",
        "backends: " + "; ".join(f"{k} {'yes' if v['available'] else 'no'}" for k, v in result["backends"].items()),
        f"run: {settings['preset']} preset; tiny cases: {settings['samples']} samples of "
        f"{settings['calls_per_sample_range'][0]}-{settings['calls_per_sample_range'][1]} calls "
        f"(about {settings['sample_target_s'] * 1e3:.0f} ms each), after warm-up; encoder: "
        f"{settings['encoder_steps']} timed steps per model and mode after one warm-up step; "
        f"{result['elapsed_s']:.0f} s; `{settings['command']}`",
    ]


def print_report(result: Mapping) -> None:
    print()
    for line in _machine_lines(result):
        print(line)
    print()
    print("\n".join(_sections(result, markdown=False)))
    for note in result["notes"]:
        print(f"NOTE: {note}")


def write_markdown(result: Mapping, path: Path) -> None:
    env = result["env"]
    out = [f"# fast_attn op-layer overhead: {env['gpu'] or 'CPU'}, {env['date'][:10]}", ""]
    out += [f"- {line}" for line in _machine_lines(result)] + [""]
    for note in result["notes"]:
        out += [f"> **Note.** {note}", ""]
    out += ["Targets (DESIGN.md): a public op costs at most "
            f"{TARGET_OP_VS_TORCH}x its torch counterpart on a tiny input; the op layer on the torch "
            f"backend at most {TARGET_LAYER_VS_FLOOR}x a bare custom op; fast_attn.nn at least "
            f"{TARGET_NN_SPEEDUP}x torch.nn. Method: `benchmarks/bench_overhead.py`.", ""]
    out += _sections(result, markdown=True)
    path.write_text("\n".join(out) + "\n")


def write_all(result: Mapping, out: Path) -> dict:
    import json

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "overhead.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, paths["markdown"])
    return paths


# -------------------------------------------------------------------------------- main


def _notes(result: Mapping) -> list[str]:
    notes = [f"tiny cases ran with torch.set_num_threads({TINY_THREADS}); the encoder with "
             f"{result['machine']['threads_encoder']} threads"]
    start, end = result["machine"]["loadavg_start"], result["machine"]["loadavg_end"]
    cores = result["machine"]["cpu_count"]
    if start and end and max(start[0], end[0]) > cores / 2:
        notes.append(f"the machine was shared: 1-minute load average {start[0]} at start, {end[0]} at end "
                     f"on {cores} cores; absolute times are inflated, interleaving keeps the ratios comparable")
    if result["env"]["gpu"] is None:
        notes.append("CPU run: fast_attn's auto backend is the torch backend here, so 'fast_attn (auto)' and "
                     "'fast_attn (torch backend)' time the same path; GPU kernels are not measured")
    notes.append("'torch backend / bare custom op' includes the op's own compute, which the bare op's clone does "
                 "not do; 'added us vs torch' beside the floor's 'added us' isolates the layer's own cost")
    return notes


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks overhead", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller encoder and fewer calls per sample (under a minute on 2 idle cores)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests only: seconds
    parser.add_argument("--out", default="", help="output folder (default benchmarks/results/<date>-<device>-overhead/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights")
    return parser.parse_args(argv)


def run(args, argv: Sequence[str]) -> dict:
    started = time.perf_counter()
    loadavg_start = _loadavg()
    preset_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = TINY_DTYPES[device.type]
    torch.manual_seed(args.seed)
    import fast_attn

    env = common.environment(device)
    dirty = _dirty_files()
    print(f"overhead: {env['gpu'] or 'CPU'}; torch {env['torch']}; {preset_name} preset; "
          f"load average {loadavg_start}", flush=True)
    threads_encoder = torch.get_num_threads()
    torch.set_num_threads(TINY_THREADS)
    try:
        print("  the floor (bare custom op) ...", flush=True)
        floor = measure_floor(device, dtype, preset)
        print("  tiny ops ...", flush=True)
        ops = measure_tiny_ops(device, dtype, preset, floor)
    finally:
        torch.set_num_threads(threads_encoder)
    print("  encoder: torch.nn vs fast_attn.nn ...", flush=True)
    encoder = measure_encoder(device, preset)
    result = {
        "schema": SCHEMA,
        "env": env,
        "machine": {"cpu_model": _cpu_model(), "cpu_count": env["cpu_count"], "threads_tiny": TINY_THREADS,
                    "threads_encoder": threads_encoder, "loadavg_start": loadavg_start, "loadavg_end": _loadavg(),
                    "git_dirty_files": dirty},
        "settings": {"preset": preset_name, "sample_target_s": preset.sample_target_s,
                     "calls_per_sample_range": [preset.min_calls, preset.max_calls], "samples": preset.samples,
                     "warmup_calls": preset.warmup_calls, "warmup_s": preset.warmup_s,
                     "encoder_steps": preset.encoder_steps,
                     "tiny_dtype": str(dtype).replace("torch.", ""), "seed": args.seed,
                     "command": "python -m benchmarks overhead " + " ".join(shlex.quote(a) for a in argv)},
        "targets": {"op_vs_torch_max": TARGET_OP_VS_TORCH, "layer_vs_floor_max": TARGET_LAYER_VS_FLOOR,
                    "nn_speedup_min": TARGET_NN_SPEEDUP},
        "backends": {name: {"available": bool(status), "reason": status.reason}
                     for name, status in fast_attn.available_backends().items()},
        "floor": floor,
        "ops": ops,
        "encoder": encoder,
        "elapsed_s": time.perf_counter() - started,
    }
    result["notes"] = _notes(result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    result = run(args, argv)
    out = Path(args.out) if args.out else default_out(result["env"])
    print_report(result)
    paths = write_all(result, out)
    print(f"\nwrote {paths['json']} and {paths['markdown']}; {result['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
