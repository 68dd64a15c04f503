"""The Triton attention kernels (``fast_attn.triton_kernels.attention``) against the reference:
dense forward/backward, packed (varlen) forward/backward, and the KV-cache decode step.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1`` before triton is imported), one pinned tile per kernel (and
each candidate tile config in turn), on small awkward shapes, and a subprocess compiles
every kernel for sm_90 without launching it; with a GPU the same small cases run compiled
on CUDA, and the ``gpu``-marked tests add the issue's sweep (head dims 32..256, lengths up
to 4224, MHA/GQA/MQA, feature toggles, fp16/fp32, every tile config, the autotuned
launch, varlen, split-KV decode, 50-run determinism, 64-bit offsets, grids past 65535
heads, linear memory).

Every comparison uses the DESIGN.md tolerance rule (``fast_attn.testing.assert_close``):
the oracle is ``attention_ref`` on fp64 copies, the baseline ``attention_ref(...,
upcast=False)`` in the input dtype; gradients come from autograd through the reference,
factor 2 for out and lse, 3 for dq/dk/dv. The launchers' outputs are allocated
NaN-filled, so an element a kernel never writes fails the comparison; inputs must come
back unchanged. Dropout is compared with the reference under the same seed (the keep-mask
is also extracted from the kernel and compared bit for bit with ``dropout_keep_mask``).
"""

import contextlib
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("triton")

from fast_attn import backends  # noqa: E402
from fast_attn.reference.attention import (  # noqa: E402
    attention_ref,
    attention_varlen_ref,
    attention_with_kvcache_ref,
    dropout_keep_mask,
)
from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close  # noqa: E402

if not (torch.cuda.is_available() or backends.triton_interpret_enabled()):
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402

from fast_attn.triton_kernels import attention as triton_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DROPOUT_SEED = 2**40 + 12345  # above 2**32: the seed's high word reaches the hash too


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Case:
    """One attention call: shapes, dtype and options (masks and slopes drawn by ``options``)."""

    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    causal: bool = False
    window: tuple = (-1, -1)
    alibi: str = ""  # "", "h" (H,) or "bh" (B, H)
    softcap: float = 0.0
    mask: str = ""  # "" or one of MASKS
    dropout_p: float = 0.0
    softmax_scale: float = 0.0  # 0: 1/sqrt(D)
    layout: str = "bshd"  # "bshd" contiguous, or "bhsd": transposed (B, H, S, D) views
    input_scale: float = 1.0  # larger scores make softcap and masks bite


