"""Multi-rank test helpers: run a function on W gloo ranks, and the per-rank checks of the
context-parallel functions (used by tests/distributed and importable by users who want to
check a build on their own machine).

``run_ranks("module:function", W, *args)`` spawns W processes (``torch.multiprocessing``,
start method "spawn"), joins them into a gloo group through a file rendezvous (no port),
calls the function on every rank and returns the per-rank results. A rank that raises
fails the whole call with its traceback and the other ranks are terminated (they would
wait in a collective forever); so does a timeout. The function is passed by name so that
it pickles by module path, whatever the caller's import mode.

``check_attention`` is the rank side of the equivalence tests: for each case it draws the
whole-sequence inputs from a seed (the same on every rank), shards them, runs the scheme,
gathers output and LSE, differentiates, and applies the DESIGN.md tolerance rule against
the fp64 reference (``fast_attn.testing_cases.evaluate``) and, with the same rule, against
single-process ``fast_attn.attention`` on the whole sequence.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import queue as queue_module
import tempfile
import time
import traceback
from typing import Any, Callable, NamedTuple, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

__all__ = ["run_ranks", "RingCase", "check_attention", "gather_replicated", "shard_replicated"]


# -------------------------------------------------------------------------- the harness


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    fn: Any = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    return fn


def _rank_main(rank: int, world: int, init_file: str, target: str, args: tuple, results, threads: int,
               timeout_s: float, backend: str) -> None:
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = _resolve(target)(*args)
        results.put((rank, True, value))
    except BaseException:  # reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: Union[str, Callable], world: int, *args, timeout: float = 180.0, threads: int = 1,
              backend: str = "gloo") -> list:
    """Runs ``target(*args)`` on ``world`` ranks (gloo; ``backend="nccl"`` for one GPU per
    rank); returns the results by rank.

    ``target``: "package.module:function", or a module-level function of an importable
    module. Raises RuntimeError with the traceback of the first rank that failed, or
    TimeoutError after ``timeout`` seconds; either way every rank is stopped."""
    if callable(target):
        target = f"{target.__module__}:{target.__qualname__}"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(r, world, init_file, target, args, results, threads, timeout, backend))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world, timeout)
        finally:
            for p in procs:  # our own children, by handle
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)


def _collect(procs, results, world: int, timeout: float) -> list:
    values: dict = {}
    deadline = time.monotonic() + timeout
    while len(values) < world:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"run_ranks: ranks {sorted(set(range(world)) - set(values))} did not finish "
                               f"within {timeout:.0f} s")
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
            if dead:
                raise RuntimeError(f"run_ranks: rank(s) {dead} exited with code(s) "
                                   f"{[procs[r].exitcode for r in dead]} without reporting")
            continue
        if not ok:
            raise RuntimeError(f"run_ranks: rank {rank} of {world} failed:\n{value}")
        values[rank] = value
    for p in procs:
        p.join(30)
    return [values[r] for r in range(world)]


# ------------------------------------------------------------------ gathering for tests


class _GatherReplicated(torch.autograd.Function):
    """``unshard_sequence`` that autograd can go through when every rank differentiates the
    same loss of the gathered tensor (as the tests do): the gradient of a shard is then
    its own rows of the incoming gradient."""

    @staticmethod
    def forward(ctx, x, kwargs):
        from fast_attn.distributed.layout import unshard_sequence

        ctx.kwargs = kwargs
        return unshard_sequence(x, **kwargs)

    @staticmethod
    def backward(ctx, grad):
        from fast_attn.distributed.layout import shard_sequence

        return shard_sequence(grad, **ctx.kwargs), None


class _ShardReplicated(torch.autograd.Function):
    """``shard_sequence`` of a tensor every rank holds (the tests' whole-sequence inputs):
    its gradient is the whole gradient, gathered from the shards' gradients."""

    @staticmethod
    def forward(ctx, x, kwargs):
        from fast_attn.distributed.layout import shard_sequence

        ctx.kwargs = kwargs
        return shard_sequence(x, **kwargs)

    @staticmethod
    def backward(ctx, grad):
        from fast_attn.distributed.layout import unshard_sequence

        return unshard_sequence(grad.contiguous(), **ctx.kwargs), None


def gather_replicated(x: Tensor, layout: str, **kwargs) -> Tensor:
    return _GatherReplicated.apply(x, dict(layout=layout, **kwargs))


def shard_replicated(x: Tensor, layout: str, **kwargs) -> Tensor:
    return _ShardReplicated.apply(x, dict(layout=layout, **kwargs))


# ---------------------------------------------------------------- equivalence checks


class RingCase(NamedTuple):
    """One equivalence check: ``scheme`` ("ring", "ulysses" or "ring_varlen") in ``layout``
    on the whole-sequence call ``spec`` (a ``fast_attn.testing_cases.AttentionSpec`` with
    seqlen_q == seqlen_k, or a ``VarlenSpec`` with lens_q == lens_k for "ring_varlen"),
    on ``backend``, inputs from ``seed``."""

    scheme: str
    layout: str
    spec: Any
    backend: str = "torch"
    seed: int = 0

    @property
    def label(self) -> str:
        from fast_attn.testing_cases import label

        return f"{self.scheme}/{self.layout}/{self.backend}/{label(self.spec)}"


def _options(spec) -> dict:
    options = dict(causal=spec.causal, window_size=tuple(spec.window), softcap=spec.softcap)
    if getattr(spec, "softmax_scale", 0.0):
        options["softmax_scale"] = spec.softmax_scale
    return options


def _distributed_run(case: RingCase) -> Callable:
    from fast_attn.distributed import ring_attention, ring_attention_varlen, ulysses_attention, unshard_sequence

    fn = {"ring": ring_attention, "ulysses": ulysses_attention}.get(case.scheme)

    def run(inputs, backend):
        q, k, v = (shard_replicated(inputs[n], case.layout) for n in ("q", "k", "v"))
        out, lse = fn(q, k, v, **_options(case.spec), alibi_slopes=inputs.get("alibi_slopes"), return_lse=True,
                      deterministic=case.spec.deterministic, backend=backend, layout=case.layout)
        return {"out": gather_replicated(out, case.layout), "lse": unshard_sequence(lse, layout=case.layout, seq_dim=2)}

    def run_varlen(inputs, backend):
        cu = inputs["cu_seqlens_q"]
        q, k, v = (shard_replicated(inputs[n], case.layout, cu_seqlens=cu) for n in ("q", "k", "v"))
        out, lse = ring_attention_varlen(q, k, v, cu, max(case.spec.lens_q), **_options(case.spec), return_lse=True,
                                         deterministic=case.spec.deterministic, backend=backend, layout=case.layout)
        lse = unshard_sequence(lse.t(), layout=case.layout, cu_seqlens=cu).t()  # (H, total)
        return {"out": gather_replicated(out, case.layout, cu_seqlens=cu), "lse": lse}

    return run_varlen if case.scheme == "ring_varlen" else run


def _against_single_process(evaluation, case, single) -> list[str]:
    """The tolerance rule with single-process ``fast_attn.attention`` in the oracle's place
    (the baseline error is still plain PyTorch's in the input dtype, measured against it)."""
    from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, compare
    from fast_attn.testing_cases import _with_grads

    failures = []
    inputs = single["inputs"]
    baseline, baseline_grads, _ = _with_grads(case, inputs, lambda i: case.ref(i, False), single["cotangents"])
    pairs = [(n, evaluation.outputs[n], single["outputs"][n], baseline[n], OUTPUT_FACTOR, False)
             for n in evaluation.outputs]
    pairs += [(f"d{n}", evaluation.grads[n], single["grads"][n], baseline_grads[n], GRAD_FACTOR, True)
              for n in evaluation.grads]
    for name, actual, reference, base, factor, gradient in pairs:
        c = compare(actual, reference.double(), base.double(), factor=factor, gradient=gradient)
        if not c:
            failures.append(f"{name} vs single-process fast_attn.attention: {c}")
    return failures


def _single_process(case, backend: str, seed: int) -> dict:
    """Single-process ``fast_attn.attention`` on the same inputs and cotangents as
    ``evaluate`` draws (the same generator sequence)."""
    from fast_attn.testing_cases import _with_grads

    gen = torch.Generator().manual_seed(seed)
    inputs = case.make(torch.device("cpu"), gen)
    outputs, grads, cotangents = _with_grads(case, inputs, lambda i: case.run(i, backend), gen=gen)
    return {"inputs": inputs, "outputs": outputs, "grads": grads, "cotangents": cotangents}


def check_attention(cases: list) -> list[tuple[str, bool, str]]:
    """Rank side: every case's (label, passed, report). fp64 inputs are held to the fp32
    rule (the op's LSE, which the merge uses, is fp32)."""
    from fast_attn.testing_cases import build, evaluate

    report = []
    for case in cases:
        single_case = build(case.spec)
        dist_case = dataclasses.replace(single_case, run=_distributed_run(case))
        evaluation = evaluate(dist_case, case.backend, "cpu", seed=case.seed)
        failures = list(evaluation.failures) + [str(c) for c in evaluation.checks if not c.ok]
        worst = max((c.ratio for c in evaluation.checks), default=0.0)
        if case.spec.dtype == "float64":
            fp32_failures, worst = _fp64_as_fp32(dist_case, case, evaluation)
            failures = list(evaluation.failures) + fp32_failures
        else:
            single = _single_process(single_case, case.backend, case.seed)
            failures += _against_single_process(evaluation, single_case, single)
        report.append((case.label, not failures, "; ".join(failures) or f"worst error/allowed {worst:.2f}"))
    return report


def _fp64_as_fp32(dist_case, case, evaluation) -> list[str]:
    """fp64 inputs: the rule with the fp32 baseline (plain PyTorch in fp32 on the same inputs)."""
    from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, compare
    from fast_attn.testing_cases import _with_grads

    gen = torch.Generator().manual_seed(case.seed)
    inputs = dist_case.make(torch.device("cpu"), gen)
    _, _, cotangents = _with_grads(dist_case, inputs, lambda i: dist_case.ref(i, True), gen=gen)
    oracle, oracle_grads, _ = _with_grads(dist_case, inputs, lambda i: dist_case.ref(i, True), cotangents)
    f32 = {n: (t.float() if t.is_floating_point() and n != "alibi_slopes" else t) for n, t in inputs.items()}
    base, base_grads, _ = _with_grads(dist_case, f32, lambda i: dist_case.ref(i, False), cotangents)
    failures, worst = [], 0.0
    for name, value in evaluation.outputs.items():
        c = compare(value.float(), oracle[name], base[name].double(), factor=OUTPUT_FACTOR)
        if not c:
            failures.append(f"{name} (fp32 rule): {c}")
        worst = max(worst, c.ratio)
    for name, value in evaluation.grads.items():
        c = compare(value.float(), oracle_grads[name], base_grads[name].double(), factor=GRAD_FACTOR, gradient=True)
        if not c:
            failures.append(f"d{name} (fp32 rule): {c}")
        worst = max(worst, c.ratio)
    return failures, worst


# ------------------------------------------------------------------ determinism


def _fwd_bwd(case: RingCase) -> list[Tensor]:
    """Outputs and gradients of one distributed run of ``case`` (on this rank)."""
    from fast_attn.testing_cases import _with_grads, build

    single_case = build(case.spec)
    dist_case = dataclasses.replace(single_case, run=_distributed_run(case))
    gen = torch.Generator().manual_seed(case.seed)
    inputs = dist_case.make(torch.device("cpu"), gen)
    outputs, grads, _ = _with_grads(dist_case, inputs, lambda i: dist_case.run(i, case.backend), gen=gen)
    return [*outputs.values(), *grads.values()]


def check_determinism(cases: list, repeats: int = 2) -> list[tuple[str, bool, str]]:
    """Rank side: each case run ``repeats`` times gives bitwise the same outputs and gradients."""
    report = []
    for case in cases:
        first = _fwd_bwd(case)
        same = all(all(torch.equal(a, b) for a, b in zip(first, _fwd_bwd(case))) for _ in range(repeats - 1))
        report.append((case.label, same, "bitwise equal" if same else "runs differ"))
    return report


# ------------------------------------------------------------------ bad input


def _expect(name: str, exc: type, fragment: str, fn: Callable) -> tuple[str, bool, str]:
    try:
        fn()
    except exc as error:
        ok = fragment in str(error)
        return name, ok, str(error) if ok else f"message lacks {fragment!r}: {error}"
    except Exception as error:  # the wrong exception type
        return name, False, f"raised {type(error).__name__}: {error}"
    return name, False, "no exception"


def check_bad_inputs() -> list[tuple[str, bool, str]]:
    """Rank side: every bad input raises a clear error naming the argument (on every rank,
    so that no rank is left waiting in a collective)."""
    from fast_attn.distributed import (
        ring_attention,
        ring_attention_varlen,
        shard_sequence,
        ulysses_attention,
    )

    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(1, 8, 4, 16)
    mine = torch.randn(1, 8 + 2 * rank, 4, 16)  # a different length on every rank
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    slopes = torch.rand(4, requires_grad=True)
    checks = [
        ("shards of different lengths", ValueError, "S_local in [8, ",
         lambda: ring_attention(mine, mine, mine, causal=True)),
        ("shards of different lengths (ulysses)", ValueError, "S_local in [8, ",
         lambda: ulysses_attention(mine, mine, mine)),
        ("odd local length with zigzag", ValueError, "must be even",
         lambda: ring_attention(x[:, :7], x[:, :7], x[:, :7])),
        ("sequence the layout cannot split", ValueError, f"multiple of {2 * world}",
         lambda: shard_sequence(torch.randn(1, 2 * world + 1, 4, 16))),
        ("unknown layout", ValueError, "layout must be one of",
         lambda: ring_attention(x, x, x, layout="striped")),
        ("heads not divisible by the world size", ValueError, "must be a multiple of the world size",
         lambda: ulysses_attention(torch.randn(1, 8, 2 * world + 1, 16), x[:, :, :1], x[:, :, :1])),
        ("mixed devices", ValueError, "k must be on the same device as q",
         lambda: ring_attention(x, x.to("meta"), x)),
        ("k of another length than q", ValueError, "k must have q's local sequence length",
         lambda: ring_attention(x, x[:, :4], x[:, :4])),
        ("alibi_slopes that require grad", NotImplementedError, "alibi_slopes",
         lambda: ring_attention(x, x, x, alibi_slopes=slopes)),
        ("varlen rows that do not match cu_seqlens", ValueError, "cu_seqlens gives rank",
         lambda: ring_attention_varlen(torch.randn(3, 4, 16), torch.randn(3, 4, 16), torch.randn(3, 4, 16), cu, 7)),
        ("varlen cu_seqlens dtype", TypeError, "cu_seqlens must be a 1-D int32",
         lambda: ring_attention_varlen(x[0], x[0], x[0], cu.long(), 7)),
        ("varlen max_seqlen too small", ValueError, "max_seqlen",
         lambda: ring_attention_varlen(x[0], x[0], x[0], cu, 3)),
    ]
    return [_expect(*check) for check in checks]


def run_suite(cases: list, determinism_cases: list = (), bad_inputs: bool = False) -> dict:
    """Rank side of one spawned test module: every check, one process group."""
    return {
        "cases": check_attention(cases),
        "determinism": check_determinism(list(determinism_cases)),
        "bad_inputs": check_bad_inputs() if bad_inputs else [],
    }


def fail_on_rank(rank: int) -> None:
    """Rank side of the harness's own test: rank ``rank`` raises, the others wait in a
    collective that never completes (the harness must stop them)."""
    if dist.get_rank() == rank:
        raise ValueError(f"rank {rank} fails on purpose")
    dist.barrier()
