"""The benchmark suite end to end on CPU: ``python -m benchmarks --quick`` in a subprocess.

The GPU is hidden (CUDA_VISIBLE_DEVICES=""), so on any machine this checks the CPU path:
exit 0, the plain statement that GPU figures need a GPU, the JSON/CSV/Markdown files
and the JSON's fields. ``--compare`` is checked on two small hand-made result files.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.common import NOISY_MIN_SAMPLES, NOISY_SPREAD  # noqa: E402

SUITE_TIMEOUT_S = 240
ROW_FIELDS = {"op", "pass", "impl", "ours", "config", "shape", "dtype", "device", "status", "note",
              "median_ms", "p20_ms", "p80_ms", "samples", "spread", "noisy", "unit", "throughput",
              "ceiling_fraction", "peak_mem_mb", "best_peer", "ratio_to_best_peer", "ratio_note"}
ENV_FIELDS = {"gpu", "sm_count", "torch", "triton", "cuda", "cudnn", "date", "git_commit", "cpu_count",
              "torch_threads", "loadavg_1m_start", "loadavg_1m_end"}
ALL_OPS = {"attention", "decode", "layer_norm", "rms_norm", "bias_gelu", "swiglu", "geglu", "block"}


def run_suite(*args, timeout=SUITE_TIMEOUT_S):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # CPU path, steady timings
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_suite("--quick", "--out", str(out))
    return result, out


def test_quick_run_exits_zero_and_says_gpu_is_needed(quick_run):
    result, _ = quick_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "GPU figures need a GPU" in result.stdout
    assert "== attention fwd" in result.stdout


def test_quick_run_writes_files(quick_run):
    result, out = quick_run
    for name in ("results.json", "results.csv", "report.md"):
        assert (out / name).is_file(), name
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# fast_attn benchmarks: CPU")
    assert "GPU figures need a GPU" in markdown
    data = json.loads((out / "results.json").read_text())
    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(data["rows"])
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in markdown  # the report says why it has no plots
    else:
        assert (out / "plots" / "attention.png").is_file() and "![attention](plots/attention.png)" in markdown
    assert {"op", "pass", "impl", "median_ms", "throughput", "ratio_to_best_peer", "shape.width"} <= set(table[0])


def test_quick_run_json_schema(quick_run):
    _, out = quick_run
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == report.SCHEMA
    assert ENV_FIELDS <= set(data["env"]) and data["env"]["gpu"] is None
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    assert set(data["backends"]) == {"cuda", "triton", "torch"}
    assert data["backends"]["torch"]["measured"]
    rows = data["rows"]
    assert all(ROW_FIELDS <= set(row) for row in rows)
    assert {row["op"] for row in rows} == ALL_OPS
    assert {row["status"] for row in rows} <= {"ok", "skipped", "error"}
    for row in rows:
        if row["status"] == "ok":
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["throughput"] > 0 and row["unit"] in ("TFLOP/s", "GB/s", "Mtok/s")
            assert row["samples"] >= 1 and row["spread"] >= 0 and isinstance(row["noisy"], bool)
            assert row["noisy"] == (row["samples"] < NOISY_MIN_SAMPLES or row["spread"] > NOISY_SPREAD)
        else:
            assert row["note"], row  # a skipped or failed row says why
    ours = [r for r in rows if r["impl"] == "fast_attn:torch" and r["status"] == "ok"]
    assert {r["op"] for r in ours} == ALL_OPS - {"block"}
    for r in ours:
        if r["op"] in ("layer_norm", "rms_norm", "swiglu"):
            assert r["best_peer"] == "torch:eager"
            # a ratio exactly when neither row is noisy (the note says which was)
            assert (r["ratio_to_best_peer"] or 0) > 0 or r["ratio_note"].startswith("no ratio: noisy")
    assert data["env"]["loadavg_1m_start"] is not None and data["env"]["loadavg_1m_end"] is not None
    passes = {(r["op"], r["pass"]) for r in rows}
    assert {("attention", "fwd"), ("attention", "bwd"), ("attention", "fwd+bwd"),
            ("block", "fwd"), ("block", "fwd+bwd")} <= passes


def test_single_op_selection(tmp_path):
    result = run_suite("--quick", "--ops", "rms_norm", "--backends", "torch", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["op"] for row in rows} == {"rms_norm"}


def test_fp32_single_op_end_to_end(tmp_path):
    """The main job's benchmark command line with fp32 and every shared option."""
    result = run_suite("--quick", "--ops", "rms_norm", "--dtype", "fp32", "--backends", "torch", "--seed", "3",
                       "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["settings"]["dtype"] == "fp32" and data["settings"]["seed"] == 3
    assert data["ceilings"]["dtype"] == "fp32" and data["ceilings"]["copy_gbps"] > 0
    measured = [row for row in data["rows"] if row["status"] == "ok"]
    assert {row["impl"] for row in measured} == {"fast_attn:torch", "torch:eager"}
    assert all(row["dtype"] == "fp32" and row["samples"] >= 1 for row in measured)
    assert "say nothing about the GPU kernels" in result.stdout and "load average" in result.stdout
    assert "legend: ~ noisy" in result.stdout


def test_fast_attn_op_names_select_their_benchmark():
    """--ops takes fast_attn's op names too (verify's spelling): attention_with_kvcache is decode."""
    from benchmarks.__main__ import _parse

    assert _parse(["--ops", "attention_with_kvcache,rms_norm"]).ops == ["decode", "rms_norm"]


def test_bad_option_is_a_usage_error(tmp_path):
    result = run_suite("--ops", "attention,bogus", "--out", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "bogus" in result.stderr
    result = run_suite("--compare", str(tmp_path / "missing.json"), timeout=60)
    assert result.returncode == 2 and "missing.json" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--ops", "attention_varlen"], "no benchmark yet"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_option_message(argv, message, capsys):
    from benchmarks.__main__ import _parse

    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    if argv[0] == "--dtype":
        assert all(name in err for name in ("fp16", "bf16", "fp32"))  # the choices are listed


# ------------------------------------------------------------------------------- compare


def _result(rows):
    """A minimal results.json: what --compare reads."""
    env = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-24T12:00:00", "torch": "2.11.0"}
    return {"schema": report.SCHEMA, "env": env, "rows": [
        {"op": op, "pass": "fwd", "impl": impl, "config": "s=1024", "dtype": "bf16", "status": status,
         "median_ms": ms}
        for op, impl, status, ms in rows
    ]}


OLD = _result([("attention", "fast_attn:triton", "ok", 2.0), ("layer_norm", "fast_attn:triton", "ok", 1.0),
               ("rms_norm", "fast_attn:triton", "ok", 1.0), ("swiglu", "fast_attn:cuda", "ok", 1.0),
               ("geglu", "fast_attn:cuda", "ok", 1.0)])
NEW = _result([("attention", "fast_attn:triton", "ok", 1.0), ("layer_norm", "fast_attn:triton", "ok", 1.2),
               ("rms_norm", "fast_attn:triton", "ok", 1.03), ("swiglu", "fast_attn:cuda", "error", None),
               ("decode", "fast_attn:cuda", "ok", 1.0)])


def test_compare_classifies_changes():
    diff = report.compare(OLD, NEW)
    assert [(key[0], round(speedup, 3)) for key, _, _, speedup in diff["faster"]] == [("attention", 2.0)]
    assert [(key[0], round(speedup, 3)) for key, _, _, speedup in diff["slower"]] == [("layer_norm", 0.833)]
    assert diff["unchanged"] == 1  # rms_norm: 3% is under the 5% threshold
    assert [(key[0], was, now) for key, was, now in diff["status_changed"]] == [("swiglu", "ok", "error")]
    assert [key[0] for key in diff["only_old"]] == ["geglu"]
    assert [key[0] for key in diff["only_new"]] == ["decode"]


def test_compare_cli_prints_faster_and_slower(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(OLD))
    new.write_text(json.dumps(NEW))
    result = run_suite("--compare", str(old), str(new), timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    faster = [line for line in lines if line.strip().startswith("faster ")]
    slower = [line for line in lines if line.strip().startswith("slower ")]
    assert len(faster) == 1 and "attention" in faster[0] and "2.00x" in faster[0]
    assert len(slower) == 1 and "layer_norm" in slower[0] and "0.83x" in slower[0]
    assert "unchanged: 1" in result.stdout
    assert "swiglu" in result.stdout and "ok -> error" in result.stdout
    assert not (tmp_path / "results.json").exists()  # comparing two files runs nothing


def test_ratios_use_the_fastest_peer():
    def row(impl, ours, ms, status="ok"):
        return {"op": "rms_norm", "pass": "fwd", "impl": impl, "ours": ours, "config": "N=1024",
                "dtype": "bf16", "device": "cuda", "status": status, "median_ms": ms,
                "best_peer": None, "ratio_to_best_peer": None}
    rows = [row("fast_attn:triton", True, 0.5), row("torch:eager", False, 2.0),
            row("torch.compile", False, 1.0), row("liger", False, 0.1, status="error")]
    report.add_ratios(rows)
    assert rows[0]["best_peer"] == "torch.compile" and rows[0]["ratio_to_best_peer"] == 2.0
    assert rows[1]["ratio_to_best_peer"] is None  # peers get no ratio


def test_fast_block_matches_the_torch_layer():
    """The block of fast_attn ops computes what nn.TransformerEncoderLayer computes, so
    their timings compare the same work (train and eval mode, causal, fp32)."""
    import torch
    from torch import nn

    from benchmarks.bench_block import _FastBlock

    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    block = _FastBlock(layer)
    x = torch.randn(2, 17, 64)
    mask = nn.Transformer.generate_square_subsequent_mask(17)
    torch.testing.assert_close(block(x), layer(x, src_mask=mask, is_causal=True))
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), layer(x, src_mask=mask, is_causal=True))


def test_context_parallel_subcommand_measures_each_scheme(tmp_path):
    """`python -m benchmarks context_parallel` runs the ring and all-to-all schemes on gloo ranks."""
    result = run_suite("context_parallel", "--sizes", "64", "--worlds", "2", "--reps", "2", "--warmup", "0",
                       "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "context_parallel.json").read_text())["results"]
    assert {(row["scheme"], row["world"]) for row in rows} >= {("ring", 2), ("ulysses", 2)}
    assert all(row["median_ms"] > 0 for row in rows)
