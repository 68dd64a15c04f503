"""The Triton attention kernels: what is specific to them (the shared sweep is test_attention.py).

CPU (the Triton interpreter) and GPU: every candidate tile config computes the same
attention; the interpreter never autotunes; the dropout keep-mask, extracted from the
kernel's output, is bit for bit ``dropout_keep_mask``; dropout that keeps nothing; the
one-key fp32 gradients (exactly 0 up to FlashAttention's delta rounding); an expanded
dout; bitwise-deterministic backward (dense and varlen); the launchers refuse learned-bias
gradients; split-KV decode with explicit split counts (and the combine kernel), which the
public API leaves to a heuristic; and, in a subprocess, every kernel compiled for sm_90
without launching it. GPU only (``pytest -m gpu``): every tile on larger shapes, the
autotuned launch, the split heuristic, 50-run determinism, grids past 65535 heads,
64-bit offsets, memory linear in seqlen.

Most tests go through ``fast_attn.attention(..., backend="triton")``. The few that need a
launcher directly call it through ``launch`` (the one place that knows the launchers'
signatures); tile pinning reads the launcher's tile tables (``pin_tile_pair``).
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import fast_attn  # noqa: E402
from fast_attn import backends  # noqa: E402
from fast_attn import testing_cases as tc  # noqa: E402
from fast_attn.reference.attention import attention_ref, attention_with_kvcache_ref, dropout_keep_mask  # noqa: E402
from fast_attn.testing import assert_close  # noqa: E402

if not (torch.cuda.is_available() or backends.triton_interpret_enabled()):
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402

from fast_attn.ops._attention_core import append_to_cache  # noqa: E402
from fast_attn.ops.attention_params import CACHE, DENSE_PACKING, AttentionParams, BiasGrads, Packing  # noqa: E402
from fast_attn.triton_kernels import attention as triton_attention  # noqa: E402
from fast_attn.triton_kernels._device import sm_count  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_A = tc.AttentionSpec


def launch(kernel: str, *tensors, **options):
    """The Triton attention launchers, called directly (the public API cannot reach
    what these tests need: learned-bias gradient flags, explicit split counts).

    kernel: "fwd" (q, k, v) -> (out, lse); "bwd" (dout, q, k, v, out, lse) -> (dq, dk,
    dv, dmask, dslopes); "kvcache_fwd" (q, k_cache, v_cache, k, v, cache_seqlens) ->
    (out, lse). options: attn_mask, alibi_slopes, seed, causal, softmax_scale, window,
    softcap, dropout_p, deterministic, mask_grad, alibi_grad, num_splits.
    """
    o = dict(attn_mask=None, alibi_slopes=None, seed=0, causal=False, softmax_scale=None, window=(-1, -1),
             softcap=0.0, dropout_p=0.0, deterministic=True, mask_grad=False, alibi_grad=False, num_splits=None)
    o.update(options)
    if o["softmax_scale"] is None:
        o["softmax_scale"] = 1.0 / math.sqrt(tensors[1 if kernel == "bwd" else 0].shape[-1])
    params = AttentionParams(
        o["softmax_scale"], causal=o["causal"], window=tuple(o["window"]), softcap=o["softcap"],
        dropout_p=o["dropout_p"], dropout_seed=o["seed"], deterministic=o["deterministic"],
        attn_mask=o["attn_mask"], alibi_slopes=o["alibi_slopes"],
    )
    if kernel == "kvcache_fwd":
        q, k_cache, v_cache, k, v, cache_seqlens = tensors
        seqlens_k = append_to_cache(k_cache, v_cache, k, v, cache_seqlens)  # as the op does first
        return triton_attention.attention_fwd(q, k_cache, v_cache, params, Packing(CACHE, seqlens_k=seqlens_k),
                                              num_splits=o["num_splits"])
    if kernel == "fwd":
        return triton_attention.attention_fwd(*tensors, params, DENSE_PACKING)
    return triton_attention.attention_bwd(*tensors, params, DENSE_PACKING, BiasGrads(o["mask_grad"], o["alibi_grad"]))


def check(spec, **evaluate_options):
    """One shared-generator case on the triton backend against the reference."""
    case = tc.build(spec)
    with tc.nan_poisoned():
        result = tc.evaluate(case, "triton", DEVICE, **evaluate_options)
    assert result, f"{case.label}: {result.report()}"
    return result


def grads_of(spec, seed=0, **options):
    """(out, dq, dk, dv) of fast_attn.attention(backend="triton") on a case's inputs."""
    case = tc.build(spec)
    inputs = case.make(torch.device(DEVICE), torch.Generator().manual_seed(seed))
    leaves = [inputs[n].detach().requires_grad_() for n in "qkv"]
    out = fast_attn.attention(*leaves, causal=spec.causal, backend="triton", **options)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout))


