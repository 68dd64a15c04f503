"""Compile csrc files one at a time with the extension's flags, without linking: a fast
check of a kernel file while it is being written (a full build compiles everything).

    .venv/bin/python scripts/compile_check.py csrc/norm/norm.cu [more files] [--arch 9.0a]

.cu files go through nvcc for each arch in TORCH_CUDA_ARCH_LIST (default 8.0;9.0a, or
--arch), .cpp files through the host compiler with torch's headers. Objects land in a
temporary directory and are deleted. Prints each command's time; exits non-zero on the
first failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fast_attn"))
import _build_config as cfg  # noqa: E402  (by path: importing fast_attn would import torch twice)


def _torch_includes() -> list[str]:
    import torch
    from torch.utils import cpp_extension

    site_packages = Path(torch.__file__).resolve().parent.parent
    dirs = [str(p) for p in cpp_extension.include_paths()]
    flags = [f"-I{d}" for d in dirs] + [f"-I{sysconfig.get_paths()['include']}"]
    cuda_major = (torch.version.cuda or "13").split(".")[0]
    return flags + cfg.cxx_include_flags(cfg.wheel_cuda_include_dirs(site_packages, cuda_major))


def _commands(source: Path, archs: list[str], out_dir: Path, cuda_home: Path) -> list[list[str]]:
    obj = out_dir / (source.stem + ".o")
    cuda_include = f"-I{cuda_home / 'include'}"
    if source.suffix == ".cpp":
        return [["c++", "-std=c++20", "-fPIC", *cfg.CXX_FLAGS, f"-I{ROOT / 'csrc'}", cuda_include,
                 *_torch_includes(), "-c", str(source), "-o", str(obj)]]
    commands = []
    arch_list = ";".join(archs)
    hopper, _ = cfg.hopper_nvcc_flags(arch_list, cfg.cutlass_include_dir(sys.path))
    for arch in archs:
        code = arch.replace(".", "")
        extra = hopper if arch.startswith("9.0a") else [f for f in hopper if not f.startswith("-DFAST")]
        commands.append([str(cuda_home / "bin" / "nvcc"), "-std=c++20", *cfg.NVCC_FLAGS, *extra,
                         f"-gencode=arch=compute_{code},code=sm_{code}", f"-I{ROOT / 'csrc'}",
                         "-c", str(source), "-o", str(obj)])
    return commands


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--arch", action="append", help="e.g. 8.0 or 9.0a (repeatable)")
    args = parser.parse_args()
    archs = args.arch or cfg.cuda_arch_list(os.environ).split(";")
    cuda_home, note = cfg.find_cuda_home(os.environ, None, cfg.cuda_home_candidates())
    if cuda_home is None:
        print(f"compile_check: no CUDA toolkit: {note}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as out_dir:
        for source in args.sources:
            for command in _commands(source.resolve(), archs, Path(out_dir), cuda_home):
                start = time.perf_counter()
                result = subprocess.run(command)
                label = next((c for c in command if c.startswith("-gencode")), "host")
                print(f"compile_check: {source} [{label}] {'ok' if result.returncode == 0 else 'FAILED'} "
                      f"in {time.perf_counter() - start:.1f} s", flush=True)
                if result.returncode:
                    return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
