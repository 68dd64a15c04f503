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
import os
import re
import sys
import time
from dataclasses import MISSING, dataclass, field, fields
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
# Plain data (dtype names, not torch dtypes) so that --list runs without torch.


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    layout: str = "bshd"  # "bhsd": transposed views; "misaligned": storage offset by one element
    deterministic: bool = False


@dataclass(frozen=True)
class VarlenCase:
    lens_q: tuple
    lens_k: tuple
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = False


@dataclass(frozen=True)
class KvcacheCase:
    cache_seqlens: tuple  # rows filled before the append, per batch row
    cache_len: int
    seqlen_q: int
    new_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = False


@dataclass(frozen=True)
class RowsCase:
    """An elementwise/row op on (rows, cols) inputs; ``options`` picks the variant."""

    rows: int
    cols: int
    dtype: str = "bfloat16"
    options: dict = field(default_factory=dict)
    row_stride_pad: int = 0  # > 0: x is a column slice of a (rows, cols + pad) tensor


def describe(case) -> str:
    """``Kind(field=value ...)`` with the fields that differ from their defaults."""
    parts = []
    for f in fields(case):
        value = getattr(case, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value != default:
            parts.append(f"{f.name}={value}")
    return f"{type(case).__name__}({' '.join(parts)})"


def attention_cases(size: str) -> list:
    if size == "tiny":
        return [
            AttentionCase(1, 2, 1, 77, 77, 64, causal=True),
            AttentionCase(1, 2, 2, 77, 77, 128),
            AttentionCase(1, 2, 1, 77, 77, 256, "float16", causal=True),
            AttentionCase(1, 2, 1, 40, 77, 80, causal=True, window=(16, -1)),  # padded, Sq < Sk
            AttentionCase(1, 2, 2, 77, 33, 64, causal=True, deterministic=True),  # Sq > Sk: empty rows
        ]
    return [
        AttentionCase(2, 4, 4, 77, 77, 64),
        AttentionCase(2, 4, 2, 77, 77, 128, causal=True),
        AttentionCase(1, 4, 1, 77, 77, 256, "float16", causal=True),
        AttentionCase(1, 6, 2, 33, 150, 80, causal=True),  # padded head dim, Sq < Sk
        AttentionCase(1, 2, 2, 150, 33, 64, causal=True),  # Sq > Sk: the top rows see nothing
        AttentionCase(1, 4, 2, 200, 200, 128, window=(32, 8), softcap=30.0),
        AttentionCase(1, 4, 2, 1, 300, 128),  # one query: the split-KV candidate
        AttentionCase(2, 4, 2, 130, 130, 64, layout="bhsd", causal=True),
        AttentionCase(1, 4, 2, 77, 130, 128, "float16", layout="misaligned"),
        AttentionCase(2, 4, 2, 257, 257, 256, causal=True, deterministic=True),
    ]


def varlen_cases(size: str) -> list:
    if size == "tiny":
        return [VarlenCase((1, 0, 17, 40), (5, 9, 0, 40), 2, 1, 64, causal=True)]
    return [
        VarlenCase((1, 0, 17, 128, 77), (5, 9, 0, 128, 300), 4, 2, 64, causal=True),
        VarlenCase((77, 200), (200, 77), 4, 4, 128, "float16"),
        VarlenCase((33, 1), (33, 65), 4, 1, 256, causal=True),
    ]


def kvcache_cases(size: str) -> list:
    if size == "tiny":
        return [
            KvcacheCase((0, 700), 1024, 1, 1, 4, 2, 128),
            KvcacheCase((5, 60), 64, 3, 3, 2, 1, 64, causal=True),
        ]
    return [
        KvcacheCase((3000,), 4096, 1, 1, 8, 2, 128),  # one long row: split-KV
        KvcacheCase((0, 1, 1000, 4000), 4096, 1, 1, 8, 1, 64),  # splits with no valid key
        KvcacheCase((2, 300, 500), 512, 4, 4, 4, 2, 256, causal=True),
        KvcacheCase((10, 77), 100, 1, 0, 4, 4, 80),  # padded head dim, nothing appended
    ]


def norm_cases(size: str) -> list:
    ln = dict(rms=False, weight=True, bias=True, residual=False)
    rms = dict(rms=True, weight=True, bias=False, residual=False)
    if size == "tiny":
        return [RowsCase(3, 33, options=ln), RowsCase(2, 1025, options=dict(rms, residual=True))]
    return [
        RowsCase(7, 1, options=ln),
        RowsCase(7, 33, options=dict(ln, residual=True)),
        RowsCase(64, 1024, "float16", options=rms),
        RowsCase(5, 4097, options=dict(rms, residual=True)),
        RowsCase(33, 1000, "float32", options=dict(ln, weight=False, bias=False)),
        RowsCase(17, 768, options=dict(ln, residual=True), row_stride_pad=8),
        RowsCase(3, 8192, options=dict(rms, weight=False)),
    ]


def glu_cases(size: str) -> list:
    if size == "tiny":
        return [RowsCase(3, 33, options=dict(activation="silu")), RowsCase(2, 1025, options=dict(activation="gelu"))]
    return [
        RowsCase(7, 1, options=dict(activation="silu")),
        RowsCase(7, 33, "float16", options=dict(activation="gelu")),
        RowsCase(64, 1000, options=dict(activation="gelu_tanh")),
        RowsCase(5, 4097, "float32", options=dict(activation="silu")),
        RowsCase(17, 768, options=dict(activation="silu"), row_stride_pad=8),
    ]


def bias_gelu_cases(size: str) -> list:
    if size == "tiny":
        return [RowsCase(3, 33, options=dict(bias=True, tanh=False)),
                RowsCase(2, 1025, options=dict(bias=False, tanh=True))]
    return [
        RowsCase(7, 1, options=dict(bias=True, tanh=False)),
        RowsCase(67, 1023, "float16", options=dict(bias=True, tanh=True)),
        RowsCase(5, 4097, options=dict(bias=False, tanh=False)),
        RowsCase(33, 1000, "float32", options=dict(bias=True, tanh=False)),
        RowsCase(17, 768, options=dict(bias=True, tanh=False), row_stride_pad=3),  # misaligned rows
    ]


CASES = {
    "attention": attention_cases,
    "varlen": varlen_cases,
    "kvcache": kvcache_cases,
    "norm": norm_cases,
    "glu": glu_cases,
    "bias_gelu": bias_gelu_cases,
}


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

    def attention(self, case: AttentionCase) -> None:
        b, sq, sk, d = case.batch, case.seqlen_q, case.seqlen_k, case.head_dim
        q, k, v = (self.layout(self.randn((b, s, h, d), case.dtype), case.layout).detach().requires_grad_()
                   for s, h in ((sq, case.heads), (sk, case.kv_heads), (sk, case.kv_heads)))
        out, lse = self.fast_attn.attention(q, k, v, causal=case.causal, window_size=case.window,
                                            softcap=case.softcap, return_lse=True,
                                            deterministic=case.deterministic, backend="cuda")
        dq, dk, dv = self.torch.autograd.grad(out, (q, k, v), self.torch.randn_like(out))
        self.finish(describe(case), out, lse, dq, dk, dv)

    def varlen(self, case: VarlenCase) -> None:
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

    def kvcache(self, case: KvcacheCase) -> None:
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

    def rows(self, case: RowsCase):
        """x (rows, cols), a column slice of a wider tensor when row_stride_pad > 0."""
        wide = self.randn((case.rows, case.cols + case.row_stride_pad), case.dtype)
        return wide[:, case.row_stride_pad:] if case.row_stride_pad else wide

    def norm(self, case: RowsCase) -> None:
        o = case.options
        x = self.rows(case)
        residual = self.randn(x.shape, case.dtype) if o["residual"] else None
        weight = self.randn((case.cols,), case.dtype) if o["weight"] else None
        bias = self.randn((case.cols,), case.dtype) if o["bias"] else None
        y, h, mean, rstd = self.ops.cuda_norm_fwd(x, residual, weight, bias, 1e-5, o["rms"])
        inp = h if residual is not None else x
        dh = self.randn(x.shape, case.dtype) if residual is not None else None
        dx, dweight, dbias = self.ops.cuda_norm_bwd(self.randn(x.shape, case.dtype), dh, inp, weight, mean, rstd,
                                                    o["rms"], bias is not None)
        self.finish(describe(case), y, h, mean, rstd, dx, dweight, dbias)

    def glu(self, case: RowsCase) -> None:
        gate, up = self.rows(case), self.rows(case)
        activation = case.options["activation"]
        y = self.ops.cuda_glu_fwd(gate, up, activation)
        dgate, dup = self.ops.cuda_glu_bwd(self.randn(gate.shape, case.dtype), gate, up, activation)
        self.finish(describe(case), y, dgate, dup)

    def bias_gelu(self, case: RowsCase) -> None:
        x = self.rows(case)
        bias = self.randn((case.cols,), case.dtype) if case.options["bias"] else None
        tanh = case.options["tanh"]
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
