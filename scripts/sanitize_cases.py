"""Small workloads of the CUDA kernels for compute-sanitizer (run by scripts/sanitize.sh).

Each group calls the ops forward and backward on a few representative shapes, then reads
every output once (a NaN check), so that an output element a kernel never wrote is an
uninitialised read under initcheck, and any failure is an exception:

    attention  fast_attn.attention(backend="cuda"): causal and not, tails (Sq = Sk = 77),
               Sq != Sk both ways (empty rows), GQA/MQA, window, softcap, a padded head
               dim, strided and misaligned inputs, deterministic backward
    varlen     fast_attn.attention_varlen(backend="cuda") with zero-length sequences
    kvcache    fast_attn.attention_with_kvcache(backend="cuda"): split-KV decode with
               per-row cache lengths (splits that hold no valid key), append, Sq > 1
    norm       torch.ops.fast_attn.cuda_norm_fwd/bwd: LayerNorm/RMSNorm, residual,
               weight/bias present and absent, odd widths, strided rows
    glu        torch.ops.fast_attn.cuda_glu_fwd/bwd: silu, gelu, gelu_tanh, odd widths
    bias_gelu  torch.ops.fast_attn.cuda_bias_gelu_fwd/bwd: with and without bias, odd widths

The attention groups run once per kernel family named by --archs (sets
FAST_ATTN_CUDA_ATTENTION_ARCH: "sm80" forces the Ampere kernels, "auto" is the Hopper
forward on an H100 for the calls it takes: dense, no KV split, i.e. here the cases with
at most 3 key blocks such as Sq = Sk = 77; the rest fall back to sm_80 as in production;
the backward is sm_80 either way). --size tiny keeps every grid to a few blocks for
racecheck and synccheck, which are orders of magnitude slower than memcheck; --size
small is for memcheck and initcheck. Head dims 64/128/256 run at both sizes.

    python3 scripts/sanitize_cases.py [--groups attention,varlen,...|all] [--size tiny|small]
                                      [--archs sm80,auto] [--list] [--check-only]
    python3 scripts/sanitize_cases.py --summarize LOG   # error count of a sanitizer log

Exit status: 0 done; 1 an op raised or returned NaN; 2 bad arguments; 3 no CUDA, the
extension does not load, or an op of a selected group has no CUDA kernel. --help,
--list and --summarize need neither a GPU nor torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("attention", "varlen", "kvcache", "norm", "glu", "bias_gelu")
SIZES = ("tiny", "small")
ARCHS = ("sm80", "auto", "sm90")
ATTENTION_GROUPS = ("attention", "varlen", "kvcache")
ENV_ARCH = "FAST_ATTN_CUDA_ATTENTION_ARCH"  # fast_attn.backends.ENV_CUDA_ATTENTION_ARCH
# The raw ops each group needs a CUDA kernel for.
GROUP_OPS = {
    "attention": ("cuda_attention_fwd", "cuda_attention_bwd"),
    "varlen": ("cuda_attention_fwd", "cuda_attention_bwd"),
    "kvcache": ("cuda_attention_fwd",),
    "norm": ("cuda_norm_fwd", "cuda_norm_bwd"),
    "glu": ("cuda_glu_fwd", "cuda_glu_bwd"),
    "bias_gelu": ("cuda_bias_gelu_fwd", "cuda_bias_gelu_bwd"),
}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


# ------------------------------------------------------------------------------ cases
# The specs of fast_attn/testing_cases.py (``sanitize_specs``): plain data, loaded from the
# file without importing the package, so that --list runs without torch.


def _load_cases_module():
    name = "fast_attn_testing_cases"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "fast_attn" / "testing_cases.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


testing_cases = _load_cases_module()
describe = testing_cases.describe


def attention_cases(size: str) -> list:
    return testing_cases.sanitize_specs("attention", size)


def varlen_cases(size: str) -> list:
    return testing_cases.sanitize_specs("varlen", size)


def kvcache_cases(size: str) -> list:
    return testing_cases.sanitize_specs("kvcache", size)


def norm_cases(size: str) -> list:
    return testing_cases.sanitize_specs("norm", size)


def glu_cases(size: str) -> list:
    return testing_cases.sanitize_specs("glu", size)


def bias_gelu_cases(size: str) -> list:
    return testing_cases.sanitize_specs("bias_gelu", size)


CASES = {
    "attention": attention_cases,
    "varlen": varlen_cases,
    "kvcache": kvcache_cases,
    "norm": norm_cases,
    "glu": glu_cases,
    "bias_gelu": bias_gelu_cases,
}
# Row stride padding (elements) of the "strided" and "misaligned" row layouts.
ROW_PAD = {"strided": 8, "misaligned": 3}
GLU_ACTIVATION = {("swiglu", "none"): "silu", ("geglu", "none"): "gelu", ("geglu", "tanh"): "gelu_tanh"}


# ------------------------------------------------------------------------- runners


class Runner:
    """Runs cases on the GPU; imports torch and fast_attn only when constructed."""

    def __init__(self):
        import torch

        import fast_attn

        self.torch = torch
        self.fast_attn = fast_attn
        self.ops = torch.ops.fast_attn
        self.device = "cuda"

    def dtype(self, name: str):
        return getattr(self.torch, name)

    def randn(self, shape, dtype: str):
        return self.torch.randn(shape, device=self.device).to(self.dtype(dtype))

    def finish(self, label: str, *tensors) -> None:
        """Waits for the kernels and reads every element of every output once."""
        self.torch.cuda.synchronize()
        for t in tensors:
            if t is not None and t.is_floating_point() and bool(self.torch.isnan(t).any()):
                raise RuntimeError(f"{label}: NaN in an output of shape {tuple(t.shape)}")

    def layout(self, t, layout: str):
        """t's values in the given memory layout."""
        if layout == "bhsd":
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "misaligned":
            flat = self.torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
            view = flat[1:].view(t.shape)
            view.copy_(t)
            return view
        return t

    # ------------------------------------------------------------------ attention

    def attention(self, case) -> None:
        b, sq, sk, d = case.batch, case.seqlen_q, case.seqlen_k, case.head_dim
        q, k, v = (self.layout(self.randn((b, s, h, d), case.dtype), case.layout).detach().requires_grad_()
                   for s, h in ((sq, case.heads), (sk, case.kv_heads), (sk, case.kv_heads)))
        out, lse = self.fast_attn.attention(q, k, v, causal=case.causal, window_size=case.window,
                                            softcap=case.softcap, return_lse=True,
                                            deterministic=case.deterministic, backend="cuda")
        dq, dk, dv = self.torch.autograd.grad(out, (q, k, v), self.torch.randn_like(out))
        self.finish(describe(case), out, lse, dq, dk, dv)

    def varlen(self, case) -> None:
        cu = [self.cu_seqlens(lens) for lens in (case.lens_q, case.lens_k)]
        q = self.randn((sum(case.lens_q), case.heads, case.head_dim), case.dtype).requires_grad_()
        k = self.randn((sum(case.lens_k), case.kv_heads, case.head_dim), case.dtype).requires_grad_()
        v = self.randn((sum(case.lens_k), case.kv_heads, case.head_dim), case.dtype).requires_grad_()
        out, lse = self.fast_attn.attention_varlen(q, k, v, *cu, max(case.lens_q), max(case.lens_k),
                                                   causal=case.causal, return_lse=True, backend="cuda")
        dq, dk, dv = self.torch.autograd.grad(out, (q, k, v), self.torch.randn_like(out))
        self.finish(describe(case), out, lse, dq, dk, dv)

    def cu_seqlens(self, lengths):
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        return self.torch.tensor(offsets, dtype=self.torch.int32, device=self.device)

    def kvcache(self, case) -> None:
        batch = len(case.cache_seqlens)
        q = self.randn((batch, case.seqlen_q, case.heads, case.head_dim), case.dtype)
        cache_shape = (batch, case.cache_len, case.kv_heads, case.head_dim)
        k_cache, v_cache = self.randn(cache_shape, case.dtype), self.randn(cache_shape, case.dtype)
        k = v = None
        if case.new_len:
            new_shape = (batch, case.new_len, case.kv_heads, case.head_dim)
            k, v = self.randn(new_shape, case.dtype), self.randn(new_shape, case.dtype)
        seqlens = self.torch.tensor(case.cache_seqlens, dtype=self.torch.int32, device=self.device)
        with self.torch.no_grad():
            out, lse = self.fast_attn.attention_with_kvcache(q, k_cache, v_cache, k, v, seqlens, causal=case.causal,
                                                             return_lse=True, backend="cuda")
        self.finish(describe(case), out, lse, k_cache, v_cache)

    # ----------------------------------------------------------------- row ops

    def rows(self, case):
        """x (rows, width), a column slice of a wider tensor for the strided/misaligned layouts."""
        pad = ROW_PAD.get(case.layout, 0)
        wide = self.randn((case.rows, case.width + pad), case.dtype)
        return wide[:, pad:] if pad else wide

    def norm(self, case) -> None:
        rms = case.op == "rms_norm"
        x = self.rows(case)
        residual = self.randn(x.shape, case.dtype) if case.residual else None
        weight = self.randn((case.width,), case.dtype) if case.weight else None
        bias = self.randn((case.width,), case.dtype) if case.bias and not rms else None
        y, h, mean, rstd = self.ops.cuda_norm_fwd(x, residual, weight, bias, 1e-5, rms)
        inp = h if residual is not None else x
        dh = self.randn(x.shape, case.dtype) if residual is not None else None
        dx, dweight, dbias = self.ops.cuda_norm_bwd(self.randn(x.shape, case.dtype), dh, inp, weight, mean, rstd,
                                                    rms, bias is not None)
        self.finish(describe(case), y, h, mean, rstd, dx, dweight, dbias)

    def glu(self, case) -> None:
        gate, up = self.rows(case), self.rows(case)
        activation = GLU_ACTIVATION[(case.op, case.approximate)]
        y = self.ops.cuda_glu_fwd(gate, up, activation)
        dgate, dup = self.ops.cuda_glu_bwd(self.randn(gate.shape, case.dtype), gate, up, activation)
        self.finish(describe(case), y, dgate, dup)

    def bias_gelu(self, case) -> None:
        x = self.rows(case)
        bias = self.randn((case.width,), case.dtype) if case.bias else None
        tanh = case.approximate == "tanh"
        y = self.ops.cuda_bias_gelu_fwd(x, bias, tanh)
        dx, dbias = self.ops.cuda_bias_gelu_bwd(self.randn(x.shape, case.dtype), x, bias, tanh)
        self.finish(describe(case), y, dx, dbias)