# attn_mask kinds: (shape as a function of (B, H, Sq, Sk), dtype)
MASKS = {
    "bool_b": lambda b, h, sq, sk: torch.rand(1, h, sq, sk, device=DEVICE) > 0.3,  # broadcast over batch
    "bool_2d": lambda b, h, sq, sk: torch.rand(sq, sk, device=DEVICE) > 0.3,  # over batch and heads
    "add_h": lambda b, h, sq, sk: torch.randn(b, 1, sq, sk, device=DEVICE),  # additive, over heads
    "add_bh": lambda b, h, sq, sk: torch.randn(1, h, sq, sk, device=DEVICE) * 2.0,
    # key padding: batch 0 loses its last third of keys (-inf), batch 1 none
    "add_pad": lambda b, h, sq, sk: torch.where(
        torch.arange(sk, device=DEVICE).view(1, 1, 1, sk)
        >= torch.tensor([sk - sk // 3, sk], device=DEVICE)[:b].view(b, 1, 1, 1),
        float("-inf"), 0.0,
    ),
}


def make_inputs(case: Case):
    """q, k, v, dout with the case's layout (``bhsd`` gives transposed views)."""

    def rand(seqlen, heads):
        if case.layout == "bhsd":
            shape = (case.batch, heads, seqlen, case.head_dim)
        else:
            shape = (case.batch, seqlen, heads, case.head_dim)
        t = torch.randn(shape, device=DEVICE).mul_(case.input_scale).to(case.dtype)
        return t.transpose(1, 2) if case.layout == "bhsd" else t

    q = rand(case.seqlen_q, case.heads)
    k = rand(case.seqlen_k, case.kv_heads)
    v = rand(case.seqlen_k, case.kv_heads)
    dout = rand(case.seqlen_q, case.heads)
    return q, k, v, dout


def make_options(case: Case) -> dict:
    """The launch options of ``attention_fwd`` for a case (masks and slopes drawn here)."""
    b, h, sq, sk = case.batch, case.heads, case.seqlen_q, case.seqlen_k
    attn_mask = None
    if case.mask:
        attn_mask = MASKS[case.mask](b, h, sq, sk)
        if attn_mask.is_floating_point():
            attn_mask = attn_mask.to(case.dtype)
    alibi = None
    if case.alibi:
        alibi = torch.rand((h,) if case.alibi == "h" else (b, h), device=DEVICE) * 0.5 + 0.05
    return dict(
        attn_mask=attn_mask,
        alibi_slopes=alibi,
        seed=DROPOUT_SEED,
        causal=case.causal,
        softmax_scale=case.softmax_scale or 1.0 / math.sqrt(case.head_dim),
        window=case.window,
        softcap=case.softcap,
        dropout_p=case.dropout_p,
    )


@contextlib.contextmanager
def nan_filled_outputs():
    """torch.empty/empty_like return NaN-filled float tensors inside the block, so an
    output element the kernels never write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *args, **kwargs: fill(empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: fill(empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def triton_run(q, k, v, dout, opts, deterministic=True):
    """(out, lse, dq, dk, dv) from the Triton launch functions."""
    args = (opts["attn_mask"], opts["alibi_slopes"], opts["seed"], opts["causal"], opts["softmax_scale"],
            opts["window"], opts["softcap"], opts["dropout_p"])
    with nan_filled_outputs():
        out, lse = triton_attention.attention_fwd(q, k, v, *args)
        dq, dk, dv, dmask, dslopes = triton_attention.attention_bwd(
            dout, q, k, v, out, lse, *args, deterministic, False, False
        )
    assert dmask is None and dslopes is None
    return out, lse, dq, dk, dv


def reference_run(q, k, v, dout, opts, upcast):
    """(out, lse, dq, dk, dv) of the reference by autograd: fp64 copies when ``upcast``
    (the oracle), the input dtype otherwise (the baseline)."""
    leaves = [(t.detach().double() if upcast else t.detach().clone()).requires_grad_() for t in (q, k, v)]
    mask = opts["attn_mask"]
    if mask is not None and upcast and mask.is_floating_point():
        mask = mask.double()
    out, lse = attention_ref(
        *leaves, causal=opts["causal"], softmax_scale=opts["softmax_scale"], window_size=opts["window"],
        alibi_slopes=opts["alibi_slopes"], softcap=opts["softcap"], attn_mask=mask,
        dropout_p=opts["dropout_p"], dropout_seed=opts["seed"], upcast=upcast,
    )
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return (out.detach(), lse.detach(), *grads)


def check_case(case: Case, *, deterministic=True):
    """Forward and backward of a case against the oracle; returns the Triton results."""
    q, k, v, dout = make_inputs(case)
    opts = make_options(case)
    clones = [t.clone() for t in (q, k, v, dout)]
    results = triton_run(q, k, v, dout, opts, deterministic)
    oracle = reference_run(q, k, v, dout, opts, upcast=True)
    baseline = reference_run(q, k, v, dout, opts, upcast=False)

    out, lse, dq, dk, dv = results
    assert out.shape == q.shape and out.dtype == case.dtype and out.is_contiguous()
    assert lse.shape == (case.batch, case.heads, case.seqlen_q) and lse.dtype == torch.float32
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype and grad.is_contiguous()
    names = ("out", "lse", "dq", "dk", "dv")
    for name, actual, o, b in zip(names, results, oracle, baseline):
        factor = OUTPUT_FACTOR if name in ("out", "lse") else GRAD_FACTOR
        assert_close(actual, o, b.to(o.dtype) if name == "lse" else b, factor=factor, name=f"{case} {name}")
    for before, after in zip(clones, (q, k, v, dout)):
        assert torch.equal(before, after), f"{case}: an input was written"
    return results


def case_id(case: Case) -> str:
    parts = [f"b{case.batch}h{case.heads}kv{case.kv_heads}", f"{case.seqlen_q}x{case.seqlen_k}", f"d{case.head_dim}",
             str(case.dtype).replace("torch.", "")]
    for name in ("causal", "window", "alibi", "softcap", "mask", "dropout_p", "softmax_scale", "layout"):
        value = getattr(case, name)
        if value and value != (-1, -1) and value != "bshd":
            parts.append(name if value is True else f"{name}={value}")
    return "-".join(parts)


# ------------------------------------------------------------------- CPU (interpreter)

# Sparse picks over Sq/Sk in {1, 17, 113, 203}, D in {40, 64, 111}, MHA/GQA/MQA, so that
# every feature, both causal alignments and the ragged tails are covered in ~2 minutes.
CASES = [
    Case(2, 2, 2, 113, 203, 64),  # MHA, Sq < Sk, ragged tails
    Case(1, 4, 2, 113, 203, 40, causal=True),  # GQA, causal bottom-right with Sq < Sk
    Case(1, 4, 1, 203, 113, 64, causal=True),  # MQA, Sq > Sk: the top rows see no key
    Case(1, 2, 1, 113, 17, 111, torch.float32, causal=True),  # fp32, head dim 111
    Case(2, 2, 2, 1, 203, 64, causal=True),  # one query row
    Case(2, 2, 1, 17, 1, 40),  # one key
    Case(1, 2, 2, 1, 1, 64),  # fp32 with one key: test_single_key_fp32_gradients
    Case(1, 2, 2, 113, 113, 64, window=(16, 7)),
    Case(1, 4, 2, 113, 203, 40, causal=True, window=(24, -1)),  # causal + left window
    Case(1, 2, 1, 17, 113, 64, window=(-1, 5)),  # right edge only
    Case(1, 4, 2, 113, 113, 64, causal=True, alibi="h"),
    Case(2, 2, 2, 17, 203, 40, alibi="bh", softmax_scale=0.3),
    Case(1, 4, 2, 113, 113, 64, causal=True, softcap=1.5, input_scale=2.0),
    Case(2, 2, 2, 113, 113, 40, mask="bool_b"),  # bool, broadcast over batch
    Case(1, 4, 2, 17, 113, 40, mask="bool_2d"),  # bool, broadcast over batch and heads
    Case(2, 2, 1, 113, 113, 64, mask="add_h"),  # additive, broadcast over heads
    Case(2, 2, 2, 17, 203, 64, causal=True, mask="add_pad"),  # -inf key padding
    Case(2, 2, 2, 17, 203, 64, dropout_p=0.17),
    Case(1, 4, 2, 113, 113, 40, torch.float32, causal=True, dropout_p=0.3),
    Case(2, 2, 1, 113, 203, 111, causal=True, window=(40, -1), alibi="bh", softcap=2.0, mask="add_bh",
         dropout_p=0.1),  # everything at once
    Case(2, 2, 1, 113, 113, 40, causal=True, layout="bhsd"),  # transposed (B, H, S, D) views
    Case(1, 2, 2, 113, 113, 64, torch.bfloat16, causal=True),  # bf16: fp32 dots when interpreting
    Case(1, 4, 2, 17, 203, 40, torch.bfloat16, alibi="h", dropout_p=0.2, layout="bhsd"),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case):
    check_case(case)


def test_fully_masked_rows_give_zero_and_minus_inf():
    """Rows with no key (bool mask rows all False, and Sq > Sk causal rows above the
    diagonal): out exactly 0, lse -inf, zero dq, and no NaN anywhere."""
    batch, heads, seqlen_q, seqlen_k = 1, 2, 40, 33
    case = Case(batch, heads, 1, seqlen_q, seqlen_k, 64, causal=True)
    q, k, v, dout = make_inputs(case)
    mask = torch.rand(batch, heads, seqlen_q, seqlen_k, device=DEVICE) > 0.2
    mask[:, 0, 20:25] = False  # five more rows of head 0 see nothing
    opts = dict(make_options(case), attn_mask=mask)
    out, lse, dq, dk, dv = triton_run(q, k, v, dout, opts)
    empty = ~(mask & torch.ones(seqlen_q, seqlen_k, device=DEVICE).tril(seqlen_k - seqlen_q).bool()).any(-1)
    assert empty[:, :, :7].all() and empty[:, 0, 20:25].all()
    empty_bshd = empty.transpose(1, 2)  # (B, Sq, H)
    assert torch.all(out[empty_bshd] == 0) and torch.all(dq[empty_bshd] == 0)
    assert torch.all(lse[empty] == float("-inf")) and torch.isfinite(lse[~empty]).all()
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    oracle = reference_run(q, k, v, dout, opts, upcast=True)
    baseline = reference_run(q, k, v, dout, opts, upcast=False)
    for name, actual, o, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), oracle, baseline):
        assert_close(actual, o, b.to(o.dtype) if name == "lse" else b,
                     factor=OUTPUT_FACTOR if name in ("out", "lse") else GRAD_FACTOR, name=name)


@pytest.mark.parametrize("seed", [0, DROPOUT_SEED])
def test_dropout_keep_mask_is_the_reference_mask(seed):
    """With q = k = 0 every probability is 1/Sk, and with V = I (D = Sk) the output row is
    the dropped-out probability row itself: out != 0 exactly where the mask keeps."""
    batch, heads, seqlen_q, seqlen_k, p = 2, 2, 17, 40, 0.3
    q = torch.zeros(batch, seqlen_q, heads, seqlen_k, device=DEVICE)
    k = torch.zeros(batch, seqlen_k, heads, seqlen_k, device=DEVICE)
    v = torch.eye(seqlen_k, device=DEVICE).expand(batch, heads, seqlen_k, seqlen_k).transpose(1, 2)
    out, lse = triton_attention.attention_fwd(q, k, v, None, None, seed, False, 1.0, (-1, -1), 0.0, p)
    kept = (out != 0).permute(0, 2, 1, 3)  # (B, H, Sq, Sk)
    assert torch.equal(kept, dropout_keep_mask(seed, batch, heads, seqlen_q, seqlen_k, p, device=DEVICE))
    scale = 1.0 / ((1.0 - p) * seqlen_k)
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], scale))
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(seqlen_k)))


def test_dropout_that_keeps_nothing():
    """dropout_p within 2**-33 of 1 has threshold 2**32 (no uint32 hash reaches it):
    out and every gradient are exactly 0, the LSE is that of the undropped scores."""
    case = Case(1, 2, 1, 17, 33, 40, torch.float32, causal=True, dropout_p=1.0 - 2.0**-34)
    q, k, v, dout = make_inputs(case)
    opts = make_options(case)
    out, lse, dq, dk, dv = triton_run(q, k, v, dout, opts)
    for t in (out, dq, dk, dv):
        assert torch.all(t == 0)
    oracle = reference_run(q, k, v, dout, opts, upcast=True)
    torch.testing.assert_close(lse, oracle[1].float())


def test_single_key_fp32_gradients():
    """With one key dS = P (dP - delta) is exactly 0. Plain PyTorch's baseline reaches 0
    exactly (it forms dP and rowsum(P dP) from the same roundings), so the tolerance rule
    allows one fp32 ulp; the kernels take delta = rowsum(dO * O) (FlashAttention's
    identity), which leaves rounding of |dO| |O| in dP - delta: dq and dk must be 0 up
    to that rounding, and out, lse and dv match by the rule."""
    case = Case(2, 2, 1, 17, 1, 64, torch.float32)
    q, k, v, dout = make_inputs(case)
    opts = make_options(case)
    results = triton_run(q, k, v, dout, opts)
    oracle = reference_run(q, k, v, dout, opts, upcast=True)
    baseline = reference_run(q, k, v, dout, opts, upcast=False)
    for index in (0, 1, 4):  # out, lse, dv
        assert_close(results[index], oracle[index], baseline[index].to(oracle[index].dtype))
    delta_terms = (dout.double() * v.double()).abs().sum(-1).max()  # sum_d |dO * O| (O = V here)
    bound = 8 * torch.finfo(torch.float32).eps * opts["softmax_scale"] * float(delta_terms) * case.seqlen_q
    for grad, other in ((results[2], k), (results[3], q)):  # dq ~ dS K, dk ~ dS^T Q
        assert float(grad.abs().max()) <= bound * float(other.abs().max())


def test_expanded_dout():
    """dout of ``out.sum()`` arrives expanded (all strides 0): copied, not misread."""
    case = Case(1, 2, 1, 17, 33, 40, causal=True)
    q, k, v, _ = make_inputs(case)
    dout = torch.ones((), dtype=case.dtype, device=DEVICE).expand(q.shape)
    opts = make_options(case)
    results = triton_run(q, k, v, dout, opts)
    oracle = reference_run(q, k, v, dout, opts, upcast=True)
    baseline = reference_run(q, k, v, dout, opts, upcast=False)
    for name, actual, o, b in zip(("dq", "dk", "dv"), results[2:], oracle[2:], baseline[2:]):
        assert_close(actual, o, b, factor=GRAD_FACTOR, name=name)


def test_backward_is_bitwise_deterministic():
    """Three backward runs (GQA, causal, dropout, a mask) give identical bits."""
    case = Case(1, 4, 2, 47, 79, 40, causal=True, dropout_p=0.1, mask="add_h")
    q, k, v, dout = make_inputs(case)
    opts = make_options(case)
    first = triton_run(q, k, v, dout, opts)
    for _ in range(2):
        again = triton_run(q, k, v, dout, opts)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_mask_and_alibi_gradients_are_not_supported():
    case = Case(1, 2, 2, 17, 17, 40, alibi="h", mask="add_h")
    q, k, v, dout = make_inputs(case)
    opts = make_options(case)
    args = tuple(opts.values())
    out, lse = triton_attention.attention_fwd(q, k, v, *args)
    for mask_grad, alibi_grad in ((True, False), (False, True)):
        with pytest.raises(NotImplementedError):
            triton_attention.attention_bwd(dout, q, k, v, out, lse, *args, True, mask_grad, alibi_grad)


def test_interpreter_never_autotunes(monkeypatch):
    """Under the interpreter each kernel runs its one pinned tile, never the autotuner."""
    if not backends.triton_interpret_enabled():
        pytest.skip("interpreter only")

    def refuse(*args, **kwargs):
        raise AssertionError("the autotuner ran under the interpreter")

    for tuned in (triton_attention._attn_fwd_tuned, triton_attention._attn_bwd_dkdv_tuned,
                  triton_attention._attn_bwd_dq_tuned):
        monkeypatch.setattr(tuned, "run", refuse)
    case = Case(1, 2, 1, 17, 33, 40, causal=True)
    q, k, v, dout = make_inputs(case)
    triton_run(q, k, v, dout, make_options(case))


# ------------------------------------------------------------------ varlen (packed)


@dataclass(frozen=True)
class VarlenCase:
    """Packed sequences of the given lengths (zero allowed), with ``Case``'s options."""

    lens_q: tuple
    lens_k: tuple
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    options: dict = field(default_factory=dict)  # Case fields: causal, window, alibi, mask, ...


def check_varlen(case: VarlenCase):
    """attention_varlen_fwd/bwd against attention_varlen_ref (oracle fp64, baseline in dtype)."""
    batch = len(case.lens_q)
    cu_q = torch.tensor([0, *torch.tensor(case.lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(case.lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    max_q, max_k = max(case.lens_q), max(case.lens_k)
    dense = Case(batch, case.heads, case.kv_heads, max_q, max_k, case.head_dim, case.dtype, **case.options)
    opts = make_options(dense)  # masks and slopes in the padded (B, H, max_q, max_k) coordinates
    q = torch.randn(int(cu_q[-1]), case.heads, case.head_dim, device=DEVICE).to(case.dtype)
    k = torch.randn(int(cu_k[-1]), case.kv_heads, case.head_dim, device=DEVICE).to(case.dtype)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    args = (opts["attn_mask"], opts["alibi_slopes"], opts["seed"], opts["causal"], opts["softmax_scale"],
            opts["window"], opts["softcap"], opts["dropout_p"])
    packing = (cu_q, cu_k, max_q, max_k)
    with nan_filled_outputs():
        out, lse = triton_attention.attention_varlen_fwd(q, k, v, *packing, *args)
        dq, dk, dv, _, _ = triton_attention.attention_varlen_bwd(dout, q, k, v, out, lse, *packing, *args,
                                                                 True, False, False)

    def reference(upcast):
        leaves = [(t.detach().double() if upcast else t.detach().clone()).requires_grad_() for t in (q, k, v)]
        mask = opts["attn_mask"]
        if mask is not None and upcast and mask.is_floating_point():
            mask = mask.double()
        ref_out, ref_lse = attention_varlen_ref(
            *leaves, *packing, causal=opts["causal"], softmax_scale=opts["softmax_scale"],
            window_size=opts["window"], alibi_slopes=opts["alibi_slopes"], softcap=opts["softcap"],
            attn_mask=mask, dropout_p=opts["dropout_p"], dropout_seed=opts["seed"], upcast=upcast,
        )
        grads = torch.autograd.grad(ref_out, leaves, dout.to(ref_out.dtype), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        return (ref_out.detach(), ref_lse.detach(), *grads)

    oracle, baseline = reference(True), reference(False)
    assert out.shape == q.shape and lse.shape == (case.heads, q.shape[0])
    for name, actual, o, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), oracle, baseline):
        factor = OUTPUT_FACTOR if name in ("out", "lse") else GRAD_FACTOR
        assert_close(actual, o, b.to(o.dtype) if name == "lse" else b, factor=factor, name=f"{case} {name}")
    return out, lse, dq, dk, dv


VARLEN_CASES = [
    # zero-length sequences on both sides: no rows, and rows with no key (out 0, lse -inf)
    VarlenCase((17, 0, 40, 5), (23, 9, 0, 31), 4, 2, 40, options=dict(causal=True)),
    VarlenCase((17, 0, 40, 5), (23, 9, 0, 31), 2, 2, 64),
    VarlenCase((17, 33, 1), (5, 50, 20), 4, 2, 64,
               options=dict(causal=True, window=(7, -1), alibi="bh", dropout_p=0.2)),
    VarlenCase((17, 33, 1), (5, 50, 20), 2, 1, 40, torch.float32, options=dict(mask="add_h", softcap=2.0)),
    VarlenCase((17, 33, 1), (5, 50, 20), 4, 2, 64, torch.bfloat16, options=dict(mask="bool_2d", alibi="h")),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_varlen_matches_reference(case):
    check_varlen(case)


def test_varlen_backward_is_bitwise_deterministic():
    case = VARLEN_CASES[2]
    torch.manual_seed(1)
    first = check_varlen(case)
    torch.manual_seed(1)
    again = check_varlen(case)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- kv cache


@dataclass(frozen=True)
class CacheCase:
    """A decode step: q (B, Sq, H, D) against caches of cache_len rows, filled to
    cache_seqlens (None: full), appending new_len rows first."""

    cache_seqlens: tuple
    cache_len: int
    seqlen_q: int
    new_len: int
    heads: int
    kv_heads: int
    head_dim: int
    num_splits: object = None  # None: the heuristic
    dtype: torch.dtype = torch.float16
    options: dict = field(default_factory=dict)  # causal, window, alibi, softcap


def check_kvcache(case: CacheCase):
    """attention_with_kvcache_fwd against attention_with_kvcache_ref; the cache rows past
    each row's length hold NaN/inf, which must never reach the result."""
    batch = len(case.cache_seqlens) if case.cache_seqlens is not None else 2
    dense = Case(batch, case.heads, case.kv_heads, case.seqlen_q, case.cache_len, case.head_dim, case.dtype,
                 **case.options)
    opts = make_options(dense)
    q = torch.randn(batch, case.seqlen_q, case.heads, case.head_dim, device=DEVICE).to(case.dtype)
    k_cache = torch.randn(batch, case.cache_len, case.kv_heads, case.head_dim, device=DEVICE).to(case.dtype)
    v_cache = torch.randn_like(k_cache)
    k = v = seqlens = None
    if case.cache_seqlens is not None:
        seqlens = torch.tensor(case.cache_seqlens, dtype=torch.int32, device=DEVICE)
        for b, filled in enumerate(case.cache_seqlens):
            k_cache[b, filled + case.new_len:] = float("nan")
            v_cache[b, filled + case.new_len:] = float("inf")
    if case.new_len:
        k = torch.randn(batch, case.new_len, case.kv_heads, case.head_dim, device=DEVICE).to(case.dtype)
        v = torch.randn_like(k)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    if case.new_len:
        for b, filled in enumerate(case.cache_seqlens):
            expected_k[b, filled:filled + case.new_len] = k[b]
            expected_v[b, filled:filled + case.new_len] = v[b]

    def reference(upcast):
        caches = [(t.double() if upcast else t).clone() for t in (k_cache, v_cache)]
        new = [None if t is None else (t.double() if upcast else t) for t in (k, v)]
        return attention_with_kvcache_ref(
            q.double() if upcast else q, *caches, *new, seqlens, causal=opts["causal"],
            softmax_scale=opts["softmax_scale"], window_size=opts["window"], alibi_slopes=opts["alibi_slopes"],
            softcap=opts["softcap"], upcast=upcast,
        )

    oracle, baseline = reference(True), reference(False)
    with nan_filled_outputs():
        out, lse = triton_attention.attention_with_kvcache_fwd(
            q, k_cache, v_cache, k, v, seqlens, opts["alibi_slopes"], opts["causal"], opts["softmax_scale"],
            opts["window"], opts["softcap"], num_splits=case.num_splits,
        )
    assert torch.equal(k_cache.nan_to_num(), expected_k.nan_to_num()), "k was not appended in place"
    assert torch.equal(v_cache.nan_to_num(), expected_v.nan_to_num()), "v was not appended in place"
    assert_close(out, oracle[0], baseline[0], name=f"{case} out")
    assert_close(lse, oracle[1], baseline[1].to(oracle[1].dtype), name=f"{case} lse")
    return out, lse


KVCACHE_CASES = [
    CacheCase((10, 200, 299), 300, 1, 1, 4, 2, 64, num_splits=1),
    CacheCase((10, 200, 299), 300, 1, 1, 4, 2, 64, num_splits=3),  # split-KV + combine
    # a row with no key (cache empty, nothing appended) next to full ones
    CacheCase((0, 100, 296), 300, 4, 0, 4, 1, 40, num_splits=3, options=dict(causal=True)),
    CacheCase((0, 100, 290), 300, 4, 4, 4, 1, 40, num_splits=2, options=dict(causal=True)),
    CacheCase((10, 200, 290), 300, 2, 2, 4, 2, 64, num_splits=2,
              options=dict(causal=True, window=(50, -1), alibi="bh")),
    CacheCase((10, 200, 295), 300, 1, 0, 2, 2, 111, num_splits=5, dtype=torch.float32, options=dict(softcap=2.0)),
    CacheCase(None, 200, 3, 0, 4, 4, 64, num_splits=2, dtype=torch.bfloat16, options=dict(alibi="h")),
    CacheCase((5, 17), 64, 1, 1, 4, 1, 64),  # the heuristic (1 split off a GPU)
]


@pytest.mark.parametrize("case", KVCACHE_CASES, ids=str)
def test_kvcache_matches_reference(case):
    check_kvcache(case)


# Compiles (no launch) each kernel for sm_90 with every feature on, in a subprocess without
# TRITON_INTERPRET: checks what the interpreter cannot (typing, layouts, dot shapes, the
# lowering to PTX and ptxas), on whatever Triton this machine has, without a GPU.
AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fast_attn.triton_kernels import attention as A

    FLOATS = {"qk_scale", "softcap_log2", "dropout_scale", "softmax_scale"}
    FP32_PTRS = {"Lse", "Delta", "Lse2", "Alibi", "Mask", "OutPartial", "LsePartial"}
    INT32_PTRS = {"CuSeqlensQ", "CuSeqlensK", "SeqlensK"}
    UNALIGNED = {
        "max_seqlen_q",
        "max_seqlen_k",
        "seqlen_q",
        "num_heads",
        "num_splits",
        "num_rows",
        "kv_group",
        "window_left",
        "window_right",
        "dropout_key",
        "dropout_thresh",
        "tune_seqlen_q",
        "tune_seqlen_k",
    }
    FEATURES = dict(HAS_BAND=True, HAS_SOFTCAP=True, HAS_ALIBI=True, MASK_KIND=2, HAS_DROPOUT=True,
                    FP32_DOT=False, DOT_PRECISION="tf32", IS_VARLEN=True)

    def compile_for_sm90(fn, constexprs, num_warps, num_stages):
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                sig[name] = "constexpr"
            elif name[0].isupper():
                sig[name] = "*fp32" if name in FP32_PTRS else "*i32" if name in INT32_PTRS else "*bf16"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in FLOATS:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
                if name not in UNALIGNED:  # strides: a launch sees them 16-divisible
                    attrs[(i,)] = [["tt.divisibility", 16]]
        kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        assert kernel.asm["cubin"], fn.__name__

    compile_for_sm90(A._attn_fwd_kernel, dict(FEATURES, HAS_SEQLENS_K=False, HEAD_DIM=80, BLOCK_D=128,
                                              BLOCK_M=128, BLOCK_N=64), 8, 3)
    compile_for_sm90(A._attn_fwd_kernel, dict(FEATURES, IS_VARLEN=False, HAS_SEQLENS_K=True, HAS_DROPOUT=False,
                                              MASK_KIND=0, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64), 4, 3)
    compile_for_sm90(A._attn_fwd_combine_kernel, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_S=8), 4, 1)
    compile_for_sm90(A._attn_bwd_dkdv_kernel, dict(FEATURES, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=32, BLOCK_N=64), 4, 2)
    compile_for_sm90(A._attn_bwd_dq_kernel, dict(FEATURES, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64), 4, 2)
    compile_for_sm90(A._attn_bwd_preprocess_kernel, dict(HEAD_DIM=111, BLOCK_D=128, BLOCK_M=64), 4, 1)
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel, all features on, lowers to a cubin for sm_90 (ptxas included)."""
    from triton.backends import backends as triton_backends

    if "nvidia" not in triton_backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


TILE_INDICES = range(max(len(triton_attention._FWD_TILES), len(triton_attention._BWD_TILES)))


def pin_tile_pair(monkeypatch, index):
    """Run the forward/dQ and dK/dV kernels on the index-th candidate tiles."""
    fwd = triton_attention._FWD_TILES[index % len(triton_attention._FWD_TILES)]
    bwd = triton_attention._BWD_TILES[index % len(triton_attention._BWD_TILES)]

    def config(tile):
        return triton.Config({"BLOCK_M": tile[0], "BLOCK_N": tile[1]}, num_warps=tile[2], num_stages=tile[3])

    monkeypatch.setattr(triton_attention, "TILE_OVERRIDE", {
        "_attn_fwd_kernel": config(fwd), "_attn_bwd_dkdv_kernel": config(bwd), "_attn_bwd_dq_kernel": config(fwd),
    })


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU test_gpu_every_tile_config runs larger shapes")
@pytest.mark.parametrize("index", TILE_INDICES)
def test_every_tile_config(index, monkeypatch):
    """Each candidate tile (forward/dQ and dK/dV, paired by index) computes the same
    attention, band edges and ragged tails included: autotuning may pick any of them."""
    pin_tile_pair(monkeypatch, index)
    check_case(Case(1, 2, 1, 203, 140, 64, causal=True, window=(60, -1), dropout_p=0.1))
    check_case(Case(2, 2, 1, 77, 215, 40, mask="add_pad", alibi="h", window=(-1, 30)))


# --------------------------------------------------------------------------- GPU sweep

SWEEP_HEAD_DIMS = (32, 40, 64, 80, 96, 111, 128, 160, 192, 256)
SWEEP_SEQLENS = ((1, 1), (1, 239), (113, 203), (203, 113), (128, 217), (1023, 1024), (4224, 4224))
HEAD_LAYOUTS = ((4, 4), (4, 2), (4, 1))  # MHA, GQA, MQA


@pytest.fixture
def pinned_tiles(monkeypatch):
    """Pin each kernel to the first tile its pruning keeps for a case, so the sweep
    compiles one tile per variant instead of autotuning every shape bucket."""

    def pin(case: Case):
        block_d = max(triton.next_power_of_2(case.head_dim), triton_attention.MIN_BLOCK)
        probe = torch.empty(0, dtype=case.dtype)
        args = dict(BLOCK_D=block_d, Q=probe, tune_seqlen_q=triton_attention._tune_bucket(case.seqlen_q))
        overrides = {}
        for name, tiles, backward in (
            ("_attn_fwd_kernel", triton_attention._FWD_TILES, False),
            ("_attn_bwd_dkdv_kernel", triton_attention._BWD_TILES, True),
            ("_attn_bwd_dq_kernel", triton_attention._FWD_TILES, False),
        ):
            fits = [t for t in tiles if triton_attention._config_fits(*t, args, backward=backward)] or [tiles[-1]]
            bm, bn, warps, stages = fits[0]
            overrides[name] = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        monkeypatch.setattr(triton_attention, "TILE_OVERRIDE", overrides)

    return pin


def sweep_cases():
    for i, head_dim in enumerate(SWEEP_HEAD_DIMS):
        for j, (seqlen_q, seqlen_k) in enumerate(SWEEP_SEQLENS):
            heads, kv_heads = HEAD_LAYOUTS[(i + j) % len(HEAD_LAYOUTS)]
            batch = 1 if seqlen_q * seqlen_k > 10**6 else 2
            for causal in (False, True):
                yield Case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, torch.bfloat16, causal=causal)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", list(sweep_cases()), ids=case_id)
def test_gpu_sweep(case, pinned_tiles):
    pinned_tiles(case)
    check_case(case)


def gpu_dtype_cases():
    for dtype in (torch.float16, torch.float32):
        for head_dim in (64, 111, 256):
            for seqlen_q, seqlen_k in ((113, 203), (203, 113), (1023, 1024)):
                yield Case(2, 4, 2, seqlen_q, seqlen_k, head_dim, dtype, causal=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", list(gpu_dtype_cases()), ids=case_id)
def test_gpu_dtypes(case, pinned_tiles):
    pinned_tiles(case)
    check_case(case)


FEATURES = {
    "window": dict(window=(64, 16)),
    "causal_window": dict(causal=True, window=(100, -1)),
    "alibi": dict(alibi="bh", causal=True),
    "softcap": dict(softcap=2.0, input_scale=2.0),
    "bool_mask": dict(mask="bool_b"),
    "additive_mask": dict(mask="add_h", causal=True),
    "key_padding": dict(mask="add_pad"),
    "dropout": dict(dropout_p=0.15, causal=True),
    "everything": dict(causal=True, window=(200, -1), alibi="h", softcap=3.0, mask="add_bh", dropout_p=0.1),
    "bhsd_views": dict(layout="bhsd", causal=True),
}


def gpu_feature_cases():
    # two head dims per feature, rotating over a padded, a mid and the largest one
    head_dim_pairs = ((40, 256), (128, 256), (40, 128))
    for f, (feature, options) in enumerate(FEATURES.items()):
        for head_dim in head_dim_pairs[f % len(head_dim_pairs)]:
            for seqlen_q, seqlen_k in ((1, 239), (113, 203), (203, 113), (1023, 1024)):
                yield pytest.param(Case(2, 4, 2, seqlen_q, seqlen_k, head_dim, torch.bfloat16, **options),
                                   id=f"{feature}-d{head_dim}-{seqlen_q}x{seqlen_k}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", list(gpu_feature_cases()))
def test_gpu_features(case, pinned_tiles):
    pinned_tiles(case)
    check_case(case)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("index", TILE_INDICES)
def test_gpu_every_tile_config(index, head_dim, monkeypatch):
    pin_tile_pair(monkeypatch, index)
    check_case(Case(2, 4, 2, 1023, 1000, head_dim, torch.bfloat16, causal=True, window=(300, -1), dropout_p=0.1))
    check_case(Case(2, 4, 1, 257, 515, head_dim, torch.bfloat16, mask="add_pad", alibi="h"))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("causal", (False, True))
def test_gpu_autotuned(causal):
    """The autotuned launch (no pinned tile), on two length buckets."""
    check_case(Case(2, 8, 2, 1023, 1024, 128, torch.bfloat16, causal=causal))
    check_case(Case(2, 8, 8, 17, 1024, 64, torch.bfloat16, causal=causal))


def gpu_varlen_cases():
    lengths = torch.Generator().manual_seed(3)
    for head_dim in (64, 128, 256):
        for options in (dict(), dict(causal=True), dict(causal=True, window=(256, -1), alibi="bh", dropout_p=0.1),
                        dict(mask="add_h", softcap=5.0)):
            lens_q = tuple(torch.randint(0, 1100, (8,), generator=lengths).tolist())
            lens_k = tuple(torch.randint(0, 1100, (8,), generator=lengths).tolist())
            yield pytest.param(VarlenCase(lens_q, lens_k, 8, 2, head_dim, torch.bfloat16, options),
                               id=f"d{head_dim}-{'-'.join(options) or 'plain'}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", list(gpu_varlen_cases()))
def test_gpu_varlen(case, pinned_tiles):
    pinned_tiles(Case(len(case.lens_q), case.heads, case.kv_heads, max(case.lens_q), max(case.lens_k),
                      case.head_dim, case.dtype))
    check_varlen(case)


def gpu_kvcache_cases():
    for cache_len in (239, 4096, 16384):
        for seqlen_q, new_len in ((1, 1), (4, 4)):
            fills = tuple(int(x) for x in torch.linspace(0, cache_len - new_len, 8).round().tolist())
            for num_splits in (None, 1, 7):
                yield pytest.param(
                    CacheCase(fills, cache_len, seqlen_q, new_len, 32, 8, 128, num_splits, torch.bfloat16,
                              dict(causal=seqlen_q > 1)),
                    id=f"cache{cache_len}-q{seqlen_q}-splits{num_splits}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", list(gpu_kvcache_cases()))
def test_gpu_kvcache(case, pinned_tiles):
    pinned_tiles(Case(8, case.heads, case.kv_heads, case.seqlen_q, case.cache_len, case.head_dim, case.dtype))
    check_kvcache(case)


@pytest.mark.gpu
@needs_gpu
def test_gpu_kvcache_split_heuristic():
    """One token over a long cache is split to fill the GPU; a full grid is not split."""
    device = torch.device(DEVICE)
    sms = triton_attention._sm_count(device)
    assert triton_attention._num_splits(8 * 8, 16384 // triton_attention.SPLIT_ALIGN, device) > 1
    assert triton_attention._num_splits(4 * sms, 16384 // triton_attention.SPLIT_ALIGN, device) == 1


@pytest.mark.gpu
@needs_gpu
def test_gpu_backward_deterministic_50_runs(pinned_tiles):
    case = Case(2, 8, 2, 1023, 1024, 128, torch.bfloat16, causal=True, dropout_p=0.1)
    pinned_tiles(case)
    q, k, v, dout = make_inputs(case)
    opts = make_options(case)
    first = triton_run(q, k, v, dout, opts)
    for _ in range(49):
        again = triton_run(q, k, v, dout, opts)
        for a, b in zip(first[2:], again[2:]):
            assert torch.equal(a, b)


@pytest.mark.gpu
@needs_gpu
def test_gpu_large_grid(pinned_tiles):
    """B * H = 66560 programs per query block: more than a 65535-wide grid axis holds."""
    case = Case(1040, 64, 16, 17, 23, 32, torch.bfloat16, causal=True)
    pinned_tiles(case)
    check_case(case)


@pytest.mark.gpu
@needs_gpu
def test_gpu_int64_offsets(pinned_tiles):
    """q, k, v, dout whose batch stride puts elements past 2**31: offsets must be 64-bit."""
    batch, seqlen, heads, head_dim = 2, 129, 2, 64
    case = Case(batch, heads, heads, seqlen, seqlen, head_dim, torch.bfloat16, causal=True)
    pinned_tiles(case)
    stride_b = 2**31 + 64
    storage = torch.empty(stride_b + seqlen * heads * head_dim, dtype=case.dtype, device=DEVICE)

    def big(t):
        view = storage.as_strided(t.shape, (stride_b, heads * head_dim, head_dim, 1))
        view.copy_(t)
        return view

    q, k, v, dout = make_inputs(case)
    opts = make_options(case)
    expected = triton_run(q, k, v, dout, opts)
    for name, small in zip("qkvd", (q, k, v, dout)):
        args = [q, k, v, dout]
        args["qkvd".index(name)] = big(small)
        got = triton_run(*args, opts)
        for a, b in zip(got, expected):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@needs_gpu
def test_gpu_memory_linear_in_seqlen(pinned_tiles):
    """Forward + backward allocate O(seqlen) beyond the inputs (no seqlen^2 buffer)."""
    peaks = []
    for seqlen in (8192, 16384):
        case = Case(1, 16, 16, seqlen, seqlen, 128, torch.bfloat16, causal=True)
        pinned_tiles(case)
        q, k, v, dout = make_inputs(case)
        opts = make_options(case)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, lse = triton_attention.attention_fwd(q, k, v, *opts.values())
        grads = triton_attention.attention_bwd(dout, q, k, v, out, lse, *opts.values(), True, False, False)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del out, lse, grads
    assert peaks[1] <= 2.2 * peaks[0], peaks


def test_case_ids_are_unique():
    ids = [case_id(c) for c in CASES]
    assert len(ids) == len(set(ids))
