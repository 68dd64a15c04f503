"""Access to the CUDA extension: the ahead-of-time build `fast_attn._C`, or a JIT build.

`extension_status()` says cheaply, without compiling, whether the CUDA kernels can be had
here and why (not). `load_extension()` gets them: it imports `fast_attn._C` (built by
setup.py), or else compiles the same csrc/ sources with the same flags
(fast_attn/_build_config.py) through `torch.utils.cpp_extension.load` (ninja) into torch's
extension cache and loads the library. Either way the `torch.ops.fast_attn.cuda_*` ops are
registered afterwards. A JIT build targets the GPUs visible at build time.

The JIT build compiles from the installed copy `fast_attn/_csrc/` (regular installs) or the
checkout's `csrc/` (editable installs). Importing this module compiles nothing and does
not touch the GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from fast_attn import _build_config as _cfg

logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent

_lock = threading.Lock()
_loaded: str | None = None  # what load_extension loaded, once it has
_failure: str | None = None  # why load_extension could not, once it has tried


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension is neither built nor buildable here; the message says why."""


def csrc_dir() -> Path | None:
    """The csrc/ tree a JIT build compiles: fast_attn/_csrc, else <checkout>/csrc; None if neither."""
    for candidate in (_PACKAGE_DIR / _cfg.PACKAGED_CSRC_DIR, _PACKAGE_DIR.parent / "csrc"):
        if _cfg.is_csrc_dir(candidate):
            return candidate
    return None


def extension_status() -> tuple[bool, str]:
    """(available, reason): can the CUDA extension be loaded here, without compiling anything.

    True when `fast_attn._C` imports (it was built at install time), or when a JIT build
    is possible: torch has CUDA, a CUDA device is visible, a CUDA toolkit matching torch's
    CUDA major version is found and the csrc/ sources are present (the reason then says
    that the first use compiles, and where). Otherwise False with the precise reason.
    """
    with _lock:
        if _loaded is not None:
            return True, _loaded
        if _failure is not None:
            return False, _failure
    imported, aot_reason = _import_aot()
    if imported:
        return True, aot_reason
    sources, cuda_home, jit_reason = _jit_plan()
    if sources is None:
        return False, f"{aot_reason}, and it cannot be JIT-built: {jit_reason}"
    from torch.utils import cpp_extension

    return True, (
        f"{aot_reason}; it will be JIT-built on first use (compiled once, then cached) from {sources} with the "
        f"toolkit at {cuda_home}, into torch's extension cache under {cpp_extension.get_default_build_root()} "
        f"(or $TORCH_EXTENSIONS_DIR)"
    )


def load_extension() -> None:
    """Make the `torch.ops.fast_attn.cuda_*` ops available; memoized (success and failure).

    Imports `fast_attn._C`, or JIT-builds csrc/ and loads the library. The JIT build is
    logged at INFO level with its build directory and cached there: 15 s for one GPU arch
    on 2 CPU cores with bias_gelu as the only op. Raises `ExtensionUnavailable` with the
    reason when neither is possible or the build fails.
    """
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return
        if _failure is not None:
            raise ExtensionUnavailable(_failure)
        from fast_attn import backends

        try:
            loaded = _load()
        except ExtensionUnavailable as exc:
            _failure = str(exc)
            backends.forget_statuses()  # the cuda backend is unavailable from now on; auto falls back
            raise
        from fast_attn.cuda_backend import _fakes  # the ops exist now; give them fake functions

        _fakes.register()
        _loaded = loaded
        backends.forget_statuses()


def _import_aot() -> tuple[bool, str]:
    """Import fast_attn._C; (True, where) or (False, why not)."""
    try:
        module = importlib.import_module(_cfg.EXTENSION_NAME)
    except ModuleNotFoundError as exc:
        if exc.name != _cfg.EXTENSION_NAME:
            return False, f"{_cfg.EXTENSION_NAME} does not import ({exc})"
        return False, f"{_cfg.EXTENSION_NAME} is not built"
    except (ImportError, OSError) as exc:
        return False, f"{_cfg.EXTENSION_NAME} is built but does not load ({exc}); rebuild it against this torch"
    return True, f"{_cfg.EXTENSION_NAME} is built ({module.__file__})"


