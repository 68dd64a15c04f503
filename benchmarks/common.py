"""Shared machinery of the benchmark suite: timing, memory, environment, ceilings, cases.

Timing. On a GPU: ``triton.testing.do_bench`` (it flushes the L2 cache before every call
and times with CUDA events), reporting the median and the 20th/80th percentiles. On CPU
(``CPU_RULES``): warm up for a minimum number of calls and time, then time single calls
until both a minimum number of samples and a minimum time are reached, capped in time and
samples; a call slower than the cap still gets ``slow_min_samples`` samples unless that
would take more than ``slow_max_s``. Same statistics, plus the number of samples and the
spread, (p80 - p20) / median. A CPU row whose spread exceeds ``NOISY_SPREAD`` or that has
fewer than ``NOISY_MIN_SAMPLES`` samples is ``noisy``: reported, never ranked (no ratio to
a peer). CPU figures are of the torch backend and eager peers on the machine that ran
them; they say nothing about the GPU kernels.

Peak memory: ``torch.cuda.max_memory_allocated`` during one call minus what was allocated
before it, i.e. the outputs, saved tensors and workspaces the call itself needed (the
inputs are not counted). None on CPU.

Ceilings, measured in the same run (DESIGN.md): a large device-to-device copy, counting
bytes read + written, and a large matmul in the benchmark dtype. Each result is also
reported as a fraction of its ceiling.

A benchmark file turns its configurations into ``Case`` objects (one op, one
implementation, one shape); ``run_case`` measures every pass of a case and returns one
row per pass, never raising: an implementation that cannot run, or fails, gives a row
with ``status`` "skipped" or "error" and the reason in ``note``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Mapping, Optional, Sequence

import torch

from benchmarks import formulas
from fast_attn._host import idle_cores, usable_cores

REPO_ROOT = Path(__file__).resolve().parent.parent

QUANTILES = (0.5, 0.2, 0.8)  # median, 20th and 80th percentiles

# do_bench's warm-up and measuring windows in ms (triton's defaults are 25 / 100). Quick
# runs shorten them: fewer samples per median, for a run that fits the GPU session.
GPU_WARMUP_MS = {False: 25, True: 10}
GPU_REP_MS = {False: 100, True: 40}


@dataclass(frozen=True)
class CpuRule:
    """When the CPU timing loop stops (``cpu_samples``); seconds are wall-clock.

    Warm-up: calls until both ``warmup_calls`` and ``warmup_s`` are reached (or
    ``warmup_max_s`` is spent, after at least one call). Then timed calls until both
    ``min_samples`` and ``min_s`` are reached, or ``max_samples`` are taken, or ``max_s`` is
    spent; past ``max_s`` a slow call still gets ``slow_min_samples`` samples unless the
    next call would end after ``slow_max_s`` (then the row records how many it got)."""

    warmup_calls: int
    warmup_s: float
    warmup_max_s: float
    min_samples: int
    min_s: float
    max_s: float
    max_samples: int
    slow_min_samples: int = 3
    slow_max_s: float = 10.0


CPU_RULES = {
    False: CpuRule(warmup_calls=2, warmup_s=0.2, warmup_max_s=2.0, min_samples=10, min_s=0.5, max_s=3.0,
                   max_samples=100_000),
    True: CpuRule(warmup_calls=1, warmup_s=0.05, warmup_max_s=1.0, min_samples=5, min_s=0.2, max_s=1.0,
                  max_samples=50_000),
}
# A CPU row is "noisy" (shown, never ranked against a peer) when its spread,
# (p80 - p20) / median, exceeds NOISY_SPREAD, or it has fewer than NOISY_MIN_SAMPLES samples.
NOISY_SPREAD = 0.2
NOISY_MIN_SAMPLES = 5

# Ceiling workloads. The copy moves 2 x 512 MiB on a GPU, far beyond any L2 cache;
# 8192^3 is the matmul BASELINES.md measured (687 TFLOP/s on our H100).
GPU_COPY_NUMEL = 2**28
CPU_COPY_NUMEL = 2**22
GPU_MATMUL_SIZE = 8192
CPU_MATMUL_SIZE = 256

MIB = 2**20
GB = 1e9  # throughput is in decimal units: GB/s, TFLOP/s
TFLOP = 1e12

# Substrings of errors after which the CUDA context is unusable: later cases would only
# fail the same way, so they are skipped with this error as the reason.
FATAL_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                     "misaligned address", "illegal instruction")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # verify's --dtype names too


def default_results_dir(gpu_name: Optional[str]) -> Path:
    """benchmarks/results/<date>-<GPU name as a slug, or cpu>/: where a run writes by default
    (the suite, and the main job that puts verify's log beside it)."""
    where = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") if gpu_name else "cpu"
    return REPO_ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-{where}"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the suite's short names)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Timing:
    """One measurement, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: Optional[int] = None  # timed calls (CPU); None where do_bench chose (GPU)

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the relative width of the middle 60% of the samples."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else math.inf


@dataclass(frozen=True)
class Work:
    """What one call does: FLOPs (reported as TFLOP/s against the matmul ceiling), or bytes
    (GB/s against the copy ceiling), or tokens (millions of tokens/s, no ceiling)."""

    flops: Optional[float] = None
    bytes: Optional[float] = None
    tokens: Optional[float] = None


@dataclass
class Bench:
    """A callable to time, and the tensors whose ``.grad`` is reset before each call
    (so a backward never pays for accumulating into an old gradient)."""

    fn: Callable[[], object]
    grad_to_none: Sequence[torch.Tensor] = ()


@dataclass
class Context:
    """What every benchmark file needs to build its cases."""

    device: torch.device
    dtype: torch.dtype
    quick: bool
    backends: tuple  # fast_attn backends to measure here (available, requested, on this device)
    statuses: Mapping  # fast_attn.available_backends()

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Case:
    """One implementation of one op on one shape, measured for each of ``passes``.

    ``prepare`` builds the inputs and returns, per pass, a function that makes the
    ``Bench`` (the backward's forward runs there, outside the timed region). ``skip``
    set means the case is not run and each pass gets a "skipped" row with that reason.
    """

    op: str
    impl: str
    ours: bool
    shape: dict
    passes: tuple
    work: Callable[[str], Work]
    prepare: Optional[Callable[[], Mapping[str, Callable[[], Bench]]]] = None
    skip: Optional[str] = None
    skip_passes: dict = field(default_factory=dict)  # pass -> why only that pass is not run
    context: Callable[[], ContextManager] = contextlib.nullcontext
    note: str = ""
    compiled: bool = False  # torch.compile inside: reset dynamo first (fresh recompile budget)

    @property
    def label(self) -> str:
        return config_label(self.shape)


# Short names of shape fields in the printed configuration label.
_LABEL_NAMES = {
    "batch": "b", "seqlen": "s", "seqlen_q": "sq", "seqlen_k": "sk", "cache_len": "cache",
    "heads": "h", "kv_heads": "hkv", "head_dim": "d", "rows": "rows", "width": "N",
    "d_model": "d_model", "ffn_dim": "ffn", "tokens": "tokens",
}


def config_label(shape: Mapping) -> str:
    """{"batch": 4, "seqlen": 4096, "causal": True} -> "b=4 s=4096 causal"."""
    parts = []
    for key, value in shape.items():
        if isinstance(value, bool):
            parts.append(key if value else f"non-{key}")
        else:
            parts.append(f"{_LABEL_NAMES.get(key, key)}={value}")
    return " ".join(parts)


# ------------------------------------------------------------------------------ timing


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile of an ascending list (q in [0, 1])."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def cpu_samples(call: Callable[[], object], rule: CpuRule, reset: Callable[[], None] = lambda: None,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Times of single calls of ``call`` in ms, ascending, under ``rule`` (see ``CpuRule``).
    ``reset`` runs before every call, outside the timed region; ``clock`` is in seconds."""
    warmup_start = clock()
    calls = 0
    while True:
        reset()
        call()  # first-call allocations, lazy initialisation, caches, thread pools
        calls += 1
        spent = clock() - warmup_start
        if (calls >= rule.warmup_calls and spent >= rule.warmup_s) or spent >= rule.warmup_max_s:
            break
    times: list[float] = []
    total = 0.0  # seconds inside the timed calls
    loop_start = clock()
    while len(times) < rule.max_samples:
        elapsed = clock() - loop_start
        if len(times) >= rule.min_samples and elapsed >= rule.min_s:
            break
        if elapsed >= rule.max_s and times:
            if len(times) >= rule.slow_min_samples:
                break
            if elapsed + total / len(times) > rule.slow_max_s:
                break  # one more slow call would run past slow_max_s
        reset()
        start = clock()
        call()
        seconds = clock() - start
        total += seconds
        times.append(seconds * 1e3)
    times.sort()
    return times


def timing_of(times_ms: Sequence[float]) -> Timing:
    """Median, 20th and 80th percentiles and the count of an ascending list of times."""
    return Timing(*(_percentile(times_ms, q) for q in QUANTILES), samples=len(times_ms))


def time_fn(bench: Bench, ctx: Context) -> Timing:
    """Median and 20th/80th percentiles of ``bench.fn`` in ms (see the module docstring)."""
    if ctx.on_gpu:
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            bench.fn, warmup=GPU_WARMUP_MS[ctx.quick], rep=GPU_REP_MS[ctx.quick],
            grad_to_none=list(bench.grad_to_none) or None, quantiles=list(QUANTILES),
        )
        return Timing(median, p20, p80)
    return timing_of(cpu_samples(bench.fn, CPU_RULES[ctx.quick], lambda: _reset_grads(bench.grad_to_none)))


def noise_of(timing: Timing, device_type: str) -> Optional[str]:
    """Why a CPU measurement is too noisy to rank (None if it is not, and on a GPU)."""
    if device_type != "cpu":
        return None
    if timing.samples is not None and timing.samples < NOISY_MIN_SAMPLES:
        return f"{timing.samples} sample{'s' if timing.samples != 1 else ''} (< {NOISY_MIN_SAMPLES})"
    if timing.spread > NOISY_SPREAD:
        return f"spread {timing.spread:.0%} (> {NOISY_SPREAD:.0%})"
    return None


def peak_memory_mb(bench: Bench, ctx: Context) -> Optional[float]:
    """Peak memory one call allocates beyond what was allocated before it, in MiB."""
    if not ctx.on_gpu:
        return None
    _reset_grads(bench.grad_to_none)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    bench.fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


# ------------------------------------------------------------------------ autograd passes


def autograd_passes(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                    passes: Sequence[str], *, no_grad_fwd: bool = False) -> dict:
    """Per pass, a function making the ``Bench`` of ``forward(*inputs)``.

    fwd: the forward alone. With inputs that require grad it also saves what the backward
    needs, as in training (FlashAttention's protocol); ``no_grad_fwd`` times it under
    ``torch.no_grad()`` instead (inference). bwd: ``out.backward(dout)`` on a graph built
    once, outside the timed region. fwd+bwd: both, as one training step.
    """
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def fwd() -> Bench:
        if no_grad_fwd:
            def run():
                with torch.no_grad():
                    return forward(*inputs)
            return Bench(run)
        return Bench(lambda: forward(*inputs))

    def bwd() -> Bench:
        out = forward(*inputs)
        dout = torch.randn_like(out)
        return Bench(lambda: out.backward(dout, retain_graph=True), grads)

    def fwd_bwd() -> Bench:
        dout = torch.randn_like(forward(*inputs))
        return Bench(lambda: forward(*inputs).backward(dout), grads)

    makers = {formulas.FWD: fwd, formulas.BWD: bwd, formulas.FWD_BWD: fwd_bwd}
    return {p: makers[p] for p in passes}


# ---------------------------------------------------------------------------- our backends


def our_backends(ctx: Context, call) -> list:
    """``(backend, why not or None)`` for each fast_attn backend measured in this run.

    Which backend implements which call comes from ``fast_attn.backends`` (CAPABILITIES),
    so a kernel that lands is benchmarked without editing the suite.
    """
    from fast_attn import backends

    return [(name, backends.why_not(name, call, ctx.statuses)) for name in ctx.backends]


def our_cases(ctx: Context, *, op: str, shape: dict, passes: Sequence[str],
              work: Callable[[str], Work], call: Callable[[str], object],
              make_forward: Callable[[str], Callable], make_inputs: Callable[[], Sequence],
              extra_skip: Callable[[str], Optional[str]] = lambda name: None,
              no_grad_fwd: bool = False) -> list[Case]:
    """One case per fast_attn backend of this run ("fast_attn:<backend>").

    ``call(pass_)`` is the ``fast_attn.backends.Call`` of that pass (the backward is a
    feature: a backend may have a forward kernel only); a pass the backend does not
    implement is a skipped row naming the missing feature. ``make_forward(backend)``
    returns ``forward(*inputs)``; ``extra_skip(backend)`` may veto a whole case (e.g. the
    reference's memory at a long sequence).
    """
    reasons = {p: dict(our_backends(ctx, call(p))) for p in passes}
    cases = []
    for name in ctx.backends:
        skip_passes = {p: reasons[p][name] for p in passes if reasons[p][name] is not None}

        def prepare(name=name):
            return autograd_passes(make_forward(name), make_inputs(), passes, no_grad_fwd=no_grad_fwd)

        cases.append(Case(op, f"fast_attn:{name}", True, shape, tuple(passes), work, prepare,
                          skip=extra_skip(name), skip_passes=skip_passes))
    return cases


def peer_case(ctx: Context, *, op: str, impl: str, shape: dict, passes: Sequence[str],
              work: Callable[[str], Work], forward: Callable, make_inputs: Callable[[], Sequence],
              skip: Optional[str] = None, context: Callable[[], ContextManager] = contextlib.nullcontext,
              compiled: bool = False, no_grad_fwd: bool = False) -> Case:
    """A peer's case: ``forward(*make_inputs())``, compiled lazily when ``compiled``
    (inside the case, after dynamo is reset; GPU only: on CPU compiling would dominate)."""
    if compiled and not ctx.on_gpu and skip is None:
        skip = "compiled peers run on GPU only (compiling dominates a CPU run)"

    def prepare():
        fn = compile_fn(forward) if compiled else forward
        return autograd_passes(fn, make_inputs(), passes, no_grad_fwd=no_grad_fwd)

    return Case(op, impl, False, shape, tuple(passes), work, prepare, skip=skip, context=context,
                compiled=compiled)


def select_backends(requested: Sequence[str], device: torch.device) -> tuple[tuple, dict, dict]:
    """(backends to measure, why each other backend is not measured, all statuses)."""
    from fast_attn import backends

    statuses = backends.available_backends()
    chosen, skipped = [], {}
    for name in backends.BACKENDS:
        status = statuses[name]
        if requested and name not in requested:
            skipped[name] = "not requested (--backends)"
        elif not status:
            skipped[name] = f"not available: {status.reason}"
        elif device.type not in status.devices:
            skipped[name] = f"does not take {device.type} tensors here"
        elif name == "triton" and device.type == "cpu":
            # TRITON_INTERPRET=1 runs the kernels on CPU, a correctness tool: its timings
            # measure the interpreter, not the kernels.
            skipped[name] = "runs on CPU only through the Triton interpreter (timings meaningless)"
        else:
            chosen.append(name)
    return tuple(chosen), skipped, statuses


def compile_fn(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, dynamic=False)``: one static graph per shape, as a user with a
    fixed shape gets (automatic dynamic shapes would start compiling shape-generic, slower
    kernels from the second shape on)."""
    return torch.compile(fn, dynamic=False, **options)


# ------------------------------------------------------------------------- running a case


def _error_text(exc: BaseException) -> str:
    """The first line of an exception, prefixed with its type, at most 300 characters."""
    message = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {message[0] if message else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


def _row(case: Case, pass_: str, ctx: Context) -> dict:
    return {
        "op": case.op,
        "pass": pass_,
        "impl": case.impl,
        "ours": case.ours,
        "config": case.label,
        "shape": dict(case.shape),
        "dtype": dtype_name(ctx.dtype),
        "device": ctx.device.type,
        "status": "ok",
        "note": case.note,
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "samples": None,
        "spread": None,
        "noisy": False,
        "unit": None,
        "throughput": None,
        "ceiling_fraction": None,
        "peak_mem_mb": None,
        "best_peer": None,
        "ratio_to_best_peer": None,
        "ratio_note": None,  # why a row of ours with a peer has no ratio (noise)
    }


def _fill_throughput(row: dict, work: Work, ceilings: Mapping) -> None:
    """unit, throughput and fraction of ceiling from the median time and the work done."""
    seconds = row["median_ms"] / 1e3
    if seconds <= 0:
        return
    if work.flops is not None:
        row["unit"], row["throughput"] = "TFLOP/s", work.flops / seconds / TFLOP
        ceiling = ceilings.get("matmul_tflops")
    elif work.bytes is not None:
        row["unit"], row["throughput"] = "GB/s", work.bytes / seconds / GB
        ceiling = ceilings.get("copy_gbps")
    elif work.tokens is not None:
        row["unit"], row["throughput"] = "Mtok/s", work.tokens / seconds / 1e6
        ceiling = None
    else:
        return
    if ceiling:
        row["ceiling_fraction"] = row["throughput"] / ceiling


def _note(row: dict, text: str) -> None:
    row["note"] = f"{row['note']}; {text}" if row["note"] else text


def run_case(case: Case, ctx: Context, ceilings: Mapping) -> tuple[list[dict], Optional[str]]:
    """(one row per pass of ``case``, None or the error after which the CUDA context is
    unusable). Never raises: failures become rows with status "error"."""
    rows = [_row(case, p, ctx) for p in case.passes]
    for row in rows:
        reason = case.skip if case.skip is not None else case.skip_passes.get(row["pass"])
        if reason is not None:
            row["status"], row["note"] = "skipped", reason
    if all(row["status"] == "skipped" for row in rows):
        return rows, None
    fatal: Optional[str] = None
    if case.compiled:
        torch._dynamo.reset()
    try:
        with case.context():
            makers = case.prepare()
            for row in rows:
                if row["status"] == "skipped":
                    continue
                try:
                    bench = makers[row["pass"]]()
                    timing = time_fn(bench, ctx)
                    row["median_ms"], row["p20_ms"], row["p80_ms"] = (
                        timing.median_ms, timing.p20_ms, timing.p80_ms)
                    row["samples"], row["spread"] = timing.samples, timing.spread
                    row["noisy"] = noise_of(timing, ctx.device.type) is not None
                    row["peak_mem_mb"] = peak_memory_mb(bench, ctx)
                    _fill_throughput(row, case.work(row["pass"]), ceilings)
                    del bench
                except Exception as exc:  # one failing pass must not stop the others
                    row["status"] = "error"
                    _note(row, _error_text(exc))
                    fatal = fatal or _fatal_cuda_error(exc)
                    if fatal:
                        break
    except Exception as exc:  # preparing the inputs failed: every pass not yet run errs
        for row in rows:
            if row["status"] == "ok" and row["median_ms"] is None:
                row["status"] = "error"
                _note(row, _error_text(exc))
        fatal = fatal or _fatal_cuda_error(exc)
    for row in rows:
        if row["status"] == "ok" and row["median_ms"] is None:
            row["status"] = "error"
            _note(row, "not run: an earlier pass hit a fatal CUDA error")
    if ctx.on_gpu and not fatal:
        torch.cuda.empty_cache()  # the next case starts from the same allocator state
    return rows, fatal


def _fatal_cuda_error(exc: BaseException) -> Optional[str]:
    text = str(exc)
    if any(marker in text for marker in FATAL_CUDA_ERRORS):
        return _error_text(exc)
    return None


# ----------------------------------------------------------------------------- environment


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return result.stdout.strip() + ("+dirty" if dirty else "")


def loadavg_1m() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_threads() -> int:
    """torch threads for a CPU run: the idle cores (``fast_attn._host.idle_cores``), at most
    torch's current setting (so OMP_NUM_THREADS or an explicit torch.set_num_threads still
    caps it)."""
    return min(torch.get_num_threads(), idle_cores())


def environment(device: torch.device) -> dict:
    """Hardware and software of this run (``loadavg_1m_end`` is filled in when it ends)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fast_attn

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": None,
        "sm_count": None,
        "compute_capability": None,
        "gpu_memory_gib": None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": usable_cores(),
        "loadavg_1m_start": loadavg_1m(),
        "loadavg_1m_end": None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "fast_attn": fast_attn.__version__,
        "git_commit": _git_commit(),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def _copy_gbps(ctx: Context, numel: int) -> tuple[float, int, Timing]:
    """(GB/s, bytes moved, timing) of ``dst.copy_(src)`` for ``numel`` elements of ctx.dtype."""
    src = torch.randn(numel, device=ctx.device, dtype=ctx.dtype)
    dst = torch.empty_like(src)
    timing = time_fn(Bench(lambda: dst.copy_(src)), ctx)
    moved = formulas.copy_bytes(numel, src.element_size())
    return moved / (timing.median_ms / 1e3) / GB, moved, timing


