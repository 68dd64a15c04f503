"""Eager calls of our custom ops without the dispatcher's Python layers.

A ``torch.library.custom_op`` call in eager mode passes through several Python layers
(the op's ``__call__``, the dispatcher's autograd kernel, its redispatch, the dynamo
guard around the implementation): measured on the CPU CI machine, a one-tensor custom
op with autograd costs ~20 us against ~2 us for the same ``clone()``, and ~40 us with the
norm ops' schema of six arguments and four outputs. That is most of an op's host cost on
a small input, paid on every call.

``EagerOp`` wraps a custom op. When nothing needs the dispatcher (not inside torch.compile
tracing or torch.jit.trace, no torch function or dispatch mode, no functorch transform,
every tensor a plain ``torch.Tensor``) it runs the op's own implementation directly, or, when autograd must
record the call, a ``torch.autograd.Function`` built from the same ``setup_context`` and
``backward`` that the custom op registers. Otherwise (compile, FakeTensor, opcheck,
vmap, a counting TorchDispatchMode, tensor subclasses) it calls the custom op itself, so
every tool sees ``fast_attn::*`` ops. Both paths run the same implementation and the same
backward: they differ only in host cost.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


_DISPATCHER = 2  # _route's answers
_AUTOGRAD = 1
_DIRECT = 0


def _route(args) -> int:
    """_DISPATCHER when a call must go through the dispatcher (compile, modes, transforms,
    subclasses), else _AUTOGRAD when autograd must record it, else _DIRECT."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._get_tracing_state() is not None):  # torch.jit.trace records the op
        return _DISPATCHER
    grad = False
    for a in args:  # one pass, no generator: this runs on every call
        if isinstance(a, Tensor):
            if type(a) is not Tensor:
                return _DISPATCHER
            grad = grad or a.requires_grad
    return _AUTOGRAD if grad and torch.is_grad_enabled() else _DIRECT


class EagerOp:
    """A custom op called through its implementation in plain eager calls (see above)."""

    def __init__(self, op, impl: Callable, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None):
        self.op = op
        self.impl = impl
        self.function = None
        if backward is not None:
            self.function = type(
                f"{impl.__name__}_function",
                (torch.autograd.Function,),
                {
                    "forward": staticmethod(impl),
                    "setup_context": staticmethod(setup_context),
                    "backward": staticmethod(torch.autograd.function.once_differentiable(backward)),
                },
            )

    def __call__(self, *args, **kwargs):
        route = _route(args)
        if kwargs and route != _DISPATCHER:
            route = max(route, _route(tuple(kwargs.values())))
        if route == _DISPATCHER or (route == _AUTOGRAD and self.function is None):
            return self.op(*args, **kwargs)
        if route == _AUTOGRAD:
            return self.function.apply(*args)
        return self.impl(*args, **kwargs)
