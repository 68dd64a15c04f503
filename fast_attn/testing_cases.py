"""The cases every op is tested and verified on: one generator for the tests, verify and sanitize.

Users: ``tests/ops/test_attention.py``, ``test_norm.py``, ``test_ffn.py``, ``test_rotary.py`` (each case on
every backend that declares its features), ``python -m fast_attn.verify`` (``quick``
subset with ``--quick``) and ``scripts/sanitize_cases.py`` (the ``sanitize_specs``).

A *spec* is plain data (no torch at import: the sanitize script lists its cases without
torch): an op, its shapes, dtype, features and memory layout. ``build(spec)`` turns it
into a ``Case`` that draws fresh random inputs, runs them through the public API on a
named backend (``backend=``), and through the reference in fp64 (the oracle) and in the
input dtype (the baseline, ``upcast=False``). ``evaluate(case, backend, device)`` does
forward and backward and compares every output and gradient with the tolerance rule of
``fast_attn.testing`` (DESIGN.md), plus exact checks (inputs unchanged, fully masked
rows give out 0 / lse -inf / dq 0, h is the correctly rounded sum, the kv-cache append).

Shapes are awkward on purpose: lengths 1, 17, 113, 203; Sq != Sk both ways; head dims
40, 72, 111; GQA/MQA; fully masked rows; transposed, sliced and misaligned layouts; odd
widths 1 and 7. ``quick`` cases are small enough for the Triton interpreter and make
``verify --quick``; ``gpu`` cases are GPU-sized sweeps, listed only with ``gpu=True``.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Callable, Optional

DROPOUT_SEED = 2**40 + 12345  # above 2**32: the seed's high word reaches the hash too
SOFTCAP_INPUT_SCALE = 4.0  # scores then have a std of ~16: tanh(s / 30) is far from linear
NORM_EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
SLICE_PAD = 16  # extra columns of the "sliced" layout: rows stay 16-byte aligned


# ====================================================================== specs (no torch)


@dataclass(frozen=True)
class AttentionSpec:
    """A dense ``fast_attn.attention`` call (B, S, H, D)."""

    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: str = "float16"
    causal: bool = False
    window: tuple = (-1, -1)
    alibi: str = ""  # "", "h": slopes (H,), "bh": (B, H)
    softcap: float = 0.0
    mask: str = ""  # "" or a key of MASKS
    dropout_p: float = 0.0
    softmax_scale: float = 0.0  # 0: 1/sqrt(D)
    deterministic: bool = False
    # "bshd" contiguous; "bhsd" transposed (B, H, S, D) views; "sliced" rows of a wider
    # tensor; "packed" q/k/v unbound from one (B, S, 3, H, D) tensor; "misaligned"
    # storage offset by one element
    layout: str = "bshd"
    input_scale: float = 1.0
    quick: bool = True
    gpu: bool = False
    op = "attention"


@dataclass(frozen=True)
class VarlenSpec:
    """Packed sequences of the given lengths (zero allowed): ``fast_attn.attention_varlen``."""

    lens_q: tuple
    lens_k: tuple
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "float16"
    causal: bool = False
    window: tuple = (-1, -1)
    alibi: str = ""
    softcap: float = 0.0
    mask: str = ""
    dropout_p: float = 0.0
    deterministic: bool = False
    input_scale: float = 1.0
    quick: bool = True
    gpu: bool = False
    op = "attention_varlen"


@dataclass(frozen=True)
class KvcacheSpec:
    """A decode step: q (B, Sq, H, D) against caches of cache_len rows filled to
    cache_seqlens (None: all valid, ``batch`` rows), appending new_len rows first."""

    cache_seqlens: Optional[tuple]
    cache_len: int
    seqlen_q: int
    new_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "float16"
    causal: bool = False
    window: tuple = (-1, -1)
    alibi: str = ""
    softcap: float = 0.0
    input_scale: float = 1.0
    batch: int = 2  # when cache_seqlens is None
    layout: str = "bshd"  # "bhsd": the caches are transposed views
    stale: str = "random"  # cache rows past the valid length: "random", or "nonfinite" (NaN k, inf v)
    quick: bool = True
    gpu: bool = False
    op = "attention_with_kvcache"


@dataclass(frozen=True)
class NormSpec:
    """``fast_attn.layer_norm`` / ``rms_norm`` on (rows, width) inputs."""

    op: str  # "layer_norm" or "rms_norm"
    rows: int
    width: int
    dtype: str = "bfloat16"
    weight: bool = True
    bias: bool = True  # layer_norm only
    residual: bool = False
    # "contiguous"; "strided" (rows of a wider tensor); "unviewable" (a transposed 3-D
    # view whose rows have no single stride); "misaligned" (storage offset by one element)
    layout: str = "contiguous"
    param_dtype: str = ""  # "": x's dtype
    quick: bool = True
    gpu: bool = False


@dataclass(frozen=True)
class ActivationSpec:
    """``fast_attn.bias_gelu`` / ``swiglu`` / ``geglu`` on (..., width) inputs."""

    op: str  # "bias_gelu", "swiglu", "geglu"
    rows: int
    width: int
    dtype: str = "bfloat16"
    bias: bool = True  # bias_gelu only
    approximate: str = "none"  # GELU's; not swiglu
    # "contiguous"; "3d" ((3, rows, width)); "strided" (rows of a wider tensor: for GLU
    # gate and up are the two halves of one fused projection); "unviewable" (3-D
    # transposed views whose rows have no single stride); "misaligned" (storage offset by
    # one element)
    layout: str = "contiguous"
    scale: float = 2.0  # of x / gate: both tails of every activation
    quick: bool = True
    gpu: bool = False


@dataclass(frozen=True)
class RotarySpec:
    """``fast_attn.rotary`` on ``(B, S, H, D)`` inputs with ``(seqlen_ro, rotary_dim / 2)`` tables."""

    batch: int
    seqlen: int
    heads: int
    head_dim: int
    rotary_dim: int = 0  # 0: head_dim
    dtype: str = "float16"
    interleaved: bool = False
    # "none" (offset 0), "int" (ROTARY_INT_OFFSET), "int32" / "int64" (a per-batch tensor)
    offsets: str = "none"
    layout: str = "contiguous"  # or "transposed": a (B, H, S, D) tensor seen as (B, S, H, D)
    x_dtype_tables: bool = False  # cos/sin in x's dtype (FlashAttention's convention), else fp32
    quick: bool = True
    gpu: bool = False
    op = "rotary"


_LABEL_SKIP = {"quick", "gpu", "op"}
_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def describe(spec) -> str:
    """``Kind(field=value ...)`` with the fields that differ from their defaults."""
    parts = []
    for f in fields(spec):
        value = getattr(spec, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value != default:
            parts.append(f"{f.name}={value}")
    return f"{type(spec).__name__}({' '.join(parts)})"


def label(spec) -> str:
    """A short pytest id: shapes, dtype and the options that differ from their defaults."""
    if isinstance(spec, AttentionSpec):
        head = [f"b{spec.batch}h{spec.heads}kv{spec.kv_heads}", f"{spec.seqlen_q}x{spec.seqlen_k}",
                f"d{spec.head_dim}"]
        shown = ("batch", "heads", "kv_heads", "seqlen_q", "seqlen_k", "head_dim")
    elif isinstance(spec, VarlenSpec):
        head = [f"q{'-'.join(map(str, spec.lens_q))}", f"k{'-'.join(map(str, spec.lens_k))}",
                f"h{spec.heads}kv{spec.kv_heads}", f"d{spec.head_dim}"]
        shown = ("lens_q", "lens_k", "heads", "kv_heads", "head_dim")
    elif isinstance(spec, KvcacheSpec):
        fill = "full" if spec.cache_seqlens is None else "-".join(map(str, spec.cache_seqlens))
        head = [f"fill{fill}", f"cache{spec.cache_len}", f"q{spec.seqlen_q}", f"new{spec.new_len}",
                f"h{spec.heads}kv{spec.kv_heads}", f"d{spec.head_dim}"]
        shown = ("cache_seqlens", "cache_len", "seqlen_q", "new_len", "heads", "kv_heads", "head_dim")
    elif isinstance(spec, RotarySpec):
        head = [f"b{spec.batch}s{spec.seqlen}h{spec.heads}", f"d{spec.head_dim}"]
        shown = ("batch", "seqlen", "heads", "head_dim")
    else:
        head = [spec.op, f"{spec.rows}x{spec.width}"]
        shown = ("op", "rows", "width")
    parts = (["gpu"] if spec.gpu else []) + head + ([_SHORT.get(spec.dtype, spec.dtype)] if spec.dtype else [])
    for f in fields(spec):
        if f.name in shown or f.name in _LABEL_SKIP or f.name == "dtype":
            continue
        value = getattr(spec, f.name)
        if value != f.default:
            parts.append(f.name if value is True else f"no-{f.name}" if value is False else
                         f"{f.name}={_SHORT.get(value, value)}".replace(" ", ""))
    return "-".join(parts)


# ------------------------------------------------------------------------ attention specs

_A = AttentionSpec


def attention_specs(gpu: bool = False) -> list:
    """Dense attention: interpreter-sized cases covering every feature, then GPU sweeps."""
    specs = [
        _A(2, 2, 2, 113, 203, 64),  # MHA, Sq < Sk, ragged tails
        _A(1, 4, 2, 113, 203, 40, causal=True),  # GQA, causal bottom-right with Sq < Sk
        _A(1, 4, 1, 203, 113, 64, causal=True),  # MQA, Sq > Sk: the top rows see no key
        _A(1, 2, 1, 113, 17, 111, "float32", causal=True),  # fp32, head dim 111
        _A(2, 2, 2, 1, 203, 72, causal=True),  # one query row, head dim 72
        _A(2, 2, 1, 17, 1, 40),  # one key
        _A(1, 2, 2, 1, 1, 64, "float32"),
        _A(1, 2, 2, 113, 113, 64, window=(16, 7)),
        _A(1, 4, 2, 113, 203, 40, causal=True, window=(24, -1)),  # causal + left window
        _A(1, 2, 1, 17, 113, 64, window=(-1, 5)),  # right edge only
        _A(1, 2, 2, 203, 113, 72, window=(0, 0)),  # Sq > Sk: the top rows have no key
        _A(1, 4, 2, 113, 113, 64, causal=True, alibi="h"),
        _A(2, 2, 2, 17, 203, 40, alibi="bh", softmax_scale=0.3),
        _A(1, 4, 2, 113, 113, 64, causal=True, softcap=1.5, input_scale=2.0),
        _A(2, 2, 2, 113, 113, 40, mask="bool_b"),  # bool, broadcast over batch, a fully masked row
        _A(1, 4, 2, 17, 113, 40, mask="bool_2d"),  # bool, broadcast over batch and heads
        _A(2, 2, 1, 113, 113, 64, mask="add_h"),  # additive, broadcast over heads
        _A(2, 2, 2, 17, 203, 64, causal=True, mask="add_pad"),  # -inf key padding
        _A(2, 2, 2, 17, 203, 64, dropout_p=0.17),
        _A(1, 4, 2, 113, 113, 40, "float32", causal=True, dropout_p=0.3),
        _A(2, 2, 1, 113, 203, 111, causal=True, window=(40, -1), alibi="bh", softcap=2.0, mask="add_bh",
           dropout_p=0.1),  # everything at once
        _A(2, 2, 1, 113, 113, 40, causal=True, layout="bhsd"),  # transposed (B, H, S, D) views
        _A(1, 2, 2, 113, 203, 72, "float32", layout="sliced"),
        _A(1, 2, 2, 17, 113, 64, causal=True, layout="misaligned"),
        _A(1, 2, 2, 113, 113, 40, layout="packed", causal=True),
        _A(1, 4, 2, 47, 79, 40, causal=True, deterministic=True),
        _A(1, 2, 2, 113, 113, 64, "bfloat16", causal=True),
        _A(1, 4, 2, 17, 203, 40, "bfloat16", alibi="h", dropout_p=0.2, layout="bhsd"),
        _A(1, 2, 2, 128, 217, 256, "float16", causal=True, quick=False),
        _A(2, 8, 2, 113, 203, 111, "bfloat16", alibi="h", quick=False),
    ]
    if gpu:
        specs += _attention_gpu_specs()
    return specs


SWEEP_HEAD_DIMS = (32, 40, 64, 72, 80, 96, 111, 128, 160, 192, 256)
SWEEP_SEQLENS = ((1, 1), (1, 239), (17, 17), (113, 203), (203, 113), (128, 217), (255, 113), (1000, 1000),
                 (1023, 1024), (17, 2048), (4224, 4224))
HEAD_LAYOUTS = ((4, 4), (6, 2), (4, 1))  # MHA, GQA with a group of 3, MQA
GPU_FEATURES = {
    "window": dict(window=(64, 16)),
    "window0": dict(window=(0, 0)),
    "right_window": dict(window=(-1, 16)),
    "causal_window": dict(causal=True, window=(100, -1)),
    "alibi": dict(alibi="bh", causal=True),
    "softcap": dict(softcap=30.0, input_scale=SOFTCAP_INPUT_SCALE),
    "causal_softcap_window": dict(causal=True, window=(50, -1), softcap=30.0, input_scale=SOFTCAP_INPUT_SCALE),
    "bool_mask": dict(mask="bool_b"),
    "additive_mask": dict(mask="add_h", causal=True),
    "key_padding": dict(mask="add_pad"),
    "dropout": dict(dropout_p=0.15, causal=True),
    "scale": dict(softmax_scale=0.3),
    "deterministic": dict(causal=True, deterministic=True),
    "everything": dict(causal=True, window=(200, -1), alibi="h", softcap=3.0, mask="add_bh", dropout_p=0.1),
    "bhsd_views": dict(layout="bhsd", causal=True),
    "sliced": dict(layout="sliced", causal=True),
    "packed": dict(layout="packed"),
    "misaligned": dict(layout="misaligned", causal=True),
}


def _attention_gpu_specs() -> list:
    specs = []
    # every head dim x lengths, rotating MHA/GQA/MQA and fp16/bf16, causal and not
    for i, head_dim in enumerate(SWEEP_HEAD_DIMS):
        for j, (seqlen_q, seqlen_k) in enumerate(SWEEP_SEQLENS):
            heads, kv_heads = HEAD_LAYOUTS[(i + j) % len(HEAD_LAYOUTS)]
            batch = 1 if seqlen_q * seqlen_k >= 10**6 else 2
            for causal in (False, True):
                dtype = ("bfloat16", "float16")[(i + j + causal) % 2]
                specs.append(_A(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, causal=causal,
                                quick=False, gpu=True))
    # fp32 (Triton only) on three head dims
    for head_dim in (64, 111, 256):
        for seqlen_q, seqlen_k in ((113, 203), (203, 113), (1023, 1024)):
            specs.append(_A(2, 4, 2, seqlen_q, seqlen_k, head_dim, "float32", causal=True, quick=False, gpu=True))
    # each feature on two head dims (a padded one, a mid one, the largest) and four length pairs
    head_dim_pairs = ((40, 256), (128, 256), (72, 128))
    for f, options in enumerate(GPU_FEATURES.values()):
        for head_dim in head_dim_pairs[f % len(head_dim_pairs)]:
            for seqlen_q, seqlen_k in ((1, 239), (113, 203), (203, 113), (1023, 1024)):
                if options.get("layout") == "packed" and seqlen_q != seqlen_k:
                    seqlen_q = seqlen_k
                kv_heads = 4 if options.get("layout") == "packed" else 2
                specs.append(_A(2, 4, kv_heads, seqlen_q, seqlen_k, head_dim, "bfloat16", **options,
                                quick=False, gpu=True))
    # full grids (>= 512 query tiles: no KV split, so the sm_90a forward takes them) and big ones
    specs += [
        _A(4, 16, 16, 1023, 1023, 64, "bfloat16", quick=False, gpu=True),
        _A(4, 16, 4, 1024, 1024, 128, "bfloat16", causal=True, quick=False, gpu=True),
        _A(4, 16, 1, 1000, 1100, 256, "float16", causal=True, quick=False, gpu=True),
        _A(4, 16, 4, 1100, 1000, 128, "float16", causal=True, window=(100, -1), softcap=30.0,
           input_scale=SOFTCAP_INPUT_SCALE, quick=False, gpu=True),
        _A(4, 16, 2, 1024, 1024, 64, "bfloat16", window=(0, 0), quick=False, gpu=True),
        _A(4, 16, 8, 1024, 1024, 256, "bfloat16", window=(32, 16), quick=False, gpu=True),
        _A(1, 8, 2, 2048, 2048, 128, "bfloat16", causal=True, quick=False, gpu=True),
        _A(1, 8, 8, 2048, 2048, 256, "float16", quick=False, gpu=True),
        _A(1, 8, 2, 2048, 1000, 128, "float16", causal=True, quick=False, gpu=True),
        _A(2, 8, 2, 1023, 1024, 128, "bfloat16", causal=True, quick=False, gpu=True),
        _A(2, 8, 8, 17, 1024, 64, "bfloat16", quick=False, gpu=True),
    ]
    return specs


def full_grid_specs() -> list:
    """The GPU cases whose grids are full enough for the sm_90a forward (no KV split)."""
    return [s for s in _attention_gpu_specs() if s.batch * s.heads * math.ceil(s.seqlen_q / 128) >= 512]


def varlen_specs(gpu: bool = False) -> list:
    specs = [
        # zero-length sequences on both sides: no rows, and rows with no key (out 0, lse -inf)
        VarlenSpec((17, 0, 40, 5), (23, 9, 0, 31), 4, 2, 40, causal=True),
        VarlenSpec((17, 0, 40, 5), (23, 9, 0, 31), 2, 2, 64),
        VarlenSpec((17, 113, 1), (5, 50, 20), 4, 2, 72, causal=True, window=(7, -1), alibi="bh", dropout_p=0.2),
        VarlenSpec((17, 33, 1), (5, 50, 20), 2, 1, 40, "float32", mask="add_h", softcap=2.0),
        VarlenSpec((17, 33, 1), (5, 50, 20), 4, 2, 64, "bfloat16", mask="bool_2d", alibi="h"),
        VarlenSpec((5, 3), (0, 0), 4, 2, 64, causal=True),  # no key at all
        VarlenSpec((17, 0, 113), (203, 5, 113), 4, 2, 40, "bfloat16", causal=True, quick=False),
    ]
    if gpu:
        specs += _varlen_gpu_specs()
    return specs


def _random_lengths(count: int, high: int, seed: int) -> tuple:
    # a tiny LCG so that the specs need no torch
    state, lengths = seed * 2654435761 % 2**32 or 1, []
    for _ in range(count):
        state = (1103515245 * state + 12345) % 2**31
        lengths.append(state % high)
    return tuple(lengths)


def _varlen_gpu_specs() -> list:
    specs = [
        VarlenSpec((1, 0, 17, 128, 300), (1, 0, 17, 128, 300), 4, 4, 64, "bfloat16"),
        VarlenSpec((1, 0, 17, 128, 300), (1, 0, 17, 128, 300), 6, 2, 128, "bfloat16", causal=True),
        VarlenSpec((1, 0, 17, 128, 300), (5, 9, 0, 200, 300), 4, 1, 256, causal=True),
        VarlenSpec((300, 17, 1), (17, 300, 128), 6, 2, 80, "bfloat16", causal=True),
        VarlenSpec((128, 255, 1000), (128, 255, 1000), 4, 2, 64, "bfloat16", causal=True, window=(32, -1)),
        VarlenSpec((77, 130), (200, 50), 4, 4, 128, softcap=30.0, input_scale=SOFTCAP_INPUT_SCALE),
        VarlenSpec(_random_lengths(8, 1100, 3), _random_lengths(8, 1100, 4), 8, 2, 128, "bfloat16", causal=True,
                   deterministic=True),
    ]
    for n, head_dim in enumerate((64, 128, 256)):
        for m, options in enumerate((dict(), dict(causal=True),
                                     dict(causal=True, window=(256, -1), alibi="bh", dropout_p=0.1),
                                     dict(mask="add_h", softcap=5.0))):
            specs.append(VarlenSpec(_random_lengths(8, 1100, 10 + 4 * n + m), _random_lengths(8, 1100, 30 + 4 * n + m),
                                    8, 2, head_dim, "bfloat16", **options))
    return [replace(s, quick=False, gpu=True) for s in specs]


def kvcache_specs(gpu: bool = False) -> list:
    specs = [
        KvcacheSpec((10, 200, 299), 300, 1, 1, 4, 2, 64),
        # a row with no key (cache empty, nothing appended) next to full ones
        KvcacheSpec((0, 100, 296), 300, 4, 0, 4, 1, 40, causal=True),
        KvcacheSpec((0, 100, 290), 300, 4, 4, 4, 1, 72, causal=True),
        KvcacheSpec((10, 200, 290), 300, 2, 2, 4, 2, 64, causal=True, window=(50, -1), alibi="bh"),
        KvcacheSpec((10, 200, 295), 300, 1, 0, 2, 2, 111, "float32", softcap=2.0),
        KvcacheSpec(None, 200, 3, 0, 4, 4, 64, "bfloat16", alibi="h"),
        KvcacheSpec((5, 17), 64, 1, 1, 4, 1, 64, stale="nonfinite"),
        KvcacheSpec((7, 40), 64, 1, 1, 4, 2, 64, layout="bhsd"),
        KvcacheSpec((0, 100, 238), 239, 1, 1, 8, 2, 128, "bfloat16", causal=True, quick=False),
    ]
    if gpu:
        specs += _kvcache_gpu_specs()
    return specs


def _kvcache_gpu_specs() -> list:
    K = KvcacheSpec
    specs = [
        # split-KV decode: batch 1, 8 heads, one query, one appended key, caches 1..8192
        K((0,), 1, 1, 1, 8, 8, 128, "bfloat16"),  # the appended key is the only one
        K((16,), 17, 1, 1, 8, 2, 128),
        K((254,), 255, 1, 1, 8, 1, 64, "bfloat16"),
        K((999,), 1000, 1, 1, 8, 2, 256),
        K((2047,), 2048, 1, 1, 8, 8, 128, "bfloat16"),
        K((8191,), 8192, 1, 1, 8, 2, 128),
        K((5000,), 8192, 1, 1, 8, 1, 64, "bfloat16", causal=True),
        K((8192,), 8192, 1, 0, 8, 2, 128, "bfloat16"),  # nothing appended, cache full
        K(None, 8192, 1, 0, 8, 8, 256, "bfloat16", batch=1),  # no cache_seqlens: the dense decode path
        K((0, 37, 1000, 4095), 4096, 1, 1, 8, 2, 128, "bfloat16", causal=True),
        K((3, 300, 2044), 2048, 4, 4, 8, 2, 128, "bfloat16", causal=True, window=(32, -1)),
        K((2, 100, 500), 512, 4, 0, 8, 1, 64, causal=True),  # row 0: 4 queries, 2 keys
        K((100, 200), 256, 8, 8, 4, 1, 128, "bfloat16", window=(16, 2)),
        K((10, 200, 299), 300, 1, 1, 8, 2, 128, "bfloat16", softcap=30.0, input_scale=SOFTCAP_INPUT_SCALE),
        K((10, 200, 290), 300, 3, 3, 6, 2, 80, "bfloat16", causal=True),
        K((0, 0), 64, 1, 0, 4, 4, 64, "bfloat16"),  # empty caches: out 0, lse -inf
        K((7, 1000), 1024, 1, 1, 8, 2, 128, "bfloat16", layout="bhsd"),
        K(None, 300, 5, 0, 4, 2, 64, causal=True, window=(-1, 0), batch=2),
        K((10, 200, 299), 300, 1, 1, 8, 2, 128, "bfloat16", stale="nonfinite"),
        K((5000,), 8192, 1, 1, 8, 2, 64, "bfloat16", stale="nonfinite"),
    ]
    for cache_len in (239, 4096, 16384):
        for seqlen_q, new_len in ((1, 1), (4, 4)):
            fills = tuple(round(i * (cache_len - new_len) / 7) for i in range(8))
            specs.append(K(fills, cache_len, seqlen_q, new_len, 32, 8, 128, "bfloat16", causal=seqlen_q > 1))
    return [replace(s, quick=False, gpu=True) for s in specs]


# ------------------------------------------------------------------------ norm / ffn specs


def norm_specs(gpu: bool = False) -> list:
    specs = []
    for op in ("layer_norm", "rms_norm"):
        N = lambda *a, **k: NormSpec(op, *a, **{"bias": op == "layer_norm", **k})  # noqa: E731
        specs += [
            # widths 1 and 7 in every dtype (one element per row is RMSNorm's sign)
            N(37, 1, "bfloat16"), N(37, 1, "float16"), N(13, 7, "bfloat16"), N(13, 7, "float16"),
            N(37, 7, "float32", residual=True),
            N(37, 1023, "bfloat16", residual=True), N(37, 1023, "float16"), N(3, 1024, "float32"),
            N(3, 4096, "bfloat16", residual=True, quick=False),
            N(1, 33, "bfloat16", weight=False, bias=False),
            N(3, 7, "bfloat16", weight=False, residual=True),
            N(37, 129, "float16", layout="strided", residual=True),
            N(3, 129, "float16", layout="unviewable"),
            N(37, 1023, "bfloat16", param_dtype="float32"),
            N(3, 8201, "bfloat16", residual=True, quick=False),  # past both register-path widths
            N(41, 4096, "float32", residual=True, quick=False),
        ]
        if op == "layer_norm":
            specs += [N(37, 7, "bfloat16", weight=False), N(37, 33, "float16", bias=False, residual=True)]
    if gpu:
        specs += _norm_gpu_specs()
    return specs


def _norm_gpu_specs() -> list:
    specs = []
    options = {
        "none": dict(weight=False, bias=False),
        "weight": dict(bias=False),
        "affine": dict(),
        "weight-residual": dict(bias=False, residual=True),
        "affine-residual": dict(residual=True),
    }
    for op in ("layer_norm", "rms_norm"):
        for name, o in options.items():
            if op == "rms_norm" and o.get("bias", True):
                continue
            for width in (1, 7, 33, 1000, 1023, 1024, 4096, 8192, 12288, 12345, 16392, 65536):
                for dtype in ("float16", "bfloat16", "float32"):
                    for layout in ("contiguous", "strided"):
                        rows = 203 if width < 65536 else 37
                        specs.append(NormSpec(op, rows, width, dtype, layout=layout, quick=False, gpu=True, **o))
        for rows, width in ((1, 1024), (16384, 1024), (16384, 4096), (4099, 8192), (65537, 1023), (257, 65536)):
            specs.append(NormSpec(op, rows, width, "bfloat16", bias=op == "layer_norm", residual=True,
                                  quick=False, gpu=True))
        for layout in ("misaligned", "unviewable"):
            for width in (7, 1000, 4096, 12345):
                specs.append(NormSpec(op, 37, width, "float32" if width == 4096 else "float16",
                                      bias=op == "layer_norm", layout=layout, quick=False, gpu=True))
        for dtype, param in (("bfloat16", "float32"), ("float16", "bfloat16"), ("float32", "float64"),
                             ("bfloat16", "float64")):
            for width in (1000, 1024, 12345):
                specs.append(NormSpec(op, 37, width, dtype, bias=op == "layer_norm", param_dtype=param,
                                      quick=False, gpu=True))
    return specs


def activation_specs(gpu: bool = False) -> list:
    A = ActivationSpec
    specs = [
        A("bias_gelu", 37, 1, "bfloat16"), A("bias_gelu", 37, 7, "float16", approximate="tanh"),
        A("bias_gelu", 3, 1023, "float32", bias=False), A("bias_gelu", 37, 1024, "bfloat16", approximate="tanh"),
        A("bias_gelu", 5, 129, "float16", layout="3d"), A("bias_gelu", 37, 1024, "bfloat16", layout="strided"),
        A("bias_gelu", 37, 7, "float16", scale=8.0), A("bias_gelu", 37, 7, "float32", scale=20.0,
                                                       approximate="tanh"),
        A("bias_gelu", 1, 4096, "float16", bias=False, approximate="tanh", quick=False),
        A("swiglu", 37, 1, "float16"), A("swiglu", 37, 7, "bfloat16"), A("swiglu", 3, 1023, "float32"),
        A("swiglu", 5, 129, "bfloat16", layout="3d"), A("swiglu", 37, 1023, "float16", layout="strided"),
        A("swiglu", 37, 7, "float32", scale=30.0), A("swiglu", 37, 4096, "bfloat16", quick=False),
        A("geglu", 37, 1, "float32"), A("geglu", 37, 7, "bfloat16", approximate="tanh"),
        A("geglu", 3, 1024, "float16"), A("geglu", 5, 129, "bfloat16", approximate="tanh", layout="3d"),
        A("geglu", 37, 1023, "float16", approximate="tanh", layout="strided"),
        A("geglu", 37, 7, "float16", scale=8.0), A("geglu", 13, 7, "bfloat16", layout="unviewable"),
        A("geglu", 37, 4096, "float32", quick=False),
    ]
    if gpu:
        specs += _activation_gpu_specs()
    return specs


def _activation_gpu_specs() -> list:
    specs = []
    for dtype in ("float16", "bfloat16", "float32"):
        for width in (1, 3, 7, 8, 13, 1023, 1024, 4096, 8191, 11008, 65536):
            for rows in (1, 37, 2053):
                if width == 65536 and rows > 37:
                    continue
                specs += [
                    ActivationSpec("bias_gelu", rows, width, dtype, bias=rows != 37, approximate="none"),
                    ActivationSpec("bias_gelu", rows, width, dtype, bias=rows == 37, approximate="tanh"),
                    ActivationSpec("swiglu", rows, width, dtype),
                    ActivationSpec("geglu", rows, width, dtype),
                    ActivationSpec("geglu", rows, width, dtype, approximate="tanh"),
                ]
        for layout in ("3d", "strided", "unviewable"):
            for op in ("bias_gelu", "swiglu", "geglu"):
                specs.append(ActivationSpec(op, 131, 4096, dtype, layout=layout))
    return [replace(s, quick=False, gpu=True) for s in specs]


# ------------------------------------------------------------------------ rotary specs

ROTARY_INT_OFFSET = 5  # the "int" offsets of a RotarySpec
ROTARY_MAX_OFFSET = 9  # per-batch offsets are drawn from [0, ROTARY_MAX_OFFSET]
ROTARY_BASE = 10000.0


def rotary_specs(gpu: bool = False) -> list:
    R = RotarySpec
    specs = [
        R(2, 17, 3, 64), R(2, 17, 3, 64, interleaved=True),
        R(3, 13, 5, 40, 24, "float32", offsets="int"),  # partial rotary, D not a power of two
        R(3, 13, 5, 40, 24, "bfloat16", interleaved=True, offsets="int64"),
        R(2, 9, 7, 72, 32, "float16", offsets="int32", layout="transposed"),
        R(2, 33, 3, 30, 30, "float16", interleaved=True, layout="transposed", x_dtype_tables=True),  # 15 pairs
        R(1, 1, 1, 2, dtype="float32"),  # one pair
        R(2, 7, 4, 128, 64, "float32", interleaved=True, offsets="int64"),
        R(0, 5, 3, 16, dtype="float32"),  # empty batch
        R(4, 257, 8, 128, dtype="bfloat16", offsets="int64", quick=False),
    ]
    if gpu:
        for dtype in ("float16", "bfloat16", "float32"):
            for interleaved in (False, True):
                for rotary_dim in (128, 64):
                    specs.append(R(8, 2048, 32, 128, rotary_dim, dtype, interleaved, "int64", quick=False, gpu=True))
            specs.append(R(4, 1023, 12, 80, 80, dtype, layout="transposed", quick=False, gpu=True))
    return specs


def all_specs(gpu: bool = False) -> list:
    """Every spec in report order (``spec.quick`` marks verify's --quick subset)."""
    return (attention_specs(gpu) + varlen_specs(gpu) + kvcache_specs(gpu) + norm_specs(gpu)
            + activation_specs(gpu) + rotary_specs(gpu))


# ---------------------------------------------------------------- sanitize (CUDA, small)


def sanitize_specs(group: str, size: str) -> list:
    """The compute-sanitizer workloads of ``scripts/sanitize_cases.py``: "tiny" keeps every
    grid to a few blocks (racecheck, synccheck), "small" is for memcheck and initcheck;
    head dims 64/128/256 at both sizes. bf16 unless said otherwise."""
    tiny = size == "tiny"
    b16 = "bfloat16"
    if group == "attention":
        if tiny:
            return [_A(1, 2, 1, 77, 77, 64, b16, causal=True), _A(1, 2, 2, 77, 77, 128, b16),
                    _A(1, 2, 1, 77, 77, 256, "float16", causal=True),
                    _A(1, 2, 1, 40, 77, 80, b16, causal=True, window=(16, -1)),  # padded, Sq < Sk
                    _A(1, 2, 2, 77, 33, 64, b16, causal=True, deterministic=True)]  # Sq > Sk: empty rows
        return [_A(2, 4, 4, 77, 77, 64, b16), _A(2, 4, 2, 77, 77, 128, b16, causal=True),
                _A(1, 4, 1, 77, 77, 256, "float16", causal=True),
                _A(1, 6, 2, 33, 150, 80, b16, causal=True),  # padded head dim, Sq < Sk
                _A(1, 2, 2, 150, 33, 64, b16, causal=True),  # Sq > Sk: the top rows see nothing
                _A(1, 4, 2, 200, 200, 128, b16, window=(32, 8), softcap=30.0),
                _A(1, 4, 2, 1, 300, 128, b16),  # one query: the split-KV candidate
                _A(2, 4, 2, 130, 130, 64, b16, layout="bhsd", causal=True),
                _A(1, 4, 2, 77, 130, 128, "float16", layout="misaligned"),
                _A(2, 4, 2, 257, 257, 256, b16, causal=True, deterministic=True)]
    if group == "varlen":
        if tiny:
            return [VarlenSpec((1, 0, 17, 40), (5, 9, 0, 40), 2, 1, 64, b16, causal=True)]
        return [VarlenSpec((1, 0, 17, 128, 77), (5, 9, 0, 128, 300), 4, 2, 64, b16, causal=True),
                VarlenSpec((77, 200), (200, 77), 4, 4, 128, "float16"),
                VarlenSpec((33, 1), (33, 65), 4, 1, 256, b16, causal=True)]
    if group == "kvcache":
        if tiny:
            return [KvcacheSpec((0, 700), 1024, 1, 1, 4, 2, 128, b16),
                    KvcacheSpec((5, 60), 64, 3, 3, 2, 1, 64, b16, causal=True)]
        return [KvcacheSpec((3000,), 4096, 1, 1, 8, 2, 128, b16),  # one long row: split-KV
                KvcacheSpec((0, 1, 1000, 4000), 4096, 1, 1, 8, 1, 64, b16),  # splits with no valid key
                KvcacheSpec((2, 300, 500), 512, 4, 4, 4, 2, 256, b16, causal=True),
                KvcacheSpec((10, 77), 100, 1, 0, 4, 4, 80, b16)]  # padded head dim, nothing appended
    if group == "norm":
        ln = dict(op="layer_norm")
        rms = dict(op="rms_norm", bias=False)
        if tiny:
            return [NormSpec(**ln, rows=3, width=33), NormSpec(**rms, rows=2, width=1025, residual=True)]
        return [NormSpec(**ln, rows=7, width=1), NormSpec(**ln, rows=7, width=33, residual=True),
                NormSpec(**rms, rows=64, width=1024, dtype="float16"),
                NormSpec(**rms, rows=5, width=4097, residual=True),
                NormSpec(**ln, rows=33, width=1000, dtype="float32", weight=False, bias=False),
                NormSpec(**ln, rows=17, width=768, residual=True, layout="strided"),
                NormSpec(**rms, rows=3, width=8192, weight=False)]
    if group == "glu":
        if tiny:
            return [ActivationSpec("swiglu", 3, 33), ActivationSpec("geglu", 2, 1025)]
        return [ActivationSpec("swiglu", 7, 1), ActivationSpec("geglu", 7, 33, "float16"),
                ActivationSpec("geglu", 64, 1000, approximate="tanh"),
                ActivationSpec("swiglu", 5, 4097, "float32"),
                ActivationSpec("swiglu", 17, 768, layout="strided")]
    if group == "bias_gelu":
        if tiny:
            return [ActivationSpec("bias_gelu", 3, 33), ActivationSpec("bias_gelu", 2, 1025, bias=False,
                                                                       approximate="tanh")]
        return [ActivationSpec("bias_gelu", 7, 1), ActivationSpec("bias_gelu", 67, 1023, "float16", approximate="tanh"),
                ActivationSpec("bias_gelu", 5, 4097, bias=False),
                ActivationSpec("bias_gelu", 33, 1000, "float32"),
                ActivationSpec("bias_gelu", 17, 768, layout="misaligned")]  # misaligned rows
    raise ValueError(f"unknown sanitize group {group!r}")


# ================================================================ cases (torch from here)


@dataclass
class Case:
    """A spec made runnable. ``make(device, gen)`` draws inputs; ``run(inputs, backend)``
    and ``ref(inputs, upcast)`` return ``{name: tensor}`` with the same names."""

    spec: object
    make: Callable
    run: Callable
    ref: Callable
    grad_inputs: tuple = ()  # names of the inputs to differentiate
    features: frozenset = frozenset()
    head_dim: int = 0
    # (inputs, actual outputs, actual grads) -> list of failure messages (exact checks)
    exact: Optional[Callable] = None
    # (name, oracle inputs, cotangents) -> an extra absolute floor for that comparison
    extra_floor: Optional[Callable] = None
    keep_dtype: tuple = ()  # inputs the oracle does not upcast (ALiBi slopes)
    exact_outputs: tuple = ()  # outputs compared bit for bit with the baseline (the appended caches)

    @property
    def op(self) -> str:
        return self.spec.op

    @property
    def quick(self) -> bool:
        return self.spec.quick

    @property
    def gpu(self) -> bool:
        return self.spec.gpu

    @property
    def label(self) -> str:
        return label(self.spec)

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.spec.dtype)

    def call(self, device_type: str):
        """The ``fast_attn.backends.Call`` this case makes on ``device_type`` tensors."""
        from fast_attn import backends

        return backends.Call(self.op, device_type, self.dtype, self.features, self.head_dim)


