"""Context parallelism: tokens/s, communication and peak memory per rank of ring and
Ulysses attention against single-process attention, by world size and sequence length.

    python -m benchmarks.bench_context_parallel                 # about 1-2 minutes on 2 CPU cores
    python -m benchmarks.bench_context_parallel --sizes 1024,2048,4096 --worlds 2,4 --reps 7
    python -m benchmarks.bench_context_parallel --out DIR       # default: benchmarks/results/
                                                                #   <date>-<cpu|gpu>-context-parallel/

What one measurement is: forward + backward of causal self-attention on one sequence of
``S`` tokens, ``(B, H, D) = (1, 8, 64)`` by default, fp32 on CPU (bf16 on CUDA), split over
``W`` ranks in the zigzag layout (``fast_attn.distributed``); the reference is
``fast_attn.attention`` on the whole sequence in one process. Every configuration runs
``--warmup`` untimed then ``--reps`` timed iterations; an iteration's time is that of the
slowest rank (ranks meet at a barrier before each one); the median and the min/max over
the iterations are reported. Tokens/s = S / time.

Communication, shown apart from compute:
- ``wait_ms``: time the ranks spent blocked waiting for transfers inside the call (the
  communication that computation did not hide), mean over ranks (CPU/gloo only: on CUDA,
  waits only order streams);
- ``comm_only_ms``: the same messages sent with no computation (ring: the K/V hops of the
  forward and backward and the fp32 dK/dV hops; Ulysses: its four all-to-alls per pass).

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` per rank. On CPU there is
no allocator statistic, so the process's peak resident set (``ru_maxrss``) is reported: it
includes the interpreter and torch (~300 MB) and only grows, which is why every rank group
runs its sizes in increasing order in a fresh process.

Processes: one spawned group per (scheme, W), gloo on CPU (nccl and one GPU per rank on
CUDA), ``torch.set_num_threads(--threads)`` per rank. On a machine with fewer cores than
``W * threads`` the ranks share cores: the JSON records the core count and load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fast_attn._host import usable_cores

SCHEMES = ("ring", "ulysses")


# ---------------------------------------------------------------------- rank side


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _inputs(shape_q, shape_kv, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float32).to(device, dtype).requires_grad_()
               for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q, generator=g, dtype=torch.float32).to(device, dtype)
    return q, k, v, dout


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, waited: float, device) -> tuple[float, float]:
    """(max over ranks of the iteration time, mean over ranks of the wait time)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seconds, waited
    t = torch.tensor([seconds, waited], dtype=torch.float64, device=device)
    both = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(both, t)
    stacked = torch.stack(both).cpu()
    return float(stacked[:, 0].max()), float(stacked[:, 1].mean())


