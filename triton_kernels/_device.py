"""What the Triton launchers need to know about where they run: the interpreter switch and
the SM count (one copy for every kernel file).

``interpret_enabled()`` is True when ``TRITON_INTERPRET=1``: the kernels then run on CPU
tensors through the Triton interpreter, where launchers pin small fixed tiles and grids.
``sm_count(device)`` is the number of SMs of a CUDA device (cached; no GPU is touched
before a launcher asks).
"""

from __future__ import annotations

import functools
import os

import torch


# Read on every op call (the backend choice depends on it): CPython's underlying bytes
# dict where it exists, since os.environ.get costs ~2 us of key encoding and decoding.
_ENV_DATA = getattr(os.environ, "_data", None)
_INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET") if hasattr(os.environ, "encodekey") else None


def interpret_enabled() -> bool:
    """True when TRITON_INTERPRET=1 (read per call: tests switch it). Importing this
    module imports no triton: fast_attn.backends asks it too."""
    if _ENV_DATA is None or _INTERPRET_KEY is None:
        raw = os.environ.get("TRITON_INTERPRET")
    else:
        raw = _ENV_DATA.get(_INTERPRET_KEY)
    return raw is not None and raw not in ("", "0", b"", b"0")


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of CUDA device ``device`` (its index, or the current device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_of(index)
