"""Ring, Ulysses and varlen ring attention on real gloo ranks against single-process
attention, by the DESIGN.md tolerance rule (output, LSE, dq, dk, dv).

Each world size spawns its processes once per module (``run_ranks`` with a timeout; a
failing or hanging rank fails the fixture and with it every test here): 2 ranks run the
full list below plus determinism and bad-input checks, 4 ranks a few cases. On the rank
side (``fast_attn.distributed.testing.check_attention``) every case draws the whole
sequence from its seed, shards it, runs the scheme, gathers, differentiates and compares
with the fp64 reference and with single-process ``fast_attn.attention``. The Triton cases
run the kernels under the Triton interpreter (conftest sets TRITON_INTERPRET=1 without a
GPU; the spawned ranks inherit it).
"""

import pytest

from fast_attn.distributed.testing import RingCase, run_ranks
from fast_attn.testing_cases import AttentionSpec as A
from fast_attn.testing_cases import VarlenSpec as V

SUITE = "fast_attn.distributed.testing:run_suite"
TIMEOUT_S = 240  # per spawned group; the 2-rank suite takes about a minute on 2 idle cores

CASES_2 = [
    # every scheme x layout x causal; GQA, head_dim 40
    *(RingCase(scheme, lay, A(2, 4, 2, 24, 24, 40, "float32", causal=causal))
      for scheme in ("ring", "ulysses") for lay in ("zigzag", "contiguous") for causal in (False, True)),
    RingCase("ring", "zigzag", A(1, 4, 1, 36, 36, 24, "float32", causal=True, window=(5, 2))),  # MQA, window
    RingCase("ring", "contiguous", A(1, 4, 4, 34, 34, 24, "float32", window=(3, 7))),  # 17 rows per rank
    RingCase("ring", "zigzag", A(1, 2, 2, 16, 16, 16, "float32", causal=True, softcap=5.0, input_scale=4.0)),
    RingCase("ring", "zigzag", A(1, 2, 2, 16, 16, 16, "float32", causal=True, alibi="h")),
    RingCase("ring", "contiguous", A(2, 2, 1, 18, 18, 16, "float32", window=(4, 4), alibi="bh")),
    RingCase("ring", "contiguous", A(1, 2, 2, 16, 16, 16, "float32", softmax_scale=0.3)),
    RingCase("ring", "zigzag", A(1, 4, 2, 32, 32, 24, "bfloat16", causal=True)),
    RingCase("ulysses", "zigzag", A(1, 4, 2, 32, 32, 24, "bfloat16", causal=True)),
    RingCase("ring", "zigzag", A(1, 2, 1, 16, 16, 16, "float64", causal=True)),  # held to the fp32 rule
    RingCase("ulysses", "contiguous", A(1, 4, 1, 16, 16, 24, "float32", causal=True, window=(3, -1), softcap=4.0)),
    RingCase("ulysses", "zigzag", A(1, 4, 2, 16, 16, 16, "float32", causal=True, alibi="h")),
    # packed batches, with empty and one-token sequences
    *(RingCase("ring_varlen", lay, V((1, 7, 0, 13), (1, 7, 0, 13), 4, 2, 24, "float32", causal=causal))
      for lay in ("zigzag", "contiguous") for causal in (False, True)),
    RingCase("ring_varlen", "zigzag", V((3, 9, 16), (3, 9, 16), 2, 1, 16, "float32", causal=True, window=(4, 0))),
    RingCase("ring_varlen", "zigzag", V((3, 9, 16), (3, 9, 16), 2, 2, 16, "float32", causal=True, softcap=3.0)),
    RingCase("ring_varlen", "contiguous", V((3, 9, 16), (3, 9, 16), 2, 2, 16, "bfloat16", window=(2, 3))),
    # Triton kernels (interpreter), fp16
    RingCase("ring", "zigzag", A(1, 2, 1, 16, 16, 24, "float16", causal=True), backend="triton"),
    RingCase("ulysses", "zigzag", A(1, 2, 1, 16, 16, 24, "float16", causal=True), backend="triton"),
    RingCase("ring_varlen", "zigzag", V((1, 9, 6), (1, 9, 6), 2, 1, 16, "float16", causal=True), backend="triton"),
]

DETERMINISM_2 = [
    RingCase("ring", "zigzag", A(1, 4, 2, 16, 16, 24, "float32", causal=True)),
    RingCase("ulysses", "zigzag", A(1, 4, 2, 16, 16, 24, "float32", causal=True)),
    RingCase("ring_varlen", "zigzag", V((3, 9), (3, 9), 2, 1, 16, "float32", causal=True)),
]

CASES_4 = [
    RingCase("ring", "zigzag", A(1, 4, 2, 32, 32, 24, "float32", causal=True)),
    RingCase("ring", "contiguous", A(1, 2, 2, 28, 28, 16, "float32", window=(5, 3))),  # 7 rows per rank
    RingCase("ring", "zigzag", A(1, 2, 1, 32, 32, 16, "bfloat16", causal=True)),
    RingCase("ulysses", "zigzag", A(1, 4, 1, 16, 16, 16, "float32", causal=True)),  # MQA: 1 kv head, 4 ranks
    RingCase("ring_varlen", "zigzag", V((1, 3, 0, 2, 11), (1, 3, 0, 2, 11), 2, 1, 16, "float32", causal=True)),
    RingCase("ring_varlen", "contiguous", V((1, 3, 0, 2, 11), (1, 3, 0, 2, 11), 2, 2, 16, "float32")),
]


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(SUITE, 2, CASES_2, DETERMINISM_2, True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(SUITE, 4, CASES_4, timeout=TIMEOUT_S)


def _result(results, kind, label):
    per_rank = [dict((name, (ok, msg)) for name, ok, msg in rank[kind]) for rank in results]
    return [(rank, *r[label]) for rank, r in enumerate(per_rank)]


def _assert_all_ranks(results, kind, label):
    failures = [f"rank {rank}: {msg}" for rank, ok, msg in _result(results, kind, label) if not ok]
    assert not failures, f"{label}:\n" + "\n".join(failures)


@pytest.mark.parametrize("label", [c.label for c in CASES_2])
def test_two_ranks_equal_single_process_attention(two_ranks, label):
    _assert_all_ranks(two_ranks, "cases", label)


@pytest.mark.parametrize("label", [c.label for c in CASES_4])
def test_four_ranks_equal_single_process_attention(four_ranks, label):
    _assert_all_ranks(four_ranks, "cases", label)


@pytest.mark.parametrize("label", [c.label for c in DETERMINISM_2])
def test_repeated_runs_are_bitwise_equal(two_ranks, label):
    _assert_all_ranks(two_ranks, "determinism", label)


def test_bad_inputs_raise_clear_errors_on_every_rank(two_ranks):
    names = [name for name, _, _ in two_ranks[0]["bad_inputs"]]
    assert len(names) >= 10
    for name in names:
        _assert_all_ranks(two_ranks, "bad_inputs", name)


def test_a_failing_rank_fails_the_group_with_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed"):
        run_ranks("fast_attn.distributed.testing:fail_on_rank", 2, 1, timeout=60)
