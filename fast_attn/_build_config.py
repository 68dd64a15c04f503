"""Build configuration of the fast_attn CUDA extension: pure functions, standard library only.

Both builds of the extension use this file, so they compile the same sources with the
same flags:

* ahead of time, `setup.py` loads it by path (it must not import the `fast_attn`
  package, which needs torch and would pick up a stale installed copy) and builds
  `fast_attn._C` with `torch.utils.cpp_extension.CUDAExtension`;
* just in time, `fast_attn/_extension.py` imports it and hands the same source list and
  flags to `torch.utils.cpp_extension.load`.

Nothing here reads the process environment or probes the machine on its own: every
function takes the environment mapping, paths or numbers it needs as arguments, so the
CPU tests can drive it with fakes (`tests/test_build.py`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

EXTENSION_NAME = "fast_attn._C"
JIT_EXTENSION_NAME = "fast_attn_C"  # torch's JIT loader wants a plain identifier

# `csrc/ops.cpp` holds the one TORCH_LIBRARY block; its presence marks a csrc tree as ours.
MARKER_SOURCE = "ops.cpp"
SOURCE_SUFFIXES = (".cu", ".cpp")
HEADER_SUFFIXES = (".h", ".cuh")
PACKAGED_CSRC_DIR = "_csrc"  # installed copy of csrc/, inside the fast_attn package

BUILD_CUDA_ENV = "FAST_ATTN_BUILD_CUDA"
ARCH_LIST_ENV = "TORCH_CUDA_ARCH_LIST"
MAX_JOBS_ENV = "MAX_JOBS"
CUDA_HOME_ENVS = ("CUDA_HOME", "CUDA_PATH")

# A100 (sm_80) and H100 (sm_90a, the arch-specific target that wgmma/TMA kernels need).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"

# Peak resident memory of one compiler job, with margin: cc1plus on a translation unit
# that includes torch/library.h peaks near 1.5 GB, cicc on a template-heavy .cu higher.
MEMORY_PER_COMPILE_JOB = 4 * 2**30

# -lineinfo keeps source lines in the cubin for compute-sanitizer and Nsight at no
# runtime cost. No --use_fast_math: the exact-erf GELU must use the accurate erff/expf.
NVCC_FLAGS = ("-O3", "-lineinfo")
CXX_FLAGS = ("-O3",)

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_AUTO_WORDS = frozenset({"", "auto"})
_CUDA_VERSION_RE = re.compile(r"^\s*#\s*define\s+CUDA_VERSION\s+(\d+)", re.MULTILINE)
_CUDA_DIR_VERSION_RE = re.compile(r"^cuda-(\d+)(?:\.(\d+))?$")


class BuildMode(enum.Enum):
    """What `FAST_ATTN_BUILD_CUDA` asks for."""

    AUTO = "auto"  # unset: build when torch has CUDA and nvcc is found
    FORCE = "force"  # =1: build, and fail the install when that is impossible
    SKIP = "skip"  # =0: never compile


class CudaBuildUnavailable(RuntimeError):
    """`FAST_ATTN_BUILD_CUDA=1` was given but the extension cannot be built here."""


def build_mode(env: Mapping[str, str]) -> BuildMode:
    """Parse `FAST_ATTN_BUILD_CUDA` from `env` (unset or "auto", 1/true/yes/on, 0/false/no/off)."""
    raw = env.get(BUILD_CUDA_ENV)
    value = "" if raw is None else raw.strip().lower()
    if value in _AUTO_WORDS:
        return BuildMode.AUTO
    if value in _TRUE_WORDS:
        return BuildMode.FORCE
    if value in _FALSE_WORDS:
        return BuildMode.SKIP
    raise ValueError(
        f"{BUILD_CUDA_ENV}={raw!r} is not understood: expected 1 (build, fail if impossible), "
        f"0 (never build) or unset/'auto' (build when possible)"
    )


def cuda_arch_list(env: Mapping[str, str]) -> str:
    """`TORCH_CUDA_ARCH_LIST` from `env` when set and non-empty, else `DEFAULT_CUDA_ARCH_LIST`."""
    value = env.get(ARCH_LIST_ENV, "").strip()
    return value or DEFAULT_CUDA_ARCH_LIST


def jit_arch_list(env: Mapping[str, str], capability: tuple[int, int] | None) -> str:
    """The arch list of a JIT build: `TORCH_CUDA_ARCH_LIST` when set, else the current GPU's.

    Hopper (9.0) becomes "9.0a", the arch-specific target its wgmma/TMA kernels need
    (torch's own default would be plain 9.0). Without a GPU, the AOT default.
    """
    value = env.get(ARCH_LIST_ENV, "").strip()
    if value:
        return value
    if capability is None:
        return DEFAULT_CUDA_ARCH_LIST
    major, minor = capability
    return f"{major}.{minor}a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def max_jobs(env: Mapping[str, str], cpu_count: int | None, available_memory: int | None) -> int:
    """Number of parallel compiler jobs: `MAX_JOBS` when set, else sized from the machine.

    Unset, it is `min(cpu_count, available_memory // MEMORY_PER_COMPILE_JOB)`, at least 1,
    so a small CI machine does not run out of memory compiling several torch-header
    translation units at once. An unknown `cpu_count` counts as 1; an unknown
    `available_memory` does not limit.
    """
    raw = env.get(MAX_JOBS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{MAX_JOBS_ENV}={raw!r} must be a positive integer")
        return int(raw)
    jobs = max(cpu_count or 1, 1)
    if available_memory is not None:
        jobs = min(jobs, available_memory // MEMORY_PER_COMPILE_JOB)
    return max(jobs, 1)


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """`MemAvailable` from a Linux /proc/meminfo style file, in bytes; None if unreadable."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def source_files(csrc_dir: Path) -> list[Path]:
    """Every .cu and .cpp file under `csrc_dir`, recursively, sorted: the extension's sources."""
    return _files_with_suffix(csrc_dir, SOURCE_SUFFIXES)


def packaged_files(csrc_dir: Path) -> list[Path]:
    """Sources and headers under `csrc_dir`: what an installed copy needs for a JIT build."""
    return _files_with_suffix(csrc_dir, SOURCE_SUFFIXES + HEADER_SUFFIXES)


def _files_with_suffix(root: Path, suffixes: Iterable[str]) -> list[Path]:
    wanted = tuple(suffixes)
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix in wanted)


