"""The CUDA attention backend (csrc/attention/ behind fast_attn/ops/cuda_attention.py): what
is specific to it. The shared sweep (every backend, the default kernel family) is
test_attention.py.

GPU tests (``pytest -m gpu``; they skip without CUDA or when the extension cannot load):
the shared GPU cases of ``fast_attn.testing_cases`` again on the sm_80 kernel family
(``FAST_ATTN_CUDA_ATTENTION_ARCH=sm80``) and the full grids with ``sm90`` forced on a
Hopper GPU; tests marked with the ``arch`` fixture run on both "sm80" and "auto"; an
expanded dout; fully masked rows (causal and window (0, 0) with Sq > Sk: out 0, lse
-inf, zero dq, no NaN); a bitwise-deterministic backward over 50 runs (dense and
varlen); the raw ops' schema and fake functions (opcheck) and their error messages;
the refusal of the features the CUDA kernels do not implement (dropout, ALiBi,
attention masks, fp32, head_dim > 256) and auto's routing of those calls to Triton.
Before each launch the caching allocator is handed NaN-filled blocks of the outputs'
sizes (``poison_for``), so an output element the kernels never write most likely
shows up as NaN.

CPU tests (no GPU needed): ``padded_head_dim``, the FAST_ATTN_CUDA_ATTENTION_ARCH
parsing, ``select_backend`` with the real capability table, and the whole cuda op layer
(padding, arch, varlen packing, kv-cache append, autograd) run on CPU tensors against a
stand-in for ``torch.ops.fast_attn.cuda_attention_fwd/bwd`` that computes the kernels'
contract (csrc/attention/attention_params.h) with the reference. The raw ops are called
with the arguments ``raw_fwd_args`` builds (the one place that knows their order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import fast_attn
from fast_attn import backends
from fast_attn import testing_cases as tc
from fast_attn.backends import BackendStatus, Call
from fast_attn.cuda_backend import attention as cuda_attention
from fast_attn.verified import Verified
from fast_attn.ops import attention as attn_ops
from fast_attn.ops import attention_kvcache as kvcache_ops
from fast_attn.reference.attention import attention_ref, attention_varlen_ref, attention_with_kvcache_ref
from fast_attn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close

DEVICE = "cuda"
ENV_ARCH = backends.ENV_CUDA_ATTENTION_ARCH
ARCHS = ("sm80", "auto")  # "auto" is the sm_90a forward on an H100
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16, FP16 = torch.bfloat16, torch.float16
POISON_COPIES = 3  # NaN blocks per output size: the op's own temporaries take some
SLICE_PAD = 16  # extra columns of the "sliced" layout: rows stay 16-byte aligned
SOFTCAP = 30.0


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cuda_extension(cuda_ops):
    """fast_attn._C loaded (tests/conftest.py) and the cuda backend usable; skips otherwise."""
    status = backends.available_backends()["cuda"]
    if not status:
        pytest.skip(f"cuda backend unavailable: {status.reason}")


@pytest.fixture(params=ARCHS)
def arch(request, monkeypatch, cuda_extension):
    """Runs the test once per kernel family (read by the op on every call)."""
    monkeypatch.setenv(ENV_ARCH, request.param)
    return request.param


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Case:
    """One dense attention call: shapes, dtype, options and the inputs' memory layout."""

    batch: int
    heads: int
    kv_heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: torch.dtype = BF16
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    softmax_scale: float = 0.0  # 0: 1/sqrt(D)
    deterministic: bool = False
    # "bshd" contiguous; "bhsd" transposed (B, H, S, D) views; "sliced" rows of a wider
    # tensor; "packed" q/k/v unbound from one (B, S, 3, H, D) tensor; "misaligned" storage
    # offset by one element (not 16-byte aligned: the op copies)
    layout: str = "bshd"
    input_scale: float = 1.0

    @property
    def scale(self) -> float:
        return self.softmax_scale or 1.0 / math.sqrt(self.head_dim)


def case_id(case: Case) -> str:
    parts = [f"b{case.batch}h{case.heads}kv{case.kv_heads}", f"{case.seqlen_q}x{case.seqlen_k}",
             f"d{case.head_dim}", str(case.dtype).replace("torch.", "")]
    for name in ("causal", "window", "softcap", "softmax_scale", "deterministic", "layout"):
        value = getattr(case, name)
        if value and value != (-1, -1) and value != "bshd":
            parts.append(name if value is True else f"{name}={value}")
    return "-".join(parts)


def draw(shape, dtype, scale=1.0) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE).mul_(scale).to(dtype)


def make_tensor(case: Case, seqlen: int, heads: int, layout: str) -> torch.Tensor:
    """A (B, S, H, D) tensor of random values laid out as ``layout`` says."""
    b, d = case.batch, case.head_dim
    if layout == "bhsd":
        return draw((b, heads, seqlen, d), case.dtype, case.input_scale).transpose(1, 2)
    if layout == "sliced":
        return draw((b, seqlen, heads, d + SLICE_PAD), case.dtype, case.input_scale)[..., :d]
    if layout == "misaligned":
        flat = draw((b * seqlen * heads * d + 1,), case.dtype, case.input_scale)
        t = flat[1:].view(b, seqlen, heads, d)
        assert t.data_ptr() % 16 != 0
        return t
    return draw((b, seqlen, heads, d), case.dtype, case.input_scale)


