"""The benchmark suite's FLOP and byte counts against hand-computed numbers.

Besides small cases worked out by hand, each formula is checked against the peers measured
on our H100 (BASELINES.md, peers-h100-2026-11-24.json): the throughput that file reports
must follow from its median time and our count, so our figures compare with its figures.
"""

import sys
from pathlib import Path

import pytest

# `benchmarks` is a folder of the checkout, not an installed package: make it importable
# however pytest was started.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import formulas  # noqa: E402

BF16_BYTES = 2
REL = 1e-4  # agreement with the baselines file (rounding of its printed floats)
WEIGHT_SHARE = 2e-4  # the (N,) parameters we count on top of the baselines' x/y/dy/dx


def brute_causal_pairs(seqlen_q, seqlen_k):
    """Kept (i, j) pairs with the bottom-right alignment, counted one by one."""
    return sum(1 for i in range(seqlen_q) for j in range(seqlen_k) if j <= i + seqlen_k - seqlen_q)


# ------------------------------------------------------------------------------ attention


def test_attention_fwd_by_hand():
    # b=1, h=1, s=4, d=2: 16 pairs x 2 matmuls x 2 FLOPs x d=2 = 128
    assert formulas.attention_flops(1, 1, 4, 4, 2, causal=False) == 128
    # the protocol's d=128, s=4096 point: 4 * 4 * 16 * 4096^2 * 128 = 2^39
    assert formulas.attention_flops(4, 16, 4096, 4096, 128, causal=False) == 2**39


def test_causal_halves_when_square():
    for seqlen in (1, 7, 512, 16384):
        full = formulas.attention_flops(2, 3, seqlen, seqlen, 64, causal=False)
        assert formulas.attention_flops(2, 3, seqlen, seqlen, 64, causal=True) == full / 2


def test_backward_factors():
    fwd = formulas.attention_flops(2, 8, 256, 256, 64, causal=True, pass_="fwd")
    assert formulas.attention_flops(2, 8, 256, 256, 64, causal=True, pass_="bwd") == 2.5 * fwd
    assert formulas.attention_flops(2, 8, 256, 256, 64, causal=True, pass_="fwd+bwd") == 3.5 * fwd
    assert formulas.attention_flops(1, 1, 4, 4, 2, causal=False, pass_="fwd+bwd") == 448


def test_causal_pairs_rectangular_exact():
    # DESIGN.md's picture: Sq=2, Sk=5 keeps 4 + 5 keys; Sq=5, Sk=2 keeps 0, 0, 0, 1, 2.
    assert formulas.causal_pairs(2, 5) == 9
    assert formulas.causal_pairs(5, 2) == 3
    for seqlen_q in range(0, 12):
        for seqlen_k in range(0, 12):
            if seqlen_q != seqlen_k:
                assert formulas.causal_pairs(seqlen_q, seqlen_k) == brute_causal_pairs(seqlen_q, seqlen_k)
    assert formulas.attention_flops(1, 1, 2, 5, 8, causal=True) == 4 * 9 * 8


@pytest.mark.parametrize(
    "causal, fwd_ms, fwd_tflops, bwd_ms, bwd_tflops",
    [  # sdpa_flash, d=64, s=512, b=32, h=32, from peers-h100-2026-11-24.json
        (False, 0.2672640085220337, 257.1220760925415, 1.056879997253418, 162.5526949951407),
        (True, 0.2226559966802597, 154.31759701195722, 0.8510880172252655, 100.92886303352125),
    ],
)
def test_attention_matches_baselines(causal, fwd_ms, fwd_tflops, bwd_ms, bwd_tflops):
    fwd = formulas.attention_flops(32, 32, 512, 512, 64, causal, "fwd")
    bwd = formulas.attention_flops(32, 32, 512, 512, 64, causal, "bwd")
    assert fwd / (fwd_ms * 1e-3) / 1e12 == pytest.approx(fwd_tflops, rel=REL)
    assert bwd / (bwd_ms * 1e-3) / 1e12 == pytest.approx(bwd_tflops, rel=REL)


def test_bad_pass():
    with pytest.raises(ValueError, match="pass"):
        formulas.attention_flops(1, 1, 4, 4, 2, causal=False, pass_="backward")
    with pytest.raises(ValueError, match="pass"):
        formulas.glu_bytes(1, 1, 2, "train")


# ---------------------------------------------------------------------- memory-bound ops


