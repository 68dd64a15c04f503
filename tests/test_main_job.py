"""The README's main command, `bash scripts/dev.sh main [options]`, with each documented
option, in quick mode on one small op; and the routing of every option to the tool that
takes it (scripts/main_job.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("main_job", REPO / "scripts" / "main_job.py")
main_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(main_job)


def routed(*argv):
    return main_job.tool_commands(main_job.parse(list(argv)), Path("/out"))


def test_each_option_reaches_the_tools_that_take_it():
    verify, bench = routed("--quick", "--interpret", "--dtype", "fp32", "--ops", "norm", "--backends",
                           "torch,triton", "--seed", "7", "--compare", "old.json", "--budget-s", "60")
    assert verify == ["fast_attn.verify", "--quick", "--interpret", "--dtype", "fp32", "--seed", "7",
                      "--backends", "torch,triton", "--ops", "layer_norm,rms_norm"]
    assert bench == ["benchmarks", "--out", "/out", "--quick", "--dtype", "fp32", "--seed", "7",
                     "--backends", "torch,triton", "--compare", "old.json", "--budget-s", "60.0", "--ops", "norm"]


def test_ops_only_one_tool_knows_leave_the_other_out():
    assert routed("--ops", "block") == (None, ["benchmarks", "--out", "/out", "--ops", "block"])
    assert routed("--ops", "attention_varlen")[1] is None
    verify, bench = routed("--ops", "rotary")
    assert verify[-1] == "rotary" and bench is None  # no rotary benchmark yet
    verify, bench = routed("--ops", "attention,decode")
    assert verify[-1] == "attention,attention_varlen,attention_with_kvcache" and bench[-1] == "attention,decode"


@pytest.mark.parametrize("argv, message", [
    (["--ops", "softmax"], "unknown op ['softmax']"),
    (["--backends", "cudnn"], "unknown backend ['cudnn']"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_options_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_job.parse(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_tools_accept_what_they_are_given():
    """Each tool's own parser takes every option the main job routes to it."""
    from benchmarks.__main__ import _parse as bench_parse
    from fast_attn.verify import _parse as verify_parse

    verify, bench = routed("--quick", "--interpret", "--dtype", "fp32", "--ops", "norm,ffn,attention,decode",
                           "--backends", "torch", "--seed", "1", "--budget-s", "5")
    verify_parse(verify[1:])
    bench_parse(bench[1:])
    for dtype in main_job.DTYPES:
        verify_parse(["--dtype", dtype])
        bench_parse(["--dtype", dtype])


def dev_main(tmp_path, name, *options):
    """`bash scripts/dev.sh main --quick --ops rms_norm --out DIR OPTIONS` in the checkout."""
    out = tmp_path / name
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(["bash", "scripts/dev.sh", "main", "--quick", "--ops", "rms_norm", "--out", str(out),
                             *options], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "up to date" in result.stdout, "set-up reinstalled an unchanged checkout"
    assert (out / "report.md").is_file() and "cells, 0 failure(s)" in (out / "verify.txt").read_text()
    return out, json.loads((out / "results.json").read_text()), result.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="scripts/dev.sh is for Linux")
def test_the_readme_main_command_runs_with_each_documented_option(tmp_path):
    plain, results, _ = dev_main(tmp_path, "plain")
    assert results["settings"]["quick"] and {row["op"] for row in results["rows"]} == {"rms_norm"}

    interpreted, _, stdout = dev_main(tmp_path, "interpret", "--interpret", "--backends", "torch,triton")
    verify_log = (interpreted / "verify.txt").read_text()
    assert "--interpret" in stdout and " triton " in verify_log and "rms_norm" in verify_log

    _, results, stdout = dev_main(tmp_path, "fp32", "--dtype", "fp32", "--seed", "3", "--budget-s", "600",
                                  "--compare", str(plain / "results.json"))
    assert results["settings"]["dtype"] == "fp32" and results["settings"]["seed"] == 3
    assert "== compare" in stdout


def test_the_main_command_refuses_an_unknown_option():
    result = subprocess.run(["bash", "scripts/dev.sh", "main", "--quick", "--nonsense"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unrecognized arguments: --nonsense" in result.stderr
