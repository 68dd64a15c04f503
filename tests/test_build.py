"""Build and packaging tests: fast_attn/_build_config.py, setup.py, fast_attn/_extension.py.

CPU tests: the pure build configuration (arch list, FAST_ATTN_BUILD_CUDA, MAX_JOBS,
CUDA_HOME detection with fake toolkits), the csrc/ source list and its layout rules, the
installed layout (fast_attn.triton_kernels, never a top-level triton_kernels), the
extension status, and, when fast_attn._C was built, the registered op schemas.

GPU tests (`pytest -m gpu`): the CUDA bias+GELU forward and backward against plain
PyTorch with the DESIGN.md rule: the kernel's max error against an fp64 reference is at
most 2x (3x for gradients) that of the same maths run by PyTorch in the input dtype, plus
a small floor; and dbias is bitwise reproducible.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fast_attn import _build_config as cfg
from fast_attn import _extension

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"

FWD_SCHEMA = "fast_attn::cuda_bias_gelu_fwd(Tensor x, Tensor? bias, bool approximate_tanh) -> Tensor"
BWD_SCHEMA = (
    "fast_attn::cuda_bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool approximate_tanh) "
    "-> (Tensor dx, Tensor dbias)"
)
GIB = 2**30


def make_toolkit(root: Path, version: str = "13.0") -> Path:
    """A fake CUDA toolkit: bin/nvcc, include/cuda_runtime.h and include/cuda.h."""
    major, minor = (int(part) for part in version.split("."))
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "include" / "cuda.h").write_text(f"#define CUDA_VERSION {major * 1000 + minor * 10}\n")
    return root


# ------------------------------------------------------------------ pure build configuration


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (None, cfg.BuildMode.AUTO),
        ("", cfg.BuildMode.AUTO),
        ("auto", cfg.BuildMode.AUTO),
        ("1", cfg.BuildMode.FORCE),
        ("true", cfg.BuildMode.FORCE),
        ("ON", cfg.BuildMode.FORCE),
        ("0", cfg.BuildMode.SKIP),
        (" no ", cfg.BuildMode.SKIP),
        ("False", cfg.BuildMode.SKIP),
    ],
)
def test_build_mode_parses_fast_attn_build_cuda(value, mode):
    env = {} if value is None else {"FAST_ATTN_BUILD_CUDA": value}
    assert cfg.build_mode(env) is mode


def test_build_mode_rejects_unknown_values():
    with pytest.raises(ValueError, match="FAST_ATTN_BUILD_CUDA='2'"):
        cfg.build_mode({"FAST_ATTN_BUILD_CUDA": "2"})


def test_arch_list_defaults_to_sm80_and_sm90a():
    assert cfg.cuda_arch_list({}) == "8.0;9.0a"
    assert cfg.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "  "}) == "8.0;9.0a"


def test_arch_list_respects_torch_cuda_arch_list():
    assert cfg.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0+PTX"}) == "9.0+PTX"


@pytest.mark.parametrize(
    ("cpus", "memory", "jobs"),
    [
        (16, 128 * GIB, 16),  # CPU-bound
        (16, 9 * GIB, 2),  # memory-bound: 4 GiB per compiler job
        (2, 23 * GIB, 2),  # the CI machine
        (8, 1 * GIB, 1),  # never below 1
        (8, None, 8),  # unknown memory does not limit
        (None, None, 1),  # nothing known
    ],
)
def test_max_jobs_sized_from_cpus_and_memory(cpus, memory, jobs):
    assert cfg.max_jobs({}, cpus, memory) == jobs


def test_max_jobs_respects_env_and_rejects_nonsense():
    assert cfg.max_jobs({"MAX_JOBS": "3"}, 64, 1 * GIB) == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="MAX_JOBS"):
            cfg.max_jobs({"MAX_JOBS": bad}, 4, None)


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       4096 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n")
    assert cfg.available_memory_bytes(meminfo) == 2048 * 1024
    assert cfg.available_memory_bytes(tmp_path / "missing") is None


def test_cuda_home_from_env_wins(tmp_path):
    toolkit = make_toolkit(tmp_path / "mycuda")
    other = make_toolkit(tmp_path / "other")
    home, note = cfg.find_cuda_home({"CUDA_HOME": str(toolkit)}, str(other / "bin" / "nvcc"), [other])
    assert home == toolkit and "CUDA_HOME" in note
    home, note = cfg.find_cuda_home({"CUDA_PATH": str(toolkit)}, None, [other])
    assert home == toolkit and "CUDA_PATH" in note


def test_cuda_home_wrong_env_value_is_reported_not_replaced(tmp_path):
    other = make_toolkit(tmp_path / "other")
    home, note = cfg.find_cuda_home({"CUDA_HOME": str(tmp_path / "nope")}, None, [other])
    assert home is None and "is not a CUDA toolkit" in note


def test_cuda_home_from_nvcc_symlink(tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    link = tmp_path / "bin" / "nvcc"
    link.symlink_to(toolkit / "bin" / "nvcc")
    home, note = cfg.find_cuda_home({}, str(link), [])
    assert home == toolkit and "PATH" in note


def test_cuda_home_skips_nvcc_wrapper_script_and_searches(tmp_path):
    # like /usr/local/bin/nvcc: a shell script whose folder's parent is not a toolkit
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.write_text("#!/bin/sh\nexec /somewhere/nvcc \"$@\"\n")
    toolkit = make_toolkit(tmp_path / "cuda-13.0")
    home, note = cfg.find_cuda_home({}, str(wrapper), cfg.cuda_home_candidates([tmp_path]))
    assert home == toolkit and "found at" in note


def test_cuda_home_not_found(tmp_path):
    home, note = cfg.find_cuda_home({}, None, cfg.cuda_home_candidates([tmp_path]))
    assert home is None and note == "nvcc not found; set CUDA_HOME to the CUDA toolkit root"


def test_cuda_home_candidates_order(tmp_path):
    for name in ("cuda", "cuda-12.8", "cuda-12.10", "cuda-13.0", "cudnn", "cuda-notes"):
        (tmp_path / name).mkdir()
    names = [path.name for path in cfg.cuda_home_candidates([tmp_path, tmp_path / "absent"])]
    assert names == ["cuda", "cuda-13.0", "cuda-12.10", "cuda-12.8"]
    names = [path.name for path in cfg.cuda_home_candidates([tmp_path], prefer_version="12.8")]
    assert names == ["cuda-12.8", "cuda", "cuda-13.0", "cuda-12.10"]


def test_cuda_toolkit_version(tmp_path):
    assert cfg.cuda_toolkit_version(make_toolkit(tmp_path / "a", "12.8")) == (12, 8)
    assert cfg.cuda_toolkit_version(tmp_path / "missing") is None


def test_plan_cuda_build(tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda-13.0", "13.0")
    old = make_toolkit(tmp_path / "cuda-12.8", "12.8")
    auto, force, skip = cfg.BuildMode.AUTO, cfg.BuildMode.FORCE, cfg.BuildMode.SKIP

    assert cfg.plan_cuda_build(skip, "2.14.1", "13.0", toolkit, "x") == (False, "FAST_ATTN_BUILD_CUDA=0")
    build, reason = cfg.plan_cuda_build(auto, "2.14.1", "13.0", toolkit, "found")
    assert build and str(toolkit) in reason
    assert cfg.plan_cuda_build(force, "2.14.1", "13.0", toolkit, "found")[0]

    build, reason = cfg.plan_cuda_build(auto, "2.13.0+cpu", None, toolkit, "found")
    assert not build and reason == "torch 2.13.0+cpu was built without CUDA"
    build, reason = cfg.plan_cuda_build(auto, None, None, None, "x")
    assert not build and "--no-build-isolation" in reason
    build, reason = cfg.plan_cuda_build(auto, "2.14.1", "13.0", None, "nvcc not found; set CUDA_HOME")
    assert not build and "nvcc not found" in reason
    build, reason = cfg.plan_cuda_build(auto, "2.14.1", "13.0", old, "found")
    assert not build and "12.8" in reason and "13.0" in reason

    build, reason = cfg.plan_cuda_build(auto, "2.14.1", "13.0", toolkit, "found", have_sources=False)
    assert not build and reason == "csrc/ sources not found"

    # Without a device, auto leaves the (minutes-long) build to a JIT build on first use;
    # FAST_ATTN_BUILD_CUDA=1 still builds, which is how CI proves csrc/ compiles.
    build, reason = cfg.plan_cuda_build(auto, "2.14.1", "13.0", toolkit, "found", device_present=False)
    assert not build and reason == "no CUDA device here (FAST_ATTN_BUILD_CUDA=1 builds it anyway)"
    assert cfg.plan_cuda_build(force, "2.14.1", "13.0", toolkit, "found", device_present=False)[0]

    with pytest.raises(cfg.CudaBuildUnavailable, match="FAST_ATTN_BUILD_CUDA=1.*built without CUDA"):
        cfg.plan_cuda_build(force, "2.13.0+cpu", None, toolkit, "found")


def test_wheel_cuda_include_dirs(tmp_path):
    assert cfg.wheel_cuda_include_dirs(tmp_path, "13") == []
    include = tmp_path / "nvidia" / "cu13" / "include"
    include.mkdir(parents=True)
    assert cfg.wheel_cuda_include_dirs(tmp_path, 13) == [include]
    assert cfg.cxx_include_flags([include]) == ["-idirafter", str(include)]


def test_build_config_is_standard_library_only():
    """setup.py loads the file by path before torch is importable; keep it that way."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bc', {str(REPO / 'fast_attn' / '_build_config.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['bc'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert 'torch' not in sys.modules and 'fast_attn' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------ csrc layout


