"""Which backends exist on this machine, what each can compute, and which one a call gets.

Three backends compute every op:

- ``"cuda"``:   the CUDA C++ kernels in ``fast_attn._C`` (built by setup.py or JIT-built
                on first use);
- ``"triton"``: the Triton kernels in ``fast_attn.triton_kernels``; on a CUDA device, or
                on CPU tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter);
- ``"torch"``:  the pure-PyTorch reference ops; any device, every feature.

Each backend declares, per op, the dtypes and features it implements (``CAPABILITIES``).
``"auto"`` picks cuda if it is available and can do the call, else triton if the tensors
are on a CUDA device and it can do the call, else torch: it never picks a backend that
would compute something different. The requested backend comes from, in order of
precedence: the ``backend=`` argument of a call (when not ``"auto"``), the innermost
``with use_backend(...)`` block, the ``FAST_ATTN_BACKEND`` environment variable.

The choice is made when the op runs (inside the custom op), not when it is traced, so a
``torch.compile``-d model follows ``use_backend`` blocks without recompiling.
``select_backend`` is a pure function of its arguments so tests exercise every rule on CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple, Optional

import torch

BACKENDS = ("cuda", "triton", "torch")
AUTO = "auto"
ENV_BACKEND = "FAST_ATTN_BACKEND"
# Which kernel family the cuda attention ops run: "auto" (sm_90a on Hopper when built, else
# sm_80), "sm80" (force the Ampere kernels, e.g. to test them on an H100) or "sm90".
ENV_CUDA_ATTENTION_ARCH = "FAST_ATTN_CUDA_ATTENTION_ARCH"
CUDA_ATTENTION_ARCHS = {"auto": 0, "sm80": 1, "sm90": 2}  # the `arch` argument of the cuda ops

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

# Feature names a call may carry; a backend serves a call only if it implements all of them.
ATTENTION_FEATURES = frozenset(
    {
        "causal",  # causal mask, bottom-right aligned
        "window",  # window_size other than (-1, -1)
        "alibi",  # alibi_slopes
        "softcap",  # softcap > 0
        "bool_mask",  # attn_mask of dtype bool
        "additive_mask",  # attn_mask of a float dtype
        "dropout",  # dropout_p > 0
        "gqa",  # fewer K/V heads than query heads
        "deterministic",  # bitwise-reproducible backward requested
        "backward",  # the backward pass
        "mask_grad",  # the gradient of an additive attn_mask that requires grad
        "alibi_grad",  # the gradient of alibi_slopes that require grad
    }
)
NORM_FEATURES = frozenset({"weight", "bias", "residual", "backward"})
ACTIVATION_FEATURES = frozenset({"bias", "gelu_tanh", "backward"})

OP_FEATURES: Mapping[str, frozenset] = {
    "attention": ATTENTION_FEATURES,
    "attention_varlen": ATTENTION_FEATURES,
    "attention_with_kvcache": ATTENTION_FEATURES
    - {"dropout", "bool_mask", "additive_mask", "backward", "deterministic", "mask_grad", "alibi_grad"},
    "layer_norm": NORM_FEATURES,
    "rms_norm": NORM_FEATURES - {"bias"},
    "bias_gelu": ACTIVATION_FEATURES,
    "swiglu": ACTIVATION_FEATURES - {"bias", "gelu_tanh"},
    "geglu": ACTIVATION_FEATURES - {"bias"},
}
OPS = tuple(OP_FEATURES)


@dataclass(frozen=True)
class Call:
    """What a backend must know about one call to say whether it can serve it."""

    op: str
    device_type: str  # "cpu", "cuda", ...
    dtype: torch.dtype
    features: frozenset = frozenset()
    head_dim: int = 0  # attention only; 0 elsewhere


@dataclass(frozen=True)
class Capability:
    """The calls of one op that one backend implements."""

    dtypes: frozenset
    features: frozenset
    max_head_dim: int = 0  # 0: no head-dim limit (or not an attention op)

    def why_not(self, call: Call) -> Optional[str]:
        """None if this capability covers ``call``, else the first missing feature."""
        if call.dtype not in self.dtypes:
            return f"dtype {call.dtype}"
        missing = sorted(call.features - self.features)
        if missing:
            return f"feature '{missing[0]}'"
        if self.max_head_dim and call.head_dim > self.max_head_dim:
            return f"head_dim {call.head_dim} (at most {self.max_head_dim})"
        return None


ATTENTION_KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16})
CUDA_ATTENTION_FEATURES = ATTENTION_FEATURES - {
    "alibi", "bool_mask", "additive_mask", "dropout", "mask_grad", "alibi_grad"
}

# What each backend implements. A kernel issue that lands a new kernel adds its entry here.
CAPABILITIES: Mapping[str, Mapping[str, Capability]] = {
    "torch": {op: Capability(FLOAT_DTYPES, features) for op, features in OP_FEATURES.items()},
    "triton": {
        "bias_gelu": Capability(KERNEL_DTYPES, OP_FEATURES["bias_gelu"]),
        "swiglu": Capability(KERNEL_DTYPES, OP_FEATURES["swiglu"]),
        "geglu": Capability(KERNEL_DTYPES, OP_FEATURES["geglu"]),
        "layer_norm": Capability(KERNEL_DTYPES, OP_FEATURES["layer_norm"]),
        "rms_norm": Capability(KERNEL_DTYPES, OP_FEATURES["rms_norm"]),
        # Learned-bias gradients (dmask, dslopes) are left to the torch backend.
        "attention": Capability(
            KERNEL_DTYPES, OP_FEATURES["attention"] - {"mask_grad", "alibi_grad"}, max_head_dim=256
        ),
        "attention_varlen": Capability(
            KERNEL_DTYPES, OP_FEATURES["attention_varlen"] - {"mask_grad", "alibi_grad"}, max_head_dim=256
        ),
        "attention_with_kvcache": Capability(
            KERNEL_DTYPES, OP_FEATURES["attention_with_kvcache"], max_head_dim=256
        ),
    },
    "cuda": {
        "bias_gelu": Capability(KERNEL_DTYPES, OP_FEATURES["bias_gelu"]),
        "swiglu": Capability(KERNEL_DTYPES, OP_FEATURES["swiglu"]),
        "geglu": Capability(KERNEL_DTYPES, OP_FEATURES["geglu"]),
        "layer_norm": Capability(KERNEL_DTYPES, OP_FEATURES["layer_norm"]),
        "rms_norm": Capability(KERNEL_DTYPES, OP_FEATURES["rms_norm"]),
        # Tensor-core kernels: fp16/bf16 only. Dropout, ALiBi and attention masks are left
        # to Triton (auto routes such calls there). Head dims other than 64/128/256 are
        # zero-padded by fast_attn/ops/_attention_cuda.py.
        "attention": Capability(ATTENTION_KERNEL_DTYPES, CUDA_ATTENTION_FEATURES, max_head_dim=256),
        "attention_varlen": Capability(ATTENTION_KERNEL_DTYPES, CUDA_ATTENTION_FEATURES, max_head_dim=256),
        "attention_with_kvcache": Capability(
            ATTENTION_KERNEL_DTYPES,
            CUDA_ATTENTION_FEATURES & OP_FEATURES["attention_with_kvcache"],
            max_head_dim=256,
        ),
    },
}


class BackendStatus(NamedTuple):
    """Whether a backend can run here; ``reason`` says why or why not. Truthy if available."""

    available: bool
    reason: str
    devices: frozenset = frozenset()  # device types whose tensors it accepts

    def __bool__(self) -> bool:
        return self.available


def triton_interpret_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch_status() -> BackendStatus:
    return BackendStatus(True, "pure PyTorch reference ops", frozenset({"cpu", "cuda", "mps", "xpu"}))


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton)")
    devices = set()
    if torch.cuda.is_available():
        devices.add("cuda")
    if triton_interpret_enabled():
        devices.add("cpu")
    if not devices:
        return BackendStatus(
            False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        )
    where = " and ".join(sorted(devices))
    note = " (Triton interpreter)" if "cpu" in devices else ""
    return BackendStatus(True, f"Triton kernels on {where}{note}", frozenset(devices))


def _cuda_status() -> BackendStatus:
    from fast_attn._extension import extension_status

    available, reason = extension_status()
    if available and not torch.cuda.is_available():
        return BackendStatus(False, f"no CUDA device ({reason})")
    return BackendStatus(available, reason, frozenset({"cuda"}) if available else frozenset())


_PROBES = {"cuda": _cuda_status, "triton": _triton_status, "torch": _torch_status}
# Probing is cheap but not free (the cuda probe inspects the toolchain); the answer cannot
# change within a process except through TRITON_INTERPRET, which is part of the key.
_status_cache: dict = {}


def available_backends() -> dict:
    """Every backend name mapped to its ``BackendStatus`` (truthy when usable here).

    >>> {name: status.reason for name, status in fast_attn.available_backends().items()}
    """
    key = triton_interpret_enabled()
    if key not in _status_cache:
        _status_cache[key] = {name: probe() for name, probe in _PROBES.items()}
    return dict(_status_cache[key])


_requested: contextvars.ContextVar = contextvars.ContextVar("fast_attn_backend", default=None)


def _check_name(name: str, allow_auto: bool = True) -> str:
    valid = BACKENDS + ((AUTO,) if allow_auto else ())
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"backend must be one of {valid}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block on backend ``name`` ("auto" restores the default).

    An explicit ``backend=`` argument of a call still takes precedence.
    """
    token = _requested.set(_check_name(name))
    try:
        yield
    finally:
        _requested.reset(token)