def is_csrc_dir(path: Path) -> bool:
    """True when `path` is a fast_attn csrc tree (holds the TORCH_LIBRARY file)."""
    return (Path(path) / MARKER_SOURCE).is_file()


def is_cuda_home(path: Path) -> bool:
    """True when `path` looks like a CUDA toolkit root: bin/nvcc and include/cuda_runtime.h."""
    path = Path(path)
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def cuda_toolkit_version(cuda_home: Path) -> tuple[int, int] | None:
    """(major, minor) of the toolkit at `cuda_home`, from CUDA_VERSION in include/cuda.h."""
    try:
        text = (Path(cuda_home) / "include" / "cuda.h").read_text(errors="replace")
    except OSError:
        return None
    match = _CUDA_VERSION_RE.search(text)
    if match is None:
        return None
    number = int(match.group(1))  # e.g. 13000 for 13.0, 12080 for 12.8
    return number // 1000, (number % 1000) // 10


def cuda_home_candidates(
    parents: Sequence[Path] = (Path("/usr/local"), Path("/opt")),
    prefer_version: str | None = None,
) -> list[Path]:
    """Conventional toolkit locations under `parents`, most wanted first.

    `<parent>/cuda-<prefer_version>` (the toolkit matching torch's CUDA) comes first, then
    `<parent>/cuda`, then the other `<parent>/cuda-X.Y` newest first. Only existing
    directories are returned.
    """
    preferred: list[Path] = []
    plain: list[Path] = []
    versioned: list[tuple[tuple[int, int], Path]] = []
    for parent in parents:
        parent = Path(parent)
        if not parent.is_dir():
            continue
        if (parent / "cuda").is_dir():
            plain.append(parent / "cuda")
        for child in parent.iterdir():
            match = _CUDA_DIR_VERSION_RE.match(child.name)
            if match is None or not child.is_dir():
                continue
            if prefer_version is not None and child.name == f"cuda-{prefer_version}":
                preferred.append(child)
            else:
                versioned.append(((int(match.group(1)), int(match.group(2) or 0)), child))
    versioned.sort(key=lambda item: item[0], reverse=True)
    return preferred + plain + [path for _, path in versioned]


def find_cuda_home(
    env: Mapping[str, str],
    nvcc_on_path: str | None,
    candidates: Sequence[Path] = (),
) -> tuple[Path | None, str]:
    """Locate the CUDA toolkit; returns (root or None, how it was found or why not).

    Order: `CUDA_HOME` / `CUDA_PATH` from `env` (used as given: a wrong explicit value is
    reported, never silently replaced); the toolkit around `nvcc_on_path` after resolving
    symlinks (a wrapper script elsewhere, like /usr/local/bin/nvcc, does not count);
    then `candidates` (see `cuda_home_candidates`).
    """
    for name in CUDA_HOME_ENVS:
        value = env.get(name, "").strip()
        if value:
            path = Path(value)
            if is_cuda_home(path):
                return path, f"{name}={value}"
            return None, f"{name}={value} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)"
    if nvcc_on_path:
        root = Path(nvcc_on_path).resolve().parent.parent
        if is_cuda_home(root):
            return root, f"nvcc on PATH ({nvcc_on_path})"
    for path in candidates:
        if is_cuda_home(path):
            return Path(path), f"found at {path}"
    return None, "nvcc not found; set CUDA_HOME to the CUDA toolkit root"