def _comm_only(scheme: str, q, k, info) -> float:
    """Seconds to send one forward + backward pass's messages with no computation."""
    from fast_attn.distributed import _comm

    start = time.perf_counter()
    if scheme == "ring":
        f32 = [torch.zeros(k.shape, dtype=torch.float32, device=k.device)] * 2
        for _ in range(2 * (info.world - 1)):  # K/V hops, forward and backward
            _comm.ring_shift(info, [k.detach(), k.detach()], _comm.KV_TAG).wait()
        for _ in range(info.world):  # dK/dV accumulators going home
            _comm.ring_shift(info, f32, _comm.GRAD_TAG).wait()
    else:
        world, (batch, local, heads, dim) = info.world, q.shape
        qkv = torch.zeros((world, batch, local, 3 * heads // world, dim), dtype=q.dtype, device=q.device)
        one = torch.zeros((world, batch, local, heads // world, dim), dtype=q.dtype, device=q.device)
        for message in (qkv, one, one, qkv):  # q|k|v in, out back; then their gradients
            _comm.all_to_all(info, message)
    _sync(q.device)
    return time.perf_counter() - start


def rank_bench(scheme: str, sizes: list, heads: int, head_dim: int, dtype_name: str, warmup: int, reps: int,
               threads: int) -> list[dict]:
    """One rank of one group: every size in increasing order."""
    from fast_attn import attention
    from fast_attn.distributed import _comm, ring_attention, ulysses_attention
    from fast_attn.distributed._group import ProcessGroupInfo

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for seqlen in sorted(sizes):
        local = seqlen // world
        q, k, v, dout = _inputs((1, local, heads, head_dim), (1, local, heads, head_dim), dtype, device,
                                seed=seqlen + (dist.get_rank() if world > 1 else 0))
        if scheme == "single":
            def step():
                return attention(q, k, v, causal=True)
        else:
            fn = {"ring": ring_attention, "ulysses": ulysses_attention}[scheme]

            def step():
                return fn(q, k, v, causal=True, layout="zigzag")
        times, waits = [], []
        for it in range(warmup + reps):
            if world > 1:
                dist.barrier()
            _sync(device)
            with _comm.time_waits() as waited:
                start = time.perf_counter()
                step().backward(dout)
                _sync(device)
                elapsed = time.perf_counter() - start
            q.grad = k.grad = v.grad = None
            elapsed, wait = _slowest(elapsed, waited[0], device)
            if it >= warmup:
                times.append(elapsed)
                waits.append(wait)
        comm = None
        if scheme != "single":
            info = ProcessGroupInfo.of(None, q, caller="bench")
            dist.barrier()
            comm = statistics.median(_slowest(_comm_only(scheme, q, k, info), 0.0, device)[0] for _ in range(3))
        memory = torch.tensor([_peak_memory_mb(device)], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        median = statistics.median(times)
        rows.append({
            "scheme": scheme, "world": world, "seqlen": seqlen, "local_seqlen": local,
            "median_ms": 1e3 * median, "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "tokens_per_s": seqlen / median, "wait_ms": 1e3 * statistics.median(waits),
            "comm_only_ms": None if comm is None else 1e3 * comm,
            "peak_memory_mb": float(memory), "reps": reps,
        })
    return rows


# ----------------------------------------------------------------------- driver


def _environment(args) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "process_group_backend": "nccl" if cuda else "gloo",
        "cores": usable_cores(),
        "threads_per_rank": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_before": os.getloadavg(),
        "shape": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "causal": True,
                  "dtype": args.dtype, "layout": "zigzag"},
        "memory_metric": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (ru_maxrss)",
    }


def _markdown(env: dict, rows: list) -> str:
    single = {r["seqlen"]: r for r in rows if r["scheme"] == "single"}
    kind = "GPU/nccl" if env["process_group_backend"] == "nccl" else "CPU/gloo"
    lines = [
        f"# Context parallelism, {kind}: forward + backward of causal attention",
        "",
        f"{env['date']}, {env['device']}, {env['cores']} cores, {env['threads_per_rank']} thread(s) per rank, "
        f"torch {env['torch']}; load average before {tuple(round(x, 2) for x in env['load_average_before'])}, "
        f"after {tuple(round(x, 2) for x in env['load_average_after'])}.",
        f"Shape: one sequence of S tokens, H={env['shape']['heads']}, D={env['shape']['head_dim']}, "
        f"{env['shape']['dtype']}, zigzag layout. Time per iteration = the slowest rank; median [min, max] of "
        f"{rows[0]['reps']} iterations. Memory: {env['memory_metric']}, max over ranks.",
        "",
        "| scheme | W | S | ms: median [min, max] | tokens/s | vs single | waiting for transfers, ms | "
        "same messages alone, ms | peak memory / rank, MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["seqlen"], r["scheme"] != "single", r["scheme"], r["world"])):
        base = single.get(r["seqlen"])
        speed = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else ""
        comm = "" if r["comm_only_ms"] is None else f"{r['comm_only_ms']:.1f}"
        wait = "" if r["scheme"] == "single" else f"{r['wait_ms']:.1f}"
        lines.append(f"| {r['scheme']} | {r['world']} | {r['seqlen']} | {r['median_ms']:.1f} "
                     f"[{r['min_ms']:.1f}, {r['max_ms']:.1f}] | {r['tokens_per_s']:.0f} | {speed} | {wait} | "
                     f"{comm} | {r['peak_memory_mb']:.0f} |")
    lines += ["", "Measured on CPU with gloo: real numbers for this machine, not a prediction of GPU/nccl "
              "behaviour. A GPU run (the same command on a multi-GPU machine) must confirm the overlap of "
              "communication with compute, the memory per rank and the scaling."
              if kind == "CPU/gloo" else "Measured with nccl, one GPU per rank.", ""]
    return "\n".join(lines)


def main(argv=None, prog: str = "python -m benchmarks.bench_context_parallel") -> dict:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="512,1024,2048", help="global sequence lengths (multiples of 2 * W)")
    p.add_argument("--worlds", default="2,4", help="world sizes")
    p.add_argument("--schemes", default="ring,ulysses")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per spawned group")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    from fast_attn.distributed.testing import run_ranks

    sizes = [int(s) for s in args.sizes.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    env = _environment(args)
    common = (sizes, args.heads, args.head_dim, args.dtype, args.warmup, args.reps, args.threads)
    rows = rank_bench("single", *common)  # the reference, in this process
    for scheme in args.schemes.split(","):
        for world in worlds:
            rows += run_ranks(rank_bench, world, scheme, *common, timeout=args.timeout,
                              threads=args.threads, backend="nccl" if torch.cuda.is_available() else "gloo")[0]
            print(f"{scheme} W={world}: " + ", ".join(f"S={r['seqlen']} {r['median_ms']:.0f} ms"
                                                       for r in rows if r["scheme"] == scheme and r["world"] == world),
                  flush=True)
    env["load_average_after"] = os.getloadavg()
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"benchmarks/results/{datetime.date.today().isoformat()}-{kind}-context-parallel")
    out.mkdir(parents=True, exist_ok=True)
    (out / "context_parallel.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    table = _markdown(env, rows)
    (out / "context_parallel.md").write_text(table)
    print(table)
    return {"environment": env, "results": rows}


if __name__ == "__main__":
    main()