def build(spec) -> Case:
    """The runnable ``Case`` of a spec."""
    if isinstance(spec, AttentionSpec):
        return _dense_case(spec)
    if isinstance(spec, VarlenSpec):
        return _varlen_case(spec)
    if isinstance(spec, KvcacheSpec):
        return _kvcache_case(spec)
    if isinstance(spec, NormSpec):
        return _norm_case(spec)
    if isinstance(spec, ActivationSpec):
        return _activation_case(spec)
    if isinstance(spec, RotarySpec):
        return _rotary_case(spec)
    raise TypeError(f"not a case spec: {spec!r}")


def cases(specs) -> list:
    return [build(spec) for spec in specs]


# ------------------------------------------------------------------------ tensor helpers


def _randn(gen, device, dtype, shape, scale=1.0, shift=0.0):
    """Normal samples drawn in fp32 on CPU (the same on every device), then moved."""
    import torch

    values = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale + shift
    return values.to(device=device, dtype=dtype)


def _laid_out(t, layout: str):
    """``t``'s values in another memory layout (same shape)."""
    import torch

    if layout == "bhsd":  # (B, S, H, D) values stored as (B, H, S, D)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout in ("sliced", "strided"):  # rows of a wider tensor
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + SLICE_PAD, dtype=t.dtype, device=t.device)
        wide[..., 3:3 + t.shape[-1]].copy_(t)
        return wide[..., 3:3 + t.shape[-1]]
    if layout == "misaligned":  # storage offset by one element
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view
    return t


