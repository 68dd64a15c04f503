"""``python -m fast_attn.models.train``: losses fall, checkpoints reload, DDP ranks agree.

Runs are a few dozen steps of the built-in tasks at small batch sizes, in process through
``train.main(argv)``; the DDP smoke test launches two gloo processes with torchrun.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fast_attn.models import train


@pytest.fixture
def small_eval(monkeypatch):
    """Shorter evaluations: 50 held-out sums/strings, 32-character GPT windows."""
    monkeypatch.setattr(train.Seq2SeqTask, "eval_examples", 50)
    monkeypatch.setattr(train.CharTask, "block_size", 32)
    monkeypatch.setattr(train.CharTask, "eval_batches", 2)


def run(tmp_path, *args, out="run"):
    return train.main(["--out", str(tmp_path / out), "--device", "cpu", *args])


def mean(xs):
    return sum(xs) / len(xs)


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [train.learning_rate(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


def test_reverse_loss_falls_and_outputs_are_written(tmp_path, small_eval):
    result = run(tmp_path, "--task", "reverse", "--steps", "40", "--batch-size", "32", "--warmup", "10")
    assert len(result.losses) == 40
    assert mean(result.losses[-5:]) < 0.8 * mean(result.losses[:5])
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40 and 0.0 <= metrics["exact_match"] <= 1.0
    assert (out / "checkpoint.pt").is_file()
    if importlib.util.find_spec("matplotlib") is None:
        assert not (out / "loss.png").exists()
    else:
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chargpt_loss_falls_and_samples_from_the_prompt(tmp_path, small_eval):
    result = run(tmp_path, "--task", "chargpt", "--steps", "30", "--batch-size", "8", "--warmup", "5")
    assert mean(result.losses[-5:]) < 0.8 * mean(result.losses[:5])
    assert result.metrics["sample"].startswith("The keeper") and len(result.metrics["sample"]) == 32
    assert result.metrics["val_loss"] > 0


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    # With warm-up longer than the run the learning rate does not depend on --steps, so
    # 6 steps + 6 resumed steps must equal 12 steps in one go.
    common = ["--task", "reverse", "--batch-size", "16", "--warmup", "100", "--no-eval"]
    whole = run(tmp_path, *common, "--steps", "12", out="whole")
    run(tmp_path, *common, "--steps", "6", out="split")
    resumed = run(tmp_path, *common, "--steps", "12", "--resume", out="split")
    assert resumed.losses == whole.losses
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # load_checkpoint rebuilds the model from the config stored with the weights.
    model, state = train.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert state["step"] == 12 and state["task"] == "reverse"
    src, tgt = torch.randint(3, 13, (2, 9)), torch.randint(3, 13, (2, 5))
    torch.testing.assert_close(model(src, tgt), resumed.model(src, tgt))


def test_resume_refuses_another_task(tmp_path):
    run(tmp_path, "--task", "reverse", "--steps", "1", "--batch-size", "4", "--no-eval")
    with pytest.raises(ValueError, match="reverse"):
        run(tmp_path, "--task", "add", "--steps", "2", "--resume")


def test_seq2seq_tasks_make_consistent_examples():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        question, answer = train.AddTask().example(g)
        a, b = question.split("+")
        assert int(a) + int(b) == int(answer) and len(a) <= 3 and len(b) <= 3
        digits, reversed_ = train.ReverseTask().example(g)
        assert reversed_ == digits[::-1] and 1 <= len(digits) <= 12
    batch = train.ReverseTask().batch(4, g, "cpu")
    assert batch["src"].shape == (4, 12) and batch["tgt"].shape == (4, 14)
    assert (batch["tgt"][:, 0] == train.BOS).all() and ((batch["tgt"] == train.EOS).sum(1) == 1).all()


def test_runs_without_matplotlib_and_tqdm(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    run(tmp_path, "--task", "reverse", "--steps", "4", "--batch-size", "4", "--log-every", "2", "--no-eval")
    printed = capsys.readouterr().out
    assert "step 2/4" in printed and "step 4/4" in printed and "no loss curve" in printed
    assert not (tmp_path / "run" / "loss.png").exists()


DDP_WORKER = """
import sys
import torch
from fast_attn.models import train

result = train.main(sys.argv[2:])
torch.save({"state": result.model.state_dict(), "losses": result.losses, "world": result.world_size},
           f"{sys.argv[1]}/rank{result.rank}.pt")
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_weights(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(DDP_WORKER))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), str(tmp_path), "--task", "reverse", "--steps", "5", "--batch-size", "8",
           "--device", "cpu", "--out", str(out), "--no-eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank drew its own batches
    for name, a in ranks[0]["state"].items():
        assert torch.equal(a, ranks[1]["state"][name]), name
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2


