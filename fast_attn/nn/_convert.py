"""Helpers shared by the drop-in modules: re-typing a torch.nn module, and hook detection.

``adopt(cls, module)`` builds an instance of ``cls`` (a fast_attn.nn subclass of
``type(module)``) whose state *is* ``module``'s: the same Parameter, buffer and child
objects, the same hooks, training flag and attributes. Nothing is copied but the small
dicts and sets that hold them, so the two modules can be edited independently afterwards
(adding a hook to one does not add it to the other) while sharing every tensor.

``has_hooks(module)`` says whether calling a sub-module's functional equivalent instead of
the module itself would skip a hook someone registered; the fused paths fall back to the
module call when it would.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn
from torch.nn.modules import module as _module

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def adopt(cls: type[ModuleT], module: nn.Module) -> ModuleT:
    """A ``cls`` instance sharing ``module``'s parameters, buffers, children and hooks.

    ``cls`` must subclass ``type(module)`` without adding instance state, so the copied
    ``__dict__`` is a complete, valid state for it.
    """
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    new = cls.__new__(cls)
    for name, value in module.__dict__.items():
        # Containers are copied (shallowly), so the two modules' registries are
        # independent; the tensors and modules inside them are shared.
        if isinstance(value, (dict, set)):
            value = type(value)(value)
        new.__dict__[name] = value
    return new


def has_hooks(module: nn.Module) -> bool:
    """True if ``module`` (or the global module registry) has forward/backward hooks."""
    if any(getattr(module, name, None) for name in _HOOK_DICTS):
        return True
    return any(getattr(_module, name, None) for name in _GLOBAL_HOOK_DICTS)


def plain_forward(module: nn.Module, *classes: type) -> bool:
    """True if ``module``'s forward is one of ``classes``' own and no hook would be skipped:
    its parameters may then be fed to a fused op instead of calling it."""
    forward = type(module).forward
    return any(forward is c.forward for c in classes) and not has_hooks(module)
