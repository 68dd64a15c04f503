"""The main job of `bash scripts/dev.sh main [options]`: verify, then benchmark.

Runs ``python -m fast_attn.verify`` (every available backend against the reference) and
then ``python -m benchmarks`` (every op against the peers and the hardware ceilings), each
in its own process, and gives each tool the options it takes:

    option            verify   benchmarks
    --quick             yes       yes       a subset of the cases, shorter timing
    --interpret         yes       no        Triton kernels through the Triton interpreter (CPU)
    --dtype D           yes       yes       fp16, bf16 or fp32 (default: each tool's own)
    --ops A,B           yes       yes       op names or benchmark groups (table below)
    --backends A,B      yes       yes       a subset of cuda, triton, torch
    --seed N            yes       yes       seed of the random inputs
    --out DIR           (log)     yes       results folder (default benchmarks/results/<date>-<gpu|cpu>/)
    --compare OLD.json  no        yes       after the run, what got faster or slower
    --budget-s S        no        yes       start no new benchmark case after S seconds

``--ops`` takes the names of ``fast_attn.backends.OPS`` and the benchmark groups
(attention: attention and attention_varlen; decode: attention_with_kvcache; norm:
layer_norm and rms_norm; ffn: bias_gelu, swiglu and geglu; rotary: verify only; block:
the transformer block, benchmark only); a tool left with nothing to do is skipped, and says so.

Writes under the results folder: verify.txt (verify's output, which is also printed),
and the benchmark's results.json, results.csv, report.md and plots/. Exits 1 when
verify finds a failure, else with the benchmark's status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("fp16", "bf16", "fp32")
# --ops name -> (verify's op names, the benchmark's --ops names)
SINGLE_OPS = ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "geglu")
OP_NAMES = {
    "attention": (("attention", "attention_varlen"), ("attention",)),
    "attention_varlen": (("attention_varlen",), ()),
    "decode": (("attention_with_kvcache",), ("decode",)),
    "attention_with_kvcache": (("attention_with_kvcache",), ("decode",)),
    "norm": (("layer_norm", "rms_norm"), ("norm",)),
    "ffn": (("bias_gelu", "swiglu", "geglu"), ("ffn",)),
    "block": ((), ("block",)),
    "rotary": (("rotary",), ()),  # verify only: no rotary benchmark yet
    **{name: ((name,), (name,)) for name in SINGLE_OPS},
}
BACKENDS = ("cuda", "triton", "torch")


def comma_list(choices, what):
    """An argparse type: a comma-separated subset of ``choices``, order kept."""

    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bash scripts/dev.sh main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset of the cases, shorter timing (both tools)")
    parser.add_argument("--interpret", action="store_true",
                        help="verify the Triton kernels through the Triton interpreter on CPU (verify only)")
    parser.add_argument("--dtype", choices=DTYPES, help="the dtype of both tools (default: each tool's own)")
    parser.add_argument("--ops", type=comma_list(tuple(OP_NAMES), "op"),
                        help="comma-separated ops or benchmark groups (default: all)")
    parser.add_argument("--backends", type=comma_list(BACKENDS, "backend"),
                        help="comma-separated fast_attn backends (default: every available one)")
    parser.add_argument("--seed", type=int, help="seed of the random inputs (both tools)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<date>-<gpu|cpu>/)")
    parser.add_argument("--compare", metavar="OLD.json", help="benchmark only: compare with an earlier run")
    parser.add_argument("--budget-s", type=float, help="benchmark only: start no new case after this many seconds")
    return parser.parse_args(argv)


def tool_commands(args: argparse.Namespace, out: Path) -> tuple[list[str] | None, list[str] | None]:
    """(verify's argv, the benchmark's argv) after ``python -m``; None for a tool with
    nothing to do (every selected op belongs to the other tool only)."""
    verify, bench = ["fast_attn.verify"], ["benchmarks", "--out", str(out)]
    if args.quick:
        verify.append("--quick")
        bench.append("--quick")
    if args.interpret:
        verify.append("--interpret")
    for flag, value in (("--dtype", args.dtype), ("--seed", args.seed)):
        if value is not None:
            verify += [flag, str(value)]
            bench += [flag, str(value)]
    if args.backends:
        verify += ["--backends", ",".join(args.backends)]
        bench += ["--backends", ",".join(args.backends)]
    if args.compare:
        bench += ["--compare", args.compare]
    if args.budget_s is not None:
        bench += ["--budget-s", str(args.budget_s)]
    if args.ops:
        verify_ops = list(dict.fromkeys(op for name in args.ops for op in OP_NAMES[name][0]))
        bench_ops = list(dict.fromkeys(op for name in args.ops for op in OP_NAMES[name][1]))
        verify = verify + ["--ops", ",".join(verify_ops)] if verify_ops else None
        bench = bench + ["--ops", ",".join(bench_ops)] if bench_ops else None
    return verify, bench


def default_out() -> Path:
    """The benchmark's own default folder (``benchmarks.common.default_results_dir``)."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a folder of the checkout
    from benchmarks.common import default_results_dir

    return default_results_dir(torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def run_logged(argv: list[str], log: Path) -> int:
    """Runs ``python -m argv`` in the checkout, its output printed and written to ``log``."""
    with log.open("w") as handle, subprocess.Popen(
            [sys.executable, "-u", "-m", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            handle.write(line)
    return process.returncode


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    verify, bench = tool_commands(args, out)
    status = 0
    for name, command in (("verify", verify), ("benchmarks", bench)):
        if command is None:
            print(f"main job: no {name} run: none of --ops {','.join(args.ops)} is one of its ops", flush=True)
            continue
        print(f"main job: python -m {' '.join(command)}", flush=True)
        start = time.monotonic()
        if name == "verify":
            code = run_logged(command, out / "verify.txt")
            status = status or (1 if code else 0)
        else:
            code = subprocess.call([sys.executable, "-m", *command], cwd=REPO_ROOT)
            status = status or code
        print(f"main job: {name} exited {code} after {time.monotonic() - start:.0f} s", flush=True)
    print(f"main job: results in {out}/ (verify.txt, report.md, results.json, results.csv, plots/)")
    return status


if __name__ == "__main__":
    sys.exit(main())