# ------------------------------------------------------------------------- tile configs

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
    check(_A(1, 2, 1, 203, 140, 64, causal=True, window=(60, -1), dropout_p=0.1))
    check(_A(2, 2, 1, 77, 215, 40, mask="add_pad", alibi="h", window=(-1, 30)))


def test_interpreter_never_autotunes(monkeypatch):
    """Under the interpreter each kernel runs its one pinned tile, never the autotuner."""
    if not backends.triton_interpret_enabled():
        pytest.skip("interpreter only")

    def refuse(*args, **kwargs):
        raise AssertionError("the autotuner ran under the interpreter")

    for tuned in (triton_attention._attn_fwd_tuned, triton_attention._attn_bwd_dkdv_tuned,
                  triton_attention._attn_bwd_dq_tuned):
        monkeypatch.setattr(tuned, "run", refuse)
    grads_of(_A(1, 2, 1, 17, 33, 40, causal=True))


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("seed", [0, tc.DROPOUT_SEED])
def test_dropout_keep_mask_is_the_reference_mask(seed):
    """With q = k = 0 every probability is 1/Sk, and with V = I (D = Sk) the output row is
    the dropped-out probability row itself: out != 0 exactly where the mask keeps."""
    batch, heads, seqlen_q, seqlen_k, p = 2, 2, 17, 40, 0.3
    q = torch.zeros(batch, seqlen_q, heads, seqlen_k, device=DEVICE)
    k = torch.zeros(batch, seqlen_k, heads, seqlen_k, device=DEVICE)
    v = torch.eye(seqlen_k, device=DEVICE).expand(batch, heads, seqlen_k, seqlen_k).transpose(1, 2)
    out, lse = fast_attn.attention(q, k, v, softmax_scale=1.0, dropout_p=p, dropout_seed=seed, return_lse=True,
                                   backend="triton")
    kept = (out != 0).permute(0, 2, 1, 3)  # (B, H, Sq, Sk)
    assert torch.equal(kept, dropout_keep_mask(seed, batch, heads, seqlen_q, seqlen_k, p, device=DEVICE))
    scale = 1.0 / ((1.0 - p) * seqlen_k)
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], scale))
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(seqlen_k)))


def test_dropout_that_keeps_nothing():
    """dropout_p within 2**-33 of 1 has threshold 2**32 (no uint32 hash reaches it):
    out and every gradient are exactly 0, the LSE is that of the undropped scores."""
    spec = _A(1, 2, 1, 17, 33, 40, "float32", causal=True)
    case = tc.build(spec)
    inputs = case.make(torch.device(DEVICE), torch.Generator().manual_seed(0))
    leaves = [inputs[n].detach().requires_grad_() for n in "qkv"]
    out, lse = fast_attn.attention(*leaves, causal=True, dropout_p=1.0 - 2.0**-34, dropout_seed=7,
                                   return_lse=True, backend="triton")
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    for t in (out, *grads):
        assert torch.all(t == 0)
    _, ref_lse = attention_ref(*(inputs[n].double() for n in "qkv"), causal=True)
    torch.testing.assert_close(lse, ref_lse.float())


# ------------------------------------------------------------------------ gradients


def test_single_key_fp32_gradients():
    """With one key dS = P (dP - delta) is exactly 0. Plain PyTorch's baseline reaches 0
    exactly, so the tolerance rule allows little; the kernels take delta = rowsum(dO * O)
    (FlashAttention's identity), which leaves rounding of |dO| |O| in dP - delta: dq and
    dk must be 0 up to that rounding; out, lse and dv match by the rule."""
    spec = _A(2, 2, 1, 17, 1, 64, "float32")
    case = tc.build(spec)
    inputs = case.make(torch.device(DEVICE), torch.Generator().manual_seed(0))
    q, k, v = (inputs[n] for n in "qkv")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fast_attn.attention(*leaves, backend="triton")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = attention_ref(*ref_leaves)
    ref_dv = torch.autograd.grad(ref_out, ref_leaves[2], dout.double())[0]
    base_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    base_out, _ = attention_ref(*base_leaves, upcast=False)
    base_dv = torch.autograd.grad(base_out, base_leaves[2], dout)[0]
    assert_close(out.detach(), ref_out.detach(), base_out.detach(), name="out")
    assert_close(dv, ref_dv, base_dv, gradient=True, factor=3.0, name="dv")
    delta_terms = (dout.double() * v.double().expand_as(dout)).abs().sum(-1).max()  # sum_d |dO * O| (O = V)
    bound = 8 * torch.finfo(torch.float32).eps * q.shape[-1] ** -0.5 * float(delta_terms) * spec.seqlen_q
    for grad, other in ((dq, k), (dk, q)):  # dq ~ dS K, dk ~ dS^T Q
        assert float(grad.abs().max()) <= bound * float(other.abs().max())


