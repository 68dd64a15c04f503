"""Build script of fast_attn: the Python package, and the CUDA extension when possible.

Always installs the package `fast_attn` with the top-level folder `triton_kernels/` as its
subpackage `fast_attn.triton_kernels` (never as a top-level `triton_kernels`, which is the
Triton project's own library), and ships the csrc/ sources inside it as `fast_attn/_csrc`
so an installed copy can JIT-build them (fast_attn/_extension.py).

Builds the CUDA extension `fast_attn._C` from csrc/ ahead of time (ninja) when torch has
CUDA, a CUDA toolkit is found and a CUDA device is present (or when asked with
FAST_ATTN_BUILD_CUDA=1). Its object files stay in build/ (one folder per Python, torch and
CUDA), so a rebuild, even by `pip install -e .` (whose own build folder is temporary),
recompiles only the translation units whose sources or headers changed. Install against
the torch already in the environment:

    pip install --no-build-isolation -e .     # editable, for development
    pip install --no-build-isolation .        # regular install

Environment variables (read here only; the pure logic is fast_attn/_build_config.py):

    FAST_ATTN_BUILD_CUDA   unset or "auto": build when possible and a GPU is present;
                           1: build (no GPU needed) or fail; 0: never
    TORCH_CUDA_ARCH_LIST   GPU targets, default "8.0;9.0a" (A100, H100)
    MAX_JOBS               parallel compiler jobs, default sized from CPUs and free memory
    CUDA_HOME / CUDA_PATH  toolkit root, default found from nvcc or /usr/local/cuda*
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def load_build_config():
    """fast_attn/_build_config.py loaded by path, without importing the fast_attn package."""
    path = ROOT / "fast_attn" / "_build_config.py"
    spec = importlib.util.spec_from_file_location("_fast_attn_build_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # enum and dataclass machinery look the module up by name
    spec.loader.exec_module(module)
    return module


cfg = load_build_config()


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/ (sources and headers) to fast_attn/_csrc/.

    Editable installs skip the copy: they JIT-build from the checkout's csrc/ directly.
    """

    def _csrc_copies(self):
        target = Path(self.build_lib) / "fast_attn" / cfg.PACKAGED_CSRC_DIR
        return [(src, target / src.relative_to(CSRC)) for src in cfg.packaged_files(CSRC)]

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for src, dest in self._csrc_copies():
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(src), str(dest))

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [str(dest) for _, dest in self._csrc_copies()]


def usable_cpu_count():
    """CPUs this process may run on (a container's limit, not the host's core count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def configure_extension():
    """(ext_modules, cmdclass) for setup(); prints one line saying what is built and why."""
    mode = cfg.build_mode(os.environ)
    if mode is cfg.BuildMode.SKIP:
        print(f"fast_attn: not building the CUDA extension {cfg.EXTENSION_NAME}: {cfg.BUILD_CUDA_ENV}=0")
        return [], {}

    try:
        import torch
    except ImportError:
        torch = None
    torch_version = torch.__version__ if torch is not None else None
    torch_cuda = torch.version.cuda if torch is not None else None
    cuda_home, note = cfg.find_cuda_home(
        os.environ, shutil.which("nvcc"), cfg.cuda_home_candidates(prefer_version=torch_cuda)
    )
    device_present = bool(torch_cuda) and torch.cuda.is_available()
    build, reason = cfg.plan_cuda_build(
        mode, torch_version, torch_cuda, cuda_home, note, have_sources=cfg.is_csrc_dir(CSRC),
        device_present=device_present,
    )
    if not build:
        print(
            f"fast_attn: not building the CUDA extension {cfg.EXTENSION_NAME}: {reason}; "
            f"the cuda backend will try a JIT build on first use"
        )
        return [], {}

    # torch.utils.cpp_extension reads these when imported (CUDA_HOME) or when compiling.
    os.environ["CUDA_HOME"] = str(cuda_home)
    arch_list = cfg.cuda_arch_list(os.environ)
    os.environ[cfg.ARCH_LIST_ENV] = arch_list
    jobs = cfg.max_jobs(os.environ, usable_cpu_count(), cfg.available_memory_bytes())
    os.environ[cfg.MAX_JOBS_ENV] = str(jobs)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(cuda_home)  # in case something imported it before us

    site_packages = Path(torch.__file__).resolve().parent.parent
    wheel_includes = cfg.wheel_cuda_include_dirs(site_packages, torch_cuda.split(".")[0])
    hopper_flags, hopper_note = cfg.hopper_nvcc_flags(arch_list, cfg.cutlass_include_dir(sys.path))
    print(
        f"fast_attn: building the CUDA extension {cfg.EXTENSION_NAME}: {reason}; "
        f"{cfg.ARCH_LIST_ENV}={arch_list}, {cfg.MAX_JOBS_ENV}={jobs}; {hopper_note}"
    )
    extension = cpp_extension.CUDAExtension(
        name=cfg.EXTENSION_NAME,
        sources=[str(path.relative_to(ROOT)) for path in cfg.source_files(CSRC)],
        # Headers too: setuptools skips an extension whose sources are all older than it.
        depends=[str(path.relative_to(ROOT)) for path in cfg.packaged_files(CSRC)],
        include_dirs=[str(CSRC)],
        extra_compile_args={
            "cxx": list(cfg.CXX_FLAGS) + cfg.cxx_include_flags(wheel_includes),
            "nvcc": list(cfg.NVCC_FLAGS) + hopper_flags,
        },
        # ops.cpp uses only the stable Python API; this also drops the libtorch_python link.
        py_limited_api=True,
    )
    build_temp = ROOT / "build" / f"ext-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_version}"
    return [extension], {"build_ext": persistent_build_ext(cpp_extension.BuildExtension, build_temp)}


def persistent_build_ext(base, build_temp: Path):
    """``base`` (torch's BuildExtension, ninja) with its object files in ``build_temp``.

    pip's editable install hands build_ext a new temporary folder on every run, which
    makes every reinstall a full rebuild (18 minutes on 2 cores); ninja's own records in a
    fixed folder make it recompile only the changed translation units and relink.
    """

    class PersistentBuildExtension(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(build_temp)

    return PersistentBuildExtension.with_options(use_ninja=True)


ext_modules, ext_cmdclass = configure_extension()

setup(
    name="fast_attn",
    version="0.1.0",
    description="Fused attention, normalization and feed-forward kernels for PyTorch (CUDA and Triton)",
    python_requires=">=3.10",
    packages=(
        find_packages(include=["fast_attn", "fast_attn.*"])
        + ["fast_attn.triton_kernels"]
        + [f"fast_attn.triton_kernels.{name}" for name in find_packages(where="triton_kernels")]
    ),
    package_dir={"fast_attn.triton_kernels": "triton_kernels"},
    package_data={"fast_attn.models": ["data/*.txt"]},  # the char-GPT training corpus
    # Only torch versions that are tested: 2.11 by the GPU session (scripts/gpu_session.sh,
    # which records the version it ran with), 2.13 (CPU wheel) and 2.14 by CI
    # (scripts/dev.sh test). 2.12 lies between two tested versions. The upper bound sits
    # just above the newest tested release: the op layer leans on torch.library custom ops
    # and on what Dynamo can trace, which change between minor releases. Raise it when CI
    # tests the next torch.
    install_requires=["torch>=2.11,<2.15", "numpy", 'triton; platform_system == "Linux"'],
    extras_require={
        "test": ["pytest"],
        "bench": ["matplotlib", "tqdm"],
        "hf": ["transformers>=4.56"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithCsrc, **ext_cmdclass},
    zip_safe=False,
)
