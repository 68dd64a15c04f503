"""``python -m benchmarks overhead`` end to end on CPU, in a subprocess.

The GPU is hidden (CUDA_VISIBLE_DEVICES=""), so on any machine this checks the CPU path.
It runs the test-only ``--smoke`` sizes (seconds, not a measurement): exit 0, the printed
tables, ``overhead.json`` with its keys, ``report.md``, and every ratio a positive finite
number. No timing is asserted: the numbers depend on the machine and its load.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120  # the smoke run takes ~10 s alone, more on a loaded machine
TOP_KEYS = {"schema", "env", "machine", "settings", "targets", "backends", "floor", "ops", "encoder", "notes",
            "elapsed_s"}
MACHINE_KEYS = {"cpu_model", "cpu_count", "threads_tiny", "threads_encoder", "loadavg_start", "loadavg_end"}
TINY_OPS = {"attention", "attention causal", "layer_norm", "rms_norm", "bias_gelu", "swiglu", "geglu"}
PASSES = {"fwd", "fwd+bwd"}
IMPLS = {"torch", "fast_attn", "fast_attn:torch"}
STATS_KEYS = {"median_us", "p20_us", "p80_us", "samples"}
ENCODER_MODE_KEYS = {"timings_ms", "speedup", "max_abs_diff", "fast_attn_calls", "fast_attn_calls_total",
                     "fast_attn_op_seconds", "counted_step_s"}


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_stats(stats: dict) -> None:
    assert STATS_KEYS <= set(stats)
    assert all(_positive_finite(stats[k]) for k in ("median_us", "p20_us", "p80_us"))
    assert stats["p20_us"] <= stats["median_us"] <= stats["p80_us"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "benchmarks", "overhead", "--smoke", "--out", str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return result, out


def test_runs_and_prints_the_tables(smoke_run):
    result, _ = smoke_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for title in ("== the floor", "== tiny ops", "== fast_attn.nn vs torch.nn"):
        assert title in result.stdout
    assert "load average" in result.stdout


def test_writes_json_and_markdown(smoke_run):
    _, out = smoke_run
    data = json.loads((out / "overhead.json").read_text())
    assert TOP_KEYS <= set(data)
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["settings"]["preset"] == "smoke"
    assert data["env"]["gpu"] is None and data["env"]["device"] == "cpu"
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# fast_attn op-layer overhead: CPU")
    assert "| op | pass |" in markdown


def test_floor_and_tiny_op_ratios_are_positive_finite(smoke_run):
    _, out = smoke_run
    data = json.loads((out / "overhead.json").read_text())
    assert set(data["floor"]) == PASSES
    for entry in data["floor"].values():
        _check_stats(entry["timings"]["plain_torch"])
        _check_stats(entry["timings"]["bare_custom_op"])
        assert _positive_finite(entry["ratio"])
    rows = data["ops"]
    assert {(r["op"], r["pass"]) for r in rows} == {(op, p) for op in TINY_OPS for p in PASSES}
    for row in rows:
        assert row["status"] == "ok", row["note"]
        assert set(row["timings"]) == IMPLS
        for stats in row["timings"].values():
            _check_stats(stats)
        for key in ("ratio_vs_torch", "ratio_torch_backend_vs_torch", "ratio_layer_vs_floor"):
            assert _positive_finite(row[key]), (row["op"], row["pass"], key)
        assert row["max_abs_diff"] < 1e-3  # fp32 at tiny sizes: the same maths as torch's


def test_encoder_section(smoke_run):
    _, out = smoke_run
    encoder = json.loads((out / "overhead.json").read_text())["encoder"]
    for mode in ("inference", "training"):
        entry = encoder[mode]
        assert ENCODER_MODE_KEYS <= set(entry)
        assert _positive_finite(entry["speedup"])
        assert set(entry["timings_ms"]) == {"torch.nn", "fast_attn.nn"}
        # the swapped model really ran fast_attn ops (no silent fallback to torch.nn)
        assert entry["fast_attn_calls"].get("fast_attn::attention_fwd", 0) >= encoder["config"]["layers"]
        assert entry["max_abs_diff"] < 1e-3
    assert "fast_attn::attention_bwd" in encoder["training"]["fast_attn_calls"]
    assert "fast_attn::attention_bwd" not in encoder["inference"]["fast_attn_calls"]


def test_default_command_keeps_its_options(capsys):
    """The subcommand leaves ``python -m benchmarks``'s own options alone, and each
    command's --help names its options (in-process: no second interpreter start)."""
    if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--compare" in text and "overhead" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["overhead", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--quick" in text and "--out" in text and "--smoke" not in text
