"""python -m fast_attn.verify: every available backend x op x feature against the reference.

For each case of ``fast_attn._verify_cases`` and each backend that is available here and
declares the case's features, the op runs on fresh random inputs through the public API;
its outputs and input gradients are compared with the tolerance rule of
``fast_attn.testing`` (oracle: the reference in fp64 on CPU or fp32 on a GPU; baseline:
the reference in the input dtype). Uninitialised memory is filled with NaN while it runs
(``torch.utils.deterministic.fill_uninitialized_memory``), so an output element a kernel
never writes shows up as a failure.

Prints a pass/fail matrix (cells are the worst error / allowed-error ratio: <= 1 passes)
and exits 1 on any failure.

    python -m fast_attn.verify [--quick] [--interpret] [--backends cuda,triton] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


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
    from fast_attn._verify_cases import all_cases
    from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, compare

    statuses = backends.available_backends()
    wanted = [b for b in args.backends.split(",") if b] or list(backends.BACKENDS)
    for name in wanted:
        backends._check_name(name, allow_auto=False)
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

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    cases = [case for case in all_cases() if case.quick or not args.quick]
    failures = 0
    rows = []
    start = time.perf_counter()
    for case in cases:
        for dtype in dtypes:
            cells = []
            for name in names:
                device = _device_for(name, statuses[name], on_gpu)
                call = backends.Call(case.op, device.type, dtype, case.features, case.head_dim)
                if backends._cannot(name, call, statuses) is not None:
                    cells.append("-")
                    continue
                ok, ratio, detail = _check(case, name, dtype, device, args.seed, compare,
                                           OUTPUT_FACTOR, GRAD_FACTOR)
                failures += not ok
                cells.append(f"{'ok' if ok else 'FAIL'} {ratio:.2f}")
                if detail:
                    print(f"FAIL {case.op} [{case.label}] {name} {dtype}: {detail}")
            rows.append((case.op, case.label, str(dtype).replace("torch.", ""), cells))
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


def _check(case, backend, dtype, device, seed, compare, output_factor, grad_factor):
    """(ok, worst ratio, failure detail) for one case on one backend and dtype."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    inputs = case.make(dtype, device, gen)
    oracle_dtype = torch.float64 if device.type == "cpu" else torch.float32
    oracle_inputs = {k: (v.to(oracle_dtype) if v.is_floating_point() and k != "alibi_slopes" else v)
                     for k, v in inputs.items()}
    try:
        results = _run_with_grads(case, inputs, lambda i: case.run(i, backend))
    except Exception as error:  # a crash is a failure of this cell, not of the whole run
        return False, float("inf"), f"{type(error).__name__}: {error}"
    oracle = _run_with_grads(case, oracle_inputs, lambda i: case.ref(i, True), results.grads_out)
    baseline = _run_with_grads(case, inputs, lambda i: case.ref(i, False), results.grads_out)
    worst, details = 0.0, []
    pairs = [(a, o, b, output_factor, False, f"output {n}") for n, (a, o, b) in
             enumerate(zip(results.outputs, oracle.outputs, baseline.outputs))]
    pairs += [(a, o, b, grad_factor, True, f"d{name}") for name, a, o, b in
              zip(case.grad_inputs, results.grads, oracle.grads, baseline.grads)]
    for actual, expected, base, factor, gradient, what in pairs:
        result = compare(actual.cpu(), expected.cpu(), base.cpu(), factor=factor, gradient=gradient)
        worst = max(worst, result.ratio)
        if not result:
            details.append(f"{what}: {result}")
    return not details, worst, "; ".join(details)


class _Results:
    def __init__(self, outputs, grads, grads_out):
        self.outputs, self.grads, self.grads_out = outputs, grads, grads_out


def _run_with_grads(case, inputs, fn, grads_out=None):
    """Outputs, and the gradients of the case's grad inputs for the given output grads."""
    import torch

    leaves = {k: (v.detach().requires_grad_() if k in case.grad_inputs else v) for k, v in inputs.items()}
    outputs = fn(leaves)
    if not case.grad_inputs:
        return _Results([o.detach() for o in outputs], [], None)
    if grads_out is None:
        gen = torch.Generator().manual_seed(17)
        grads_out = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outputs]
    wanted = [leaves[name] for name in case.grad_inputs]
    grads = torch.autograd.grad(outputs, wanted, [g.to(o.device, o.dtype) for g, o in zip(grads_out, outputs)])
    return _Results([o.detach() for o in outputs], [g.detach() for g in grads], grads_out)


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
