"""Hugging Face ``transformers`` integration: ``attn_implementation="fast_attn"``.

    from fast_attn.integrations import huggingface
    huggingface.register()                          # once per process; idempotent
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fast_attn")
    model.set_attn_implementation("fast_attn")      # or switch a model already built

``register()`` adds two entries named ``"fast_attn"`` to transformers' registries (needs
the ``hf`` extra, ``pip install 'fast_attn[hf]'``: transformers >= 4.56; tested with 4.56.2,
4.57.6, 5.18.0 and 5.24.0). Every model whose attention goes through transformers'
``AttentionInterface`` can then use it (in transformers 5 nearly all; in 4.x some, such
as BERT, still pick a class per implementation and ignore registered ones; and in some
releases ``set_attn_implementation`` misses sub-configs, e.g. T5's in 5.18, where passing
``attn_implementation`` to ``from_config``/``from_pretrained`` works). The backend
is chosen per call as for ``fast_attn.attention`` (``fast_attn.use_backend``,
``FAST_ATTN_BACKEND``):

- ``AttentionInterface``: ``attention_forward``, transformers' attention-function
  convention: ``(module, query, key, value, attention_mask, scaling, dropout,
  sliding_window, softcap, **kwargs) -> (attn_output, None)`` with query/key/value
  ``(B, H, S, D)`` and ``attn_output`` ``(B, Sq, H, D)``. It calls ``fast_attn.attention``
  on transposed views (no copies), K/V with fewer heads as they are (no ``repeat_kv``).
- ``AttentionMaskInterface``: ``create_mask``, which builds the 4-D bool mask transformers'
  "sdpa" implementation builds (``(B, 1, Sq, Sk)``, True = may attend, or None where
  ``is_causal`` or nothing at all says it) and records, on the mask tensor, the structure
  it has when that is one the kernels take without reading a dense mask.

How masks reach the kernel (``attention_forward``):

- No mask: causal when ``module.is_causal`` (or an ``is_causal`` keyword) says so and
  ``Sq > 1``, with torch SDPA's top-left alignment, as transformers' "sdpa" path has it
  (``Sk > Sq`` only happens when prefilling a static cache: the keys past ``Sq`` are cut
  off, as "sdpa" does). A ``sliding_window`` then keeps the last ``sliding_window`` keys
  (transformers builds a mask whenever the window removes a key, so this is a safeguard).
- Fast path: a mask from ``create_mask`` whose structure is recorded. ``create_mask``
  compares the dense mask (once per forward, not per layer) with
  ``structure & padding``, where ``padding = mask.any(dim=-2)`` is the ``(B, 1, 1, Sk)``
  key-padding vector and the structure is one of: everything; causal (bottom-right);
  causal with a left window of ``local_size - 1`` (transformers' sliding window);
  a symmetric window of ``local_size`` (bidirectional sliding window). The first that
  matches exactly is used: the kernel gets ``causal``/``window_size`` and only the small
  padding mask (none if no key is padded). This covers padding in encoders (BERT, ViT,
  Whisper's cross-attention), causal decoders with left or right padding, decoding with a
  dynamic cache, and sliding-window layers (Mistral, Gemma 2).
- Slower path (correct, reads the dense mask): any other mask passes as ``attn_mask``
  unchanged: bool masks whose pattern is none of the above (packed sequences found from
  ``position_ids``, chunked attention, image-token overlays, decoding into a static
  cache, whose unused slots break the bottom-right alignment), additive
  float masks built by model code (``0`` / ``finfo.min``), masks sliced or built by the
  model itself, and every mask while ``torch.compile`` traces (``create_mask`` then
  records nothing, so it adds no graph break and no device sync).

Other keywords: ``scaling`` is ``softmax_scale`` (None: ``1 / sqrt(D)``); ``softcap``
(Gemma 2) caps the scaled scores before the mask is added, as transformers' eager code
does; ``dropout`` is applied only while ``module.training``; ``position_bias`` (T5, MPT)
is added to the scores as an additive mask; a value head dim unlike the query's is
handled by zero-padding the smaller one.

Limits: ``attn_weights`` is always None (``output_attentions=True`` warns, as "sdpa"
does: use ``attn_implementation="eager"`` for the weights); attention sinks (``s_aux``,
GPT-OSS) raise ``NotImplementedError``. A query row whose keys are all masked (a padded
position in a left-padded causal batch) gives 0 where eager attention averages every
key; outputs at padded positions differ, those at real tokens do not.

``unregister()`` removes both entries. transformers' registries have no public removal
for globally registered names, so it edits their class-level mapping (a private
attribute, ``_global_mapping``), and only if the entry is still this module's.

Importing this module imports neither transformers nor anything heavy.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fast_attn.ops.attention import attention

__all__ = ["IMPLEMENTATION", "attention_forward", "create_mask", "register", "unregister"]

IMPLEMENTATION = "fast_attn"  # the attn_implementation name

_MIN_VERSION = (4, 56)  # AttentionMaskInterface and the current mask-function keywords
_LAYOUT_ATTR = "_fast_attn_layout"  # the attribute create_mask sets on the masks it builds


class _MaskLayout(NamedTuple):
    """What a dense ``(B, 1, Sq, Sk)`` bool mask is, in the kernel's terms."""

    causal: bool
    window: tuple[int, int]
    padding: Optional[Tensor]  # bool (B, 1, 1, Sk), True = real key; None: no key padded
    shape: torch.Size  # the dense mask's shape, checked again where it is used


