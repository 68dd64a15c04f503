"""scripts/sanitize.sh and its driver scripts/sanitize_cases.py, without a GPU.

The script's syntax (``bash -n``); the driver's --help, --list and argument errors (no
GPU, no torch needed); its parser of compute-sanitizer logs; and the script end to end
with a stand-in ``compute-sanitizer`` (prints a chosen summary) and a stand-in
interpreter (answers the preflight and runs no kernels): the per-tool summary lines,
the exit status, and the NOT RUN / usage / missing-sanitizer paths.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "sanitize.sh"
DRIVER = REPO / "scripts" / "sanitize_cases.py"
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")


def load_driver():
    spec = importlib.util.spec_from_file_location("sanitize_cases", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sanitize_cases"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_driver_help_needs_no_gpu():
    result = subprocess.run([sys.executable, str(DRIVER), "--help"], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    for option in ("--groups", "--size", "--archs", "--list", "--check-only", "--summarize"):
        assert option in result.stdout


def test_driver_lists_cases_without_importing_torch():
    code = textwrap.dedent(f"""\
        import runpy, sys
        sys.argv = ["sanitize_cases.py", "--list", "--size", "tiny", "--groups", "attention,norm"]
        try:
            runpy.run_path({str(DRIVER)!r}, run_name="__main__")
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        assert "torch" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("attention[sm80] ") for line in lines)
    assert any(line.startswith("attention[auto] ") for line in lines)
    assert any(line.startswith("norm ") for line in lines)
    assert not any(line.startswith(("varlen", "glu")) for line in lines)


def test_driver_cases_cover_the_brief():
    driver = load_driver()
    small = driver.attention_cases("small")
    assert {c.head_dim for c in small} >= {64, 128, 256} and any(c.head_dim not in (64, 128, 256) for c in small)
    assert any(c.causal for c in small) and any(not c.causal for c in small)
    assert any(c.seqlen_q == c.seqlen_k == 77 for c in small)
    assert any(c.heads != c.kv_heads for c in small)
    assert {c.head_dim for c in driver.attention_cases("tiny")} >= {64, 128, 256}
    assert any(0 in c.lens_q + c.lens_k for c in driver.varlen_cases("small"))
    assert any(len(c.cache_seqlens) == 1 and c.seqlen_q == 1 and c.cache_len >= 4096
               for c in driver.kvcache_cases("small"))
    for cases in (driver.norm_cases, driver.glu_cases, driver.bias_gelu_cases):
        assert any(c.width % 2 for c in cases("small")), "odd widths"
    steps = driver.plan(list(driver.GROUPS), "small", ["sm80", "auto"])
    assert {arch for _, group, arch, _ in steps if group in driver.ATTENTION_GROUPS} == {"sm80", "auto"}


@pytest.mark.parametrize("argv", [["--groups", "attention,bogus"], ["--archs", "sm70"], ["--size", "huge"]])
def test_driver_rejects_bad_arguments(argv):
    result = subprocess.run([sys.executable, str(DRIVER), *argv, "--list"], capture_output=True, text=True)
    assert result.returncode == 2 and "error" in result.stderr


@pytest.mark.parametrize(("log", "expected"), [
    ("========= COMPUTE-SANITIZER\nok\n========= ERROR SUMMARY: 0 errors\n", (0, 0)),
    ("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 1 error\n", (1, 0)),
    ("========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)\n", (2, 1)),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
     "========= ERROR SUMMARY: 0 errors\n", (0, 0)),
    ("Traceback (most recent call last):\nRuntimeError: boom\n", None),
])
def test_summarize_reads_sanitizer_logs(log, expected):
    assert load_driver().summarize(log) == expected


# ------------------------------------------------------------ the script end to end

