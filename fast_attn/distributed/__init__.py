"""Context parallelism: attention over one sequence split across ranks (torch.distributed).

Nothing here is imported by ``import fast_attn``; use ``import fast_attn.distributed``.

    q, k, v = (shard_sequence(t, group, "zigzag") for t in (q, k, v))   # (B, S / W, H, D)
    out = ring_attention(q, k, v, group=group, causal=True)              # this rank's rows
    out = ulysses_attention(q, k, v, group=group, causal=True)           # all-to-all scheme
    full = unshard_sequence(out, group, "zigzag")                        # (B, S, H, D)

- ``ring_attention``: K/V blocks travel around the ring (point-to-point), partial outputs
  merged by log-sum-exp in fp32; a backward ring brings fp32 dK/dV home.
- ``ring_attention_varlen``: the same for packed batches (``cu_seqlens``).
- ``ulysses_attention``: DeepSpeed-Ulysses: all-to-all from a sequence split to a head
  split, attention on the whole sequence for H / W heads, all-to-all back.
- ``shard_sequence`` / ``unshard_sequence`` / ``shard_positions``: the layouts
  ("contiguous", "zigzag") in ``fast_attn.distributed.layout``.

gloo on CPU, nccl on CUDA (whatever the process group uses). See docs/context_parallel.md.
"""

from fast_attn.distributed.layout import LAYOUTS, shard_positions, shard_sequence, unshard_sequence
from fast_attn.distributed.ring import ring_attention
from fast_attn.distributed.ring_varlen import ring_attention_varlen
from fast_attn.distributed.ulysses import ulysses_attention

__all__ = [
    "LAYOUTS",
    "ring_attention",
    "ring_attention_varlen",
    "shard_positions",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
]