def requested_backend(per_call: str = AUTO) -> str:
    """The backend asked for: per call, else the innermost use_backend block, else the env."""
    _check_name(per_call)
    if per_call != AUTO:
        return per_call
    block = _requested.get()
    if block is not None and block != AUTO:
        return block
    env = os.environ.get(ENV_BACKEND, AUTO) or AUTO
    if env not in BACKENDS + (AUTO,):
        raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS + (AUTO,)}, got {env!r}")
    return env


def _cannot(name: str, call: Call, statuses: Mapping[str, BackendStatus]) -> Optional[str]:
    """None if backend ``name`` can serve ``call`` here, else why not."""
    status = statuses[name]
    if not status.available:
        return f"the {name} backend is not available here: {status.reason}"
    if call.device_type not in status.devices:
        return f"the {name} backend does not take {call.device_type} tensors"
    capability = CAPABILITIES[name].get(call.op)
    if capability is None:
        return f"the {name} backend has no {call.op} kernel yet"
    missing = capability.why_not(call)
    if missing is not None:
        return f"the {name} backend's {call.op} does not support {missing}"
    return None


def select_backend(call: Call, requested: str, statuses: Mapping[str, BackendStatus]) -> str:
    """The backend that runs ``call``: a pure function of its arguments.

    ``requested`` is a backend name or "auto". Raises NotImplementedError when the
    explicitly requested backend cannot serve the call, naming the reason and the
    backends that can.
    """
    _check_name(requested)
    if requested != AUTO:
        reason = _cannot(requested, call, statuses)
        if reason is None:
            return requested
        able = [name for name in BACKENDS if _cannot(name, call, statuses) is None]
        raise NotImplementedError(
            f"{call.op}: {reason}; backends that can run this call here: {able}"
        )
    for name in BACKENDS:
        if name == "triton" and call.device_type != "cuda":
            continue  # auto uses the Triton interpreter only when asked for by name
        if _cannot(name, call, statuses) is None:
            return name
    reason = _cannot("torch", call, statuses)
    raise NotImplementedError(f"{call.op}: no backend can run this call: {reason}")


def resolve_backend(call: Call, per_call: str = AUTO) -> str:
    """``select_backend`` for this process: the requested backend and the probed statuses."""
    return select_backend(call, requested_backend(per_call), available_backends())


def features(**flags: bool) -> frozenset:
    """``features(causal=True, dropout=False)`` -> frozenset({"causal"})."""
    return frozenset(name for name, present in flags.items() if present)


def cuda_attention_arch() -> int:
    """The ``arch`` argument of the cuda attention ops, from ``FAST_ATTN_CUDA_ATTENTION_ARCH``.

    Read when the op runs (like the backend choice), so tests can switch it per call.
    ``sm90`` applies to the forward; there is one backward kernel family (sm_80).
    """
    raw = os.environ.get(ENV_CUDA_ATTENTION_ARCH, "auto").strip().lower() or "auto"
    if raw not in CUDA_ATTENTION_ARCHS:
        raise ValueError(
            f"{ENV_CUDA_ATTENTION_ARCH}={raw!r} is not understood: expected one of {sorted(CUDA_ATTENTION_ARCHS)}"
        )
    return CUDA_ATTENTION_ARCHS[raw]