def test_source_list_is_every_cu_and_cpp_under_csrc():
    on_disk = sorted(
        Path(folder) / name
        for folder, _, names in os.walk(CSRC)
        for name in names
        if name.endswith((".cu", ".cpp"))
    )
    assert cfg.source_files(CSRC) == on_disk
    assert CSRC / "ops.cpp" in on_disk and CSRC / "ffn" / "bias_gelu.cu" in on_disk
    assert cfg.is_csrc_dir(CSRC)


def test_one_torch_library_block_and_no_torch_headers_in_kernels():
    defining = [p.name for p in cfg.source_files(CSRC) if "TORCH_LIBRARY(" in p.read_text()]
    assert defining == ["ops.cpp"]
    torch_include = re.compile(r"#\s*include\s*[<\"](torch|ATen|c10)/")
    for path in cfg.packaged_files(CSRC):
        # Torch-side code lives in *_ops.cpp and the helpers they share in *_ops.h.
        if path.suffix in (".cu", ".cuh") or (path.suffix == ".h" and not path.stem.endswith("_ops")):
            assert not torch_include.search(path.read_text()), f"{path} includes a torch header"


# -------------------------------------------------------------------------- setup.py itself


def _run_setup(*args, **env):
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "setup.py", *args], cwd=REPO, env=full_env, capture_output=True, text=True
    )


