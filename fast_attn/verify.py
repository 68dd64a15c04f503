"""python -m fast_attn.verify: every available backend x op x feature against the reference.

For each case of ``fast_attn.testing_cases`` (the generator the tests use; on a GPU
without --quick its GPU sweep too), in each requested dtype, and each backend that is
available here and declares the case's features, the op runs on fresh random inputs
through the public API; its outputs and input gradients are compared with the tolerance
rule of ``fast_attn.testing`` (oracle: the reference in fp64; baseline: the reference in
the input dtype). Uninitialised memory is filled with NaN while it runs
(``testing_cases.nan_poisoned``), so an output element a kernel never writes shows up as
a failure.

Prints a line per op and backend as it goes (checks, failures, elapsed time), then a
pass/fail matrix (cells are the worst error / allowed-error ratio: <= 1 passes)
and exits 1 on any failure.

    python -m fast_attn.verify [--quick] [--interpret] [--backends cuda,triton] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_SHORT_DTYPE = {value: key for key, value in _DTYPES.items()}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m fast_attn.verify", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of the cases (about a minute on CPU)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the Triton kernels through the Triton interpreter on CPU (sets TRITON_INTERPRET=1)")
    parser.add_argument("--backends", default="", help="comma-separated subset of cuda,triton,torch (default: all available)")
    parser.add_argument("--dtype", default="", help="comma-separated subset of fp16,bf16,fp32 (default: bf16,fp16 on GPU; fp32,bf16 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.interpret:
        # Must be set before triton is imported anywhere in this process.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from fast_attn import backends

    statuses = backends.available_backends()
    wanted = [b for b in args.backends.split(",") if b] or list(backends.BACKENDS)
    for name in wanted:
        backends.check_name(name, allow_auto=False)
    names = [name for name in wanted if statuses[name]]
    on_gpu = torch.cuda.is_available()
    dtype_names = [d for d in args.dtype.split(",") if d] or (["bf16", "fp16"] if on_gpu else ["fp32", "bf16"])
    dtypes = [getattr(torch, _DTYPES[d]) for d in dtype_names]

    print(f"fast_attn.verify: torch {torch.__version__}, device {'cuda: ' + torch.cuda.get_device_name() if on_gpu else 'cpu'}")
    for name, status in statuses.items():
        mark = "yes" if status else "no "
        print(f"  {name:7s} {mark}  {status.reason}")
    if not on_gpu:
        print("  (no CUDA GPU: the cuda backend and the Triton kernels on GPU are not verified by this run)")

    from fast_attn import testing_cases

    specs = [spec for spec in testing_cases.all_specs(gpu=on_gpu and not args.quick) if spec.quick or not args.quick]
    # every case in every requested dtype (a case's own dtype is the tests' choice)
    variants = list(dict.fromkeys(dataclasses.replace(spec, dtype=str(dtype)[6:]) for spec in specs for dtype in dtypes))
    failures = 0
    rows = []
    start = time.perf_counter()
    with testing_cases.nan_poisoned():
        for op in dict.fromkeys(spec.op for spec in variants):
            op_cases = [testing_cases.build(spec) for spec in variants if spec.op == op]
            cells = {id(case): ["-"] * len(names) for case in op_cases}
            for column, name in enumerate(names):
                device = _device_for(name, statuses[name], on_gpu)
                ran, op_failures, op_start = 0, 0, time.perf_counter()
                for case in op_cases:
                    if backends.why_not(name, case.call(device.type), statuses) is not None:
                        continue
                    ok, ratio, detail = _check(case, name, device, args.seed)
                    ran += 1
                    op_failures += not ok
                    cells[id(case)][column] = f"{'ok' if ok else 'FAIL'} {ratio:.2f}"
                    if detail:
                        print(f"FAIL {op} [{case.label}] {name}: {detail}", flush=True)
                failures += op_failures
                print(f"  {op:24s} {name:7s} {ran:3d} checks, {op_failures} failed, "
                      f"{time.perf_counter() - op_start:6.1f} s (total {time.perf_counter() - start:6.1f} s)",
                      flush=True)
            for case in op_cases:
                rows.append((op, testing_cases.label(dataclasses.replace(case.spec, dtype="")),
                             _SHORT_DTYPE[case.spec.dtype], cells[id(case)]))
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
