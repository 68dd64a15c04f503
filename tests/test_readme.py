"""The README is true where a test can tell: its CPU example runs as printed, and the
files it points users at are in the repository."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_cpu_usage_example_runs_as_printed(capsys):
    text = README.read_text()
    cpu_example = text.split("On a CPU (this runs as it is", 1)[1]
    code = _python_blocks(cpu_example)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (CPU example)", "exec"), namespace)  # noqa: S102
    assert namespace["q"].grad.shape == (2, 256, 8, 64)
    assert torch.isfinite(namespace["out"]).all() and namespace["lse"].shape == (2, 8, 256)
    assert namespace["y"].shape == namespace["h"].shape == (4, 128, 512)
    assert "torch" in capsys.readouterr().out


def test_files_the_readme_points_at_exist():
    text = README.read_text()
    root = README.parent
    paths = set(re.findall(r"`((?:docs|scripts|benchmarks|fast_attn|csrc|tests)/[\w./-]+\.(?:md|py|sh))`", text))
    paths |= set(re.findall(r"\]\(((?:docs|scripts|benchmarks)/[\w./-]+)\)", text))
    assert "docs/design.md" in paths
    missing = sorted(p for p in paths if not (root / p).exists())
    assert not missing, f"README.md points at files that are not in the repository: {missing}"
    assert "DESIGN.md`" not in text.replace("DESIGN_NOTES.md`", ""), "DESIGN.md lives outside the repository"
    assert "_MEASURED" not in text, "a figure still to be measured is left in the README"