def make_inputs(case: Case):
    """q, k, v, dout in the case's layout (dout too, except for "packed")."""
    if case.layout == "packed":
        assert case.heads == case.kv_heads and case.seqlen_q == case.seqlen_k
        qkv = draw((case.batch, case.seqlen_q, 3, case.heads, case.head_dim), case.dtype, case.input_scale)
        q, k, v = qkv.unbind(2)
        return q, k, v, make_tensor(case, case.seqlen_q, case.heads, "bshd")
    q = make_tensor(case, case.seqlen_q, case.heads, case.layout)
    k = make_tensor(case, case.seqlen_k, case.kv_heads, case.layout)
    v = make_tensor(case, case.seqlen_k, case.kv_heads, case.layout)
    dout = make_tensor(case, case.seqlen_q, case.heads, case.layout)
    return q, k, v, dout


def poison_allocator(*specs) -> None:
    """Hands the caching allocator NaN-filled blocks of the given (shape, dtype)s, so that
    outputs the kernels allocate next most likely start as NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
              for shape, dtype in specs for _ in range(POISON_COPIES)]
    del blocks


def padded(shape) -> tuple:
    """A (..., D) shape with D padded to the compiled head dim the kernels run."""
    return (*shape[:-1], cuda_attention.padded_head_dim(shape[-1]))


def poison_for(q: torch.Tensor, k: torch.Tensor, lse_shape) -> None:
    poison_allocator((padded(q.shape), q.dtype), (padded(k.shape), k.dtype), (lse_shape, torch.float32))


def leaves_of(*tensors):
    """Leaf tensors sharing the inputs' storage and strides (layouts survive)."""
    return [t.detach().requires_grad_() for t in tensors]


def compare(names, results, oracle, baseline, label) -> None:
    for name, actual, o, b in zip(names, results, oracle, baseline):
        is_grad = name.startswith("d")
        assert_close(actual, o, b.to(o.dtype) if name == "lse" else b,
                     factor=GRAD_FACTOR if is_grad else OUTPUT_FACTOR, gradient=is_grad, name=f"{label} {name}")


NAMES = ("out", "lse", "dq", "dk", "dv")


def cuda_run(case: Case, q, k, v, dout):
    """(out, lse, dq, dk, dv) of ``fast_attn.attention(..., backend="cuda")`` and autograd."""
    leaves = leaves_of(q, k, v)
    poison_for(q, k, (case.batch, case.heads, case.seqlen_q))
    out, lse = fast_attn.attention(
        *leaves, causal=case.causal, softmax_scale=case.scale, window_size=case.window, softcap=case.softcap,
        return_lse=True, deterministic=case.deterministic, backend="cuda",
    )
    poison_for(q, k, (case.batch, case.heads, case.seqlen_q))
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    return out.detach(), lse.detach(), dq, dk, dv


def reference_run(case: Case, q, k, v, dout, upcast: bool):
    """(out, lse, dq, dk, dv) of the reference by autograd: fp64 copies when ``upcast``
    (the oracle), the input dtype otherwise (the baseline)."""
    leaves = [(t.detach().double() if upcast else t.detach().clone()).requires_grad_() for t in (q, k, v)]
    out, lse = attention_ref(*leaves, causal=case.causal, softmax_scale=case.scale, window_size=case.window,
                             softcap=case.softcap, upcast=upcast)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return (out.detach(), lse.detach(), *grads)


def check_case(case: Case):
    """Forward and backward of a case against the oracle; returns the cuda results."""
    q, k, v, dout = make_inputs(case)
    clones = [t.clone() for t in (q, k, v, dout)]
    results = cuda_run(case, q, k, v, dout)
    oracle = reference_run(case, q, k, v, dout, upcast=True)
    baseline = reference_run(case, q, k, v, dout, upcast=False)

    out, lse, dq, dk, dv = results
    assert out.shape == q.shape and out.dtype == case.dtype and out.is_contiguous()
    assert lse.shape == (case.batch, case.heads, case.seqlen_q) and lse.dtype == torch.float32
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype and grad.is_contiguous()
    compare(NAMES, results, oracle, baseline, case_id(case))
    for before, after in zip(clones, (q, k, v, dout)):
        assert torch.equal(before, after), f"{case_id(case)}: an input was written"
    return results


# ------------------------------------------ GPU: the shared sweep on each kernel family

# test_attention.py runs the shared cases on the default family ("auto": the sm_90a
# forward on an H100 where it takes the call); here they run again on the sm_80 kernels,
# and the full grids with the sm_90a forward forced.
SHARED_GPU_SPECS = [s for s in (tc.attention_specs(True) + tc.varlen_specs(True) + tc.kvcache_specs(True))
                    if s.gpu and s.dtype != "float32"]


