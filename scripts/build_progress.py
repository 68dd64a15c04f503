"""Condenses `pip install -v -e .` output to the lines a person waiting for it wants.

scripts/dev.sh pipes the install's output through this filter (the full log goes to
build/install.log). It keeps setup.py's own ``fast_attn: ...`` lines (what is built and
why) and turns each of ninja's ``[3/40] <compiler command>`` lines into
``[ 3/40]  2m05s  csrc/attention/fwd_sm90_hdim128.cu``: the step, the time since the
install started, and the source file being compiled (or "link").
"""

from __future__ import annotations

import re
import sys
import time

NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")
SOURCE = re.compile(r"\s-c\s+([^\s-]\S*)")  # the compiler's input file (torch writes "-c -c FILE")
CSRC = re.compile(r"(csrc/\S+)$")


def describe(command: str) -> str:
    """The source a ninja step compiles, relative to the checkout, or what it does."""
    source = SOURCE.search(command)
    if source is None:
        return "link" if " -shared" in command or command.lstrip().startswith(("c++", "g++")) else command[:80]
    path = source.group(1)
    within = CSRC.search(path)
    return within.group(1) if within else path


def main() -> int:
    start = time.monotonic()
    said = set()  # pip runs setup.py more than once: each of its lines is said once
    for line in sys.stdin:
        text = line.rstrip("\n")
        stripped = text.strip()
        if stripped.startswith("fast_attn:"):
            if stripped not in said:
                said.add(stripped)
                print(stripped, flush=True)
            continue
        step = NINJA_STEP.match(text)
        if step:
            done, total, command = step.groups()
            elapsed = int(time.monotonic() - start)
            print(f"  [{int(done):{len(total)}d}/{total}] {elapsed // 60:3d}m{elapsed % 60:02d}s  "
                  f"{describe(command)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