def test_expanded_dout():
    """dout of ``out.sum()`` arrives expanded (all strides 0): copied, not misread."""
    spec = _A(1, 2, 1, 17, 33, 40, causal=True)
    case = tc.build(spec)
    inputs = case.make(torch.device(DEVICE), torch.Generator().manual_seed(0))
    leaves = [inputs[n].detach().requires_grad_() for n in "qkv"]
    grads = torch.autograd.grad(fast_attn.attention(*leaves, causal=True, backend="triton").sum(), leaves)
    ref_leaves = [inputs[n].detach().double().requires_grad_() for n in "qkv"]
    oracle = torch.autograd.grad(attention_ref(*ref_leaves, causal=True)[0].sum(), ref_leaves)
    base_leaves = [inputs[n].detach().clone().requires_grad_() for n in "qkv"]
    baseline = torch.autograd.grad(attention_ref(*base_leaves, causal=True, upcast=False)[0].sum(), base_leaves)
    for name, actual, o, b in zip(("dq", "dk", "dv"), grads, oracle, baseline):
        assert_close(actual, o, b, factor=3.0, gradient=True, name=name)


def test_backward_is_bitwise_deterministic():
    """Three backward runs (GQA, causal, dropout, a mask) give identical bits."""
    spec = _A(1, 4, 2, 47, 79, 40, causal=True, dropout_p=0.1, mask="add_h", deterministic=True)
    runs = [tc.evaluate(tc.build(spec), "triton", DEVICE) for _ in range(3)]
    for again in runs[1:]:
        for name in ("q", "k", "v"):
            assert torch.equal(again.grads[name], runs[0].grads[name])
        assert torch.equal(again.outputs["out"], runs[0].outputs["out"])


def test_varlen_backward_is_bitwise_deterministic():
    spec = tc.VarlenSpec((17, 33, 1), (5, 50, 20), 4, 2, 64, causal=True, window=(7, -1), alibi="bh", dropout_p=0.2)
    first, again = (tc.evaluate(tc.build(spec), "triton", DEVICE) for _ in range(2))
    for name in ("q", "k", "v"):
        assert torch.equal(first.grads[name], again.grads[name])


def test_mask_and_alibi_gradients_are_not_supported():
    q = torch.randn(1, 17, 2, 40, device=DEVICE).half()
    mask = torch.randn(1, 2, 17, 17, device=DEVICE).half()
    alibi = torch.rand(2, device=DEVICE)
    out, lse = launch("fwd", q, q, q, attn_mask=mask, alibi_slopes=alibi)
    for mask_grad, alibi_grad in ((True, False), (False, True)):
        with pytest.raises(NotImplementedError):
            launch("bwd", torch.randn_like(out), q, q, q, out, lse, attn_mask=mask, alibi_slopes=alibi,
                   mask_grad=mask_grad, alibi_grad=alibi_grad)


# ------------------------------------------------------------- kv cache: explicit splits

KVCACHE_SPLITS = [
    (tc.KvcacheSpec((10, 200, 299), 300, 1, 1, 4, 2, 64), 1),
    (tc.KvcacheSpec((10, 200, 299), 300, 1, 1, 4, 2, 64), 3),  # split-KV + combine
    (tc.KvcacheSpec((0, 100, 296), 300, 4, 0, 4, 1, 40, causal=True), 3),  # a row with no key
    (tc.KvcacheSpec((0, 100, 290), 300, 4, 4, 4, 1, 40, causal=True), 2),
    (tc.KvcacheSpec((10, 200, 290), 300, 2, 2, 4, 2, 64, causal=True, window=(50, -1), alibi="bh"), 2),
    (tc.KvcacheSpec((10, 200, 295), 300, 1, 0, 2, 2, 111, "float32", softcap=2.0), 5),
    (tc.KvcacheSpec(None, 200, 3, 0, 4, 4, 64, alibi="h", stale="nonfinite"), 2),
    (tc.KvcacheSpec((5, 17), 64, 1, 1, 4, 1, 64, stale="nonfinite"), None),  # the heuristic
]


@pytest.mark.parametrize(("spec", "num_splits"), KVCACHE_SPLITS,
                         ids=[f"{tc.label(s)}-splits{n}" for s, n in KVCACHE_SPLITS])
