"""Train the reference models on built-in tasks: ``python -m fast_attn.models.train``.

Tasks (no download; the data is generated or ships in the package):

- ``reverse``: seq2seq, reverse a random digit string of 1..12 digits
  ("3141" -> "1413"); the encoder-decoder ("transformer-tiny") learns it in the default
  600 steps: 100% exact match on 500 held-out strings, after 201 s of training (221 s in
  all) on our 2-core CPU machine while other jobs loaded it (load average 2.5-4.8; one
  thread chosen).
- ``add``: seq2seq, multi-digit addition ("417+86" -> "503") with operands of 1..3 digits.
- ``chargpt``: a character-level GPT ("gpt-tiny") on ``fast_attn/models/data/tiny_corpus.txt``
  (10 KB of prose written for this package); reports the held-out loss (last 10% of the
  text) and samples text through the KV cache.

On a CPU, ``--threads`` sets torch's intra-op threads. By default the run takes the cores
that are idle when it starts (those this process may use, less the 1-minute load average,
shared among the ranks torchrun starts on the node; at least 1): these models are small,
so a second thread gains little (reverse, 2-core machine, idle: 2 threads 18.5 s, 1
thread 21.8 s for 150 steps) while a thread on a busy core costs a lot (a loaded machine:
10x slower than one thread). The chosen count is printed.

Examples::

    python -m fast_attn.models.train --task reverse                  # CPU or the GPU
    python -m fast_attn.models.train --task chargpt --steps 2000 --out runs/char
    python -m fast_attn.models.train --task chargpt --steps 4000 --out runs/char --resume
    torchrun --nproc_per_node=2 -m fast_attn.models.train --task reverse   # DDP
    torchrun --nproc_per_node=4 -m fast_attn.models.train --task chargpt --context-parallel 2 --fsdp

Writes to ``--out``: ``checkpoint.pt`` (model, optimizer, step, config, losses; reloaded
by ``--resume``), ``loss.png`` (when matplotlib is installed) and ``metrics.json``.
Progress shows as a tqdm bar when tqdm is installed and stderr is a terminal, else as a
line every ``--log-every`` steps (a bar redrawn into a log file would bury the log).

Distributed: under ``torchrun`` (detected with ``torch.distributed.is_torchelastic_launched``)
the process group is initialised from torchrun's environment (``env://``; gloo on CPU,
nccl on CUDA with one GPU per local rank) and the model wrapped in
DistributedDataParallel. Each rank draws its own batches (so ``--batch-size`` is per
rank); rank 0 alone logs, evaluates and writes files.

Context parallelism (``--context-parallel N``, GPT task only): groups of N ranks share a
batch and split its sequences (zigzag), attention by ``--cp-scheme`` ring or ulysses;
``--fsdp`` shards parameters with FSDP2 instead of DDP (fast_attn/distributed/training.py;
docs/context_parallel.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fast_attn._host import idle_cores
from fast_attn.models import ModelConfig, build_model

__all__ = ["main", "TrainResult", "TASKS", "load_checkpoint"]

CHECKPOINT = "checkpoint.pt"
EVAL_SEED = 1_000_003  # held-out examples come from their own generator
PAD, BOS, EOS = 0, 1, 2  # special tokens of the seq2seq tasks; characters start at 3


# ------------------------------------------------------------------------------- tasks


class Seq2SeqTask:
    """A synthetic string-to-string task for the encoder-decoder, scored by exact match."""

    name = ""
    alphabet = ""
    preset = "transformer-tiny"
    defaults = dict(steps=600, batch_size=128, lr=1e-3)
    eval_examples = 500

    def __init__(self) -> None:
        self.vocab_size = 3 + len(self.alphabet)
        self.max_src, self.max_tgt = self.max_lengths()

    def max_lengths(self) -> tuple[int, int]:
        raise NotImplementedError

    def example(self, g: torch.Generator) -> tuple[str, str]:
        raise NotImplementedError

    def model_config(self, preset: Optional[str]) -> ModelConfig:
        return ModelConfig.from_name(preset or self.preset, vocab_size=self.vocab_size,
                                     max_seq_len=max(self.max_src, self.max_tgt + 2))

    def encode(self, text: str) -> list[int]:
        return [3 + self.alphabet.index(c) for c in text]

    def batch(self, size: int, g: torch.Generator, device) -> dict:
        """src (B, S) and tgt (B, T + 2) = BOS, answer, EOS; both right-padded with PAD."""
        src = torch.full((size, self.max_src), PAD, dtype=torch.long)
        tgt = torch.full((size, self.max_tgt + 2), PAD, dtype=torch.long)
        for i in range(size):
            question, answer = self.example(g)
            src[i, :len(question)] = torch.tensor(self.encode(question))
            tgt[i, :len(answer) + 2] = torch.tensor([BOS, *self.encode(answer), EOS])
        return {"src": src.to(device), "tgt": tgt.to(device)}

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        src, tgt = batch["src"], batch["tgt"]
        logits = model(src, tgt[:, :-1], src == PAD)  # (B, T + 1, vocab): teacher forcing
        return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device) -> dict:
        """Exact match of greedy decoding on held-out examples (answer and EOS all right)."""
        batch = self.batch(self.eval_examples, torch.Generator().manual_seed(EVAL_SEED), device)
        src, target = batch["src"], batch["tgt"][:, 1:]  # (B, T + 1)
        out = model.generate(src, target.shape[1], BOS, EOS, src == PAD)[:, 1:]
        out = F.pad(out, (0, target.shape[1] - out.shape[1]), value=-1)
        correct = ((out == target) | (target == PAD)).all(dim=1)
        return {"exact_match": correct.float().mean().item()}

    def describe(self, metrics: dict) -> str:
        return f"exact match {100 * metrics['exact_match']:.1f}% on {self.eval_examples} held-out examples"


class ReverseTask(Seq2SeqTask):
    name = "reverse"
    alphabet = "0123456789"
    min_len, max_len = 1, 12

    def max_lengths(self):
        return self.max_len, self.max_len

    def example(self, g):
        length = int(torch.randint(self.min_len, self.max_len + 1, (1,), generator=g))
        digits = "".join(self.alphabet[i] for i in torch.randint(0, 10, (length,), generator=g).tolist())
        return digits, digits[::-1]


class AddTask(Seq2SeqTask):
    name = "add"
    alphabet = "0123456789+"
    digits = 3
    defaults = dict(steps=1500, batch_size=128, lr=1e-3)

    def max_lengths(self):
        return 2 * self.digits + 1, self.digits + 1

    def example(self, g):
        terms = []
        for _ in range(2):  # the number of digits is uniform, then the number
            n = int(torch.randint(1, self.digits + 1, (1,), generator=g))
            low = 0 if n == 1 else 10 ** (n - 1)
            terms.append(int(torch.randint(low, 10 ** n, (1,), generator=g)))
        return f"{terms[0]}+{terms[1]}", str(terms[0] + terms[1])


class CharTask:
    """Next-character prediction on the corpus that ships in the package (90% / 10% split)."""

    name = "chargpt"
    preset = "gpt-tiny"
    defaults = dict(steps=400, batch_size=16, lr=2e-3)
    block_size = 128
    eval_batches = 8
    prompt = "The keeper"

    def __init__(self) -> None:
        text = resources.files("fast_attn.models").joinpath("data", "tiny_corpus.txt").read_text("utf-8")
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        data = torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        self.train_data, self.val_data = data[:split], data[split:]

    def model_config(self, preset: Optional[str]) -> ModelConfig:
        # 10 KB of text overfit a 0.8M-parameter model fast: dropout 0.2 (held-out loss
        # 1.94 after 400 steps vs 3.0 with 0.1). No attention dropout: on CPU the
        # reference's counter-based dropout mask costs more than the rest of the step.
        return ModelConfig.from_name(preset or self.preset, vocab_size=self.vocab_size,
                                     max_seq_len=self.block_size, dropout=0.2, attn_dropout=0.0)

    def batch(self, size: int, g: torch.Generator, device, data: Optional[Tensor] = None) -> dict:
        data = self.train_data if data is None else data
        starts = torch.randint(0, len(data) - self.block_size - 1, (size,), generator=g)
        windows = torch.stack([data[s:s + self.block_size + 1] for s in starts.tolist()])  # (B, T + 1)
        return {"x": windows[:, :-1].to(device), "y": windows[:, 1:].to(device)}

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        logits = model(batch["x"])  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device) -> dict:
        g = torch.Generator().manual_seed(EVAL_SEED)
        losses = [self.loss(model, self.batch(16, g, device, self.val_data)).item()
                  for _ in range(self.eval_batches)]
        prompt = torch.tensor([[self.chars.index(c) for c in self.prompt]], device=device)
        out = model.generate(prompt, self.block_size - len(self.prompt), temperature=0.8, top_k=10,
                             generator=torch.Generator(device=device).manual_seed(EVAL_SEED))
        return {"val_loss": sum(losses) / len(losses), "sample": "".join(self.chars[i] for i in out[0].tolist())}

    def describe(self, metrics: dict) -> str:
        return f"held-out loss {metrics['val_loss']:.3f} nats/char; sample:\n{metrics['sample']}"


TASKS = {"reverse": ReverseTask, "add": AddTask, "chargpt": CharTask}


# ------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What ``main`` returns: the trained model (unwrapped from DDP), the per-step losses of
    this rank (from step 1, including those of a resumed checkpoint), the final evaluation
    (rank 0 only; empty elsewhere), and this process's rank and the world size."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fast_attn.models.train",
                                description="Train a fast_attn reference model on a built-in task.")
    p.add_argument("--task", choices=sorted(TASKS), default="reverse")
    p.add_argument("--model", default=None, help="a ModelConfig preset (default: the task's)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the task's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the task's)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (mainly for CUDA)")
    p.add_argument("--out", default="fast_attn_runs", help="folder for checkpoint, loss.png, metrics.json")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: OUT/checkpoint.pt)")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: at the end)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="split each sequence across N ranks (torchrun; --task chargpt)")
    p.add_argument("--cp-scheme", choices=("ring", "ulysses"), default="ring",
                   help="context-parallel attention: ring (point-to-point) or ulysses (all-to-all)")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (torchrun) instead of DDP")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: the idle cores, shared among this node's "
                        "ranks; see the module docstring)")
    return p.parse_args(argv)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins torchrun's process group when launched by it."""
    if not dist.is_torchelastic_launched():
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, torch.device(device_arg)
    use_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda:
        local_rank = dist.get_node_local_rank(fallback_rank=0) if hasattr(dist, "get_node_local_rank") else 0
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def save_checkpoint(path: Path, model: nn.Module, optimizer, step: int, task: str,
                    cfg: ModelConfig, losses: list[float]) -> None:
    """Writes atomically (a partial file never replaces a good one)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "task": task, "config": cfg.to_dict(), "losses": losses}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """(model with the checkpoint's weights, the checkpoint dict) from a ``checkpoint.pt``."""
    state = torch.load(path, map_location=device, weights_only=True)
    model = build_model(ModelConfig(**state["config"])).to(device)
    model.load_state_dict(state["model"])
    return model, state


def save_loss_curve(path: Path, losses: list[float], title: str) -> bool:
    """Plots the losses to a PNG; False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, linewidth=0.8)
    ax.set(xlabel="step", ylabel="training loss", title=title, yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


class Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else a printed line
    every ``every`` steps."""

    def __init__(self, start: int, total: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled, self.t0 = total, max(1, every), enabled, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == self.total:
                self.bar.set_postfix(loss=f"{loss:.4f}")
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  loss {loss:.4f}  {time.perf_counter() - self.t0:.1f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> TrainResult:
    """Runs the CLI with ``argv`` (default ``sys.argv[1:]``); returns the trained model."""
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    threads_before = torch.get_num_threads()  # restored: main() may run inside a caller's process
    if device.type == "cpu":
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 1
        torch.set_num_threads(args.threads or idle_cores(local_ranks))
    try:
        return _train(args, rank, world, device)
    finally:
        torch.set_num_threads(threads_before)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank: int, world: int, device: torch.device) -> TrainResult:
    log = print if rank == 0 else (lambda *a, **k: None)
    task = TASKS[args.task]()
    steps = args.steps if args.steps is not None else task.defaults["steps"]
    batch_size = args.batch_size or task.defaults["batch_size"]
    peak_lr = args.lr or task.defaults["lr"]
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    parallel = None
    if args.context_parallel > 1 or args.fsdp:
        from fast_attn.distributed.training import Parallel

        if args.fsdp and args.resume is not None:
            raise ValueError("--resume is not supported with --fsdp")
        parallel = Parallel.setup(world, args.context_parallel, device, args.cp_scheme, args.fsdp)
    data_rank = rank if parallel is None else parallel.dp_rank  # ranks that share a batch share its seed

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    start, losses = 0, []
    if args.resume is not None:
        path = Path(args.resume) if args.resume else out / CHECKPOINT
        model, state = load_checkpoint(path, device)
        if state["task"] != args.task:
            raise ValueError(f"{path} was trained on task {state['task']!r}, not {args.task!r}")
        cfg, start, losses = model.cfg, state["step"], list(state["losses"])
    else:
        cfg = task.model_config(args.model)
        model = build_model(cfg).to(device)
    if parallel is not None:
        parallel.prepare(model, args.task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.98), weight_decay=0.01)
    if args.resume is not None:
        optimizer.load_state_dict(state["optimizer"])
    if parallel is not None:
        trained = parallel.wrap(model)
    else:
        trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    n_params = sum(p.numel() for p in model.parameters())
    threads = f" ({torch.get_num_threads()} thread(s) each)" if device.type == "cpu" else ""
    log(f"{args.task}: {cfg.arch} model, {n_params / 1e6:.2f}M parameters, {world} process(es) on "
        f"{device}{threads}, steps {start + 1}..{steps}, batch {batch_size} per process")

    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    progress = Progress(start, steps, args.log_every, enabled=rank == 0)
    t0 = time.perf_counter()
    model.train()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, args.warmup)
        # Batches are a function of (seed, rank, step): a resumed run sees the same data.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + data_rank * 7919 + step)
        with amp:
            if parallel is None:
                loss = logged = task.loss(trained, task.batch(batch_size, g, device))
            else:
                loss, logged = parallel.loss(task, trained, task.batch(batch_size, g, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(logged.item())
        progress.update(step + 1, losses[-1])
        if args.save_every and (step + 1) % args.save_every == 0:
            saved = (model, optimizer) if parallel is None else parallel.for_checkpoint(
                model, optimizer, lambda: build_model(cfg).to(device))  # FSDP: a collective
            if rank == 0:
                save_checkpoint(out / CHECKPOINT, *saved, step + 1, args.task, cfg, losses)
    progress.close()
    train_s = time.perf_counter() - t0
    if parallel is not None:  # a plain model (FSDP: with the full weights), attention unsplit
        model, optimizer = parallel.for_checkpoint(model, optimizer, lambda: build_model(cfg).to(device))
        model = parallel.finish(model)

    metrics = {}
    if rank == 0:
        save_checkpoint(out / CHECKPOINT, model, optimizer, steps, args.task, cfg, losses)
        if save_loss_curve(out / "loss.png", losses, f"{args.task} ({cfg.arch})"):
            log(f"loss curve: {out / 'loss.png'}")
        else:
            log("matplotlib is not installed: no loss curve PNG")
        metrics = {"task": args.task, "steps": steps, "train_seconds": round(train_s, 2),
                   "final_loss": losses[-1] if losses else None, "world_size": world}
        if parallel is not None:
            metrics.update(context_parallel=args.context_parallel, cp_scheme=args.cp_scheme, fsdp=args.fsdp)
        if not args.no_eval:
            model.eval()
            metrics.update(task.evaluate(model, device))
            model.train()
            log(f"{args.task}: {task.describe(metrics)}")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log(f"trained {steps - start} steps in {train_s:.1f}s; checkpoint: {out / CHECKPOINT}")
    if world > 1:
        dist.barrier()
    return TrainResult(model, losses, metrics, rank, world)


if __name__ == "__main__":
    # Tiny gradients late in training turn into denormal floats that slow CPU maths ~10x.
    torch.set_flush_denormal(True)
    main()
