"""Tests of fast_attn.backends: which backend a call gets, and how the request is made.

``select_backend`` is pure, so every rule is exercised on CPU with hand-made
``BackendStatus`` dicts and, where a rule needs a kernel backend to implement something,
a temporarily patched ``CAPABILITIES`` table. ``requested_backend`` precedence is per
call > innermost ``use_backend`` block > ``FAST_ATTN_BACKEND`` > auto. Importing the
package must neither initialise CUDA nor import triton (checked in a fresh interpreter).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fast_attn
from fast_attn import backends
from fast_attn.backends import BackendStatus, Call, Capability
from fast_attn.verified import Verified, is_verified

ALL_ATTENTION = backends.ATTENTION_FEATURES
KERNEL_DTYPES = backends.KERNEL_DTYPES

UP_CPU_CUDA = BackendStatus(True, "up", frozenset({"cpu", "cuda"}))
UP_CUDA = BackendStatus(True, "up", frozenset({"cuda"}))
TORCH_UP = BackendStatus(True, "reference", frozenset({"cpu", "cuda"}))
CUDA_DOWN = BackendStatus(False, "fast_attn._C was not built (no nvcc)")
TRITON_DOWN = BackendStatus(False, "triton is not installed")


def statuses(cuda=UP_CUDA, triton=UP_CPU_CUDA, torch_=TORCH_UP):
    return {"cuda": cuda, "triton": triton, "torch": torch_}


H100 = (9, 0)
# A record in which the cuda attention has passed the GPU suite on an H100 (tests only).
H100_ATTENTION = (Verified("cuda", "attention", H100, "benchmarks/results/example/summary.md"),)


def attention_call(device="cuda", dtype=torch.bfloat16, head_dim=64, **flags):
    arch = H100 if device == "cuda" else ()
    return Call("attention", device, dtype, backends.features(**flags), head_dim=head_dim, arch=arch)


@pytest.fixture
def kernel_capabilities(monkeypatch):
    """cuda: attention without dropout, head_dim <= 128, fp16/bf16; triton: every feature
    and kernel dtype, head_dim <= 256; torch unchanged."""
    table = {
        "torch": backends.CAPABILITIES["torch"],
        "triton": {"attention": Capability(KERNEL_DTYPES, ALL_ATTENTION, max_head_dim=256)},
        "cuda": {
            "attention": Capability(
                frozenset({torch.float16, torch.bfloat16}), ALL_ATTENTION - {"dropout"}, max_head_dim=128
            )
        },
    }
    monkeypatch.setattr(backends, "CAPABILITIES", table)
    return table


# --------------------------------------------------------------------- select_backend


def test_auto_on_cpu_is_torch_even_with_triton_interpreter(kernel_capabilities):
    call = attention_call(device="cpu", dtype=torch.float32)
    assert backends.select_backend(call, "auto", statuses()) == "torch"


def test_auto_on_cuda_prefers_verified_cuda(kernel_capabilities):
    call = attention_call(causal=True, alibi=True, gqa=True, backward=True)
    assert backends.select_backend(call, "auto", statuses(), verified=H100_ATTENTION) == "cuda"


def test_auto_skips_cuda_families_without_a_gpu_record(kernel_capabilities):
    """Dispatch by evidence: no row for (cuda, attention, this arch) -> triton."""
    call = attention_call(causal=True)
    assert backends.select_backend(call, "auto", statuses(), verified=()) == "triton"
    other_arch = Call("attention", "cuda", torch.bfloat16, call.features, head_dim=64, arch=(8, 0))
    assert backends.select_backend(other_arch, "auto", statuses(), verified=H100_ATTENTION) == "triton"
    reason = backends.why_not_auto("cuda", other_arch, statuses(), verified=H100_ATTENTION)
    assert "has not yet passed the GPU test suite on compute capability 8.0" in reason


def test_unverified_cuda_still_runs_when_asked_for(kernel_capabilities):
    call = attention_call(causal=True)
    assert backends.select_backend(call, "cuda", statuses(), verified=()) == "cuda"


def test_the_package_record_gates_every_cuda_family_today():
    """No CUDA kernel has run on a GPU yet: the shipped record is empty, so auto never
    picks cuda (a GPU session adds rows with the results that show the pass)."""
    for op in backends.OPS:
        assert not is_verified("cuda", op, H100)
    assert set(backends.UNGATED) == {"torch", "triton"}


def test_why_not_is_public_and_names_the_reason(kernel_capabilities):
    call = attention_call(dropout=True)
    assert backends.why_not("triton", call, statuses()) is None
    assert "does not support feature 'dropout'" in backends.why_not("cuda", call, statuses())
    assert "not available here" in backends.why_not("cuda", call, statuses(cuda=CUDA_DOWN))


def test_auto_on_cuda_falls_to_triton_when_cuda_lacks_feature(kernel_capabilities):
    call = attention_call(causal=True, dropout=True)
    assert backends.select_backend(call, "auto", statuses()) == "triton"


def test_auto_on_cuda_falls_to_triton_when_cuda_unavailable(kernel_capabilities):
    call = attention_call(causal=True)
    assert backends.select_backend(call, "auto", statuses(cuda=CUDA_DOWN)) == "triton"


def test_auto_on_cuda_falls_to_torch_past_head_dim_limits(kernel_capabilities):
    call = attention_call(head_dim=320)
    assert backends.select_backend(call, "auto", statuses()) == "torch"


def test_auto_on_cuda_falls_to_torch_for_fp64(kernel_capabilities):
    call = attention_call(dtype=torch.float64)
    assert backends.select_backend(call, "auto", statuses()) == "torch"


def test_auto_on_cuda_falls_to_torch_when_op_has_no_kernel(kernel_capabilities):
    call = Call("rms_norm", "cuda", torch.float16, backends.features(weight=True))
    assert backends.select_backend(call, "auto", statuses()) == "torch"


def test_auto_with_no_backend_able_raises():
    call = Call("layer_norm", "cpu", torch.int32)
    with pytest.raises(NotImplementedError, match="layer_norm.*no backend"):
        backends.select_backend(call, "auto", statuses())


def test_explicit_available_backend_is_used(kernel_capabilities):
    call = attention_call(causal=True)
    assert backends.select_backend(call, "triton", statuses()) == "triton"
    assert backends.select_backend(call, "torch", statuses()) == "torch"


def test_explicit_triton_on_cpu_with_interpreter(kernel_capabilities):
    call = attention_call(device="cpu", dtype=torch.float32)
    assert backends.select_backend(call, "triton", statuses()) == "triton"


def test_explicit_unavailable_backend_raises_with_reason(kernel_capabilities):
    call = attention_call()
    with pytest.raises(NotImplementedError, match=r"cuda backend is not available.*no nvcc") as info:
        backends.select_backend(call, "cuda", statuses(cuda=CUDA_DOWN))
    assert "['triton', 'torch']" in str(info.value)


def test_explicit_backend_on_wrong_device_raises(kernel_capabilities):
    call = attention_call(device="cpu", dtype=torch.float32)
    with pytest.raises(NotImplementedError, match=r"cuda.*cpu tensors.*\['triton', 'torch'\]"):
        backends.select_backend(call, "cuda", statuses())


def test_explicit_backend_lacking_feature_names_it_and_who_can(kernel_capabilities):
    call = attention_call(causal=True, dropout=True)
    with pytest.raises(NotImplementedError, match=r"feature 'dropout'.*\['triton', 'torch'\]"):
        backends.select_backend(call, "cuda", statuses())


def test_explicit_backend_head_dim_limit(kernel_capabilities):
    call = attention_call(head_dim=192)
    with pytest.raises(NotImplementedError, match=r"head_dim 192 \(at most 128\).*\['triton', 'torch'\]"):
        backends.select_backend(call, "cuda", statuses())


def test_explicit_backend_dtype_limit(kernel_capabilities):
    call = attention_call(dtype=torch.float32)
    with pytest.raises(NotImplementedError, match=r"dtype torch\.float32.*\['triton', 'torch'\]"):
        backends.select_backend(call, "cuda", statuses())


def test_explicit_backend_without_kernel_for_op(kernel_capabilities):
    call = Call("geglu", "cuda", torch.float16, backends.features(backward=True))
    with pytest.raises(NotImplementedError, match=r"no geglu kernel.*\['torch'\]"):
        backends.select_backend(call, "triton", statuses())


def test_select_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend.*'flash'"):
        backends.select_backend(attention_call(), "flash", statuses())


# ------------------------------------------------------------------ requested_backend


def test_requested_default_is_auto(monkeypatch):
    monkeypatch.delenv("FAST_ATTN_BACKEND", raising=False)
    assert backends.requested_backend() == "auto"


def test_requested_env(monkeypatch):
    monkeypatch.setenv("FAST_ATTN_BACKEND", "triton")
    assert backends.requested_backend() == "triton"


def test_requested_block_beats_env(monkeypatch):
    monkeypatch.setenv("FAST_ATTN_BACKEND", "triton")
    with fast_attn.use_backend("cuda"):
        assert backends.requested_backend() == "cuda"
    assert backends.requested_backend() == "triton"


def test_requested_per_call_beats_block_and_env(monkeypatch):
    monkeypatch.setenv("FAST_ATTN_BACKEND", "triton")
    with fast_attn.use_backend("cuda"):
        assert backends.requested_backend("torch") == "torch"


def test_requested_auto_per_call_defers_to_block():
    with fast_attn.use_backend("triton"):
        assert backends.requested_backend("auto") == "triton"


def test_requested_nested_blocks(monkeypatch):
    monkeypatch.delenv("FAST_ATTN_BACKEND", raising=False)
    with fast_attn.use_backend("cuda"):
        with fast_attn.use_backend("triton"):
            assert backends.requested_backend() == "triton"
            with fast_attn.use_backend("auto"):
                assert backends.requested_backend() == "auto"
            assert backends.requested_backend() == "triton"
        assert backends.requested_backend() == "cuda"
    assert backends.requested_backend() == "auto"


def test_requested_block_restored_after_exception(monkeypatch):
    monkeypatch.delenv("FAST_ATTN_BACKEND", raising=False)
    with fast_attn.use_backend("torch"):
        with pytest.raises(RuntimeError, match="boom"):
            with fast_attn.use_backend("triton"):
                raise RuntimeError("boom")
        assert backends.requested_backend() == "torch"
    assert backends.requested_backend() == "auto"


def test_cuda_attention_arch_block_beats_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_CUDA_ATTENTION_ARCH, "sm90")
    assert backends.cuda_attention_arch() == backends.CUDA_ATTENTION_ARCHS["sm90"]
    with backends.use_cuda_attention_arch("sm80"):
        assert backends.cuda_attention_arch() == backends.CUDA_ATTENTION_ARCHS["sm80"]
        with backends.use_cuda_attention_arch("auto"):
            assert backends.cuda_attention_arch() == 0
    assert backends.cuda_attention_arch() == backends.CUDA_ATTENTION_ARCHS["sm90"]
    with pytest.raises(ValueError, match="cuda attention arch"):
        with backends.use_cuda_attention_arch("sm70"):
            pass


def test_failed_extension_load_makes_cuda_unavailable_and_auto_falls_back(monkeypatch):
    """A failed JIT build: cuda is unavailable for the process (with the reason) and a call
    under auto falls back instead of raising; asked for by name, it raises the reason."""
    from fast_attn import _extension
    from fast_attn.ops import _dispatch

    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_failure", None)

    def failing_load():
        raise _extension.ExtensionUnavailable("the JIT build failed: nvcc exploded")

    monkeypatch.setattr(_extension, "_load", failing_load)
    monkeypatch.setattr(_extension, "extension_status", lambda: (True, "JIT-buildable") if _extension._failure is None
                        else (False, _extension._failure))
    monkeypatch.setattr(backends, "_PROBES", dict(backends._PROBES, cuda=lambda: (
        BackendStatus(True, "JIT-buildable", frozenset({"cpu"})) if _extension._failure is None
        else BackendStatus(False, _extension._failure))))
    monkeypatch.setattr(backends, "CAPABILITIES", dict(backends.CAPABILITIES, cuda=backends.CAPABILITIES["torch"]))
    monkeypatch.setattr(backends, "UNGATED", dict(backends.UNGATED, cuda="test stand-in"))
    backends.forget_statuses()
    try:
        call = Call("layer_norm", "cpu", torch.float32, backends.features(weight=True))
        assert backends.resolve_backend(call) == "cuda"  # before the first use
        assert _dispatch.choose(call, "auto") == "torch"  # the load fails: fall back
        status = fast_attn.available_backends()["cuda"]
        assert not status and "nvcc exploded" in status.reason
        with pytest.raises(NotImplementedError, match="cuda backend is not available here.*nvcc exploded"):
            _dispatch.choose(call, "cuda")
        x = torch.randn(3, 8)
        torch.testing.assert_close(fast_attn.layer_norm(x), torch.nn.functional.layer_norm(x, (8,)))
    finally:
        monkeypatch.undo()
        backends.forget_statuses()


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend.*'fast'"):
        with fast_attn.use_backend("fast"):
            pass


# ---------------------------------------------------------------- available_backends


def test_available_backends_names_and_reasons():
    found = fast_attn.available_backends()
    assert set(found) == {"cuda", "triton", "torch"}
    assert found["torch"]
    for name, status in found.items():
        assert isinstance(status, BackendStatus), name
        assert isinstance(status.reason, str) and status.reason, name
        assert bool(status) == status.available, name


def test_available_backends_triton_interpreter_accepts_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = fast_attn.available_backends()["triton"]
    if importlib.util.find_spec("triton") is None:
        assert not triton and "triton" in triton.reason
    else:
        assert triton and "cpu" in triton.devices


def test_available_backends_without_interpreter_no_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "cpu" not in fast_attn.available_backends()["triton"].devices


# ---------------------------------------------------------------------------- import

_IMPORT_PROBE = """
import sys
import torch
import fast_attn
print(int('triton' in sys.modules), int(torch.cuda.is_initialized()))
"""


def test_import_does_not_init_cuda_or_import_triton():
    root = Path(fast_attn.__file__).resolve().parent.parent
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0"], "expected triton not imported, CUDA not initialised"
