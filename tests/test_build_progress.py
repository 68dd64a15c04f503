"""scripts/build_progress.py: the install's output condensed to what the build is doing."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_progress.py"

PIP_OUTPUT = """\
Obtaining file:///work/x
  Running command Getting requirements to build editable
  fast_attn: building the CUDA extension fast_attn._C: torch 2.14.1+cu130 with CUDA 13.0
  fast_attn: building the CUDA extension fast_attn._C: torch 2.14.1+cu130 with CUDA 13.0
  [1/3] /usr/local/cuda/bin/nvcc -MD -MF /x/build/a.o.d -I/x/csrc -c -c /x/csrc/attention/fwd_sm90.cu -o /x/build/a.o -O3
  [2/3] c++ -MMD -MF /x/build/ops.o.d -I/x/csrc -c -c /x/csrc/ops.cpp -o /x/build/ops.o
  [3/3] c++ -shared /x/build/a.o /x/build/ops.o -o /x/fast_attn/_C.abi3.so
  copying build/lib/fast_attn/_C.abi3.so -> fast_attn
"""


def test_keeps_our_lines_once_and_names_each_compiled_file():
    result = subprocess.run([sys.executable, str(SCRIPT)], input=PIP_OUTPUT, capture_output=True, text=True,
                            check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "fast_attn: building the CUDA extension fast_attn._C: torch 2.14.1+cu130 with CUDA 13.0"
    assert [line.split()[-1] for line in lines[1:]] == ["csrc/attention/fwd_sm90.cu", "csrc/ops.cpp", "link"]
    assert lines[1].lstrip().startswith("[1/3]") and len(lines) == 4