def check_shared(spec) -> None:
    case = tc.build(spec)
    if backends.CAPABILITIES["cuda"][case.op].why_not(case.call("cuda")) is not None:
        pytest.skip("not a cuda-backend case")
    with tc.nan_poisoned():
        result = tc.evaluate(case, "cuda", DEVICE)
    assert result, f"{case.label}: {result.report()}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("spec", SHARED_GPU_SPECS, ids=tc.label)
def test_sm80_family_sweep(monkeypatch, cuda_extension, spec):
    monkeypatch.setenv(ENV_ARCH, "sm80")
    check_shared(spec)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("spec", tc.full_grid_specs(), ids=tc.label)
def test_hopper_forward_forced(monkeypatch, cuda_extension, spec):
    """FAST_ATTN_CUDA_ATTENTION_ARCH=sm90 runs the sm_90a forward (Hopper only; full
    grids, because it declines split-KV launches with cudaErrorNotSupported)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a kernels run on compute capability 9.0 only")
    monkeypatch.setenv(ENV_ARCH, "sm90")
    check_shared(spec)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim", (64, 100))
def test_expanded_dout(arch, head_dim):
    """dout of ``out.sum()`` arrives expanded (all strides 0): copied, not misread."""
    case = Case(2, 4, 2, 113, 255, head_dim, causal=True)
    q, k, v, _ = make_inputs(case)
    leaves = leaves_of(q, k, v)
    out = fast_attn.attention(*leaves, causal=True, backend="cuda")
    grads = torch.autograd.grad(out.sum(), leaves)
    ones = torch.ones_like(q)
    oracle = reference_run(case, q, k, v, ones, upcast=True)
    baseline = reference_run(case, q, k, v, ones, upcast=False)
    compare(NAMES[2:], grads, oracle[2:], baseline[2:], case_id(case))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim", (128, 80))
def test_fully_masked_rows(arch, head_dim):
    """Causal with Sq > Sk: rows i < Sq - Sk see no key; window (0, 0) with Sq > Sk: the
    same rows again. Out exactly 0, lse -inf, dq exactly 0, and no NaN anywhere."""
    seqlen_q, seqlen_k = 300, 100
    empty_rows = seqlen_q - seqlen_k
    for options in (dict(causal=True), dict(window=(0, 0))):
        case = Case(2, 4, 2, seqlen_q, seqlen_k, head_dim, **options)
        out, lse, dq, dk, dv = check_case(case)
        assert torch.all(out[:, :empty_rows] == 0) and torch.all(dq[:, :empty_rows] == 0)
        assert torch.all(lse[:, :, :empty_rows] == float("-inf"))
        assert torch.isfinite(lse[:, :, empty_rows:]).all()
        for t in (out, dq, dk, dv):
            assert not torch.isnan(t).any()


def assert_bitwise_repeatable(out, leaves, dout, runs: int) -> None:
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    for _ in range(runs - 1):
        again = torch.autograd.grad(out, leaves, dout, retain_graph=True)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name} differs between two deterministic backward runs"


DETERMINISM_RUNS = 50


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", [
    Case(2, 8, 8, 1023, 1023, 128, causal=True, deterministic=True),
    Case(2, 8, 2, 1023, 1024, 64, causal=True, deterministic=True),
], ids=case_id)
def test_deterministic_backward_50_runs(arch, case):
    q, k, v, dout = make_inputs(case)
    leaves = leaves_of(q, k, v)
    out = fast_attn.attention(*leaves, causal=case.causal, deterministic=True, backend="cuda")
    assert_bitwise_repeatable(out, leaves, dout, DETERMINISM_RUNS)


# ------------------------------------------------------ GPU: varlen determinism


@pytest.mark.gpu
@needs_gpu
def test_varlen_deterministic_backward_50_runs(arch):
    spec = tc.VarlenSpec(tc._random_lengths(6, 1100, 5), tc._random_lengths(6, 1100, 6), 8, 2, 128, "bfloat16",
                         causal=True)
    inputs = tc.build(spec).make(torch.device(DEVICE), torch.Generator().manual_seed(0))
    leaves = leaves_of(inputs["q"], inputs["k"], inputs["v"])
    packing = (inputs["cu_seqlens_q"], inputs["cu_seqlens_k"], max(spec.lens_q), max(spec.lens_k))
    out = fast_attn.attention_varlen(*leaves, *packing, causal=True, deterministic=True, backend="cuda")
    assert_bitwise_repeatable(out, leaves, torch.randn_like(out), DETERMINISM_RUNS)


def cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


# ------------------------------------------------------------- GPU: the raw ops


def raw_fwd_args(q, k, v, *, cu_q=None, cu_k=None, seqlens_k=None, max_q=0, max_k=0, causal=True):
    return (q, k, v, cu_q, cu_k, seqlens_k, max_q, max_k, q.shape[-1] ** -0.5, causal, -1, -1, 0.0, 0)


@pytest.mark.gpu
@needs_gpu
def test_raw_ops_match_their_fake_functions(cuda_extension):
    """torch.library.opcheck's schema and fake-tensor checks (fast_attn/cuda_backend/_fakes.py)
    on the dense, varlen and kv-cache forms and the backward."""
    utils = ("test_schema", "test_faketensor")
    ops = torch.ops.fast_attn
    q, k, v = draw((2, 17, 4, 64), BF16), draw((2, 33, 2, 64), BF16), draw((2, 33, 2, 64), BF16)
    torch.library.opcheck(ops.cuda_attention_fwd.default, raw_fwd_args(q, k, v), test_utils=utils)
    seqlens_k = torch.tensor([5, 33], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(ops.cuda_attention_fwd.default, raw_fwd_args(q, k, v, seqlens_k=seqlens_k),
                          test_utils=utils)
    cu_q = torch.tensor([0, 7, 17], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 33], dtype=torch.int32, device=DEVICE)
    packed = (q[0], k[0], v[0])
    torch.library.opcheck(ops.cuda_attention_fwd.default,
                          raw_fwd_args(*packed, cu_q=cu_q, cu_k=cu_k, max_q=10, max_k=20), test_utils=utils)
    out, lse = ops.cuda_attention_fwd(*raw_fwd_args(q, k, v))
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, None, None, 0, 0, 0.125, True, -1, -1, 0.0, True, 0)
    torch.library.opcheck(ops.cuda_attention_bwd.default, bwd_args, test_utils=utils)


@pytest.mark.gpu
@needs_gpu
def test_raw_op_bad_input_messages(cuda_extension):
    ops = torch.ops.fast_attn
    q, k, v = draw((1, 8, 2, 64), BF16), draw((1, 8, 2, 64), BF16), draw((1, 8, 2, 64), BF16)
    with pytest.raises(ValueError, match="head_dim must be 64, 128 or 256"):
        ops.cuda_attention_fwd(*raw_fwd_args(q[..., :40], k[..., :40], v[..., :40]))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ops.cuda_attention_fwd(*raw_fwd_args(q.float(), k.float(), v.float()))
    with pytest.raises(ValueError, match="arch must be"):
        ops.cuda_attention_fwd(*raw_fwd_args(q, k, v)[:-1], 3)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        ops.cuda_attention_fwd(*raw_fwd_args(q, draw((1, 8, 3, 64), BF16), draw((1, 8, 3, 64), BF16)))


# ------------------------------------------------------------ GPU: backend routing


def unsupported_options(feature: str, batch, heads, seqlen_q, seqlen_k, dtype) -> dict:
    if feature == "dropout":
        return dict(dropout_p=0.17, dropout_seed=2**40 + 7)
    if feature == "alibi":
        return dict(alibi_slopes=torch.rand(heads, device=DEVICE) * 0.5 + 0.05)
    if feature == "bool_mask":
        return dict(attn_mask=torch.rand(seqlen_q, seqlen_k, device=DEVICE) > 0.3)
    assert feature == "additive_mask"
    return dict(attn_mask=torch.randn(batch, 1, seqlen_q, seqlen_k, device=DEVICE).to(dtype))


UNSUPPORTED = ("dropout", "alibi", "bool_mask", "additive_mask")
ROUTING_CASE = Case(2, 4, 2, 113, 255, 64, causal=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("feature", UNSUPPORTED)
def test_cuda_refuses_unsupported_features(cuda_extension, feature):
    """backend="cuda" raises NotImplementedError naming the feature, for the dense and
    varlen ops (and ALiBi for the kv-cache op)."""
    c = ROUTING_CASE
    q, k, v, _ = make_inputs(c)
    options = unsupported_options(feature, c.batch, c.heads, c.seqlen_q, c.seqlen_k, c.dtype)
    with pytest.raises(NotImplementedError, match=f"feature '{feature}'"):
        fast_attn.attention(q, k, v, causal=True, backend="cuda", **options)
    if feature != "additive_mask":  # (B, ...) masks have no varlen counterpart here
        cu = cu_seqlens((c.seqlen_q,))
        cu_k = cu_seqlens((c.seqlen_k,))
        with pytest.raises(NotImplementedError, match=f"feature '{feature}'"):
            fast_attn.attention_varlen(q[0], k[0], v[0], cu, cu_k, c.seqlen_q, c.seqlen_k, backend="cuda",
                                       **unsupported_options(feature, 1, c.heads, c.seqlen_q, c.seqlen_k, c.dtype))
    if feature == "alibi":
        with pytest.raises(NotImplementedError, match="feature 'alibi'"):
            fast_attn.attention_with_kvcache(q, k, v, backend="cuda", **options)


@pytest.mark.gpu
@needs_gpu
def test_cuda_refuses_fp32_and_large_head_dims(cuda_extension):
    q, k, v, _ = make_inputs(Case(1, 2, 2, 17, 17, 64, torch.float32))
    with pytest.raises(NotImplementedError, match="dtype torch.float32"):
        fast_attn.attention(q, k, v, backend="cuda")
    with pytest.raises(NotImplementedError, match="dtype torch.float32"):
        fast_attn.attention_with_kvcache(q, k, v, backend="cuda")
    q, k, v, _ = make_inputs(Case(1, 2, 2, 17, 17, 300))
    with pytest.raises(NotImplementedError, match="head_dim 300"):
        fast_attn.attention(q, k, v, backend="cuda")


@pytest.fixture
def pinned_triton_tiles(monkeypatch):
    """One small tile per Triton kernel, so the auto-routed calls compile once instead of
    autotuning (the tiles fit every head dim up to 128 within the pruning budgets)."""
    triton = pytest.importorskip("triton")
    from fast_attn.triton_kernels import attention as triton_attention

    fwd = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)
    bwd = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2)
    monkeypatch.setattr(triton_attention, "TILE_OVERRIDE", {
        "_attn_fwd_kernel": fwd, "_attn_bwd_dkdv_kernel": bwd, "_attn_bwd_dq_kernel": fwd,
    })


def spy_kernels(monkeypatch, table: dict) -> list:
    """Records which backend's entry of an op's kernel table runs."""
    ran = []
    for name, fn in list(table.items()):
        def spy(*args, _name=name, _fn=fn, **kwargs):
            ran.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setitem(table, name, spy)
    return ran


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("feature", UNSUPPORTED)
def test_auto_routes_unsupported_features_to_triton(cuda_extension, pinned_triton_tiles, monkeypatch, feature):
    """backend="auto" runs such a call on Triton, and it matches the reference (forward,
    and the backward for dropout)."""
    c = ROUTING_CASE
    q, k, v, dout = make_inputs(c)
    options = unsupported_options(feature, c.batch, c.heads, c.seqlen_q, c.seqlen_k, c.dtype)
    fwd_ran = spy_kernels(monkeypatch, attn_ops._FWD)
    bwd_ran = spy_kernels(monkeypatch, attn_ops._BWD)
    leaves = leaves_of(q, k, v)
    out, lse = fast_attn.attention(*leaves, causal=True, return_lse=True, backend="auto", **options)
    assert fwd_ran == ["triton"]
    results = [out.detach(), lse.detach()]
    names = NAMES[:2]
    if feature == "dropout":
        results += torch.autograd.grad(out, leaves, dout)
        names = NAMES
        assert bwd_ran == ["triton"]

    def reference(upcast):
        ref_leaves = [(t.detach().double() if upcast else t.detach().clone()).requires_grad_() for t in (q, k, v)]
        ref_options = dict(options)
        mask = ref_options.get("attn_mask")
        if mask is not None and upcast and mask.is_floating_point():
            ref_options["attn_mask"] = mask.double()
        ref_out, ref_lse = attention_ref(*ref_leaves, causal=True, softmax_scale=c.scale, upcast=upcast,
                                         **ref_options)
        grads = torch.autograd.grad(ref_out, ref_leaves, dout.to(ref_out.dtype)) if feature == "dropout" else ()
        return (ref_out.detach(), ref_lse.detach(), *grads)

    compare(names, results, reference(True), reference(False), f"auto {feature}")


@pytest.mark.gpu
@needs_gpu
def test_auto_picks_cuda_for_supported_calls(cuda_extension, monkeypatch):
    """A plain fp16/bf16 call (causal, GQA, window, softcap, deterministic backward; a
    kv-cache decode) runs on the cuda backend when backend="auto"."""
    fwd_ran = spy_kernels(monkeypatch, attn_ops._FWD)
    bwd_ran = spy_kernels(monkeypatch, attn_ops._BWD)
    cache_ran = spy_kernels(monkeypatch, kvcache_ops._KVCACHE_FWD)
    case = Case(2, 6, 2, 113, 255, 128, causal=True, window=(64, -1), softcap=SOFTCAP, deterministic=True)
    q, k, v, dout = make_inputs(case)
    leaves = leaves_of(q, k, v)
    out = fast_attn.attention(*leaves, causal=True, window_size=(64, -1), softcap=SOFTCAP, deterministic=True)
    torch.autograd.grad(out, leaves, dout)
    with torch.no_grad():
        fast_attn.attention_with_kvcache(q[:, :1], k, v, cache_seqlens=100)
    assert fwd_ran == ["cuda"] and bwd_ran == ["cuda"] and cache_ran == ["cuda"]


# =========================================================================== CPU tests


@pytest.mark.parametrize(("head_dim", "expected"), [
    (1, 64), (32, 64), (40, 64), (64, 64), (65, 128), (100, 128), (128, 128), (129, 256), (192, 256), (256, 256),
])
def test_padded_head_dim(head_dim, expected):
    assert cuda_attention.padded_head_dim(head_dim) == expected


def test_padded_head_dim_rejects_more_than_256():
    with pytest.raises(ValueError, match="head_dim must be at most 256 for the cuda backend, got 257"):
        cuda_attention.padded_head_dim(257)


@pytest.mark.parametrize(("value", "expected"), [
    (None, 0), ("", 0), ("auto", 0), ("sm80", 1), ("sm90", 2), (" SM80 ", 1), ("Auto", 0),
])
def test_cuda_attention_arch_parses_the_env(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(ENV_ARCH, raising=False)
    else:
        monkeypatch.setenv(ENV_ARCH, value)
    assert backends.cuda_attention_arch() == expected


@pytest.mark.parametrize("value", ["sm75", "90", "sm_80", "hopper"])
def test_cuda_attention_arch_rejects_unknown_values(monkeypatch, value):
    monkeypatch.setenv(ENV_ARCH, value)
    with pytest.raises(ValueError, match=ENV_ARCH):
        backends.cuda_attention_arch()


# Every backend up on a GPU machine, with the real CAPABILITIES table.
GPU_MACHINE = {
    "cuda": BackendStatus(True, "fast_attn._C is built", frozenset({"cuda"})),
    "triton": BackendStatus(True, "Triton kernels on cuda", frozenset({"cuda"})),
    "torch": BackendStatus(True, "pure PyTorch reference ops", frozenset({"cpu", "cuda"})),
}

ROUTES = [
    # (op, dtype, head_dim, features, backend auto picks)
    ("attention", BF16, 128, {"causal", "gqa", "backward", "deterministic"}, "cuda"),
    ("attention", FP16, 64, {"window", "softcap"}, "cuda"),
    ("attention", BF16, 80, {"causal"}, "cuda"),  # padded by the op layer
    ("attention", BF16, 256, set(), "cuda"),
    ("attention", BF16, 64, {"causal", "dropout", "backward"}, "triton"),
    ("attention", BF16, 64, {"alibi"}, "triton"),
    ("attention", BF16, 64, {"bool_mask", "gqa"}, "triton"),
    ("attention", FP16, 64, {"additive_mask"}, "triton"),
    ("attention", BF16, 64, {"additive_mask", "mask_grad", "backward"}, "torch"),  # learned bias
    ("attention", torch.float32, 64, {"causal"}, "triton"),
    ("attention", torch.float64, 64, set(), "torch"),
    ("attention", BF16, 300, {"causal"}, "torch"),  # past every kernel's head-dim limit
    ("attention_varlen", BF16, 128, {"causal", "gqa", "backward", "deterministic"}, "cuda"),
    ("attention_varlen", BF16, 128, {"dropout"}, "triton"),
    ("attention_with_kvcache", BF16, 128, {"causal", "window", "softcap", "gqa"}, "cuda"),
    ("attention_with_kvcache", BF16, 128, {"alibi"}, "triton"),
    ("attention_with_kvcache", torch.float32, 128, set(), "triton"),
]


@pytest.mark.parametrize(("op", "dtype", "head_dim", "features", "expected"), ROUTES,
                         ids=[f"{r[0]}-{str(r[1])[6:]}-d{r[2]}-{'+'.join(sorted(r[3])) or 'plain'}" for r in ROUTES])
def test_select_backend_routes_the_cuda_attention(op, dtype, head_dim, features, expected):
    """Where auto sends each call once the cuda attention families have their GPU record
    on this architecture; without it (today) the cuda rows go to triton."""
    call = Call(op, "cuda", dtype, frozenset(features), head_dim=head_dim, arch=H100)
    assert backends.select_backend(call, "auto", GPU_MACHINE, verified=VERIFIED_ON_H100) == expected
    unverified = "triton" if expected == "cuda" else expected
    assert backends.select_backend(call, "auto", GPU_MACHINE, verified=()) == unverified


H100 = (9, 0)
# A record in which every cuda attention family has passed the GPU suite on an H100 (tests only).
VERIFIED_ON_H100 = tuple(Verified("cuda", op, H100, "benchmarks/results/example/summary.md")
                         for op in ("attention", "attention_varlen", "attention_with_kvcache"))


def test_select_backend_auto_without_the_extension_is_triton():
    call = Call("attention", "cuda", BF16, frozenset({"causal"}), head_dim=64)
    down = dict(GPU_MACHINE, cuda=BackendStatus(False, "fast_attn._C is not built"))
    assert backends.select_backend(call, "auto", down) == "triton"


@pytest.mark.parametrize(("dtype", "head_dim", "features", "message"), [
    (BF16, 64, {"causal", "dropout"},
     r"feature 'dropout'; backends that can run this call here: \['triton', 'torch'\]"),
    (BF16, 64, {"alibi"}, "feature 'alibi'"),
    (BF16, 64, {"bool_mask"}, "feature 'bool_mask'"),
    (BF16, 64, {"additive_mask"}, "feature 'additive_mask'"),
    (torch.float32, 64, set(), r"dtype torch.float32; backends that can run this call here: \['triton', 'torch'\]"),
    (BF16, 300, set(), r"head_dim 300 \(at most 256\); backends that can run this call here: \['torch'\]"),
])
def test_select_backend_explicit_cuda_names_what_it_lacks(dtype, head_dim, features, message):
    call = Call("attention", "cuda", dtype, frozenset(features), head_dim=head_dim)
    with pytest.raises(NotImplementedError, match=message):
        backends.select_backend(call, "cuda", GPU_MACHINE)


# ---------------------------------------------- CPU: the op layer on a stand-in kernel


class StandInKernels:
    """``torch.ops.fast_attn.cuda_attention_fwd/bwd`` as the C++ side defines them
    (attention_ops.cpp, attention_params.h), computed on CPU by the reference; records
    every call. Checks what the kernels require of the op layer: a compiled head dim,
    int32 packing tensors that are contiguous (the C++ side reads them through
    data_ptr), and a valid arch."""

    def __init__(self):
        self.calls = []

    def _check(self, kind, q, cu_q, cu_k, seqlens_k, softmax_scale, arch):
        assert q.shape[-1] in cuda_attention.COMPILED_HEAD_DIMS, f"head_dim {q.shape[-1]} reached the kernels"
        assert arch in (0, 1, 2)
        for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k), ("seqlens_k", seqlens_k)):
            if t is not None:
                assert t.dtype == torch.int32, f"{name} must reach the kernels as int32"
        for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            if t is not None:
                assert t.is_contiguous(), f"{name} reaches attention_ops.cpp non-contiguous; it reads data_ptr"
        self.calls.append(dict(kind=kind, head_dim=q.shape[-1], arch=arch, softmax_scale=softmax_scale,
                               seqlens_k=None if seqlens_k is None else seqlens_k.tolist()))

    @staticmethod
    def _attend(q, k, v, cu_q, cu_k, seqlens_k, max_q, max_k, softmax_scale, causal, window_left,
                window_right, softcap):
        options = dict(causal=causal, softmax_scale=softmax_scale, window_size=(window_left, window_right),
                       softcap=softcap)
        if cu_q is not None:
            return attention_varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k, **options)
        return attention_ref(q, k, v, seqlens_k=seqlens_k, **options)

    def cuda_attention_fwd(self, q, k, v, cu_q, cu_k, seqlens_k, max_q, max_k, softmax_scale, causal,
                           window_left, window_right, softcap, arch):
        self._check("fwd", q, cu_q, cu_k, seqlens_k, softmax_scale, arch)
        out, lse = self._attend(q, k, v, cu_q, cu_k, seqlens_k, max_q, max_k, softmax_scale, causal, window_left,
                                window_right, softcap)
        return out, lse.float()

    def cuda_attention_bwd(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale, causal,
                           window_left, window_right, softcap, deterministic, arch):
        self._check("bwd", q, cu_q, cu_k, None, softmax_scale, arch)
        assert dout.shape == q.shape and out.shape == q.shape, "dout/out must be padded like q"
        def forward(q_, k_, v_):
            return self._attend(q_, k_, v_, cu_q, cu_k, None, max_q, max_k, softmax_scale, causal, window_left,
                                window_right, softcap)[0]

        grads = vjp_below_autograd(forward, [t.float() for t in (q, k, v)], dout.float())
        return tuple(g.to(q.dtype) for g in grads)


def vjp_below_autograd(fn, inputs, dout):
    """Gradients of ``fn(*inputs)`` from where a kernel runs: inside a custom op, below the
    autograd dispatch key (the dispatcher excludes it, so enable_grad alone records
    nothing), or in an autograd.Function's backward (grad mode off). Lifts both."""
    key = torch._C.DispatchKey.AutogradFunctionality
    was_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in inputs]
            return torch.autograd.grad(fn(*leaves), leaves, dout, allow_unused=True)
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, was_excluded)


