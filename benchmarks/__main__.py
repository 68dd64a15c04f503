"""python -m benchmarks: run the suite, print the tables, write JSON, CSV, Markdown and plots.

    python -m benchmarks                         # every op, protocol shapes (GPU) or small ones (CPU)
    python -m benchmarks --quick                 # fewer shapes, shorter timing windows
    python -m benchmarks --ops attention,norm --backends triton,cuda --dtype fp16
    python -m benchmarks --ops rms_norm --dtype fp32 --seed 1   # --ops also takes fast_attn op names
    python -m benchmarks --out DIR               # default benchmarks/results/<date>-<gpu or cpu>/
    python -m benchmarks --compare OLD.json      # run, then print what got faster / slower
    python -m benchmarks --compare OLD.json NEW.json   # compare two runs, run nothing
    python -m benchmarks overhead [--quick] [--out DIR] # host cost per call; fast_attn.nn vs torch.nn
    python -m benchmarks context_parallel [--worlds 2,4] # ring / all-to-all attention over processes

Without a CUDA GPU it runs what it can (the torch backend and torch's eager peers at
small sizes), says that GPU figures need a GPU, writes the files and exits 0. CPU rows
record their number of samples and spread; noisy ones are marked and never ranked
(benchmarks/NOTES.md, "Timing").
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from benchmarks import bench_attention, bench_block, bench_decode, bench_ffn, bench_norm, common, report

# Option name -> the bench file it selects. The fast_attn op names each file COVERS (and
# its OPS) select single ops of a file: --ops rms_norm.
MODULES = {"attention": bench_attention, "decode": bench_decode, "norm": bench_norm,
           "ffn": bench_ffn, "block": bench_block}
EXIT_INTERRUPTED = 130
EXIT_USAGE = 2  # argparse's status for a bad command line


def _op_names(module) -> tuple:
    """The case ``op`` names a bench file produces (what --ops may name besides the file)."""
    return tuple(getattr(module, "OPS", ())) or (module.OP,)


def _aliases() -> dict:
    """fast_attn op names (``fast_attn.backends.OPS``, verify's --ops) that are not case op
    names -> the case ops that benchmark them: attention_with_kvcache -> decode."""
    aliases = {}
    for module in MODULES.values():
        for covered in module.COVERS:
            if covered not in _op_names(module):
                aliases[covered] = _op_names(module)
    return aliases


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="python -m benchmarks overhead [--quick] [--out DIR]: the host cost "
                                            "per call of each op, and fast_attn.nn vs torch.nn; python -m benchmarks "
                                            "context_parallel [--sizes ...] [--worlds ...]: ring and all-to-all "
                                            "attention over processes (each its own --help)")
    single = sorted({op for m in MODULES.values() for op in _op_names(m)} - set(MODULES))
    aliases = _aliases()
    quick, full = common.CPU_RULES[True], common.CPU_RULES[False]
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and shorter timing windows (CPU: each row times until "
                             f">= {quick.min_samples} calls and {quick.min_s} s, at most {quick.max_s:.0f} s, instead of "
                             f">= {full.min_samples} and {full.min_s} s, at most {full.max_s:.0f} s)")
    parser.add_argument("--ops", default="",
                        help=f"comma-separated subset of {','.join(MODULES)} (or single ops: {','.join(single)}; "
                             + ", ".join(f"{a} = {','.join(o)}" for a, o in aliases.items()) + "); default: all")
    parser.add_argument("--backends", default="",
                        help="comma-separated fast_attn backends to measure (cuda,triton,torch); default: "
                             "every available one. Peers are always measured")
    parser.add_argument("--dtype", default="bf16", choices=list(common.DTYPES),
                        help="inputs and ceilings in this dtype (default bf16); a case an implementation "
                             "does not take in it is a skipped row saying so")
    parser.add_argument("--out", default="",
                        help="output folder (default benchmarks/results/<date>-<gpu or cpu>/)")
    parser.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                        help="OLD.json: after the run, print what got more than 5%% faster or slower; "
                             "OLD.json NEW.json: only compare two earlier runs")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no new case after this many seconds (the rest are recorded as skipped); "
                             "0: no limit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args(argv)
    if args.compare is not None and len(args.compare) > 2:
        parser.error("--compare takes OLD.json, or OLD.json NEW.json")
    from fast_attn import backends

    wanted = [name for name in args.ops.split(",") if name]
    valid = set(MODULES) | set(single) | set(aliases)
    unknown = [name for name in wanted if name not in valid]
    if unknown:
        no_bench = [name for name in unknown if name in backends.OPS]
        parser.error(f"--ops: unknown {unknown}" + (f" ({', '.join(no_bench)}: no benchmark yet)" if no_bench else "")
                     + f"; choose from {sorted(valid)}")
    args.ops = list(dict.fromkeys(op for name in wanted for op in aliases.get(name, (name,))))

    args.backends = [name for name in args.backends.split(",") if name]
    bad = [name for name in args.backends if name not in backends.BACKENDS]
    if bad:
        parser.error(f"--backends: unknown {bad}; choose from {list(backends.BACKENDS)}")
    return args


def _selected_cases(args, ctx) -> list:
    """Cases of the selected files and ops, in file order."""
    cases = []
    for name, module in MODULES.items():
        ops = _op_names(module)
        if args.ops and name not in args.ops and not set(ops) & set(args.ops):
            continue
        keep = set(ops) if (not args.ops or name in args.ops) else set(ops) & set(args.ops)
        cases += [case for case in module.cases(ctx) if case.op in keep]
    return cases


class _Stop(BaseException):
    """SIGTERM arrived (e.g. from `timeout`): stop measuring, write what exists. A
    BaseException, so that no ``except Exception`` around one case swallows it."""


def _on_sigterm(signum, frame):
    raise _Stop()


class _Progress:
    """tqdm when it is installed and stderr is a terminal, else one printed line per case."""

    def __init__(self, total: int):
        self.total, self.count = total, 0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, case) -> None:
        self.count += 1
        text = f"{case.op} {case.impl} {case.label}"
        if self.bar is not None:
            self.bar.set_description_str(text[:70])
        else:
            print(f"[{self.count:{len(str(self.total))}d}/{self.total}] {text}", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _skipped_rows(case, ctx, reason: str) -> list:
    rows, _ = common.run_case(
        common.Case(case.op, case.impl, case.ours, case.shape, case.passes, case.work, skip=reason,
                    note=case.note), ctx, {})
    return rows


def run(args) -> tuple[dict, bool]:
    """Measures everything selected; (the result dict, whether the run was interrupted)."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen, not_measured, statuses = common.select_backends(args.backends, device)
    ctx = common.Context(device=device, dtype=common.DTYPES[args.dtype], quick=args.quick,
                         backends=chosen, statuses=statuses)
    threads_before = torch.get_num_threads()
    if not ctx.on_gpu:
        torch.set_num_threads(common.cpu_threads())
    env = common.environment(device)
    if not ctx.on_gpu:
        print(f"NOTE: {report.cpu_note(env)}", flush=True)
    notes = []
    print(f"benchmarks: {env['gpu'] or 'CPU'}; torch {env['torch']}, triton {env['triton']}; "
          f"measuring fast_attn backends {list(chosen)}", flush=True)
    for name, reason in not_measured.items():
        print(f"  backend {name} not measured: {reason}", flush=True)

    ceilings = common.measure_ceilings(ctx)
    cases = _selected_cases(args, ctx)
    rows, interrupted, fatal, index = [], False, None, 0
    progress = _Progress(len(cases))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for index, case in enumerate(cases):
            reason = None
            if fatal:
                reason = f"not run: the CUDA context was lost earlier ({fatal})"
            elif args.budget_s and time.perf_counter() - started > args.budget_s:
                reason = f"not run: the time budget (--budget-s {args.budget_s:.0f}) was spent"
            if reason:
                rows += _skipped_rows(case, ctx, reason)
                continue
            progress.start(case)
            case_rows, fatal = common.run_case(case, ctx, ceilings)
            rows += case_rows
            progress.done()
    except (_Stop, KeyboardInterrupt):
        interrupted = True
        for case in cases[index:]:
            rows += _skipped_rows(case, ctx, "not run: the run was interrupted")
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
        torch.set_num_threads(threads_before)
    if interrupted:
        notes.append("the run was interrupted: rows marked 'not run' were not measured")
    if fatal:
        notes.append(f"the CUDA context was lost ({fatal}): the cases after it were not run")
    over_budget = sum("time budget" in row["note"] for row in rows if row["status"] == "skipped")
    if over_budget:
        notes.append(f"the time budget (--budget-s {args.budget_s:.0f}) ran out: {over_budget} rows not measured")

    report.add_ratios(rows)
    env["loadavg_1m_end"] = common.loadavg_1m()
    if not ctx.on_gpu:
        notes.insert(0, report.cpu_note(env))
    from fast_attn import backends

    covered = {op for module in MODULES.values() for op in module.COVERS}
    result = {
        "schema": report.SCHEMA,
        "env": env,
        "ceilings": ceilings,
        "settings": {"quick": args.quick, "dtype": args.dtype, "ops": args.ops or list(MODULES),
                     "backends": list(chosen), "seed": args.seed,
                     "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in args.argv)},
        "backends": {name: {"measured": name in chosen, "reason": not_measured.get(name, statuses[name].reason)}
                     for name in backends.BACKENDS},
        "uncovered_ops": [op for op in backends.OPS if op not in covered],
        "notes": notes,
        "elapsed_s": time.perf_counter() - started,
        "rows": rows,
    }
    return result, interrupted


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["overhead"]:  # a subcommand with its own options (benchmarks/bench_overhead.py)
        from benchmarks import bench_overhead

        return bench_overhead.main(argv[1:])
    if argv[:1] == ["context_parallel"]:  # ring / all-to-all over processes (bench_context_parallel.py)
        from benchmarks import bench_context_parallel

        bench_context_parallel.main(argv[1:], prog="python -m benchmarks context_parallel")
        return 0
    args = _parse(argv)
    args.argv = argv
    try:  # read the files to compare before measuring anything: fail early on a bad one
        compared = [report.load(Path(path)) for path in args.compare or ()]
    except (OSError, ValueError) as exc:
        print(f"python -m benchmarks: error: --compare: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if len(compared) == 2:
        report.print_compare(*compared)
        return 0
    old = compared[0] if compared else None

    result, interrupted = run(args)
    out = Path(args.out) if args.out else common.default_results_dir(result["env"]["gpu"])
    print()
    report.print_report(result)
    paths = report.write_all(result, out)
    print(f"\nwrote {paths['json']}, {paths['csv']}, {paths['markdown']}"
          + (f" and {len(paths['plots'])} plots" if paths["plots"] else f"; plots {paths['plot_note']}"))
    counts = {s: sum(r["status"] == s for r in result["rows"]) for s in ("ok", "skipped", "error")}
    print(f"{len(result['rows'])} rows: {counts['ok']} measured, {counts['skipped']} skipped, "
          f"{counts['error']} errors; {result['elapsed_s']:.1f} s")
    if old is not None:
        report.print_compare(old, result)
    return EXIT_INTERRUPTED if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
