"""Point-to-point ring transfers and the all-to-all of the Ulysses scheme.

``ring_shift`` starts sending tensors to the next rank and receiving the previous rank's
into new buffers (one ``batch_isend_irecv``) and returns at once, so the caller computes
while the transfer is in flight and calls ``wait()`` when it needs the data. Transfers
of different kinds in flight at the same time (K/V blocks and dK/dV accumulators in the
backward) use different tags, so a receive never takes a message of the other kind even
when their sizes agree.

``time_waits()`` accumulates the seconds spent blocked in ``wait()`` (the communication
that compute did not hide) for the benchmark. On CUDA, ``wait()`` only orders streams,
so these seconds mean something on CPU/gloo only.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fast_attn.distributed._group import ProcessGroupInfo

KV_TAG = 0  # K/V blocks
GRAD_TAG = 1  # dK/dV accumulators travelling home

_wait_seconds: Optional[list] = None  # [seconds] while time_waits() is active


@contextlib.contextmanager
def time_waits() -> Iterator[list]:
    """``with time_waits() as t: ...``: ``t[0]`` is the seconds spent waiting on transfers."""
    global _wait_seconds
    previous, _wait_seconds = _wait_seconds, [0.0]
    try:
        yield _wait_seconds
    finally:
        _wait_seconds = previous


class Transfer:
    """Tensors on their way here; ``wait()`` returns them once they have arrived."""

    def __init__(self, works: list, received: list[Tensor], sent: Sequence[Tensor] = ()) -> None:
        self._works, self._received = works, received
        self._sent = list(sent)  # kept alive until the sends complete

    def wait(self) -> list[Tensor]:
        start = time.perf_counter() if _wait_seconds is not None else 0.0
        for work in self._works:
            work.wait()
        if _wait_seconds is not None:
            _wait_seconds[0] += time.perf_counter() - start
        self._works, self._sent = [], []
        return self._received


def ring_shift(info: ProcessGroupInfo, tensors: Sequence[Tensor], tag: int,
               recv_shapes: Optional[Sequence[torch.Size]] = None) -> Transfer:
    """Sends ``tensors`` to the next rank and receives the previous rank's (shapes
    ``recv_shapes``, default the same as sent). With one rank the tensors come straight back."""
    if info.world == 1:
        return Transfer([], list(tensors))
    sent = [t.contiguous() for t in tensors]
    shapes = recv_shapes if recv_shapes is not None else [t.shape for t in sent]
    received = [torch.empty(shape, dtype=t.dtype, device=t.device) for shape, t in zip(shapes, sent)]
    ops = [dist.P2POp(dist.isend, t, info.next_rank, info.group, tag) for t in sent]
    ops += [dist.P2POp(dist.irecv, t, info.prev_rank, info.group, tag) for t in received]
    return Transfer(dist.batch_isend_irecv(ops), received, sent)


def all_to_all(info: ProcessGroupInfo, send: Tensor) -> Tensor:
    """``send (W, ...)``: slice j goes to rank j; returns ``(W, ...)`` with slice j from rank j."""
    if info.world == 1:
        return send
    send = send.contiguous()
    received = torch.empty_like(send)
    start = time.perf_counter() if _wait_seconds is not None else 0.0
    dist.all_to_all_single(received, send, group=info.group)
    if _wait_seconds is not None:
        _wait_seconds[0] += time.perf_counter() - start
    return received
