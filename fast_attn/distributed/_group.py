"""The process group a context-parallel call runs on, and the checks that need it.

``ProcessGroupInfo.of(group, q)`` resolves ``group`` (None = the default group), refuses
an uninitialised ``torch.distributed`` and a tensor on a device the group's backend cannot
move (nccl needs CUDA tensors), and knows this rank's neighbours on the ring as global
ranks (what ``torch.distributed.P2POp`` takes).

``check_same_on_all_ranks`` is the one cheap cross-rank check of a call: a single
``all_reduce(MAX)`` of a few ints and their negations (which gives the minimum too),
so shards of different shapes on different ranks fail with a clear error on every rank
instead of a hang or a garbled receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ProcessGroupInfo:
    group: Optional[dist.ProcessGroup]
    rank: int  # this process's rank in the group
    world: int  # the group's size
    next_rank: int  # global rank of (rank + 1) % world: where K/V blocks go
    prev_rank: int  # global rank of (rank - 1) % world: where they come from
    backend: str  # "gloo", "nccl", ...

    @staticmethod
    def of(group: Optional[dist.ProcessGroup], q: Tensor, *, caller: str) -> "ProcessGroupInfo":
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{caller} needs an initialised torch.distributed process group: call "
                f"torch.distributed.init_process_group (gloo on CPU, nccl on CUDA) first, "
                f"or run under torchrun; group=None means the default group"
            )
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of it")
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend and q.device.type != "cuda":
            raise ValueError(f"q is on {q.device}, but the process group's backend is nccl, which moves CUDA "
                             f"tensors only (use a gloo group for CPU tensors)")
        return ProcessGroupInfo(group, rank, world, global_rank(group, (rank + 1) % world),
                                global_rank(group, (rank - 1) % world), backend)

    @property
    def comm_device(self) -> torch.device:
        """Where small control tensors live for this group's collectives."""
        if "nccl" in self.backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def global_rank(group: Optional[dist.ProcessGroup], group_rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def check_same_on_all_ranks(info: ProcessGroupInfo, values: Sequence[int], names: Sequence[str],
                            *, caller: str) -> None:
    """Raises ValueError (on every rank) unless ``values`` are equal on every rank."""
    if info.world == 1:
        return
    local = torch.tensor(list(values), dtype=torch.int64)
    both = torch.cat([local, -local]).to(info.comm_device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=info.group)
    both = both.cpu()
    high, low = both[:len(values)], -both[len(values):]
    differ = [f"{name} in [{int(lo)}, {int(hi)}]" for name, lo, hi in zip(names, low, high) if lo != hi]
    if differ:
        mine = ", ".join(f"{n}={v}" for n, v in zip(names, values))
        raise ValueError(
            f"{caller}: every rank must pass shards of the same shape (and the same options); "
            f"across the {info.world} ranks: {', '.join(differ)} (this rank {info.rank}: {mine})"
        )