@pytest.fixture
def stand_in(monkeypatch):
    """The cuda backend made available for CPU tensors, running the stand-in kernels."""
    from fast_attn import _extension

    kernels = StandInKernels()
    monkeypatch.setattr(cuda_attention, "ops", lambda: kernels)
    monkeypatch.setattr(_extension, "load_extension", lambda: None)
    cpu_machine = {
        "cuda": BackendStatus(True, "stand-in kernels", frozenset({"cpu"})),
        "triton": BackendStatus(False, "not used here"),
        "torch": BackendStatus(True, "ATen ops", frozenset({"cpu"})),
    }
    monkeypatch.setattr(backends, "_statuses", lambda: cpu_machine)
    monkeypatch.delenv(ENV_ARCH, raising=False)
    backends.forget_statuses()  # no selection memoized with other statuses
    yield kernels
    backends.forget_statuses()


def cpu_reference(fn, inputs, dout, upcast):
    leaves = [(t.detach().double() if upcast else t.detach().clone()).requires_grad_() for t in inputs]
    out, lse = fn(*leaves, upcast)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return (out.detach(), lse.detach(), *grads)


@pytest.mark.parametrize(("head_dim", "layout"), [(40, "bshd"), (64, "bshd"), (100, "bhsd"), (192, "bshd")])
def test_op_layer_pads_head_dims_and_keeps_the_scale(stand_in, head_dim, layout):
    batch, seqlen_q, seqlen_k, heads, kv_heads = 2, 17, 23, 4, 2

    def rand(seqlen, h):
        if layout == "bhsd":
            return torch.randn(batch, h, seqlen, head_dim).to(BF16).transpose(1, 2)
        return torch.randn(batch, seqlen, h, head_dim).to(BF16)

    q, k, v, dout = rand(seqlen_q, heads), rand(seqlen_k, kv_heads), rand(seqlen_k, kv_heads), rand(seqlen_q, heads)
    options = dict(causal=True, window_size=(9, -1), softcap=5.0)
    leaves = leaves_of(q, k, v)
    out, lse = fast_attn.attention(*leaves, **options, return_lse=True, deterministic=True, backend="cuda")
    grads = torch.autograd.grad(out, leaves, dout)
    assert out.shape == q.shape and out.is_contiguous() and all(g.is_contiguous() for g in grads)

    def reference(q_, k_, v_, upcast):
        return attention_ref(q_, k_, v_, **options, upcast=upcast)

    compare(NAMES, (out.detach(), lse.detach(), *grads), cpu_reference(reference, (q, k, v), dout, True),
            cpu_reference(reference, (q, k, v), dout, False), f"d{head_dim}")
    padded_dim = cuda_attention.padded_head_dim(head_dim)
    assert [c["kind"] for c in stand_in.calls] == ["fwd", "bwd"]
    for call in stand_in.calls:
        assert call["head_dim"] == padded_dim and call["softmax_scale"] == pytest.approx(head_dim**-0.5)


