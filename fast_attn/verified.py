"""The record of kernel families that have passed the GPU test suite: what ``auto`` trusts.

``backend="auto"`` picks a gated backend's kernel (see ``fast_attn.backends.UNGATED`` for
the backends that are not gated, and why) only where this record holds a row for
(backend, op, compute capability) naming the committed results file that shows the
pass. A family without a row still runs when asked for by name (``backend="cuda"``,
``use_backend("cuda")``); ``fast_attn.available_backends()`` says which are gated.

A GPU session adds a row once ``scripts/gpu_session.sh`` has passed the family's tests
on that architecture and its results are committed under ``benchmarks/results/``; a
family that fails stays out (or its row is removed) with the reason in that results
directory's summary.

No CUDA kernel of fast_attn has run on a GPU yet, so the record is empty.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional


class Verified(NamedTuple):
    """One kernel family that passed the GPU test suite on one architecture."""

    backend: str  # "cuda"
    op: str  # a fast_attn.backends.OPS name, e.g. "attention", "rms_norm"
    arch: tuple  # compute capability, e.g. (9, 0)
    evidence: str  # the committed results file that shows the pass


VERIFIED: tuple = ()


def is_verified(backend: str, op: str, arch: tuple, record: Optional[Iterable[Verified]] = None) -> bool:
    """Whether ``record`` (default ``VERIFIED``) holds a row for (backend, op, arch)."""
    rows = VERIFIED if record is None else record
    return any(row.backend == backend and row.op == op and tuple(row.arch) == tuple(arch) for row in rows)


def unverified_ops(backend: str, arch: tuple, ops: Iterable[str]) -> list:
    """The ops of ``ops`` that have no row for ``backend`` on ``arch``."""
    return [op for op in ops if not is_verified(backend, op, arch)]