def _unviewable(t):
    """(R, N) values as an (R, 2, N) view of a (2, R, N) tensor (both planes hold t): its
    2R rows have no single row stride, so the op must copy them."""
    import torch

    store = torch.empty(2, *t.shape, dtype=t.dtype, device=t.device)
    store[0].copy_(t)
    store[1].copy_(t)
    return store.transpose(0, 1)


def _cu_seqlens(lengths, device):
    import torch

    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


# attn_mask kinds: (B, H, Sq, Sk, gen) -> mask on CPU (moved by the caller)
def _mask(kind, b, h, sq, sk, gen):
    import torch

    if kind == "bool_b":  # broadcast over batch; row 0 fully masked
        mask = torch.rand(1, h, sq, sk, generator=gen) > 0.3
        mask[:, :, 0] = False
        return mask
    if kind == "bool_2d":  # broadcast over batch and heads
        return torch.rand(sq, sk, generator=gen) > 0.3
    if kind == "add_h":  # additive, broadcast over heads
        return torch.randn(b, 1, sq, sk, generator=gen)
    if kind == "add_bh":
        return torch.randn(1, h, sq, sk, generator=gen) * 2.0
    if kind == "add_pad":  # key padding: batch 0 loses its last third of keys (-inf)
        keep = torch.tensor([sk - sk // 3] + [sk] * (b - 1))[:b].view(b, 1, 1, 1)
        return torch.where(torch.arange(sk).view(1, 1, 1, sk) >= keep, float("-inf"), 0.0)
    raise ValueError(f"unknown mask kind {kind!r}")


MASKS = ("bool_b", "bool_2d", "add_h", "add_bh", "add_pad")


def _attention_extras(spec, inputs, gen, device, batch, seqlen_q, seqlen_k):
    import torch

    if spec.alibi:
        shape = (spec.heads,) if spec.alibi == "h" else (batch, spec.heads)
        inputs["alibi_slopes"] = (torch.rand(shape, generator=gen) * 0.5 + 0.05).to(device)
    if getattr(spec, "mask", ""):
        mask = _mask(spec.mask, batch, spec.heads, seqlen_q, seqlen_k, gen)
        inputs["attn_mask"] = mask.to(device=device, dtype=mask.dtype if mask.dtype == torch.bool
                                      else getattr(torch, spec.dtype))


def _attention_options(spec) -> dict:
    options = dict(causal=spec.causal, window_size=tuple(spec.window), softcap=spec.softcap)
    if getattr(spec, "softmax_scale", 0.0):
        options["softmax_scale"] = spec.softmax_scale
    if getattr(spec, "dropout_p", 0.0):
        options.update(dropout_p=spec.dropout_p, dropout_seed=DROPOUT_SEED)
    return options


def _attention_features(spec, backward: bool):
    from fast_attn import backends

    mask = getattr(spec, "mask", "")
    return backends.features(
        causal=spec.causal, window=tuple(spec.window) != (-1, -1), alibi=bool(spec.alibi),
        softcap=spec.softcap > 0, bool_mask=mask.startswith("bool"), additive_mask=mask.startswith("add"),
        dropout=getattr(spec, "dropout_p", 0.0) > 0, gqa=spec.kv_heads != spec.heads,
        deterministic=getattr(spec, "deterministic", False), backward=backward,
    )


def _extra(inputs) -> dict:
    return {name: inputs[name] for name in ("alibi_slopes", "attn_mask") if name in inputs}


def _masked_rows_check(inputs, actual, grads):
    """Rows whose oracle LSE is -inf (no key): out exactly 0, LSE -inf, dq exactly 0."""
    import torch

    failures = []
    lse, out = actual["lse"], actual["out"]
    empty = torch.isneginf(lse)  # (B, H, Sq) or (H, total_q)
    if bool(empty.any()):
        rows = empty.transpose(-1, -2) if out.dim() == 4 else empty.transpose(0, 1)  # like out[..., 0]
        if not bool((out[rows] == 0).all()):
            failures.append("a fully masked row's output is not exactly 0")
        if "q" in grads and not bool((grads["q"][rows] == 0).all()):
            failures.append("a fully masked row's dq is not exactly 0")
    return failures


def _dense_case(spec: AttentionSpec) -> Case:
    def make(device, gen):
        import torch

        dtype = getattr(torch, spec.dtype)
        b, d, scale = spec.batch, spec.head_dim, spec.input_scale
        if spec.layout == "packed":
            qkv = _randn(gen, device, dtype, (b, spec.seqlen_q, 3, spec.heads, d), scale)
            q, k, v = qkv.unbind(2)
        else:
            q, k, v = (_laid_out(_randn(gen, device, dtype, (b, s, h, d), scale), spec.layout)
                       for s, h in ((spec.seqlen_q, spec.heads), (spec.seqlen_k, spec.kv_heads),
                                    (spec.seqlen_k, spec.kv_heads)))
        inputs = {"q": q, "k": k, "v": v}
        _attention_extras(spec, inputs, gen, device, b, spec.seqlen_q, spec.seqlen_k)
        return inputs

    options = _attention_options(spec)

    def run(inputs, backend):
        import fast_attn

        out, lse = fast_attn.attention(inputs["q"], inputs["k"], inputs["v"], **_extra(inputs), **options,
                                       deterministic=spec.deterministic, return_lse=True, backend=backend)
        return {"out": out, "lse": lse}

    def ref(inputs, upcast):
        from fast_attn.reference.attention import attention_ref

        out, lse = attention_ref(inputs["q"], inputs["k"], inputs["v"], **_extra(inputs), **options, upcast=upcast)
        return {"out": out, "lse": lse}

    return Case(spec, make, run, ref, ("q", "k", "v"), _attention_features(spec, True), spec.head_dim,
                exact=_masked_rows_check, keep_dtype=("alibi_slopes",))


def _varlen_case(spec: VarlenSpec) -> Case:
    batch, max_q, max_k = len(spec.lens_q), max(spec.lens_q), max(spec.lens_k)

    def make(device, gen):
        import torch

        dtype = getattr(torch, spec.dtype)
        scale = spec.input_scale
        inputs = {
            "q": _randn(gen, device, dtype, (sum(spec.lens_q), spec.heads, spec.head_dim), scale),
            "k": _randn(gen, device, dtype, (sum(spec.lens_k), spec.kv_heads, spec.head_dim), scale),
            "v": _randn(gen, device, dtype, (sum(spec.lens_k), spec.kv_heads, spec.head_dim), scale),
            "cu_seqlens_q": _cu_seqlens(spec.lens_q, device),
            "cu_seqlens_k": _cu_seqlens(spec.lens_k, device),
        }
        # masks and slopes in the padded (B, H, max_q, max_k) coordinates
        _attention_extras(spec, inputs, gen, device, batch, max_q, max_k)
        return inputs

    options = _attention_options(spec)

    def args(inputs):
        return (inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens_q"], inputs["cu_seqlens_k"], max_q, max_k)

    def run(inputs, backend):
        import fast_attn

        out, lse = fast_attn.attention_varlen(*args(inputs), **_extra(inputs), **options,
                                              deterministic=spec.deterministic, return_lse=True, backend=backend)
        return {"out": out, "lse": lse}

    def ref(inputs, upcast):
        from fast_attn.reference.attention import attention_varlen_ref

        out, lse = attention_varlen_ref(*args(inputs), **_extra(inputs), **options, upcast=upcast)
        return {"out": out, "lse": lse}

    return Case(spec, make, run, ref, ("q", "k", "v"), _attention_features(spec, True), spec.head_dim,
                exact=_masked_rows_check, keep_dtype=("alibi_slopes",))


def _kvcache_case(spec: KvcacheSpec) -> Case:
    batch = len(spec.cache_seqlens) if spec.cache_seqlens is not None else spec.batch

    def make(device, gen):
        import torch

        dtype = getattr(torch, spec.dtype)
        shape = (batch, spec.cache_len, spec.kv_heads, spec.head_dim)
        scale = spec.input_scale
        inputs = {"q": _randn(gen, device, dtype, (batch, spec.seqlen_q, spec.heads, spec.head_dim), scale),
                  "k_cache": _laid_out(_randn(gen, device, dtype, shape, scale), spec.layout),
                  "v_cache": _laid_out(_randn(gen, device, dtype, shape, scale), spec.layout)}
        if spec.cache_seqlens is not None:
            inputs["cache_seqlens"] = torch.tensor(spec.cache_seqlens, dtype=torch.int32, device=device)
            if spec.stale == "nonfinite":  # stale rows must never be read into the result
                for b, filled in enumerate(spec.cache_seqlens):
                    inputs["k_cache"][b, filled + spec.new_len:] = float("nan")
                    inputs["v_cache"][b, filled + spec.new_len:] = float("inf")
        if spec.new_len:
            new = (batch, spec.new_len, spec.kv_heads, spec.head_dim)
            inputs["k"] = _randn(gen, device, dtype, new, scale)
            inputs["v"] = _randn(gen, device, dtype, new, scale)
        _attention_extras(spec, inputs, gen, device, batch, spec.seqlen_q, spec.cache_len)
        return inputs

    options = _attention_options(spec)

    def call(fn, inputs, **extra):
        # The op appends into the caches: every run gets its own copies (layout kept),
        # returned as outputs so that the append is compared too.
        k_cache, v_cache = (_laid_out(inputs[n].clone(), spec.layout) for n in ("k_cache", "v_cache"))
        out, lse = fn(inputs["q"], k_cache, v_cache, inputs.get("k"), inputs.get("v"), inputs.get("cache_seqlens"),
                      alibi_slopes=inputs.get("alibi_slopes"), **options, **extra)
        return {"out": out, "lse": lse, "k_cache": k_cache, "v_cache": v_cache}

    def run(inputs, backend):
        import torch

        import fast_attn

        with torch.no_grad():
            return call(fast_attn.attention_with_kvcache, inputs, return_lse=True, backend=backend)

    def ref(inputs, upcast):
        from fast_attn.reference.attention import attention_with_kvcache_ref

        return call(attention_with_kvcache_ref, inputs, upcast=upcast)

    return Case(spec, make, run, ref, (), _attention_features(spec, False), spec.head_dim,
                exact=_masked_rows_check, keep_dtype=("alibi_slopes",), exact_outputs=("k_cache", "v_cache"))


def _norm_case(spec: NormSpec) -> Case:
    op, width = spec.op, spec.width
    has_bias = spec.bias and op == "layer_norm"

    def make(device, gen):
        import torch

        dtype = getattr(torch, spec.dtype)
        param_dtype = getattr(torch, spec.param_dtype or spec.dtype)

        def rows(scale=1.0, shift=0.0):
            t = _randn(gen, device, dtype, (spec.rows, width), scale, shift)
            if spec.layout == "unviewable":
                return _unviewable(t)  # (2, rows, width): no single row stride
            return _laid_out(t, spec.layout)

        inputs = {"x": rows(1.5, 0.5)}  # an offset mean exercises the centring
        if spec.weight:
            inputs["weight"] = _randn(gen, device, param_dtype, (width,))
        if has_bias:
            inputs["bias"] = _randn(gen, device, param_dtype, (width,))
        if spec.residual:
            inputs["residual"] = rows()
        return inputs

    eps = NORM_EPS[op]

    def run(inputs, backend):
        import fast_attn

        fn = fast_attn.layer_norm if op == "layer_norm" else fast_attn.rms_norm
        out = fn(**inputs, eps=eps, backend=backend)
        return {"y": out[0], "h": out[1]} if spec.residual else {"y": out}

    def ref(inputs, upcast):
        from fast_attn.reference.norm import layer_norm_ref, rms_norm_ref

        fn = layer_norm_ref if op == "layer_norm" else rms_norm_ref
        result = fn(**inputs, eps=eps, upcast=upcast)
        return {"y": result.y, "h": result.h} if spec.residual else {"y": result.y}

    def exact(inputs, actual, grads):
        if not spec.residual:
            return []
        x, r = inputs["x"], inputs["residual"]
        rounded = (x.float() + r.float()).to(x.dtype)
        return [] if bool((actual["h"] == rounded).all()) else ["h is not the fp32 sum rounded to nearest even"]

    def extra_floor(name, oracle_inputs, cotangents):
        """dweight/dbias are sums over rows: their rounding error scales with the sum of
        |terms| (cancellation can make it far larger than the sum): one ulp of the
        parameter's dtype at the largest column's sum of |terms|."""
        import torch

        if name not in ("weight", "bias"):
            return 0.0
        dy = cotangents["y"].double().reshape(-1, width)
        terms = dy
        if name == "weight":
            xhat = ref({k: v for k, v in oracle_inputs.items() if k in ("x", "residual")}, True)["y"]
            terms = dy * xhat.double().reshape(-1, width)
        param_dtype = getattr(torch, spec.param_dtype or spec.dtype)
        return torch.finfo(param_dtype).eps * (float(terms.abs().sum(0).max()) if terms.numel() else 0.0)

    names = tuple(n for n, present in (("x", True), ("weight", spec.weight), ("bias", has_bias),
                                       ("residual", spec.residual)) if present)
    from fast_attn import backends

    feats = backends.features(weight=spec.weight, bias=has_bias, residual=spec.residual, backward=True)
    return Case(spec, make, run, ref, names, feats, exact=exact, extra_floor=extra_floor)


def _activation_case(spec: ActivationSpec) -> Case:
    op = spec.op

    def make(device, gen):
        import torch

        dtype = getattr(torch, spec.dtype)
        shape = (3, spec.rows, spec.width) if spec.layout == "3d" else (spec.rows, spec.width)

        def draw(scale=1.0):
            t = _randn(gen, device, dtype, shape, scale)
            if spec.layout == "unviewable":
                return _unviewable(t)
            if spec.layout in ("strided", "misaligned"):
                return _laid_out(t, spec.layout)
            return t

        if op == "bias_gelu":
            inputs = {"x": draw(spec.scale)}
            if spec.bias:
                inputs["bias"] = _randn(gen, device, dtype, (spec.width,))
            return inputs
        if spec.layout == "strided":  # gate and up: the two halves of one fused projection
            fused = _randn(gen, device, dtype, (spec.rows, 2 * spec.width))
            fused[:, :spec.width] *= spec.scale
            return {"gate": fused[:, :spec.width], "up": fused[:, spec.width:]}
        return {"gate": draw(spec.scale), "up": draw()}

    def run(inputs, backend):
        import fast_attn

        if op == "bias_gelu":
            return {"y": fast_attn.bias_gelu(inputs["x"], inputs.get("bias"), spec.approximate, backend=backend)}
        if op == "swiglu":
            return {"y": fast_attn.swiglu(inputs["gate"], inputs["up"], backend=backend)}
        return {"y": fast_attn.geglu(inputs["gate"], inputs["up"], spec.approximate, backend=backend)}

    def ref(inputs, upcast):
        from fast_attn.reference.ffn import bias_gelu_ref, geglu_ref, swiglu_ref

        if op == "bias_gelu":
            return {"y": bias_gelu_ref(inputs["x"], inputs.get("bias"), spec.approximate, upcast)}
        if op == "swiglu":
            return {"y": swiglu_ref(inputs["gate"], inputs["up"], upcast)}
        return {"y": geglu_ref(inputs["gate"], inputs["up"], spec.approximate, upcast)}

    from fast_attn import backends

    has_bias = op == "bias_gelu" and spec.bias
    names = (("x", "bias") if has_bias else ("x",)) if op == "bias_gelu" else ("gate", "up")
    feats = backends.features(bias=has_bias, gelu_tanh=op != "swiglu" and spec.approximate == "tanh", backward=True)
    return Case(spec, make, run, ref, names, feats)


def _rotary_case(spec: RotarySpec) -> Case:
    rotary_dim = spec.rotary_dim or spec.head_dim
    seqlen_ro = spec.seqlen + ROTARY_MAX_OFFSET + 3  # a few rows past the last position used

    def make(device, gen):
        import torch

        dtype = getattr(torch, spec.dtype)
        b, s, h, d = spec.batch, spec.seqlen, spec.heads, spec.head_dim
        if spec.layout == "transposed":
            x = _randn(gen, device, dtype, (b, h, s, d)).transpose(1, 2)
        else:
            x = _randn(gen, device, dtype, (b, s, h, d))
        # GPT-NeoX / Llama tables: angle pos * base^(-2m / rotary_dim)
        inv_freq = ROTARY_BASE ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        angles = torch.outer(torch.arange(seqlen_ro, dtype=torch.float64), inv_freq)
        table_dtype = dtype if spec.x_dtype_tables else torch.float32
        inputs = {"x": x, "cos": angles.cos().to(device, table_dtype), "sin": angles.sin().to(device, table_dtype)}
        if spec.offsets in ("int32", "int64"):
            inputs["seqlen_offsets"] = torch.randint(0, ROTARY_MAX_OFFSET + 1, (b,), generator=gen).to(
                device, getattr(torch, spec.offsets))
        return inputs

    def offsets(inputs):
        return inputs.get("seqlen_offsets", ROTARY_INT_OFFSET if spec.offsets == "int" else 0)

    def run(inputs, backend):
        import fast_attn

        return {"out": fast_attn.rotary(inputs["x"], inputs["cos"], inputs["sin"], interleaved=spec.interleaved,
                                        seqlen_offsets=offsets(inputs), backend=backend)}

    def ref(inputs, upcast):
        from fast_attn.reference.rotary import rotary_ref

        return {"out": rotary_ref(inputs["x"], inputs["cos"], inputs["sin"], spec.interleaved, offsets(inputs),
                                  upcast=upcast)}

    from fast_attn import backends

    feats = backends.features(interleaved=spec.interleaved, batch_offsets=spec.offsets in ("int32", "int64"),
                              backward=True)
    return Case(spec, make, run, ref, ("x",), feats)


# ============================================================================ evaluation


@dataclass
class Check:
    """One tolerance-rule comparison of an output or gradient."""

    name: str  # "out", "lse", "dq", "dweight", ...
    comparison: object  # fast_attn.testing.Comparison
    extra_floor: float = 0.0

    @property
    def ok(self) -> bool:
        c = self.comparison
        return not c.message and c.error <= c.allowed + self.extra_floor

    @property
    def ratio(self) -> float:
        allowed = self.comparison.allowed + self.extra_floor
        return self.comparison.error / allowed if allowed > 0 else float("inf")

    def __str__(self) -> str:
        floor = f" (row-sum floor {self.extra_floor:.3g})" if self.extra_floor else ""
        return f"{self.name}: {self.comparison}{floor}"


@dataclass
class Evaluation:
    """Everything one case on one backend produced; truthy when every check passed."""

    checks: list = field(default_factory=list)
    failures: list = field(default_factory=list)  # exact checks that failed
    outputs: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures and all(c.ok for c in self.checks)

    @property
    def worst(self) -> float:
        return max((c.ratio for c in self.checks), default=0.0)

    def __bool__(self) -> bool:
        return self.ok

    def report(self) -> str:
        return "; ".join(self.failures + [str(c) for c in self.checks if not c.ok])


def _with_grads(case: Case, inputs: dict, fn, cotangents=None, gen=None):
    """(outputs, grads of the case's grad inputs, cotangents) for ``fn(inputs)``."""
    import torch

    leaves = {k: (v.detach().requires_grad_() if k in case.grad_inputs else v) for k, v in inputs.items()}
    outputs = fn(leaves)
    if not case.grad_inputs:
        return {k: v.detach() for k, v in outputs.items()}, {}, cotangents
    # the differentiable outputs: everything but the LSE (it carries no gradient)
    diff = [name for name in outputs if name != "lse"]
    if cotangents is None:
        cotangents = {name: _randn(gen, outputs[name].device, outputs[name].dtype, outputs[name].shape)
                      for name in diff}
    wanted = [name for name in case.grad_inputs if name in leaves]
    grads = torch.autograd.grad([outputs[n] for n in diff], [leaves[n] for n in wanted],
                                [cotangents[n].to(outputs[n].device, outputs[n].dtype) for n in diff],
                                allow_unused=True)
    grads = {n: (torch.zeros_like(leaves[n]) if g is None else g.detach()) for n, g in zip(wanted, grads)}
    return {k: v.detach() for k, v in outputs.items()}, grads, cotangents


def evaluate(case: Case, backend: str, device, *, seed: int = 0, oracle_dtype=None) -> Evaluation:
    """Run ``case`` on ``backend`` (fresh inputs from ``seed``) forward and backward, and
    compare every output and gradient with the oracle by the tolerance rule.

    A backend that raises propagates the exception (the caller decides whether that is
    a failure of one cell or of a test)."""
    import torch

    from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, compare

    device = torch.device(device)
    oracle_dtype = oracle_dtype or torch.float64
    gen = torch.Generator().manual_seed(seed)
    inputs = case.make(device, gen)
    before = {k: v.clone() for k, v in inputs.items()}
    actual, grads, cotangents = _with_grads(case, inputs, lambda i: case.run(i, backend), gen=gen)

    def up(name, t):
        if t.is_floating_point() and name not in case.keep_dtype:
            return t.to(oracle_dtype)
        return t

    oracle_inputs = {k: up(k, v) for k, v in inputs.items()}
    oracle, oracle_grads, _ = _with_grads(case, oracle_inputs, lambda i: case.ref(i, True), cotangents)
    baseline, baseline_grads, _ = _with_grads(case, inputs, lambda i: case.ref(i, False), cotangents)

    result = Evaluation(outputs=actual, grads=grads)
    for name, value in actual.items():
        if value.shape != oracle[name].shape:
            result.failures.append(f"{name}: shape {tuple(value.shape)} != {tuple(oracle[name].shape)}")
            continue
        if name in case.exact_outputs:
            if not torch.equal(value.nan_to_num(), baseline[name].nan_to_num()):
                result.failures.append(f"{name} differs from the reference's (the append in place)")
            continue
        if name != "lse" and value.dtype != case.dtype:
            result.failures.append(f"{name}: dtype {value.dtype}, expected {case.dtype}")
        if name == "lse" and value.dtype != torch.float32:
            result.failures.append(f"lse: dtype {value.dtype}, expected torch.float32")
        comparison = compare(value.cpu(), oracle[name].cpu(), baseline[name].to(oracle[name].dtype).cpu(),
                             factor=OUTPUT_FACTOR)
        result.checks.append(Check(name, comparison))
    for name, value in grads.items():
        if value.shape != inputs[name].shape or value.dtype != inputs[name].dtype:
            result.failures.append(f"d{name}: {value.dtype} {tuple(value.shape)}, expected "
                                   f"{inputs[name].dtype} {tuple(inputs[name].shape)}")
            continue
        comparison = compare(value.cpu(), oracle_grads[name].cpu(), baseline_grads[name].cpu(),
                             factor=GRAD_FACTOR, gradient=True)
        floor = case.extra_floor(name, oracle_inputs, cotangents) if case.extra_floor else 0.0
        result.checks.append(Check(f"d{name}", comparison, floor))
    for name, value in inputs.items():
        if not torch.equal(value.nan_to_num(), before[name].nan_to_num()):
            result.failures.append(f"the input {name} was written")
    if case.exact is not None:
        result.failures += case.exact(inputs, actual, grads)
    return result


def nan_poisoned():
    """A context in which every fresh float allocation (torch.empty and the ATen/C++
    ``at::empty`` behind every op and launcher) is filled with NaN: an output element a
    kernel never writes then fails the comparison."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def poisoned():
        was_on = torch.are_deterministic_algorithms_enabled()
        was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        was_fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
            torch.utils.deterministic.fill_uninitialized_memory = was_fill

    return poisoned()


# -------------------------------------------------------------- for the test modules

BACKEND_NAMES = ("torch", "triton", "cuda")  # what the per-op test modules parametrize over
_DOT_OPS = ("attention", "attention_varlen", "attention_with_kvcache")  # kernels with tl.dot


def device_for(backend: str) -> str:
    """Where a backend's cases run in the tests: the GPU when there is one, else the CPU
    (the triton backend through the interpreter there)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def skip_reason(case: Case, backend: str) -> Optional[str]:
    """None if ``case`` runs on ``backend`` in this test session, else why not: a GPU-sized
    case without a GPU, a backend that cannot serve it here (``backends.why_not``), or a
    Triton case the interpreter leaves to a GPU (bf16 dots: the interpreter multiplies
    raw bf16 bits in tl.dot; the non-quick cases: too slow there)."""
    import torch

    from fast_attn import backends

    on_gpu = torch.cuda.is_available()
    if case.gpu and not on_gpu:
        return "a GPU-sized case"
    reason = backends.why_not(backend, case.call(device_for(backend)))
    if reason or backend != "triton" or on_gpu:
        return reason
    if case.op in _DOT_OPS and case.dtype == torch.bfloat16:
        return "bf16 attention only on a GPU (the interpreter multiplies raw bf16 bits in tl.dot)"
    if case.op == "rotary" and case.dtype == torch.bfloat16:
        return "bf16 rotary only on a GPU (the interpreter truncates fp32 -> bf16 on store)"
    if not case.quick:
        return "the interpreter runs the quick cases; this one runs on a GPU"
    return None


def pytest_params(specs) -> list:
    """The specs as pytest parameters: built cases, their labels as ids, GPU sweeps marked."""
    import pytest

    return [pytest.param(build(spec), id=label(spec), marks=[pytest.mark.gpu] if spec.gpu else [])
            for spec in specs]


def assert_matches_reference(case: Case, backend: str, before=None) -> None:
    """The op test of every family: skip (with the reason) what ``backend`` does not run
    here, else run ``case`` on it with NaN-poisoned memory and assert the tolerance rule.
    ``before(case)`` runs just before the op (e.g. pinning Triton tiles)."""
    import pytest

    reason = skip_reason(case, backend)
    if reason:
        pytest.skip(reason)
    if before is not None:
        before(case)
    with nan_poisoned():
        result = evaluate(case, backend, device_for(backend))
    assert result, f"{case.label} on {backend}: {result.report()}"


def norm_reference_run(op: str, inputs, dy, dh, eps: float, upcast: bool):
    """Outputs and gradients (of each of ``inputs`` = x, weight, bias, residual; None for an
    absent one) of the reference norm, by autograd: on fp64 copies when ``upcast`` (the
    oracle), in the input dtypes otherwise (the baseline)."""
    import torch

    from fast_attn.reference.norm import layer_norm_ref, rms_norm_ref

    leaves = [
        None if t is None else (t.detach().double() if upcast else t.detach().clone()).requires_grad_()
        for t in inputs
    ]
    x, weight, bias, residual = leaves
    if op == "layer_norm":
        out = layer_norm_ref(x, weight, bias, eps, residual, upcast=upcast)
    else:
        out = rms_norm_ref(x, weight, eps, residual, upcast=upcast)
    outs, cotangents = [out.y], [dy.to(out.y.dtype)]
    if out.h is not None:
        outs.append(out.h)
        cotangents.append(dh.to(out.h.dtype))
    present = [t for t in leaves if t is not None]
    found = iter(torch.autograd.grad(outs, present, cotangents))
    grads = [None if t is None else next(found) for t in leaves]
    return out._replace(**{k: v.detach() for k, v in out._asdict().items() if v is not None}), grads


def assert_rounded_sum(h, x, residual, name: str) -> None:
    """h is x + residual added in fp32 and rounded to nearest even in x's dtype, like the reference's."""
    assert bool((h == (x.float() + residual.float()).to(x.dtype)).all()), f"{name}: h is not the rounded fp32 sum"


def glu_reference(gate, up, dy, approximate: Optional[str], upcast: bool = True):
    """(y, dgate, dup) of swiglu_ref (approximate None) or geglu_ref; gradients by autograd."""
    import torch

    from fast_attn.reference.ffn import geglu_ref, swiglu_ref

    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    if approximate is None:
        y = swiglu_ref(gate, up, upcast=upcast)
    else:
        y = geglu_ref(gate, up, approximate, upcast=upcast)
    dgate, dup = torch.autograd.grad(y, [gate, up], dy)
    return y.detach(), dgate, dup
