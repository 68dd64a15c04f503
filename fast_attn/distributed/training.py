"""Data x context parallel training for ``python -m fast_attn.models.train`` (``--context-parallel
N``, ``--cp-scheme``, ``--fsdp``), kept here so that the training script only calls it.

The W processes form a 2-D ``DeviceMesh`` ``(dp, cp) = (W / N, N)``: ranks with the same
``dp`` coordinate share a batch and split its sequences (``cp``, zigzag layout), ranks
with different ``dp`` coordinates draw different batches. Gradients are averaged over
all W ranks, by DistributedDataParallel on the default group or, with ``--fsdp``, by
FSDP2 (``fully_shard`` per transformer block and at the root) over the mesh flattened to
one dimension, which shards parameters, gradients and optimizer state over all W ranks.

Why averaging over all W ranks is right: rank r's loss is the mean over its
``T / N`` tokens; the ring backward sends every K/V gradient home, so summing the ranks'
parameter gradients gives the gradient of the sum of the N local means, and dividing by
W = N * dp gives the mean over dp of the whole-sequence loss's gradient (equal shards).
The logged loss is the mean of the local means over the cp group: the loss of the whole
sequence, as single-process training computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fast_attn.distributed.layout import shard_positions, shard_sequence
from fast_attn.distributed.model import SCHEMES, disable_context_parallel, enable_context_parallel

__all__ = ["Parallel"]

LAYOUT = "zigzag"  # balanced causal work; the sequence length must be a multiple of 2N


@dataclass
class Parallel:
    """The data x context parallel setup of one training process."""

    mesh: object  # torch.distributed.device_mesh.DeviceMesh, dims ("dp", "cp")
    dp_rank: int
    cp_size: int
    cp_group: Optional[dist.ProcessGroup]
    scheme: str
    fsdp: bool

    @staticmethod
    def setup(world: int, context_parallel: int, device: torch.device, scheme: str, fsdp: bool) -> "Parallel":
        from torch.distributed.device_mesh import init_device_mesh

        if scheme not in SCHEMES:
            raise ValueError(f"--cp-scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
        if context_parallel < 1 or world % context_parallel != 0:
            raise ValueError(f"--context-parallel {context_parallel} must divide the number of processes ({world})")
        if (context_parallel > 1 or fsdp) and not dist.is_initialized():
            raise RuntimeError("--context-parallel and --fsdp need torchrun (no process group is initialised)")
        mesh = init_device_mesh(device.type, (world // context_parallel, context_parallel), mesh_dim_names=("dp", "cp"))
        return Parallel(mesh, mesh.get_local_rank("dp"), context_parallel, mesh["cp"].get_group(), scheme, fsdp)

    def prepare(self, model: nn.Module, task_name: str) -> nn.Module:
        """Routes attention through the scheme and, with FSDP, shards the model in place
        (call before building the optimizer)."""
        if self.cp_size > 1:
            if not hasattr(model, "blocks") or task_name != "chargpt":
                raise ValueError("--context-parallel needs the decoder-only GPT (--task chargpt)")
            enable_context_parallel(model, self.cp_group, self.scheme, LAYOUT)
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            flat = self.mesh["dp", "cp"]._flatten("dp_cp")  # shard over all W ranks
            for block in getattr(model, "blocks", []):
                fully_shard(block, mesh=flat)
            fully_shard(model, mesh=flat)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training loop calls: FSDP modules as they are, else DDP over all ranks."""
        return model if self.fsdp else nn.parallel.DistributedDataParallel(model)

    def loss(self, task, model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        """(this rank's loss to differentiate, the whole-sequence loss to log)."""
        if self.cp_size == 1:
            loss = task.loss(model, batch)
            return loss, loss.detach()
        seqlen = batch["x"].shape[1]
        positions = shard_positions(seqlen, self.cp_group, LAYOUT, device=batch["x"].device)
        local = {name: shard_sequence(t, self.cp_group, LAYOUT) for name, t in batch.items()}
        loss = task.loss(lambda x: model(x, position_ids=positions), local)
        logged = loss.detach().clone()
        dist.all_reduce(logged, group=self.cp_group)
        return loss, logged / self.cp_size

    def for_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, build) -> tuple:
        """(model, optimizer) as single-process training would have them: under FSDP a
        plain model and optimizer holding the full state (a collective: call on every
        rank); otherwise the same objects. Context parallelism is switched off in the copy."""
        if not self.fsdp:
            return model, optimizer
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)  # the full tensors on every rank
        model_state = get_model_state_dict(model, options=full)
        optim_state = get_optimizer_state_dict(model, optimizer, options=full)
        plain = build()
        plain.load_state_dict(model_state)
        # the hyper-parameters come back with the param groups of the loaded state
        plain_optimizer = type(optimizer)(plain.parameters(), lr=optimizer.defaults["lr"])
        set_optimizer_state_dict(plain, plain_optimizer, optim_state, options=full)
        return plain, plain_optimizer

    def finish(self, model: nn.Module) -> nn.Module:
        """The model for evaluation and the caller: context parallelism switched off."""
        if self.cp_size > 1:
            disable_context_parallel(model)
        return model