def _matmul_tflops(ctx: Context, size: int) -> tuple[float, Timing]:
    """(TFLOP/s, timing) of a (size x size) @ (size x size) matmul in ctx.dtype."""
    a = torch.randn(size, size, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(size, size, device=ctx.device, dtype=ctx.dtype)
    timing = time_fn(Bench(lambda: torch.matmul(a, b)), ctx)
    return formulas.matmul_flops(size, size, size) / (timing.median_ms / 1e3) / TFLOP, timing


def measure_ceilings(ctx: Context) -> dict:
    """The copy bandwidth (GB/s, read + write) and the matmul rate (TFLOP/s) in ctx.dtype.
    A ceiling that cannot be measured is recorded as an error and leaves fractions empty."""
    ceilings: dict = {"dtype": dtype_name(ctx.dtype)}
    numel = GPU_COPY_NUMEL if ctx.on_gpu else CPU_COPY_NUMEL
    size = GPU_MATMUL_SIZE if ctx.on_gpu else CPU_MATMUL_SIZE
    try:
        ceilings["copy_gbps"], ceilings["copy_bytes"], timing = _copy_gbps(ctx, numel)
        ceilings["copy_samples"], ceilings["copy_spread"] = timing.samples, timing.spread
    except Exception as exc:
        ceilings["copy_error"] = _error_text(exc)
    try:
        ceilings["matmul_tflops"], timing = _matmul_tflops(ctx, size)
        ceilings["matmul_shape"] = [size, size, size]
        ceilings["matmul_samples"], ceilings["matmul_spread"] = timing.samples, timing.spread
    except Exception as exc:
        ceilings["matmul_error"] = _error_text(exc)
    if ctx.on_gpu:
        torch.cuda.empty_cache()
    return ceilings


@functools.lru_cache(maxsize=None)
def optional_import(module: str) -> tuple[object, Optional[str]]:
    """(the module, None), or (None, why not) when it is not installed or fails to import."""
    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        if getattr(exc, "name", None) == module.split(".")[0]:
            return None, f"{module.split('.')[0]} is not installed"
        return None, f"{module} fails to import: {_error_text(exc)}"
    except Exception as exc:  # a broken build of an optional peer must not stop the suite
        return None, f"{module} fails to import: {_error_text(exc)}"
