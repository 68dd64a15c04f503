"""``python -m fast_attn.verify``: its options (--ops, --dtype, --backends validated with a
clear usage error) and its progress output, on one small op with the torch backend."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fast_attn import backends, verify

REPO_ROOT = Path(__file__).resolve().parents[1]


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        verify._parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_op_is_a_usage_error(capsys):
    err = _usage_error(capsys, ["--ops", "rms_norm,bogus"])
    assert "argument --ops: unknown op 'bogus'" in err
    assert ",".join(backends.OPS) in err  # the choices are listed


def test_unknown_dtype_is_a_usage_error(capsys):
    err = _usage_error(capsys, ["--dtype", "fp32,fp8"])
    assert "argument --dtype: unknown dtype 'fp8'; choose from fp16,bf16,fp32" in err


def test_unknown_backend_is_a_usage_error(capsys):
    err = _usage_error(capsys, ["--backends", "torch,tpu"])
    assert "argument --backends: unknown backend 'tpu'" in err


def test_options_parse():
    args = verify._parse(["--ops", "rms_norm,attention,rms_norm", "--dtype", "fp32,bf16", "--backends", "torch",
                          "--seed", "7", "--quick"])
    assert args.ops == ["rms_norm", "attention"] and args.dtype == ["fp32", "bf16"]
    assert args.backends == ["torch"] and args.seed == 7 and args.quick
    assert verify._parse([]).ops == list(backends.OPS)
    assert tuple(verify._BACKENDS) == backends.BACKENDS


def test_help_names_every_op(capsys):
    with pytest.raises(SystemExit):
        verify._parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(op in text for op in backends.OPS)


def test_one_op_runs_and_prints_its_progress(capsys):
    code = verify.main(["--ops", "rms_norm", "--quick", "--backends", "torch", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    lines = out.splitlines()
    plan = [line for line in lines if line.endswith("checks: 1 op(s) x backends ['torch'] x dtypes ['fp32'] (quick)")]
    assert len(plan) == 1
    total = int(plan[0].split()[0])
    assert total > 0
    assert any(line.split()[:4] == ["rms_norm", "torch", str(total), "checks,"] for line in lines)
    assert "layer_norm" not in out  # only the selected op
    assert f"{total} cells, 0 failure(s)" in out  # the matrix and its closing line, unchanged


def test_progress_prints_a_line_when_quiet_too_long():
    stream = io.StringIO()
    progress = verify._Progress(3, stream=stream, tty=False, every_s=0.05)
    progress.begin("rms_norm torch rms_norm-37x7 (fp32)")
    time.sleep(1.3)  # the ticker looks every min(every_s, 1 s)
    progress.advance()
    progress.print("  rms_norm torch 3 checks")
    progress.close()
    lines = stream.getvalue().splitlines()
    ticks = [line for line in lines if line.startswith("  ... [0/3 checks] rms_norm torch rms_norm-37x7 (fp32), ")]
    assert ticks and lines[-1] == "  rms_norm torch 3 checks"
    assert "\r" not in stream.getvalue()  # no terminal control in a log


def test_progress_on_a_terminal_is_one_updating_line():
    stream = io.StringIO()
    progress = verify._Progress(2, stream=stream, tty=True)
    progress.begin("swiglu torch swiglu-37x7 (bf16)")
    progress.advance()
    progress.print("  swiglu torch 2 checks")
    progress.close()
    text = stream.getvalue()
    assert "\r\x1b[K[0/2 checks] swiglu torch swiglu-37x7 (bf16), 0 s elapsed" in text
    assert "\r\x1b[K[1/2 checks]" in text
    assert "\r\x1b[K  swiglu torch 2 checks\n" in text  # a normal line clears the status line first
    assert text.endswith("\r\x1b[K")  # and the status line is gone at the end


def test_command_line_usage_error_exit_code():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "fast_attn.verify", "--ops", "nope"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown op 'nope'" in result.stderr