@pytest.mark.parametrize(("value", "arch"), [("sm80", 1), ("auto", 0), ("sm90", 2)])
def test_op_layer_passes_the_arch(stand_in, monkeypatch, value, arch):
    monkeypatch.setenv(ENV_ARCH, value)
    q = torch.randn(1, 5, 2, 64, dtype=BF16, requires_grad=True)
    out = fast_attn.attention(q, q.detach(), q.detach(), backend="cuda")
    out.sum().backward()
    assert [c["arch"] for c in stand_in.calls] == [arch, arch]


def test_op_layer_varlen(stand_in):
    lens_q, lens_k, heads, kv_heads, head_dim = (17, 0, 5, 9), (23, 9, 0, 4), 4, 2, 80
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    packing = (cu_q, cu_k, max(lens_q), max(lens_k))
    q = torch.randn(int(cu_q[-1]), heads, head_dim).to(FP16)
    k = torch.randn(int(cu_k[-1]), kv_heads, head_dim).to(FP16)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    leaves = leaves_of(q, k, v)
    out, lse = fast_attn.attention_varlen(*leaves, *packing, causal=True, return_lse=True, backend="cuda")
    grads = torch.autograd.grad(out, leaves, dout)

    def reference(q_, k_, v_, upcast):
        return attention_varlen_ref(q_, k_, v_, *packing, causal=True, upcast=upcast)

    compare(NAMES, (out.detach(), lse.detach(), *grads), cpu_reference(reference, (q, k, v), dout, True),
            cpu_reference(reference, (q, k, v), dout, False), "varlen")
    assert [c["head_dim"] for c in stand_in.calls] == [128, 128]