def _find_toolkit() -> tuple[Path | None, str]:
    """The CUDA toolkit for a JIT build: torch's CUDA_HOME if it is one, else a search."""
    from torch.utils import cpp_extension

    torch_choice = cpp_extension.CUDA_HOME  # from $CUDA_HOME/$CUDA_PATH, nvcc on PATH or /usr/local/cuda
    if torch_choice and _cfg.is_cuda_home(Path(torch_choice)):
        return Path(torch_choice), f"torch's CUDA_HOME {torch_choice}"
    # An nvcc wrapper script on PATH makes torch guess its parent folder; look further.
    found, note = _cfg.find_cuda_home(
        {}, shutil.which("nvcc"), _cfg.cuda_home_candidates(prefer_version=torch.version.cuda)
    )
    if found is None and torch_choice:
        note = f"{note} (torch's guess {torch_choice} is not a CUDA toolkit)"
    return found, note


def _jit_plan() -> tuple[Path | None, Path | None, str]:
    """(csrc dir, toolkit root, reason) for a JIT build; Nones and the reason when impossible."""
    if torch.version.cuda is None:
        return None, None, f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return None, None, "no CUDA device"
    cuda_home, note = _find_toolkit()
    possible, reason = _cfg.plan_cuda_build(
        _cfg.BuildMode.AUTO, torch.__version__, torch.version.cuda, cuda_home, note
    )
    if not possible:
        return None, None, reason
    sources = csrc_dir()
    if sources is None:
        looked = [_PACKAGE_DIR / _cfg.PACKAGED_CSRC_DIR, _PACKAGE_DIR.parent / "csrc"]
        return None, None, f"csrc/ sources not found (looked in {', '.join(map(str, looked))})"
    return sources, cuda_home, reason


def _jit_build_directory() -> str | None:
    """torch's build directory for our JIT name (honours TORCH_EXTENSIONS_DIR); None if unknown."""
    from torch.utils import cpp_extension

    get_build_directory = getattr(cpp_extension, "_get_build_directory", None)
    if get_build_directory is None:
        return None
    return get_build_directory(_cfg.JIT_EXTENSION_NAME, False)


@contextlib.contextmanager
def _temporarily(owner, attribute: str, value):
    previous = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, previous)


@contextlib.contextmanager
def _temporary_env(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _load() -> str:
    imported, aot_reason = _import_aot()
    if imported:
        logger.debug("fast_attn: %s", aot_reason)
        return aot_reason
    sources, cuda_home, jit_reason = _jit_plan()
    if sources is None:
        raise ExtensionUnavailable(f"{aot_reason}, and it cannot be JIT-built: {jit_reason}")

    from torch.utils import cpp_extension

    build_directory = _jit_build_directory()
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    arch_list = _cfg.jit_arch_list(os.environ, capability)
    hopper_flags, hopper_note = _cfg.hopper_nvcc_flags(arch_list, _cfg.cutlass_include_dir(sys.path))
    logger.info("fast_attn: %s", hopper_note)
    site_packages = Path(torch.__file__).resolve().parent.parent
    wheel_includes = _cfg.wheel_cuda_include_dirs(site_packages, torch.version.cuda.split(".")[0])
    logger.info(
        "fast_attn: %s; JIT-building the CUDA extension from %s in %s (once; later runs reuse it)",
        aot_reason,
        sources,
        build_directory or "torch's extension cache",
    )
    if cpp_extension.CUDA_HOME != str(cuda_home):
        logger.info("fast_attn: using the CUDA toolkit at %s for the JIT build (%s)", cuda_home, jit_reason)
    try:
        # torch's load() compiles with cpp_extension.CUDA_HOME and reads the arch list from
        # the environment: set both for the build only, and give the process back its own.
        with _temporarily(cpp_extension, "CUDA_HOME", str(cuda_home)), _temporary_env(_cfg.ARCH_LIST_ENV, arch_list):
            cpp_extension.load(
                name=_cfg.JIT_EXTENSION_NAME,
                sources=[str(path) for path in _cfg.source_files(sources)],
                extra_cflags=list(_cfg.CXX_FLAGS) + _cfg.cxx_include_flags(wheel_includes),
                extra_cuda_cflags=list(_cfg.NVCC_FLAGS) + hopper_flags,
                extra_include_paths=[str(sources)],
                build_directory=build_directory,
                is_python_module=False,
            )
    except (RuntimeError, OSError, ImportError, ValueError) as exc:
        raise ExtensionUnavailable(
            f"{aot_reason}, and the JIT build in {build_directory or 'the torch extension cache'} failed: {exc}"
        ) from exc
    logger.info("fast_attn: loaded the JIT-built CUDA extension from %s", build_directory)
    return f"JIT-built CUDA extension loaded from {build_directory}"