def test_kvcache_split_counts(spec, num_splits):
    """The decode launcher with a given number of KV splits matches the reference, and
    appends in place exactly as the reference does."""
    case = tc.build(spec)
    inputs = case.make(torch.device(DEVICE), torch.Generator().manual_seed(0))
    opts = tc._attention_options(spec)
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with tc.nan_poisoned():
        out, lse = launch("kvcache_fwd", inputs["q"], k_cache, v_cache, inputs.get("k"), inputs.get("v"),
                          inputs.get("cache_seqlens"), alibi_slopes=inputs.get("alibi_slopes"), causal=spec.causal,
                          window=spec.window, softcap=spec.softcap, num_splits=num_splits)

    def reference(upcast):
        cast = (lambda t: None if t is None else t.double()) if upcast else (lambda t: t)
        caches = [cast(inputs[n]).clone() for n in ("k_cache", "v_cache")]
        result = attention_with_kvcache_ref(cast(inputs["q"]), *caches, cast(inputs.get("k")), cast(inputs.get("v")),
                                            inputs.get("cache_seqlens"), alibi_slopes=inputs.get("alibi_slopes"),
                                            **opts, upcast=upcast)
        return (*result, *caches)

    oracle, baseline = reference(True), reference(False)
    assert torch.equal(k_cache.nan_to_num(), baseline[2].nan_to_num()), "k was not appended in place"
    assert torch.equal(v_cache.nan_to_num(), baseline[3].nan_to_num()), "v was not appended in place"
    assert_close(out, oracle[0], baseline[0], name="out")
    assert_close(lse, oracle[1], baseline[1].to(oracle[1].dtype), name="lse")


# ---------------------------------------------------------------- sm_90 compile (no GPU)

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


# --------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("index", TILE_INDICES)
def test_gpu_every_tile_config(index, head_dim, monkeypatch):
    pin_tile_pair(monkeypatch, index)
    check(_A(2, 4, 2, 1023, 1000, head_dim, "bfloat16", causal=True, window=(300, -1), dropout_p=0.1))
    check(_A(2, 4, 1, 257, 515, head_dim, "bfloat16", mask="add_pad", alibi="h"))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("causal", (False, True))
def test_gpu_autotuned(causal):
    """The autotuned launch (no pinned tile), on two length buckets."""
    check(_A(2, 8, 2, 1023, 1024, 128, "bfloat16", causal=causal))
    check(_A(2, 8, 8, 17, 1024, 64, "bfloat16", causal=causal))


@pytest.mark.gpu
@needs_gpu
def test_gpu_kvcache_split_heuristic():
    """One token over a long cache is split to fill the GPU; a full grid is not split."""
    device = torch.device(DEVICE)
    sms = sm_count(device)
    assert triton_attention._num_splits(8 * 8, 16384 // triton_attention.SPLIT_ALIGN, device) > 1
    assert triton_attention._num_splits(4 * sms, 16384 // triton_attention.SPLIT_ALIGN, device) == 1


@pytest.mark.gpu
@needs_gpu
def test_gpu_backward_deterministic_50_runs():
    spec = _A(2, 8, 2, 1023, 1024, 128, "bfloat16", causal=True, dropout_p=0.1)
    first = grads_of(spec, dropout_p=0.1, dropout_seed=3, deterministic=True)
    for _ in range(49):
        again = grads_of(spec, dropout_p=0.1, dropout_seed=3, deterministic=True)
        for a, b in zip(first[1:], again[1:]):
            assert torch.equal(a, b)


@pytest.mark.gpu
@needs_gpu
def test_gpu_large_grid():
    """B * H = 66560 programs per query block: more than a 65535-wide grid axis holds."""
    check(_A(1040, 64, 16, 17, 23, 32, "bfloat16", causal=True))


@pytest.mark.gpu
@needs_gpu
def test_gpu_int64_offsets():
    """q, k, v whose batch stride puts elements past 2**31: offsets must be 64-bit."""
    batch, seqlen, heads, head_dim = 2, 129, 2, 64
    stride_b = 2**31 + 64
    storage = torch.empty(stride_b + seqlen * heads * head_dim, dtype=torch.bfloat16, device=DEVICE)
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=DEVICE).bfloat16() for _ in range(3))

    def run(*tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fast_attn.attention(*leaves, causal=True, backend="triton")
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return (out.detach(), *grads)

    expected = run(q, k, v)
    for index in range(3):
        args = [q, k, v]
        big = storage.as_strided(args[index].shape, (stride_b, heads * head_dim, head_dim, 1))
        big.copy_(args[index])
        args[index] = big
        for a, b in zip(run(*args), expected):
            assert torch.equal(a, b), "qkv"[index]


@pytest.mark.gpu
@needs_gpu
def test_gpu_memory_linear_in_seqlen():
    """Forward + backward allocate O(seqlen) beyond the inputs (no seqlen^2 buffer)."""
    peaks = []
    for seqlen in (8192, 16384):
        q, k, v = (torch.randn(1, seqlen, 16, 128, device=DEVICE).bfloat16().requires_grad_() for _ in range(3))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fast_attn.attention(q, k, v, causal=True, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del out, grads
    assert peaks[1] <= 2.2 * peaks[0], peaks