def test_op_layer_varlen_noncontiguous_cu_seqlens(stand_in):
    lens = (5, 9, 3)
    dense = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    storage = torch.full((2 * dense.numel(),), 999, dtype=torch.int32)
    storage[::2] = dense
    cu = storage[::2]  # the right values, every other element of the storage
    q = torch.randn(int(dense[-1]), 2, 64).to(BF16)
    out = fast_attn.attention_varlen(q, q, q, cu, cu, max(lens), max(lens), backend="cuda")
    expected, _ = attention_varlen_ref(q, q, q, dense, dense, max(lens), max(lens))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("head_dim", (64, 80))
def test_op_layer_kvcache_appends_in_place(stand_in, head_dim):
    batch, cache_len, heads, kv_heads, seqlen_q, new_len = 3, 40, 4, 2, 2, 2
    fills = (0, 17, 38)
    q = torch.randn(batch, seqlen_q, heads, head_dim).to(BF16)
    k_cache = torch.randn(batch, cache_len, kv_heads, head_dim).to(BF16)
    v_cache = torch.randn_like(k_cache)
    k = torch.randn(batch, new_len, kv_heads, head_dim).to(BF16)
    v = torch.randn_like(k)
    seqlens = torch.tensor(fills, dtype=torch.int32)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    oracle = attention_with_kvcache_ref(q.double(), expected_k.double(), expected_v.double(), k.double(),
                                        v.double(), seqlens, causal=True)
    baseline = attention_with_kvcache_ref(q, expected_k.clone(), expected_v.clone(), k, v, seqlens, causal=True,
                                          upcast=False)
    for b, filled in enumerate(fills):
        expected_k[b, filled:filled + new_len] = k[b]
        expected_v[b, filled:filled + new_len] = v[b]
    k_ptr = k_cache.data_ptr()
    out, lse = fast_attn.attention_with_kvcache(q, k_cache, v_cache, k, v, seqlens, causal=True, return_lse=True,
                                                backend="cuda")
    assert k_cache.data_ptr() == k_ptr and torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    compare(NAMES[:2], (out, lse), oracle, baseline, f"kvcache d{head_dim}")
    (call,) = stand_in.calls
    assert call["seqlens_k"] == [f + new_len for f in fills]
    assert call["head_dim"] == cuda_attention.padded_head_dim(head_dim)
