"""The eager fast path of the public ops (fast_attn/ops/_eager.py): plain eager calls run
the custom op's implementation without the dispatcher, everything else goes through the
``fast_attn::*`` op, and both give bitwise the same outputs and gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fast_attn


class CountFastAttnOps(TorchDispatchMode):
    """Counts the fast_attn:: ops the dispatcher sees (and passes every op through)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fast_attn":
            self.calls.append(func.name())
        return func(*args, **(kwargs or {}))


CALLS = {
    "attention": lambda t: fast_attn.attention(t[0], t[1], t[2], causal=True),
    "layer_norm": lambda t: fast_attn.layer_norm(t[3], t[4]),
    "rms_norm": lambda t: fast_attn.rms_norm(t[3], t[4], residual=t[3]),
    "bias_gelu": lambda t: fast_attn.bias_gelu(t[3], t[4], approximate="tanh"),
    "swiglu": lambda t: fast_attn.swiglu(t[3], t[5]),
    "geglu": lambda t: fast_attn.geglu(t[3], t[5]),
}


def inputs():
    torch.manual_seed(1)
    return [torch.randn(2, 7, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16),
            torch.randn(5, 16), torch.randn(16), torch.randn(5, 16)]


def run(name, through_dispatcher: bool):
    leaves = [t.requires_grad_() for t in inputs()]
    mode = CountFastAttnOps() if through_dispatcher else None
    if mode is None:
        out = CALLS[name](leaves)
    else:
        with mode:
            out = CALLS[name](leaves)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
    return out, grads, (mode.calls if mode else None)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_eager_path_equals_the_custom_op_bitwise(name):
    out, grads, _ = run(name, through_dispatcher=False)
    out_op, grads_op, calls = run(name, through_dispatcher=True)
    assert calls, "under a dispatch mode the fast_attn op itself must run"
    assert torch.equal(out, out_op)
    for g, g_op in zip(grads, grads_op):
        assert (g is None) == (g_op is None)
        if g is not None:
            assert torch.equal(g, g_op)


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    """No fast_attn:: op reaches the dispatcher in a plain eager call, with or without grad."""
    from fast_attn.ops import attention as attention_ops

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was called on the eager path")

    monkeypatch.setattr(attention_ops._eager_fwd, "op", refuse)
    q, k, v = inputs()[:3]
    fast_attn.attention(q, k, v)
    q.requires_grad_()
    fast_attn.attention(q, k, v).sum().backward()
    assert q.grad is not None


def test_no_grad_runs_the_implementation_without_autograd():
    q, k, v = (t.requires_grad_() for t in inputs()[:3])
    with torch.no_grad():
        out = fast_attn.attention(q, k, v)
    assert not out.requires_grad
