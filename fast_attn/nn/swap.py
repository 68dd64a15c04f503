"""``swap_modules``: put fast_attn.nn layers into an existing model, keeping its weights.

    model = torch.nn.Transformer(d_model=512, nhead=8)
    fast_attn.nn.swap_modules(model)          # in place; returns model
    model(src, tgt)                           # same outputs, fused kernels

Every ``torch.nn.MultiheadAttention``, ``LayerNorm``, ``RMSNorm``,
``TransformerEncoderLayer`` and ``TransformerDecoderLayer`` found in the model is replaced,
in its parent, by the fast_attn.nn subclass of the same class built around the *same*
state (``new.weight is old.weight``): parameters, buffers, children, hooks (forward,
backward, state_dict), attributes and the training flag are carried over without copies,
so device and dtype are unchanged and an optimizer built before the swap keeps training
the model. Replacement modules are still instances of the torch.nn classes, so
``isinstance`` checks in user code keep holding.

Encoder and decoder layers are swapped whole: their attention and LayerNorm children
come along (whatever ``include`` says), their Linear/Dropout children are kept as they are.
A module reachable under several names (shared or tied) is replaced by one new module.

Left alone (they could compute something else):

- subclasses of those classes (a user subclass may override ``forward``): only modules
  whose type is exactly the torch.nn class are swapped;
- modules inside a ``torch.jit.ScriptModule`` (not ordinary Python modules);
- the handles returned by ``register_*_hook`` on an old module still remove the hook
  from the old module only.

If ``model`` itself is one of the swapped classes there is no parent to update: use the
returned module.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from fast_attn.nn.attention import MultiheadAttention
from fast_attn.nn.norm import LayerNorm, RMSNorm
from fast_attn.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = ["swap_modules", "SWAPPABLE"]

# torch.nn class -> its fast_attn.nn replacement.
SWAPPABLE: dict[type, type] = {
    nn.MultiheadAttention: MultiheadAttention,
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
    nn.TransformerDecoderLayer: TransformerDecoderLayer,
}
_BY_NAME = {cls.__name__: cls for cls in SWAPPABLE}


def _resolve_include(include: Optional[Iterable[Union[type, str]]]) -> frozenset:
    """The torch.nn classes to swap: all by default; classes or their names otherwise."""
    if include is None:
        return frozenset(SWAPPABLE)
    if isinstance(include, (str, type)):
        include = [include]
    chosen = set()
    for item in include:
        if isinstance(item, str):
            cls = _BY_NAME.get(item.rsplit(".", 1)[-1])
        elif isinstance(item, type):
            cls = item if item in SWAPPABLE else None
        else:
            cls = None
        if cls is None:
            names = ", ".join(sorted(_BY_NAME))
            raise ValueError(
                f"include entries must be torch.nn classes (or names) among {names}; got {item!r}"
            )
        chosen.add(cls)
    return frozenset(chosen)


def _convert(module: nn.Module, memo: dict) -> nn.Module:
    """The fast_attn replacement of ``module`` (memoised by identity)."""
    new = memo.get(id(module))
    if new is None:
        fast_cls = SWAPPABLE[type(module)]
        if fast_cls in (TransformerEncoderLayer, TransformerDecoderLayer):
            new = fast_cls.from_torch(module, memo)
        else:
            new = fast_cls.from_torch(module)
        memo[id(module)] = new
    return new


def _swap_children(parent: nn.Module, include: frozenset, memo: dict, visited: set) -> None:
    if id(parent) in visited or isinstance(parent, torch.jit.ScriptModule):
        return
    visited.add(id(parent))
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        if type(child) in include:
            child = parent._modules[name] = _convert(child, memo)
        # A converted layer's attention and LayerNorm children are converted already;
        # other swappable modules inside it (an RMSNorm someone put there) are not.
        _swap_children(child, include, memo, visited)


def swap_modules(model: nn.Module, include: Optional[Iterable[Union[type, str]]] = None) -> nn.Module:
    """Replaces torch.nn attention, norm and transformer-layer modules by fast_attn.nn ones, in place.

    Args:
        model: any ``nn.Module``.
        include: the torch.nn classes to swap (or their names, e.g. ``"LayerNorm"``), among
            ``MultiheadAttention, LayerNorm, RMSNorm, TransformerEncoderLayer,
            TransformerDecoderLayer``; None (default) swaps all of them.

    Returns:
        ``model`` (modified in place), or its replacement if ``model`` itself is swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = _resolve_include(include)
    memo: dict = {}
    if type(model) in chosen:
        return _convert(model, memo)
    _swap_children(model, chosen, memo, set())
    return model
