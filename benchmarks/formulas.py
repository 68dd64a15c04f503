"""FLOP and byte counts of every benchmarked op: what "TFLOP/s" and "GB/s" mean in the suite.

Attention is compute-bound and reported in TFLOP/s; everything else here is memory-bound
and reported in GB/s (10^9 bytes per second) counted from the bytes that *must* move.

Attention (FlashAttention's protocol, DESIGN.md "Benchmark protocol"):

- forward FLOPs = 4 * b * h * pairs * d: two matmuls (Q K^T and P V), each 2 * d FLOPs per
  (query, key) pair; the softmax is not counted;
- ``pairs`` = sq * sk without a mask. Causal with sq == sk: s * s / 2, the protocol's
  "halved" (the exact count of kept pairs is s * (s + 1) / 2, larger by s / 2: 0.1% at
  s = 512, 0.006% at 16k; the protocol's number keeps our figures comparable with
  FlashAttention's published ones). Causal with sq != sk (bottom-right aligned, as in
  DESIGN.md): the exact count of kept (i, j) pairs, since "half" is meaningless there;
- backward = 2.5 x forward (five matmuls instead of two); forward + backward = 3.5 x.

Memory-bound ops: each input is read once and each output written once, at the tensor's
own element size; nothing else counts (saved statistics such as LayerNorm's mean/rstd,
workspaces, or re-reads a kernel chooses to do are the kernel's cost, not required traffic).

- LayerNorm / RMSNorm forward: read x (rows x N) and weight (N) (and bias (N)), write y.
  Backward: read x and dy and weight, write dx and dweight (and dbias). BASELINES.md
  counts only x, dy and dx (x and y forward); the weight terms add N elements each, under
  0.02% at the protocol's 16384 rows, so the figures stay comparable.
- bias_gelu: forward reads x and bias, writes y; backward reads dy, x and bias, writes dx
  and dbias. SwiGLU / GeGLU: forward reads gate and up, writes out; backward reads dy,
  gate and up, writes dgate and dup (BASELINES.md's silu(a) * b count).
- Decode (one query token per sequence over a KV cache): the bytes of K and V read,
  2 * b * s_cache * h_kv * d * element size (q and the output, b * h * d each, are ignored).

Pure functions of Python numbers: unit-tested in tests/benchmarks/test_formulas.py.
"""

from __future__ import annotations

FWD, BWD, FWD_BWD = "fwd", "bwd", "fwd+bwd"
PASSES = (FWD, BWD, FWD_BWD)

ATTENTION_MATMUL_FLOPS_PER_PAIR_PER_DIM = 4  # 2 FLOPs (multiply-add) x 2 matmuls (QK^T, PV)
ATTENTION_BWD_FACTOR = 2.5  # backward: 5 matmuls (S recomputed, dV, dP, dQ, dK) vs the forward's 2
ATTENTION_PASS_FACTOR = {FWD: 1.0, BWD: ATTENTION_BWD_FACTOR, FWD_BWD: 1.0 + ATTENTION_BWD_FACTOR}


def _check_pass(pass_: str) -> str:
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    return pass_


def causal_pairs(seqlen_q: int, seqlen_k: int) -> float:
    """The (query, key) pairs a causal mask keeps, as the protocol counts them.

    sq == sk: s * s / 2 (FlashAttention's convention). Otherwise the exact count with the
    bottom-right alignment: query i keeps keys j <= i + sk - sq.
    """
    if seqlen_q == seqlen_k:
        return seqlen_q * seqlen_k / 2
    # Row i keeps clamp(i + offset + 1, 0, sk) keys: sum that over i in [0, sq).
    offset = seqlen_k - seqlen_q
    return float(_sum_clamped(offset + 1, offset + seqlen_q, seqlen_k))


def _sum_clamped(first: int, last: int, cap: int) -> int:
    """sum of min(max(v, 0), cap) for v = first .. last (an arithmetic range)."""
    low, high = max(first, 1), min(last, cap)  # values counted as themselves
    linear = (low + high) * (high - low + 1) // 2 if high >= low else 0
    capped_from = max(first, cap + 1)  # values counted as cap
    capped = cap * (last - capped_from + 1) if last >= capped_from else 0
    return linear + capped


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool, pass_: str = FWD) -> float:
    """FLOPs of dense attention for one pass (see the module docstring)."""
    pairs = causal_pairs(seqlen_q, seqlen_k) if causal else float(seqlen_q * seqlen_k)
    fwd = ATTENTION_MATMUL_FLOPS_PER_PAIR_PER_DIM * batch * heads * pairs * head_dim
    return fwd * ATTENTION_PASS_FACTOR[_check_pass(pass_)]


def decode_bytes(batch: int, cache_len: int, kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of K and V a decode step must read: 2 * b * s_cache * h_kv * d * element size."""
    return 2 * batch * cache_len * kv_heads * head_dim * element_size


def norm_bytes(rows: int, width: int, element_size: int, pass_: str, *, bias: bool,
               weight_element_size: int | None = None) -> int:
    """Bytes a LayerNorm (``bias=True``) or RMSNorm (``bias=False``) with a weight must move.

    forward:  read x, weight (, bias); write y.
    backward: read x, dy, weight; write dx, dweight (, dbias).
    fwd+bwd:  the sum of both (x is read by each pass).
    """
    _check_pass(pass_)
    w_size = element_size if weight_element_size is None else weight_element_size
    activation = rows * width * element_size  # one (rows, N) tensor
    param = width * w_size  # one (N,) tensor
    params = 2 if bias else 1  # weight (and bias)
    fwd = 2 * activation + params * param  # x, y; weight (, bias)
    bwd = 3 * activation + (1 + params) * param  # x, dy, dx; weight, dweight (, dbias)
    return {FWD: fwd, BWD: bwd, FWD_BWD: fwd + bwd}[pass_]


def bias_gelu_bytes(rows: int, width: int, element_size: int, pass_: str, *, bias: bool = True) -> int:
    """Bytes of ``gelu(x + bias)``: forward reads x (, bias) writes y; backward reads dy, x
    (, bias) and writes dx (, dbias)."""
    _check_pass(pass_)
    activation = rows * width * element_size
    param = width * element_size if bias else 0
    fwd = 2 * activation + param
    bwd = 3 * activation + 2 * param
    return {FWD: fwd, BWD: bwd, FWD_BWD: fwd + bwd}[pass_]


def glu_bytes(rows: int, width: int, element_size: int, pass_: str) -> int:
    """Bytes of ``act(gate) * up`` (SwiGLU, GeGLU), gate and up each (rows, width):
    forward reads 2 and writes 1 tensor; backward reads 3 (dy, gate, up) and writes 2."""
    _check_pass(pass_)
    activation = rows * width * element_size
    return {FWD: 3 * activation, BWD: 5 * activation, FWD_BWD: 8 * activation}[pass_]


def copy_bytes(numel: int, element_size: int) -> int:
    """Bytes a device-to-device copy moves: each element read once and written once."""
    return 2 * numel * element_size


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) x (k, n) matmul: one multiply-add (2 FLOPs) per (i, j, l)."""
    return 2 * m * n * k
