"""The counter-hash dropout keep mask, for backends that generate it piece by piece.

What: ``dropout_key(seed)``, ``dropout_threshold(p)``, ``hash_counters(key, idx)`` and
``keep_mask(...)``, which builds any rectangular block ``[batches, heads, rows, cols]`` of
the keep mask. The one definition of the mask, used by the reference
(``fast_attn.reference.attention.dropout_keep_mask``), the torch backend and the Triton
launchers (which pass the key and threshold to their kernels); a backend that works on
chunks of query rows (or on one varlen sequence inside the padded coordinates) asks for
exactly the block it needs instead of the whole ``(B, H, Sq, Sk)`` mask. The tests check
it against a plain-Python transcription of the formula below.

Definition, uint32 arithmetic with wrap-around::

    fmix32(x): x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    key  = fmix32(fmix32(0x9E3779B9 ^ seed_lo) ^ seed_hi)
    idx  = ((b * heads + h) * seqlen_q + i) * seqlen_k + j          (64-bit counter)
    hash = fmix32(fmix32(fmix32(key ^ idx_lo) ^ idx_hi) ^ key)
    keep = hash >= floor(p * 2**32 + 0.5)

Limits: uint32 values are held in int64 tensors (torch has no uint32 arithmetic on every
device), so one block costs about ten int64 temporaries of its size; callers keep blocks
small (the torch backend asks for one chunk of query rows at a time).
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

__all__ = ["dropout_key", "dropout_threshold", "hash_counters", "keep_mask"]

UINT32_MASK = 0xFFFFFFFF
HASH_INIT = 0x9E3779B9  # 2**32 / golden ratio: seed 0 does not start the chain at 0
FMIX_MUL1 = 0x85EBCA6B  # MurmurHash3 fmix32 multipliers
FMIX_MUL2 = 0xC2B2AE35
HALF_BITS = 16
HALF_MASK = 0xFFFF
TWO_POW_32 = 4294967296.0
MAX_SEED = 2**63

IntOrTensor = Union[int, Tensor]


def _mul32(x: IntOrTensor, c: int) -> IntOrTensor:
    """``(x * c) mod 2**32`` for uint32 ``x`` held in int64 without int64 overflow.

    The product of two uint32 values needs 64 unsigned bits; splitting ``c`` into 16-bit
    halves keeps every partial product below 2**48.
    """
    low = x * (c & HALF_MASK)
    high = (x * (c >> HALF_BITS)) & HALF_MASK  # only these bits survive << 16 mod 2**32
    return (low + (high << HALF_BITS)) & UINT32_MASK


def _fmix32(x: IntOrTensor) -> IntOrTensor:
    """MurmurHash3's 32-bit finalizer (a bijection on uint32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_MUL1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_MUL2)
    return x ^ (x >> 16)


def dropout_key(seed: int) -> int:
    """The 64-bit seed folded into the uint32 key of one call (a Python int)."""
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"dropout seed must be an int in [0, 2**63), got {seed}")
    return _fmix32(_fmix32(HASH_INIT ^ (seed & UINT32_MASK)) ^ (seed >> 32))


def dropout_threshold(dropout_p: float) -> int:
    """``floor(dropout_p * 2**32 + 0.5)`` in fp64: keep where ``hash >= threshold``.

    2**32 (p within 2**-33 of 1) keeps nothing; int64 comparison handles it as is.
    """
    return math.floor(dropout_p * TWO_POW_32 + 0.5)


def _indices(s: slice, n: int, device) -> Tensor:
    start, stop, step = s.indices(n)
    return torch.arange(start, stop, step, dtype=torch.int64, device=device)


def keep_mask(
    seed: int,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    device=None,
    rows: slice = slice(None),
    cols: slice = slice(None),
    batches: slice = slice(None),
) -> Tensor:
    """Block ``[batches, :, rows, cols]`` of the bool ``(batch, heads, seqlen_q, seqlen_k)``
    keep mask (True = kept) of ``seed`` and ``dropout_p``.

    ``batch, heads, seqlen_q, seqlen_k`` are the full (for varlen: padded) extents that fix
    the counters; the slices pick the block. With the default slices this equals
    ``dropout_keep_mask(seed, batch, heads, seqlen_q, seqlen_k, dropout_p, device)``.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    b = _indices(batches, batch, device).view(-1, 1, 1, 1)
    h = torch.arange(heads, dtype=torch.int64, device=device).view(1, -1, 1, 1)
    i = _indices(rows, seqlen_q, device).view(1, 1, -1, 1)
    j = _indices(cols, seqlen_k, device).view(1, 1, 1, -1)
    shape = (b.shape[0], heads, i.shape[2], j.shape[3])
    if dropout_p == 0.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    idx = ((b * heads + h) * seqlen_q + i) * seqlen_k + j  # broadcasts to `shape`
    return hash_counters(dropout_key(seed), idx) >= dropout_threshold(dropout_p)


def hash_counters(key: int, idx: Tensor) -> Tensor:
    """The uint32 hash (held in int64) of 64-bit counters ``idx`` under ``key``; the last
    round re-injects the key so masks of two seeds are not index permutations of each other."""
    return _fmix32(_fmix32(_fmix32(key ^ (idx & UINT32_MASK)) ^ (idx >> 32)) ^ key)