def test_norm_bytes_by_hand():
    # rows=2, N=3, bf16: one activation is 12 bytes, one parameter 6 bytes.
    assert formulas.norm_bytes(2, 3, BF16_BYTES, "fwd", bias=True) == 2 * 12 + 2 * 6  # x, y; w, b
    assert formulas.norm_bytes(2, 3, BF16_BYTES, "bwd", bias=True) == 3 * 12 + 3 * 6  # x, dy, dx; w, dw, db
    assert formulas.norm_bytes(2, 3, BF16_BYTES, "fwd", bias=False) == 2 * 12 + 6
    assert formulas.norm_bytes(2, 3, BF16_BYTES, "bwd", bias=False) == 3 * 12 + 2 * 6
    assert formulas.norm_bytes(2, 3, BF16_BYTES, "fwd+bwd", bias=False) == 5 * 12 + 3 * 6
    # fp32 parameters with bf16 activations
    assert formulas.norm_bytes(2, 3, BF16_BYTES, "fwd", bias=False, weight_element_size=4) == 24 + 12


@pytest.mark.parametrize(
    "bias, fwd_ms, fwd_gbps, bwd_ms, bwd_gbps",
    [  # torch_layer_norm / torch_rms_norm, M=16384, N=1024, from peers-h100-2026-11-24.json
        (True, 0.044576000422239304, 1505.4931659260951, 0.12563200294971466, 801.2552027869157),
        (False, 0.031647998839616776, 2120.477327495144, 0.1090880036354065, 922.7714564878873),
    ],
)
def test_norm_matches_baselines(bias, fwd_ms, fwd_gbps, bwd_ms, bwd_gbps):
    fwd = formulas.norm_bytes(16384, 1024, BF16_BYTES, "fwd", bias=bias)
    bwd = formulas.norm_bytes(16384, 1024, BF16_BYTES, "bwd", bias=bias)
    # We also count the parameters, which BASELINES.md leaves out: a hair more bytes.
    assert fwd / (fwd_ms * 1e-3) / 1e9 == pytest.approx(fwd_gbps, rel=WEIGHT_SHARE)
    assert bwd / (bwd_ms * 1e-3) / 1e9 == pytest.approx(bwd_gbps, rel=WEIGHT_SHARE)
    assert fwd > 2 * 16384 * 1024 * BF16_BYTES


def test_activation_bytes_by_hand():
    # rows=2, N=3, bf16: an activation is 12 bytes, the bias 6.
    assert formulas.bias_gelu_bytes(2, 3, BF16_BYTES, "fwd") == 24 + 6  # x, y; bias
    assert formulas.bias_gelu_bytes(2, 3, BF16_BYTES, "bwd") == 36 + 12  # dy, x, dx; bias, dbias
    assert formulas.bias_gelu_bytes(2, 3, BF16_BYTES, "fwd", bias=False) == 24
    assert formulas.glu_bytes(2, 3, BF16_BYTES, "fwd") == 36  # gate, up, out
    assert formulas.glu_bytes(2, 3, BF16_BYTES, "bwd") == 60  # dy, gate, up, dgate, dup
    assert formulas.glu_bytes(2, 3, BF16_BYTES, "fwd+bwd") == 96


def test_glu_matches_baselines():
    # torch_silu_mul, M=16384, hidden 4096 (d_model 1024), from peers-h100-2026-11-24.json
    fwd = formulas.glu_bytes(16384, 4096, BF16_BYTES, "fwd")
    bwd = formulas.glu_bytes(16384, 4096, BF16_BYTES, "bwd")
    assert fwd / (0.454367995262146e-3) / 1e9 == pytest.approx(886.1829798722744, rel=REL)
    assert bwd / (0.40649598836898804e-3) / 1e9 == pytest.approx(1650.9108557077166, rel=REL)


def test_decode_bytes_by_hand():
    # K and V, batch 8, 4096 keys, 8 KV heads, d=128, bf16: 2 * 8 * 4096 * 8 * 128 * 2 = 2^27
    assert formulas.decode_bytes(8, 4096, 8, 128, BF16_BYTES) == 2**27
    assert formulas.decode_bytes(1, 1, 1, 1, 4) == 8


def test_ceiling_counts():
    assert formulas.copy_bytes(2**28, BF16_BYTES) == 2**30  # read 512 MiB + write 512 MiB
    assert formulas.matmul_flops(8192, 8192, 8192) == 2 * 8192**3
    assert formulas.matmul_flops(2, 3, 4) == 48