# ----------------------------------------------------------------- registration


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "fast_attn.integrations.huggingface needs Hugging Face transformers: install the "
            "'hf' extra, pip install 'fast_attn[hf]' (or pip install transformers)"
        ) from error
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if version < _MIN_VERSION:
        raise ImportError(
            f"fast_attn.integrations.huggingface needs transformers >= "
            f"{'.'.join(map(str, _MIN_VERSION))} (its AttentionMaskInterface), found "
            f"{transformers.__version__}: pip install -U 'fast_attn[hf]'"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionInterface, AttentionMaskInterface


def register() -> None:
    """Makes ``attn_implementation="fast_attn"`` available in transformers (idempotent).

    Raises:
        ImportError: transformers is missing or older than 4.56 (the ``hf`` extra).
    """
    attention_interface, mask_interface = _import_transformers()
    attention_interface.register(IMPLEMENTATION, attention_forward)
    mask_interface.register(IMPLEMENTATION, create_mask)


def unregister() -> None:
    """Removes ``"fast_attn"`` from transformers' registries (a no-op if absent).

    Models already built with it keep ``config._attn_implementation == "fast_attn"`` and
    fail at their next forward until ``register()`` is called again or they are switched
    with ``model.set_attn_implementation(...)``.
    """
    attention_interface, mask_interface = _import_transformers()
    entries = ((attention_interface, attention_forward), (mask_interface, create_mask))
    for interface, function in entries:
        mapping = interface._global_mapping  # no public removal exists for global entries
        if mapping.get(IMPLEMENTATION) is function:
            del mapping[IMPLEMENTATION]


# ----------------------------------------------------------------- masks


def _structure(rows: Tensor, seqlen_q: int, seqlen_k: int, causal: bool,
               window: tuple[int, int]) -> Tensor:
    """The bool ``(len(rows), Sk)`` pattern ``fast_attn.attention`` keeps for these query rows."""
    diagonal = (rows + (seqlen_k - seqlen_q)).view(-1, 1)  # bottom-right aligned
    cols = torch.arange(seqlen_k, device=rows.device).view(1, seqlen_k)
    keep = torch.ones(rows.numel(), seqlen_k, dtype=torch.bool, device=rows.device)
    if causal:
        keep &= cols <= diagonal
    left, right = window
    if left >= 0:
        keep &= cols >= diagonal - left
    if right >= 0:
        keep &= cols <= diagonal + right
    return keep


def _describe(mask: Tensor, local_size: Optional[int]) -> Optional[_MaskLayout]:
    """The first (causal, window) structure with ``mask == structure & padding``, or None.

    Each candidate is first tried on three query rows (cheap); only one that fits them is
    compared in full, so a mask costs about one extra pass over it (and a few syncs), once
    per forward: the mask is built once and shared by the layers.
    """
    seqlen_q, seqlen_k = mask.shape[-2:]
    # A key that no query may see is padding or lies outside every window; either way
    # ``structure & padding`` is unchanged, so this padding vector is exact for a match.
    padding = mask.any(dim=-2, keepdim=True)  # (B, 1, 1, Sk)
    all_rows = torch.arange(seqlen_q, device=mask.device)
    probe = torch.tensor(sorted({0, seqlen_q // 2, seqlen_q - 1}), device=mask.device)
    probe_rows = mask.index_select(-2, probe)
    candidates = [(False, (-1, -1)), (True, (-1, -1))]
    if local_size is not None and local_size > 0:  # transformers' causal / bidirectional windows
        candidates += [(True, (local_size - 1, 0)), (False, (local_size, local_size))]
    for causal, window in candidates:
        expected = _structure(probe, seqlen_q, seqlen_k, causal, window) & padding
        if not torch.equal(expected.expand(probe_rows.shape), probe_rows):
            continue
        expected = _structure(all_rows, seqlen_q, seqlen_k, causal, window) & padding
        if torch.equal(expected.expand(mask.shape), mask):
            return _MaskLayout(causal, window, None if bool(padding.all()) else padding, mask.shape)
    return None


def create_mask(*args, **kwargs):
    """transformers' mask function for ``"fast_attn"``: "sdpa"'s bool mask, annotated.

    Takes the arguments of ``transformers.masking_utils.sdpa_mask`` (whatever the installed
    version's are) and returns what it returns: None, or a bool ``(B, 1, Sq, Sk)`` mask
    (True = may attend). Outside ``torch.compile`` the mask also carries its structure
    (see the module docstring), which ``attention_forward`` uses to skip reading it.
    """
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if (
        isinstance(mask, Tensor)
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and not torch.compiler.is_compiling()
    ):
        setattr(mask, _LAYOUT_ATTR, _describe(mask, kwargs.get("local_size")))
    return mask


# ----------------------------------------------------------------- attention


def _broadcast_batch(query: Tensor, key: Tensor, value: Tensor):
    """SDPA broadcasts a batch of 1 (e.g. learned queries); the kernel wants equal batches."""
    batch = max(query.shape[0], key.shape[0], value.shape[0])
    return tuple(x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 else x
                 for x in (query, key, value))


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention function for ``attn_implementation="fast_attn"``.

    Args:
        module: the calling attention module (``is_causal``, ``training`` are read).
        query: ``(B, H, Sq, D)``; key, value: ``(B, Hkv, Sk, D)`` / ``(B, Hkv, Sk, Dv)``,
            ``H % Hkv == 0``.
        attention_mask: None, a bool ``(B, 1|H, Sq, Sk)`` mask (True = may attend), or an
            additive float mask of that shape.
        scaling: the softmax scale; None: ``1 / sqrt(D)``.
        dropout: attention dropout probability, applied only while ``module.training``.
        sliding_window: the layer's window (keys ``j > i - sliding_window``); only read
            when there is no mask (a mask already holds the window).
        softcap: ``softcap * tanh(s / softcap)`` on the scaled scores; None or 0: off.
        **kwargs: ``is_causal`` overrides ``module.is_causal``; ``position_bias`` is an
            additive ``(B|1, H|1, Sq, Sk)`` bias; ``output_attentions`` warns; ``s_aux``
            raises; the rest (``position_ids``, cache and flash-attention keywords) is
            ignored.

    Returns:
        ``(attn_output, None)`` with ``attn_output`` ``(B, Sq, H, Dv)`` in query's dtype.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "attn_implementation='fast_attn' does not support attention sinks (s_aux); use 'eager'"
        )
    if kwargs.get("output_attentions", False):
        warnings.warn(
            "attn_implementation='fast_attn' returns no attention weights; use "
            "attn_implementation='eager' for output_attentions=True",
            stacklevel=2,
        )
    if attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError(
            f"attn_implementation='fast_attn' expects a 4-D attention_mask (B, 1, Sq, Sk), got "
            f"shape {tuple(attention_mask.shape)}; 2-D padding masks are built into 4-D masks by "
            f"transformers' mask functions once fast_attn.integrations.huggingface.register() ran"
        )
    query, key, value = _broadcast_batch(query, key, value)
    seqlen_q, head_dim, value_dim = query.shape[2], query.shape[3], value.shape[3]
    position_bias = kwargs.get("position_bias")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)

    causal, window, mask = False, (-1, -1), attention_mask
    layout = None
    if isinstance(attention_mask, Tensor) and not torch.compiler.is_compiling():
        layout = getattr(attention_mask, _LAYOUT_ATTR, None)
        if layout is not None and layout.shape != attention_mask.shape:
            layout = None
    if layout is not None:  # fast path: causal/window flags plus a (B, 1, 1, Sk) padding mask
        causal, window, mask = layout.causal, layout.window, layout.padding
    elif attention_mask is None and is_causal and seqlen_q > 1:
        # SDPA's is_causal is top-left aligned: query i keeps keys j <= i.
        seqlen_k = key.shape[2]
        if seqlen_k > seqlen_q:  # keys past Sq are never seen (static-cache prefill)
            key, value = key[:, :, :seqlen_q], value[:, :, :seqlen_q]
            if position_bias is not None:
                position_bias = position_bias[..., :seqlen_q]
            seqlen_k = seqlen_q
        if seqlen_k == seqlen_q:
            causal = True
            right = 0
        else:  # Sk < Sq: bottom-right causal would hide keys; open the right edge instead
            right = seqlen_q - seqlen_k
            window = (-1, right)
        if sliding_window is not None and sliding_window > 0:
            window = (sliding_window - 1, right)

    if position_bias is not None:  # one additive mask: bias, plus the mask where given
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, position_bias, torch.finfo(position_bias.dtype).min)
        else:
            mask = position_bias + mask

    if value_dim != head_dim:  # the kernels take one head dim: zero-pad the smaller one
        width = max(head_dim, value_dim)
        if scaling is None:
            scaling = head_dim ** -0.5
        query = torch.nn.functional.pad(query, (0, width - head_dim))
        key = torch.nn.functional.pad(key, (0, width - head_dim))
        value = torch.nn.functional.pad(value, (0, width - value_dim))

    out = attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),  # (B, S, H, D) views
        causal=causal,
        softmax_scale=None if scaling is None else float(scaling),
        window_size=window,
        softcap=float(softcap) if softcap else 0.0,
        attn_mask=mask,
        dropout_p=float(dropout) if getattr(module, "training", False) else 0.0,
    )  # (B, Sq, H, D)
    if value_dim != out.shape[-1]:
        out = out[..., :value_dim]
    return out, None
