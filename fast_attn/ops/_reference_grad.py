"""Backward passes of the torch backend: autograd through the reference, inside a custom op.

A custom op's implementation runs below the autograd dispatch key (the dispatcher
excludes it so the op is opaque to autograd), so ``torch.enable_grad()`` alone records
nothing there. ``reference_vjp`` lifts that exclusion for the duration of one
vector-Jacobian product and restores it afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

_AUTOGRAD_KEY = torch._C.DispatchKey.AutogradFunctionality


@contextlib.contextmanager
def _autograd_dispatch() -> Iterator[None]:
    was_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(_AUTOGRAD_KEY)
    torch._C._dispatch_tls_set_dispatch_key_excluded(_AUTOGRAD_KEY, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(_AUTOGRAD_KEY, was_excluded)


def reference_vjp(
    fn: Callable[..., object],
    inputs: Sequence[Optional[Tensor]],
    grad_outputs: Sequence[Optional[Tensor]],
    differentiable: Optional[Sequence[bool]] = None,
) -> tuple:
    """Gradients of ``fn(*inputs)`` w.r.t. its tensor inputs, given the output gradients.

    ``fn`` returns a tensor or a tuple of tensors; None gradients are skipped. Inputs that
    are None or marked non-differentiable get None back.
    """
    if differentiable is None:
        differentiable = [True] * len(inputs)
    with _autograd_dispatch():
        leaves = [
            t.detach().requires_grad_() if t is not None and wants else t
            for t, wants in zip(inputs, differentiable)
        ]
        outputs = fn(*leaves)
        if isinstance(outputs, Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [t for t, wants in zip(leaves, differentiable) if t is not None and wants]
        if pairs and wanted:
            grads = torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
        else:
            grads = [None] * len(wanted)
    grads = iter(grads)
    result = []
    for t, wants in zip(leaves, differentiable):
        if t is None or not wants:
            result.append(None)
            continue
        grad = next(grads)
        result.append(torch.zeros_like(t) if grad is None else grad)
    return tuple(result)