def wheel_cuda_include_dirs(site_packages: Path, cuda_major: str | int) -> list[Path]:
    """`<site-packages>/nvidia/cu<major>/include` when it exists, else [].

    CUDA torch wheels ship the cuBLAS/cuSPARSE headers there; ATen's CUDA headers include
    them and a bare toolkit install may lack them.
    """
    path = Path(site_packages) / "nvidia" / f"cu{cuda_major}" / "include"
    return [path] if path.is_dir() else []


def cutlass_include_dir(search_paths: Iterable[str | Path]) -> Path | None:
    """The CUTLASS/CuTe headers of the `nvidia-cutlass` wheel, if installed on `search_paths`.

    The wheel installs the package `cutlass_library` with the headers under
    `source/include` (cute/tensor.hpp, cutlass/cutlass.h). `search_paths` is sys.path.
    Looked up by path, not imported: importing the package pulls in its own dependencies.
    """
    for entry in search_paths:
        include = Path(entry) / "cutlass_library" / "source" / "include"
        if (include / "cute" / "tensor.hpp").is_file():
            return include
    return None


def hopper_nvcc_flags(arch_list: str, cutlass_include: Path | None) -> tuple[list[str], str]:
    """nvcc flags that build the sm_90a attention kernels, and a one-line reason.

    They need the arch-specific target 9.0a in `arch_list` (wgmma and TMA exist only
    there) and the CuTe headers; without either, those files compile to stubs and the
    attention ops run the sm_80 kernels on Hopper too. CuTe needs relaxed constexpr.
    """
    archs = {a.strip() for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()}
    if not any(a.startswith("9.0a") for a in archs):
        return [], f"{ARCH_LIST_ENV}={arch_list} has no 9.0a: the sm_90a attention kernels are not built"
    if cutlass_include is None:
        return [], "the nvidia-cutlass wheel (CuTe headers) is not installed: the sm_90a attention kernels are not built"
    flags = ["-DFAST_ATTN_HAVE_SM90=1", "--expt-relaxed-constexpr", f"-I{cutlass_include}"]
    return flags, f"sm_90a attention kernels built with CuTe from {cutlass_include}"


def cxx_include_flags(dirs: Iterable[Path]) -> list[str]:
    """`-idirafter DIR` for each dir: searched after the toolkit's own headers, never before."""
    flags: list[str] = []
    for path in dirs:
        flags += ["-idirafter", str(path)]
    return flags


def plan_cuda_build(
    mode: BuildMode,
    torch_version: str | None,
    torch_cuda_version: str | None,
    cuda_home: Path | None,
    cuda_home_note: str,
    *,
    have_sources: bool = True,
    device_present: bool = True,
) -> tuple[bool, str]:
    """Decide whether to build the extension; returns (build, one-line reason).

    `torch_version` is None when torch is not importable; `torch_cuda_version` is
    `torch.version.cuda`; `have_sources` says whether the csrc/ tree is present (an
    sdist made without it has none); `device_present` whether a CUDA device is visible.
    AUTO builds only where a device is present: elsewhere the library could not load,
    and the build costs minutes (the cuda backend JIT-builds on first use instead).
    FORCE builds without a device (CI proves csrc/ compiles that way). Raises
    `CudaBuildUnavailable` when `mode` is FORCE and the build is impossible.
    """
    if mode is BuildMode.SKIP:
        return False, f"{BUILD_CUDA_ENV}=0"
    if not have_sources:
        reason = "csrc/ sources not found"
    else:
        reason = _cannot_build_reason(torch_version, torch_cuda_version, cuda_home, cuda_home_note)
    if reason is None and mode is BuildMode.AUTO and not device_present:
        return False, f"no CUDA device here ({BUILD_CUDA_ENV}=1 builds it anyway)"
    if reason is None:
        return True, f"torch {torch_version} with CUDA {torch_cuda_version}, toolkit at {cuda_home} ({cuda_home_note})"
    if mode is BuildMode.FORCE:
        raise CudaBuildUnavailable(f"{BUILD_CUDA_ENV}=1 but the CUDA extension cannot be built: {reason}")
    return False, reason


def _cannot_build_reason(
    torch_version: str | None,
    torch_cuda_version: str | None,
    cuda_home: Path | None,
    cuda_home_note: str,
) -> str | None:
    if torch_version is None:
        return "torch is not importable at build time (install torch first and use --no-build-isolation)"
    if torch_cuda_version is None:
        return f"torch {torch_version} was built without CUDA"
    if cuda_home is None:
        return cuda_home_note
    toolkit = cuda_toolkit_version(cuda_home)
    torch_major = torch_cuda_version.split(".")[0]
    if toolkit is not None and str(toolkit[0]) != torch_major:
        return (
            f"the CUDA toolkit at {cuda_home} is {toolkit[0]}.{toolkit[1]} but torch was built "
            f"with CUDA {torch_cuda_version}; point CUDA_HOME at a {torch_major}.x toolkit"
        )
    return None