def missing_kernels(torch, groups) -> list:
    """The ops of the selected groups that have no CUDA kernel registered."""
    missing = []
    for group in groups:
        for op in GROUP_OPS[group]:
            name = f"fast_attn::{op}"
            try:
                has = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
            except RuntimeError:  # the schema itself is unknown
                has = False
            if not has and name not in missing:
                missing.append(name)
    return missing


def prepare(groups) -> int:
    """Loads the extension and checks the selected ops exist; an exit status."""
    import torch

    if not torch.cuda.is_available():
        print("sanitize_cases: no CUDA device", file=sys.stderr)
        return EXIT_UNAVAILABLE
    from fast_attn._extension import ExtensionUnavailable, load_extension

    try:
        load_extension()
    except ExtensionUnavailable as exc:
        print(f"sanitize_cases: the CUDA extension is unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    missing = missing_kernels(torch, groups)
    if missing:
        print(f"sanitize_cases: no CUDA kernel registered for {', '.join(missing)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def plan(groups, size: str, archs) -> list:
    """(label, group, arch or None, case) in run order."""
    steps = []
    for group in groups:
        group_archs = archs if group in ATTENTION_GROUPS else (None,)
        for arch in group_archs:
            for case in CASES[group](size):
                label = f"{group}{'[' + arch + ']' if arch else ''} {describe(case)}"
                steps.append((label, group, arch, case))
    return steps


def run(steps) -> int:
    runner = Runner()
    failures = 0
    for label, group, arch, case in steps:
        if arch is not None:
            os.environ[ENV_ARCH] = arch  # read by the op on every call
        start = time.perf_counter()
        try:
            getattr(runner, group)(case)
        except Exception as exc:  # report every failing case, not just the first
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"ok   {label} ({time.perf_counter() - start:.2f}s)", flush=True)
    print(f"sanitize_cases: {len(steps) - failures}/{len(steps)} cases ran", flush=True)
    return EXIT_FAILED if failures else EXIT_OK


# ----------------------------------------------------------------- log summary

_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?")
_RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY:.*?\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)")