def test_setup_skips_extension_when_told():
    result = _run_setup("--version", FAST_ATTN_BUILD_CUDA="0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "fast_attn: not building the CUDA extension fast_attn._C: FAST_ATTN_BUILD_CUDA=0" in lines
    assert lines[-1] == "0.1.0"


def test_setup_rejects_bad_build_flag():
    result = _run_setup("--version", FAST_ATTN_BUILD_CUDA="maybe")
    assert result.returncode != 0 and "FAST_ATTN_BUILD_CUDA='maybe'" in result.stderr


# --------------------------------------------------------------------------- installed layout


def test_triton_kernels_is_a_fast_attn_subpackage():
    module = importlib.import_module("fast_attn.triton_kernels")
    assert Path(module.__file__).parent.name == "triton_kernels"
    assert "fast_attn.triton_kernels" in module.__doc__


def test_no_top_level_triton_kernels_is_installed(tmp_path):
    """From a folder other than the checkout, `triton_kernels` must not resolve to ours."""
    code = (
        "import importlib.util\n"
        "spec = importlib.util.find_spec('triton_kernels')\n"
        "print('' if spec is None else (spec.origin or list(spec.submodule_search_locations)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    found = result.stdout.strip()
    assert str(REPO) not in found and "fast_attn" not in found, f"triton_kernels resolves to {found}"


def test_distribution_declares_only_fast_attn():
    try:
        dist = importlib.metadata.distribution("fast_attn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fast_attn is not installed (pip install --no-build-isolation -e .)")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert top_level.split() == ["fast_attn"]
    for file in dist.files or []:
        assert file.parts[0] != "triton_kernels", f"installed top-level file {file}"


# ------------------------------------------------------------------------- extension status


def test_extension_status_never_compiles(monkeypatch):
    from torch.utils import cpp_extension

    def no_build(*args, **kwargs):
        raise AssertionError("extension_status() must not compile")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    monkeypatch.setattr(cpp_extension, "_write_ninja_file_and_build_library", no_build, raising=False)
    available, reason = _extension.extension_status()
    assert isinstance(available, bool) and isinstance(reason, str) and reason


def test_extension_status_explains_missing_device(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_failure", None)
    monkeypatch.setattr(_extension, "_import_aot", lambda: (False, "fast_attn._C is not built"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if torch.version.cuda is None:
        expected = "was built without CUDA"
    else:
        expected = "no CUDA device"
    available, reason = _extension.extension_status()
    assert not available
    assert reason.startswith("fast_attn._C is not built, and it cannot be JIT-built: ") and expected in reason


def test_extension_status_explains_cpu_torch(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_failure", None)
    monkeypatch.setattr(_extension, "_import_aot", lambda: (False, "fast_attn._C is not built"))
    monkeypatch.setattr(torch.version, "cuda", None)
    available, reason = _extension.extension_status()
    assert not available and reason.endswith("was built without CUDA")


def test_load_extension_raises_and_memoizes_when_unavailable(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_failure", None)
    calls = []

    def not_built():
        calls.append(1)
        return False, "fast_attn._C is not built"

    monkeypatch.setattr(_extension, "_import_aot", not_built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for _ in range(2):
        with pytest.raises(_extension.ExtensionUnavailable, match="cannot be JIT-built"):
            _extension.load_extension()
    assert len(calls) == 1
    assert issubclass(_extension.ExtensionUnavailable, RuntimeError)
    assert _extension.extension_status()[0] is False


def test_jit_sources_are_found():
    found = _extension.csrc_dir()
    assert found is not None and cfg.is_csrc_dir(found)


def test_built_extension_registers_the_ops():
    if importlib.util.find_spec("fast_attn._C") is None:
        pytest.skip("fast_attn._C is not built (FAST_ATTN_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
    importlib.import_module("fast_attn._C")
    assert str(torch.ops.fast_attn.cuda_bias_gelu_fwd.default._schema) == FWD_SCHEMA
    assert str(torch.ops.fast_attn.cuda_bias_gelu_bwd.default._schema) == BWD_SCHEMA
    assert _extension.extension_status()[0]


# --------------------------------------------------------------------- CUDA bias+GELU (GPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Absolute floor of the tolerance, relative to the reference's magnitude: about half an
# ulp at 1.0 in the storage type, for cases where PyTorch happens to be exact.
FLOOR = {torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float32: 1e-6}


def poison_allocator(like: torch.Tensor) -> None:
    """Free a NaN-filled block of like's size so the next allocation likely reuses it."""
    torch.full_like(like, float("nan"))


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return 0.0 if out.numel() == 0 else (out.double() - ref).abs().max().item()


def assert_within_rule(out, ref, baseline, factor, dtype, what):
    err, base = max_error(out, ref), max_error(baseline, ref)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    tolerance = factor * base + FLOOR[dtype] * scale
    assert err <= tolerance, f"{what}: max error {err:.3g} > {factor} x PyTorch's {base:.3g} + floor"


def gelu_case(x, bias, dy, approximate):
    """(y, dx, dbias) of gelu(x + bias) by PyTorch autograd, in the dtype of its inputs."""
    x = x.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = F.gelu(x if bias is None else x + bias, approximate=approximate)
    y.backward(dy)
    return y.detach(), x.grad, None if bias is None else bias.grad


def check_against_torch(ops, x, bias, approximate):
    dtype = x.dtype
    dy = torch.randn_like(x)
    tanh = approximate == "tanh"
    ref = gelu_case(x.double(), None if bias is None else bias.double(), dy.double(), approximate)
    base = gelu_case(x, bias, dy, approximate)

    poison_allocator(x)
    y = ops.cuda_bias_gelu_fwd(x, bias, tanh)
    poison_allocator(x)
    dx, dbias = ops.cuda_bias_gelu_bwd(dy, x, bias, tanh)

    assert y.shape == x.shape and y.dtype == dtype and dx.shape == x.shape and dx.dtype == dtype
    assert_within_rule(y, ref[0], base[0], 2, dtype, "y")
    assert_within_rule(dx, ref[1], base[1], 3, dtype, "dx")
    if bias is None:
        assert dbias.numel() == 0
    else:
        assert dbias.shape == bias.shape and dbias.dtype == dtype
        assert_within_rule(dbias, ref[2], base[2], 3, dtype, "dbias")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [1, 7, 1023, 4096])
@pytest.mark.parametrize("rows", [1, 67, 2053])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cuda_bias_gelu_matches_torch(cuda_ops, dtype, cols, rows, with_bias, approximate):
    x = torch.randn(rows, cols, device="cuda", dtype=dtype)
    bias = torch.randn(cols, device="cuda", dtype=dtype) if with_bias else None
    check_against_torch(cuda_ops, x, bias, approximate)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_slice", "misaligned", "3d", "3d_transposed"])
def test_cuda_bias_gelu_strided_inputs(cuda_ops, dtype, layout):
    cols = 256
    if layout == "row_slice":  # aligned rows, row stride > cols: vector path, no copy
        x = torch.randn(131, cols + 64, device="cuda", dtype=dtype)[:, :cols]
    elif layout == "misaligned":  # rows start off 16-byte boundaries: scalar path
        x = torch.randn(131, cols + 3, device="cuda", dtype=dtype)[:, 1 : cols + 1]
    elif layout == "3d":
        x = torch.randn(3, 37, cols, device="cuda", dtype=dtype)
    else:  # leading dims that do not collapse into one row stride: copied
        x = torch.randn(37, 3, cols, device="cuda", dtype=dtype).transpose(0, 1)
    bias = torch.randn(cols, device="cuda", dtype=dtype)
    check_against_torch(cuda_ops, x, bias, "none")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_bias_gelu_dbias_is_deterministic(cuda_ops, dtype):
    x = torch.randn(8191, 4096, device="cuda", dtype=dtype)
    bias = torch.randn(4096, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    first_dx, first_dbias = cuda_ops.cuda_bias_gelu_bwd(dy, x, bias, False)
    for _ in range(9):
        dx, dbias = cuda_ops.cuda_bias_gelu_bwd(dy, x, bias, False)
        assert torch.equal(dbias, first_dbias) and torch.equal(dx, first_dx)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bias_gelu_empty_rows_give_zero_dbias(cuda_ops):
    x = torch.randn(0, 5, device="cuda")
    bias = torch.randn(5, device="cuda")
    assert cuda_ops.cuda_bias_gelu_fwd(x, bias, False).shape == (0, 5)
    dx, dbias = cuda_ops.cuda_bias_gelu_bwd(torch.randn_like(x), x, bias, False)
    assert dx.shape == (0, 5) and torch.equal(dbias, torch.zeros(5, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_cuda_bias_gelu_bad_input_messages(cuda_ops):
    x = torch.randn(4, 8, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        cuda_ops.cuda_bias_gelu_fwd(x, torch.randn(8, device="cuda"), False)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        cuda_ops.cuda_bias_gelu_fwd(x, torch.randn(9, device="cuda", dtype=torch.float16), False)
    with pytest.raises(ValueError, match="bias must be on x's device"):
        cuda_ops.cuda_bias_gelu_fwd(x, torch.randn(8, dtype=torch.float16), False)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        cuda_ops.cuda_bias_gelu_fwd(x.double(), None, False)
    with pytest.raises(ValueError, match="dy must have x's shape"):
        cuda_ops.cuda_bias_gelu_bwd(x[:2], x, None, False)


# ------------------------------------------------------- Hopper kernels: CuTe and sm_90a flags


def make_cutlass_wheel(site: Path) -> Path:
    include = site / "cutlass_library" / "source" / "include"
    (include / "cute").mkdir(parents=True)
    (include / "cute" / "tensor.hpp").write_text("")
    return include


def test_cutlass_include_dir_is_found_on_the_search_path(tmp_path):
    include = make_cutlass_wheel(tmp_path / "site")
    assert cfg.cutlass_include_dir([tmp_path / "empty", tmp_path / "site"]) == include
    assert cfg.cutlass_include_dir([tmp_path / "empty"]) is None


def test_hopper_flags_need_sm90a_and_cute(tmp_path):
    include = make_cutlass_wheel(tmp_path)
    flags, note = cfg.hopper_nvcc_flags("8.0;9.0a", include)
    assert "-DFAST_ATTN_HAVE_SM90=1" in flags and f"-I{include}" in flags and "built" in note
    flags, note = cfg.hopper_nvcc_flags("8.0;9.0", include)
    assert flags == [] and "no 9.0a" in note
    flags, note = cfg.hopper_nvcc_flags("9.0a", None)
    assert flags == [] and "nvidia-cutlass" in note


@pytest.mark.parametrize(
    ("env", "capability", "expected"),
    [
        ({}, (9, 0), "9.0a"),
        ({}, (8, 0), "8.0"),
        ({}, None, cfg.DEFAULT_CUDA_ARCH_LIST),
        ({"TORCH_CUDA_ARCH_LIST": "8.6"}, (9, 0), "8.6"),
    ],
)
def test_jit_arch_list(env, capability, expected):
    assert cfg.jit_arch_list(env, capability) == expected


def test_this_checkout_finds_the_cutlass_wheel_when_installed():
    if importlib.util.find_spec("cutlass_library") is None:
        pytest.skip("nvidia-cutlass is not installed")
    include = cfg.cutlass_include_dir(sys.path)
    assert include is not None and (include / "cute" / "tensor.hpp").is_file()
