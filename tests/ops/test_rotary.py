"""``fast_attn.rotary`` on every backend against the reference, and the op's contracts.

The cases come from ``fast_attn.testing_cases.rotary_specs`` (shared with ``python -m
fast_attn.verify``): odd S and H, head dims 2, 30, 40, 72 (not powers of two), partial
rotary, GPT-NeoX and GPT-J pairing, int and int32/int64 per-batch offsets, transposed
(non-contiguous) x, tables in fp32 or x's dtype, an empty batch. Each runs through the
public function with ``backend=`` each of "torch", "triton", "cuda" (cuda declares no
rotary: skipped), forward and backward, compared with the DESIGN.md tolerance rule,
inputs unchanged, every fresh allocation NaN-filled. On CPU the triton backend runs under
the Triton interpreter, fp16/fp32 only.

Also: the pairings on a hand-worked example, pass-through features bit for bit, the
offset forms agreeing, gradcheck in fp64, every bad input's error naming its argument,
auto never choosing cuda, ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import pytest
import torch

import fast_attn
from fast_attn import backends
from fast_attn import testing_cases as tc

ON_GPU = torch.cuda.is_available()
SPECS = tc.rotary_specs(ON_GPU)
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_BACKENDS = ("torch", "triton")


def tables(seqlen_ro, rotary_dim, dtype=torch.float32, device=DEVICE):
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(seqlen_ro, dtype=torch.float64), inv_freq)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def skip_unless_available(backend):
    reason = backends.why_not(backend, backends.Call("rotary", DEVICE, torch.float32))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", tc.BACKEND_NAMES)
@pytest.mark.parametrize("case", tc.pytest_params(SPECS))
def test_matches_reference(case, backend):
    tc.assert_matches_reference(case, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_pairings_on_a_worked_example(backend):
    """A quarter turn: NeoX pairs (0, 2), (1, 3); GPT-J pairs (0, 1), (2, 3)."""
    skip_unless_available(backend)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], device=DEVICE).view(1, 1, 1, 4)
    cos, sin = torch.zeros(1, 2, device=DEVICE), torch.ones(1, 2, device=DEVICE)
    neox = fast_attn.rotary(x, cos, sin, backend=backend)
    gptj = fast_attn.rotary(x, cos, sin, interleaved=True, backend=backend)
    assert neox.flatten().tolist() == [-3.0, -4.0, 1.0, 2.0]
    assert gptj.flatten().tolist() == [-2.0, 1.0, -4.0, 3.0]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_passes_the_rest_through(backend, interleaved):
    skip_unless_available(backend)
    x = torch.randn(2, 5, 3, 22, device=DEVICE, dtype=torch.float16)
    cos, sin = tables(8, 10)
    out = fast_attn.rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=3, backend=backend)
    assert torch.equal(out[..., 10:], x[..., 10:])
    assert not torch.equal(out[:, 1:, :, :10], x[:, 1:, :, :10])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_offset_forms_agree(backend):
    """An int offset, the same offset per batch in int32 and int64, and the shifted tables."""
    skip_unless_available(backend)
    x = torch.randn(3, 7, 2, 16, device=DEVICE)
    cos, sin = tables(12, 16)
    by_int = fast_attn.rotary(x, cos, sin, seqlen_offsets=4, backend=backend)
    for dtype in (torch.int32, torch.int64):
        offsets = torch.full((3,), 4, dtype=dtype, device=DEVICE)
        assert torch.equal(fast_attn.rotary(x, cos, sin, seqlen_offsets=offsets, backend=backend), by_int)
    assert torch.equal(fast_attn.rotary(x, cos[4:], sin[4:], backend=backend), by_int)
    mixed = fast_attn.rotary(x, cos, sin, seqlen_offsets=torch.tensor([0, 4, 5], device=DEVICE), backend=backend)
    assert torch.equal(mixed[1], by_int[1])
    assert torch.equal(mixed[0], fast_attn.rotary(x[:1], cos, sin, backend=backend)[0])


def test_torch_and_triton_agree_bitwise_in_fp32():
    skip_unless_available("triton")
    x = torch.randn(2, 9, 5, 24, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    cos, sin = tables(9, 20)
    for interleaved in (False, True):
        outs = [fast_attn.rotary(x, cos, sin, interleaved=interleaved, backend=b) for b in KERNEL_BACKENDS]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


def test_gradcheck_fp64():
    x = torch.randn(2, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(5, 4, torch.float64, "cpu")
    offsets = torch.tensor([0, 2])
    for interleaved in (False, True):
        assert torch.autograd.gradcheck(
            lambda t: fast_attn.rotary(t, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, backend="torch"),
            (x,),
        )


def test_no_gradient_for_the_tables():
    x = torch.randn(1, 3, 2, 8, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in tables(3, 8, device="cpu"))
    fast_attn.rotary(x, cos, sin, backend="torch").sum().backward()
    assert x.grad is not None and cos.grad is None and sin.grad is None


def _bad_inputs():
    x = torch.randn(2, 4, 3, 8)
    cos, sin = tables(6, 8, device="cpu")
    return [
        ("x 3-D", dict(x=x[0]), ValueError, "x must be 4-dimensional"),
        ("x int", dict(x=x.long()), TypeError, "x must have dtype"),
        ("cos 1-D", dict(cos=cos[0]), ValueError, "cos must be 2-dimensional"),
        ("sin shape", dict(sin=sin[:, :3]), ValueError, "sin must have cos's shape"),
        ("rotary_dim > D", dict(cos=tables(6, 10, device="cpu")[0], sin=tables(6, 10, device="cpu")[1]),
         ValueError, "rotary_dim <= D"),
        ("offset too large", dict(seqlen_offsets=3), ValueError, "seqlen_offsets + S must lie in [0, 6]"),
        ("offset negative", dict(seqlen_offsets=-1), ValueError, "seqlen_offsets + S"),
        ("offsets float", dict(seqlen_offsets=torch.zeros(2)), TypeError, "seqlen_offsets must be an int"),
        ("offsets shape", dict(seqlen_offsets=torch.zeros(3, dtype=torch.int32)), ValueError,
         "seqlen_offsets must have shape (2,)"),
        ("offsets bool", dict(seqlen_offsets=True), TypeError, "seqlen_offsets must be an int"),
        ("offsets tensor range", dict(seqlen_offsets=torch.tensor([0, 3])), ValueError,
         "got seqlen_offsets in [0, 3] with S = 4"),
        ("interleaved", dict(interleaved=1), TypeError, "interleaved must be a bool"),
        ("backend", dict(backend="tpu"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("name, changes, error, message", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_names_the_argument(name, changes, error, message):
    x = torch.randn(2, 4, 3, 8)
    cos, sin = tables(6, 8, device="cpu")
    args = dict(x=x, cos=cos, sin=sin, interleaved=False, seqlen_offsets=0, backend="torch")
    args.update(changes)
    with pytest.raises(error, match=None) as info:
        fast_attn.rotary(args.pop("x"), args.pop("cos"), args.pop("sin"), **args)
    assert message in str(info.value)


def test_cuda_declares_no_rotary_so_auto_never_picks_it():
    assert "rotary" in backends.OPS and "rotary" not in backends.CAPABILITIES["cuda"]
    everywhere = {name: backends.BackendStatus(True, "test", frozenset({"cuda", "cpu"})) for name in backends.BACKENDS}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        call = backends.Call("rotary", "cuda", dtype, backends.features(backward=True), arch=(9, 0))
        assert backends.select_backend(call, "auto", everywhere, verified=()) == "triton"
        assert "has no rotary kernel" in backends.why_not("cuda", call, everywhere)
    fp64 = backends.Call("rotary", "cuda", torch.float64)
    assert backends.select_backend(fp64, "auto", everywhere, verified=()) == "torch"
    with pytest.raises(NotImplementedError, match="rotary"):
        fast_attn.rotary(torch.randn(1, 2, 1, 4), *tables(2, 4, device="cpu"), backend="cuda")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    skip_unless_available(backend)
    x = torch.randn(2, 5, 3, 12, device=DEVICE)
    cos, sin = tables(9, 8)
    op = torch.ops.fast_attn.rotary.default
    torch.library.opcheck(op, (x, cos, sin, None, 2, False, False, backend))
    offsets = torch.tensor([1, 4], device=DEVICE)
    torch.library.opcheck(op, (x.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, offsets, 0, True, False,
                               backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph(backend):
    skip_unless_available(backend)

    def fn(x, cos, sin, offsets):
        q = fast_attn.rotary(x, cos, sin, seqlen_offsets=offsets, backend=backend)
        k = fast_attn.rotary(x * 2, cos, sin, interleaved=True, seqlen_offsets=3, backend=backend)
        return q * k

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 3, 12, device=DEVICE)
    cos, sin = tables(9, 10)
    offsets = torch.tensor([1, 4], device=DEVICE)
    leaves = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    got, want = compiled(leaves[0], cos, sin, offsets), fn(leaves[1], cos, sin, offsets)
    torch.testing.assert_close(got, want)
    dy = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, leaves[0], dy)[0], torch.autograd.grad(want, leaves[1], dy)[0])