def test_idle_cores_leaves_busy_cores_and_shares_among_ranks(monkeypatch):
    from fast_attn import _host

    monkeypatch.setattr(_host.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(_host.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert _host.idle_cores() == 5          # 8 cores, about 3 busy
    assert _host.idle_cores(local_ranks=2) == 2
    monkeypatch.setattr(_host.os, "getloadavg", lambda: (11.0, 0.0, 0.0))
    assert _host.idle_cores() == 1          # never fewer than one


def test_main_restores_the_callers_thread_count(tmp_path, small_eval):
    before = torch.get_num_threads()
    run(tmp_path, "--task", "reverse", "--steps", "2", "--batch-size", "4", "--threads", str(before + 1),
        "--no-eval")
    assert torch.get_num_threads() == before


# Context parallelism: no dropout, since each rank draws the dropout masks of its own
# shard; with it off, a sequence split over ranks must train like the whole sequence.
CP_WORKER = """
import sys
import torch
from fast_attn.models import ModelConfig, train

config = train.CharTask.model_config
train.CharTask.model_config = lambda self, preset: ModelConfig(**{**config(self, preset).to_dict(), "dropout": 0.0})
train.CharTask.block_size = 32
result = train.main(sys.argv[2:])
torch.save({"state": result.model.state_dict(), "losses": result.losses, "world": result.world_size},
           f"{sys.argv[1]}/rank{result.rank}.pt")
"""
CP_ARGS = ("--task", "chargpt", "--steps", "4", "--batch-size", "4", "--warmup", "2", "--no-eval")


def torchrun(tmp_path, nproc, *args):
    worker = tmp_path / "cp_worker.py"
    worker.write_text(textwrap.dedent(CP_WORKER))
    out = tmp_path / "cp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(worker), str(tmp_path), *CP_ARGS, "--device", "cpu", "--threads", "1", "--out", str(out), *args]
    # One thread per rank, as in the single-process runs they are compared with: the thread
    # count changes the order of float sums, which four Adam steps amplify past rounding.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(nproc)], out


@pytest.fixture
def no_dropout_chargpt(monkeypatch):
    config = train.CharTask.model_config
    monkeypatch.setattr(train.CharTask, "model_config",
                        lambda self, preset: type(config(self, preset))(**{**config(self, preset).to_dict(),
                                                                           "dropout": 0.0}))
    monkeypatch.setattr(train.CharTask, "block_size", 32)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("--cp-scheme", "ring", "--fsdp"), ("--cp-scheme", "ulysses")],
                         ids=["ring-fsdp2", "ulysses-ddp"])
def test_context_parallel_training_matches_single_process(tmp_path, no_dropout_chargpt, extra):
    single = run(tmp_path, *CP_ARGS, "--threads", "1", out="single")
    ranks, out = torchrun(tmp_path, 2, "--context-parallel", "2", *extra)
    for r in ranks:  # fp32: the same losses and weights up to rounding
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(r["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["context_parallel"] == 2 and metrics["fsdp"] == ("--fsdp" in extra)
    # the checkpoint has the single-process format (FSDP: gathered), so it reloads
    model, state = train.load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 4 and len(state["optimizer"]["state"]) == len(list(model.parameters()))


@pytest.mark.slow
def test_data_and_context_parallel_on_a_2x2_mesh(tmp_path, no_dropout_chargpt):
    single = run(tmp_path, *CP_ARGS, "--steps", "1", "--threads", "1", out="single")
    ranks, _ = torchrun(tmp_path, 4, "--context-parallel", "2")
    # mesh (dp, cp) = (2, 2): ranks 0, 1 share a batch, ranks 2, 3 share another
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[2]["losses"] == ranks[3]["losses"]
    assert ranks[0]["losses"] != ranks[2]["losses"]
    assert ranks[0]["losses"][0] == pytest.approx(single.losses[0], rel=1e-6)  # same weights, same batch
    for r in ranks[1:]:
        for name, value in ranks[0]["state"].items():
            assert torch.equal(r["state"][name], value), name


def test_context_parallel_needs_ranks_to_split_over(tmp_path):
    with pytest.raises(ValueError, match="must divide the number of processes"):
        run(tmp_path, "--task", "chargpt", "--steps", "1", "--context-parallel", "2", "--no-eval")
