"""python -m fast_attn.verify: every available backend x op x feature against the reference.

For each case of ``fast_attn.testing_cases`` (the generator the tests use; on a GPU
without --quick its GPU sweep too), in each requested dtype, and each backend that is
available here and declares the case's features, the op runs on fresh random inputs
through the public API; its outputs and input gradients are compared with the tolerance
rule of ``fast_attn.testing`` (oracle: the reference in fp64; baseline: the reference in
the input dtype). Uninitialised memory is filled with NaN while it runs
(``testing_cases.nan_poisoned``), so an output element a kernel never writes shows up as
a failure.

Shows progress as it goes (on a terminal one updating line: checks done / total, the
current op, backend and case, elapsed time; otherwise a line at least every
``PROGRESS_EVERY_S`` seconds), a line per op and backend (checks, failures, elapsed
time), then a pass/fail matrix (cells are the worst error / allowed-error ratio: <= 1
passes) and exits 1 on any failure.

    python -m fast_attn.verify [--quick] [--interpret] [--ops rms_norm,attention]
                               [--backends cuda,triton] [--dtype bf16] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_SHORT_DTYPE = {value: key for key, value in _DTYPES.items()}
_BACKENDS = ("cuda", "triton", "torch")  # fast_attn.backends.BACKENDS (checked in _parse)
# Non-terminal output: a progress line when nothing was printed for this long.
PROGRESS_EVERY_S = 10.0
# Terminal: how often the status line's elapsed time is refreshed.
TTY_REFRESH_S = 1.0
# Measured on the 2-core CPU development machine (no GPU) on 2026-12-07, other work sharing
# the cores: --quick 9 s (load 0.4-0.5); --quick --interpret 447 s (load 0.5 rising to 5)
# and 444 s (load 3.7-4.7), 89% of it the Triton interpreter on the 84 attention,
# attention_varlen and attention_with_kvcache checks (2-22 s each, spread over every
# feature case: no few big cases to cut). benchmarks/NOTES.md has the entry.
QUICK_HELP = ("the small cases only (testing_cases' quick subset): about 10 s on a 2-core CPU; with "
              "--interpret about 7.5 min there, nearly all of it the Triton interpreter on the attention ops")


def _comma_list(choices, what):
    """An argparse type: a comma-separated subset of ``choices`` (order kept, no repeats);
    an unknown name is a usage error naming the choices."""

    def parse(text: str) -> list:
        names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(repr(n) for n in unknown)}; choose from {','.join(choices)}")
        if not names:
            raise argparse.ArgumentTypeError(f"no {what} given; choose from {','.join(choices)}")
        return names

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m fast_attn.verify", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    parser.add_argument("--interpret", action="store_true",
                        help="run the Triton kernels through the Triton interpreter on CPU (sets TRITON_INTERPRET=1)")
    parser.add_argument("--ops", default="",
                        help="comma-separated subset of the fast_attn ops (fast_attn.backends.OPS: attention, "
                             "attention_varlen, attention_with_kvcache, layer_norm, rms_norm, bias_gelu, swiglu, "
                             "geglu, rotary; default: all)")
    parser.add_argument("--backends", type=_comma_list(_BACKENDS, "backend"), default=None,
                        help="comma-separated subset of cuda,triton,torch (default: all available)")
    parser.add_argument("--dtype", type=_comma_list(tuple(_DTYPES), "dtype"), default=None,
                        help="comma-separated subset of fp16,bf16,fp32 (default: bf16,fp16 on GPU; fp32,bf16 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args(argv)
    if args.interpret:
        # Must be set before triton is imported anywhere in this process.
        os.environ["TRITON_INTERPRET"] = "1"
    from fast_attn import backends

    if tuple(backends.BACKENDS) != _BACKENDS:  # keep the help text and the choices true
        raise AssertionError(f"verify's backend list {_BACKENDS} differs from fast_attn.backends {backends.BACKENDS}")
    try:
        args.ops = _comma_list(tuple(backends.OPS), "op")(args.ops) if args.ops else list(backends.OPS)
    except argparse.ArgumentTypeError as error:
        parser.error(f"argument --ops: {error}")
    return args


class _Progress:
    """Progress of the checks: on a terminal one status line rewritten in place (refreshed
    every ``TTY_REFRESH_S`` by a background thread, so the elapsed time moves during a
    slow check); otherwise a line whenever nothing was printed for ``every_s`` seconds.
    ``print`` writes a normal line (the status line is cleared first)."""

    def __init__(self, total: int, stream=None, tty=None, every_s: float = PROGRESS_EVERY_S):
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.done, self.current = total, 0, "starting"
        self.every_s = TTY_REFRESH_S if self.tty else every_s
        self.start = self.last_line = time.perf_counter()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._tick, name="verify-progress", daemon=True)
        self.thread.start()

    def _status(self) -> str:
        width = len(str(self.total))
        return (f"[{self.done:{width}d}/{self.total} checks] {self.current}, "
                f"{time.perf_counter() - self.start:.0f} s elapsed")

    def _tick(self) -> None:
        while not self.stop_event.wait(min(self.every_s, 1.0)):
            with self.lock:
                if self.tty:
                    self._write_status()
                elif time.perf_counter() - self.last_line >= self.every_s:
                    self._line(f"  ... {self._status()}")

    def _write_status(self) -> None:
        self.stream.write("\r\x1b[K" + self._status()[:160])
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_line = time.perf_counter()
        if self.tty:
            self._write_status()

    def begin(self, text: str) -> None:
        """A check starts: ``text`` names it."""
        with self.lock:
            self.current = text
            if self.tty:
                self._write_status()

    def advance(self) -> None:
        """A check ended."""
        with self.lock:
            self.done += 1
            if self.tty:
                self._write_status()

    def print(self, text: str) -> None:
        with self.lock:
            self._line(text)

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join()
        if self.tty:
            with self.lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    from fast_attn import backends

    statuses = backends.available_backends()
    wanted = args.backends or list(backends.BACKENDS)
    names = [name for name in wanted if statuses[name]]
    on_gpu = torch.cuda.is_available()
    dtype_names = args.dtype or (["bf16", "fp16"] if on_gpu else ["fp32", "bf16"])
    dtypes = [getattr(torch, _DTYPES[d]) for d in dtype_names]

    print(f"fast_attn.verify: torch {torch.__version__}, device {'cuda: ' + torch.cuda.get_device_name() if on_gpu else 'cpu'}")
    for name, status in statuses.items():
        mark = "yes" if status else "no "
        print(f"  {name:7s} {mark}  {status.reason}")
    if not on_gpu:
        print("  (no CUDA GPU: the cuda backend and the Triton kernels on GPU are not verified by this run)")

    from fast_attn import testing_cases

    specs = [spec for spec in testing_cases.all_specs(gpu=on_gpu and not args.quick)
             if (spec.quick or not args.quick) and spec.op in args.ops]
    # every case in every requested dtype (a case's own dtype is the tests' choice)
    variants = list(dict.fromkeys(dataclasses.replace(spec, dtype=str(dtype)[6:]) for spec in specs for dtype in dtypes))
    plan = []  # (op, its cases, per backend: (column, name, device, the cases it runs))
    for op in dict.fromkeys(spec.op for spec in variants):
        op_cases = [testing_cases.build(spec) for spec in variants if spec.op == op]
        columns = []
        for column, name in enumerate(names):
            device = _device_for(name, statuses[name], on_gpu)
            runs = [case for case in op_cases if backends.why_not(name, case.call(device.type), statuses) is None]
            columns.append((column, name, device, runs))
        plan.append((op, op_cases, columns))
    total = sum(len(runs) for _, _, columns in plan for *_, runs in columns)
    print(f"{total} checks: {len(plan)} op(s) x backends {names} x dtypes {dtype_names}"
          f"{' (quick)' if args.quick else ''}{' (Triton interpreter)' if args.interpret else ''}", flush=True)

    failures = 0
    rows = []
    start = time.perf_counter()
    progress = _Progress(total)
    try:
        with testing_cases.nan_poisoned():
            for op, op_cases, columns in plan:
                cells = {id(case): ["-"] * len(names) for case in op_cases}
                for column, name, device, runs in columns:
                    op_failures, op_start = 0, time.perf_counter()
                    for case in runs:
                        progress.begin(f"{op} {name} {case.label}")  # the label names the dtype
                        ok, ratio, detail = _check(case, name, device, args.seed)
                        progress.advance()
                        op_failures += not ok
                        cells[id(case)][column] = f"{'ok' if ok else 'FAIL'} {ratio:.2f}"
                        if detail:
                            progress.print(f"FAIL {op} [{case.label}] {name}: {detail}")
                    failures += op_failures
                    progress.print(f"  {op:24s} {name:7s} {len(runs):3d} checks, {op_failures} failed, "
                                   f"{time.perf_counter() - op_start:6.1f} s (total {time.perf_counter() - start:6.1f} s)")
                for case in op_cases:
                    rows.append((op, testing_cases.label(dataclasses.replace(case.spec, dtype="")),
                                 _SHORT_DTYPE[case.spec.dtype], cells[id(case)]))
    finally:
        progress.close()
    _print_matrix(names, rows)
    elapsed = time.perf_counter() - start
    print(f"\n{len(rows) * len(names)} cells, {failures} failure(s), {elapsed:.1f} s "
          "(cell: ok/FAIL and worst error / allowed error; '-' = backend does not implement it)")
    return 1 if failures else 0


def _device_for(name, status, on_gpu):
    import torch

    if name == "torch":
        return torch.device("cuda" if on_gpu else "cpu")
    return torch.device("cuda" if "cuda" in status.devices else "cpu")


def _check(case, backend, device, seed):
    """(ok, worst ratio, failure detail) for one case on one backend."""
    from fast_attn import testing_cases

    try:
        result = testing_cases.evaluate(case, backend, device, seed=seed)
    except Exception as error:  # a crash is a failure of this cell, not of the whole run
        return False, float("inf"), f"{type(error).__name__}: {error}"
    return result.ok, result.worst, result.report()


def _print_matrix(names, rows):
    header = ["op", "case", "dtype"] + names
    table = [header] + [[op, label, dtype] + cells for op, label, dtype, cells in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    print()
    for index, row in enumerate(table):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    sys.exit(main())