FAKE_SANITIZER = textwrap.dedent("""\
    #!/usr/bin/env bash
    # stand-in compute-sanitizer: runs the command after the options, then prints the
    # summary of $FAKE_ERRORS_<tool> errors
    if [ "$1" = --version ]; then echo "Compute Sanitizer stand-in"; exit 0; fi
    tool=memcheck
    while [ "${1#--}" != "$1" ]; do
      [ "$1" = --tool ] && tool=$2
      shift 2
    done
    "$@"
    rc=$?
    var="FAKE_ERRORS_$tool"
    errors=${!var:-0}
    if [ "$tool" = racecheck ]; then
      echo "========= RACECHECK SUMMARY: $errors hazards displayed ($errors errors, 0 warnings)"
    else
      echo "========= ERROR SUMMARY: $errors errors"
    fi
    [ "$errors" -gt 0 ] && exit 1
    exit $rc
""")

FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # stand-in interpreter: the preflight passes, --summarize is the real driver's, and a
    # sanitized run "runs" one case (which fails with $FAKE_DRIVER_FAIL set)
    for arg in "$@"; do
      case "$arg" in
        --check-only) exit 0 ;;
        --summarize) exec {python} "$@" ;;
      esac
    done
    if [ -n "${{FAKE_DRIVER_FAIL:-}}" ]; then
      echo "FAIL attention[sm80] stand-in: RuntimeError: boom"
      echo "sanitize_cases: 0/1 cases ran"
      exit 1
    fi
    echo "ok   attention[sm80] stand-in"
    echo "sanitize_cases: 1/1 cases ran"
""")


@pytest.fixture
def stand_ins(tmp_path):
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text(FAKE_SANITIZER)
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    for path in (sanitizer, python):
        path.chmod(0o755)
    return {"SANITIZER": str(sanitizer), "PYTHON": str(python), "OUT": str(tmp_path / "out")}


def run_script(env, *tools):
    return subprocess.run(["bash", str(SCRIPT), *tools], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def summary_lines(stdout: str) -> dict:
    lines = stdout.split("== sanitize summary")[1].splitlines()[1:]
    return {line.split()[0]: line for line in lines if line.strip()}


def test_script_all_clean(stand_ins):
    result = run_script(stand_ins)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = summary_lines(result.stdout)
    assert set(lines) == set(TOOLS)
    assert "0 errors (exit 0)" in lines["memcheck"] and "0 errors, 0 warnings" in lines["racecheck"]
    for tool in TOOLS:
        assert (Path(stand_ins["OUT"]) / f"{tool}.log").exists()


def test_script_reports_errors_and_fails(stand_ins):
    result = run_script({**stand_ins, "FAKE_ERRORS_memcheck": "3", "FAKE_ERRORS_racecheck": "2"}, "memcheck",
                        "racecheck", "synccheck")
    assert result.returncode == 1
    lines = summary_lines(result.stdout)
    assert "3 errors (exit 1)" in lines["memcheck"]
    assert "2 errors, 0 warnings (exit 1)" in lines["racecheck"]
    assert "0 errors (exit 0)" in lines["synccheck"]


def test_script_fails_when_a_driver_case_fails(stand_ins):
    result = run_script({**stand_ins, "FAKE_DRIVER_FAIL": "1"}, "memcheck")
    assert result.returncode == 1
    assert "0 errors (exit 1), 1 driver case(s) FAILED" in summary_lines(result.stdout)["memcheck"]


def test_script_budget_spent_is_not_run(stand_ins):
    result = run_script({**stand_ins, "SANITIZE_BUDGET_S": "0"}, "memcheck")
    assert result.returncode == 1 and "NOT RUN" in summary_lines(result.stdout)["memcheck"]


def test_script_usage_and_missing_sanitizer(stand_ins, tmp_path):
    assert run_script(stand_ins, "helgrind").returncode == 2
    missing = {**stand_ins, "SANITIZER": str(tmp_path / "nowhere")}
    result = run_script(missing, "memcheck")
    assert result.returncode == 2 and "compute-sanitizer not found" in result.stderr