def summarize(text: str):
    """(errors, warnings) reported by a compute-sanitizer log, or None without a summary
    line (the run died or never started). memcheck, initcheck and synccheck print
    ``ERROR SUMMARY: N errors``; racecheck prints ``RACECHECK SUMMARY: ... (E errors, W
    warnings)`` (and possibly an ERROR SUMMARY too): the larger error count is taken."""
    errors = [int(m) for m in _ERROR_SUMMARY.findall(text)]
    warnings = 0
    for e, w in _RACECHECK_SUMMARY.findall(text):
        errors.append(int(e))
        warnings += int(w)
    if not errors:
        return None
    return max(errors), warnings


# --------------------------------------------------------------------------- main


def parse_list(value: str, allowed, what: str) -> list:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if items == ["all"] and what == "group":
        return list(allowed)
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {unknown or value!r}: choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Groups: " + ", ".join(GROUPS) + ". Run under compute-sanitizer by scripts/sanitize.sh.",
    )
    parser.add_argument("--groups", default="all", type=lambda v: parse_list(v, GROUPS, "group"),
                        help="comma-separated op groups, or all (default)")
    parser.add_argument("--size", default="small", choices=SIZES,
                        help="tiny: a few blocks per launch (racecheck, synccheck); small (default)")
    parser.add_argument("--archs", default="sm80,auto", type=lambda v: parse_list(v, ARCHS, "arch"),
                        help="attention kernel families, values of FAST_ATTN_CUDA_ATTENTION_ARCH (default sm80,auto)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    parser.add_argument("--check-only", action="store_true",
                        help="load the extension and check the selected ops have CUDA kernels, then exit")
    parser.add_argument("--summarize", metavar="LOG",
                        help="print '<errors> <warnings>' of a compute-sanitizer log (exit 1 if it has no summary)")
    args = parser.parse_args(argv)

    if args.summarize:
        result = summarize(Path(args.summarize).read_text(errors="replace"))
        if result is None:
            print("no summary")
            return EXIT_FAILED
        print(*result)
        return EXIT_OK
    steps = plan(args.groups, args.size, args.archs)
    if args.list:
        for label, *_ in steps:
            print(label)
        return EXIT_OK
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    status = prepare(args.groups)
    if status != EXIT_OK or args.check_only:
        return status
    return run(steps)


if __name__ == "__main__":
    sys.exit(main())
