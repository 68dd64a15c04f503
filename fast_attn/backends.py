"""Which backends exist on this machine, what each can compute, and which one a call gets.

Three backends compute the ops (the cuda backend all but ``rotary``):

- ``"cuda"``:   the CUDA C++ kernels in ``fast_attn._C`` (built by setup.py or JIT-built
                on first use), reached through ``fast_attn.cuda_backend``;
- ``"triton"``: the Triton kernels in ``fast_attn.triton_kernels``; on a CUDA device, or
                on CPU tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter);
- ``"torch"``:  ``fast_attn.torch_backend``: ATen's fused ops where they compute exactly
                our semantics, plain maths for the rest; any device, every feature.

Each backend declares, per op, the dtypes and features it implements (``CAPABILITIES``).
``"auto"`` picks the first of cuda, triton, torch that can do the call here, but only
kernel families with evidence: a cuda family only where the GPU test suite has passed it
on this architecture (``fast_attn/verified.py``, data with the results file that shows
the pass); triton is eligible on CUDA devices on the strength of its interpreter tests and
sm_90 compile checks; torch always. Auto never picks a backend that would compute
something different. The requested backend comes from, in order of precedence: the
``backend=`` argument of a call (when not ``"auto"``), the innermost ``with
use_backend(...)`` block, the ``FAST_ATTN_BACKEND`` environment variable.

The choice is made when the op runs (inside the custom op), not when it is traced, so a
``torch.compile``-d model follows ``use_backend`` blocks without recompiling, and nothing
outside the custom ops reads the context (Dynamo before torch 2.14 cannot trace a
``ContextVar``). ``select_backend`` is a pure function of its arguments so tests exercise
every rule on CPU; ``resolve_backend`` memoizes it per (call, request).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple, Optional

import torch

from fast_attn import verified as _verified
from fast_attn.triton_kernels._device import interpret_enabled

BACKENDS = ("cuda", "triton", "torch")
AUTO = "auto"
ENV_BACKEND = "FAST_ATTN_BACKEND"
# Which kernel family the cuda attention ops run: "auto" (sm_90a on Hopper when built, else
# sm_80), "sm80" (force the Ampere kernels, e.g. to test them on an H100) or "sm90".
ENV_CUDA_ATTENTION_ARCH = "FAST_ATTN_CUDA_ATTENTION_ARCH"
CUDA_ATTENTION_ARCHS = {"auto": 0, "sm80": 1, "sm90": 2}  # the `arch` argument of the cuda ops
# Backends that auto may pick without a row in fast_attn/verified.py, and why.
UNGATED = {
    "torch": "ATen ops, verified against the reference on every CI run",
    "triton": "verified against the reference under the Triton interpreter and compiled for sm_90 on every CI run",
}

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
ROTARY_FEATURES = frozenset(
    {
        "interleaved",  # GPT-J pairs (2m, 2m + 1)
        "batch_offsets",  # seqlen_offsets given as a per-batch tensor
        "backward",  # the rotation by -sin (the backward pass)
    }
)

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
    "rotary": ROTARY_FEATURES,
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
    arch: tuple = ()  # the CUDA device's compute capability, () elsewhere


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
        "rotary": Capability(KERNEL_DTYPES, OP_FEATURES["rotary"]),
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
    # No rotary kernel in CUDA C++: auto sends rotary to triton or torch.
    "cuda": {
        "bias_gelu": Capability(KERNEL_DTYPES, OP_FEATURES["bias_gelu"]),
        "swiglu": Capability(KERNEL_DTYPES, OP_FEATURES["swiglu"]),
        "geglu": Capability(KERNEL_DTYPES, OP_FEATURES["geglu"]),
        "layer_norm": Capability(KERNEL_DTYPES, OP_FEATURES["layer_norm"]),
        "rms_norm": Capability(KERNEL_DTYPES, OP_FEATURES["rms_norm"]),
        # Tensor-core kernels: fp16/bf16 only. Dropout, ALiBi and attention masks are left
        # to Triton (auto routes such calls there). Head dims other than 64/128/256 are
        # zero-padded by fast_attn/cuda_backend/attention.py.
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


# os.environ.get costs ~2 us (Mapping.get, key encoding, value decoding) and the request
# is read on every op call: read CPython's underlying bytes dict directly where it exists.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_ENCODE = getattr(os.environ, "encodekey", None)


def _getenv(name: str) -> Optional[str]:
    if _ENV_DATA is None or _ENV_ENCODE is None:
        return os.environ.get(name)
    raw = _ENV_DATA.get(_ENV_ENCODE(name))
    return None if raw is None else os.environ.decodevalue(raw)


# True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (one definition,
# in the kernel layer; importing it imports no triton).
triton_interpret_enabled = interpret_enabled


def _torch_status() -> BackendStatus:
    return BackendStatus(
        True, "ATen fused ops (plain maths where ATen has no op for a feature)",
        frozenset({"cpu", "cuda", "mps", "xpu"}),
    )


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
    if not available:
        return BackendStatus(False, reason)
    arch = device_arch(torch.device("cuda", torch.cuda.current_device()))
    gated = _verified.unverified_ops("cuda", arch, [op for op in OPS if op in CAPABILITIES["cuda"]])
    if gated:
        reason = (
            f"{reason}; not yet verified on a GPU of compute capability {arch[0]}.{arch[1]} "
            f"for {', '.join(gated)}: auto skips those, backend='cuda' runs them"
        )
    return BackendStatus(True, reason, frozenset({"cuda"}))


_PROBES = {"cuda": _cuda_status, "triton": _triton_status, "torch": _torch_status}
# Probing is cheap but not free (the cuda probe inspects the toolchain); the answer changes
# within a process only through TRITON_INTERPRET (part of the key) or a failed load of
# the CUDA extension (which calls ``forget_statuses``).
_status_cache: dict = {}
_selection_cache: dict = {}


def available_backends() -> dict:
    """Every backend name mapped to its ``BackendStatus`` (truthy when usable here).

    >>> {name: status.reason for name, status in fast_attn.available_backends().items()}
    """
    return dict(_statuses())


def _statuses() -> Mapping[str, BackendStatus]:
    key = triton_interpret_enabled()
    statuses = _status_cache.get(key)
    if statuses is None:
        statuses = _status_cache[key] = {name: probe() for name, probe in _PROBES.items()}
    return statuses


def forget_statuses() -> None:
    """Probe again on the next call (after the CUDA extension failed or succeeded to load)."""
    _status_cache.clear()
    _selection_cache.clear()


_ARCHS: dict = {}


def device_arch(device: torch.device) -> tuple:
    """The compute capability of a CUDA device, () for other devices (cached per device)."""
    if device.type != "cuda":
        return ()
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _ARCHS.get(index)
    if arch is None:
        arch = _ARCHS[index] = tuple(torch.cuda.get_device_capability(index))
    return arch


# ----------------------------------------------------------------------- the request


_requested: contextvars.ContextVar = contextvars.ContextVar("fast_attn_backend", default=None)
_cuda_arch_requested: contextvars.ContextVar = contextvars.ContextVar("fast_attn_cuda_arch", default=None)


def check_name(name: object, allow_auto: bool = True) -> str:
    """``name`` if it is a backend name (or "auto"), else ValueError. Pure: safe to call
    outside the custom ops (torch.compile traces it)."""
    valid = BACKENDS + ((AUTO,) if allow_auto else ())
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"backend must be one of {valid}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block on backend ``name`` ("auto" restores the default).

    An explicit ``backend=`` argument of a call still takes precedence.
    """
    token = _requested.set(check_name(name))
    try:
        yield
    finally:
        _requested.reset(token)


def requested_backend(per_call: str = AUTO) -> str:
    """The backend asked for: per call, else the innermost use_backend block, else the env.

    Reads a ContextVar: call it only inside the custom ops.
    """
    if per_call != AUTO:
        return check_name(per_call)
    block = _requested.get()
    if block is not None and block != AUTO:
        return block
    env = _getenv(ENV_BACKEND) or AUTO
    if env not in BACKENDS and env != AUTO:
        raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS + (AUTO,)}, got {env!r}")
    return env


@contextlib.contextmanager
def use_cuda_attention_arch(name: str) -> Iterator[None]:
    """Run the cuda attention ops called inside the block on kernel family ``name``:
    "sm80" (the Ampere kernels, e.g. to test them on an H100), "sm90" (the Hopper
    forward) or "auto" (sm_90a on Hopper where it was built and serves the call, else
    sm_80). ``FAST_ATTN_CUDA_ATTENTION_ARCH`` sets the process default."""
    if name not in CUDA_ATTENTION_ARCHS:
        raise ValueError(f"cuda attention arch must be one of {sorted(CUDA_ATTENTION_ARCHS)}, got {name!r}")
    token = _cuda_arch_requested.set(name)
    try:
        yield
    finally:
        _cuda_arch_requested.reset(token)


def cuda_attention_arch() -> int:
    """The ``arch`` argument of the cuda attention ops: the innermost
    ``use_cuda_attention_arch`` block, else ``FAST_ATTN_CUDA_ATTENTION_ARCH``, else auto.

    Read when the op runs (like the backend choice). ``sm90`` applies to the forward;
    there is one backward kernel family (sm_80).
    """
    block = _cuda_arch_requested.get()
    if block is not None:
        return CUDA_ATTENTION_ARCHS[block]
    raw = (_getenv(ENV_CUDA_ATTENTION_ARCH) or "auto").strip().lower() or "auto"
    if raw not in CUDA_ATTENTION_ARCHS:
        raise ValueError(
            f"{ENV_CUDA_ATTENTION_ARCH}={raw!r} is not understood: expected one of {sorted(CUDA_ATTENTION_ARCHS)}"
        )
    return CUDA_ATTENTION_ARCHS[raw]


# ------------------------------------------------------------------------ the choice


def why_not(name: str, call: Call, statuses: Optional[Mapping[str, BackendStatus]] = None) -> Optional[str]:
    """None if backend ``name`` can compute ``call`` here when asked for by name, else why
    not (one sentence). ``statuses`` defaults to this process's ``available_backends()``.
    Says nothing of auto's evidence rule: see ``why_not_auto``."""
    check_name(name, allow_auto=False)
    status = (statuses if statuses is not None else _statuses())[name]
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


def why_not_auto(name: str, call: Call, statuses: Optional[Mapping[str, BackendStatus]] = None,
                 verified=None) -> Optional[str]:
    """None if ``"auto"`` may pick backend ``name`` for ``call`` (it can, and the evidence
    rule allows it), else why not."""
    reason = why_not(name, call, statuses)
    if reason is not None:
        return reason
    if name == "triton" and call.device_type != "cuda":
        return "auto uses the Triton interpreter only when asked for by name"
    if name not in UNGATED and not _verified.is_verified(name, call.op, call.arch, verified):
        where = f"compute capability {call.arch[0]}.{call.arch[1]}" if call.arch else call.device_type
        return (f"the {name} backend's {call.op} has not yet passed the GPU test suite on {where} "
                f"(fast_attn/verified.py): it runs only when asked for by name")
    return None


def select_backend(call: Call, requested: str, statuses: Mapping[str, BackendStatus], verified=None) -> str:
    """The backend that runs ``call``: a pure function of its arguments.

    ``requested`` is a backend name or "auto"; ``verified`` the record of GPU-verified
    kernel families (default: ``fast_attn.verified.VERIFIED``). Raises
    NotImplementedError when the explicitly requested backend cannot serve the call,
    naming the reason and the backends that can.
    """
    check_name(requested)
    if requested != AUTO:
        reason = why_not(requested, call, statuses)
        if reason is None:
            return requested
        able = [name for name in BACKENDS if why_not(name, call, statuses) is None]
        raise NotImplementedError(
            f"{call.op}: {reason}; backends that can run this call here: {able}"
        )
    for name in BACKENDS:
        if why_not_auto(name, call, statuses, verified) is None:
            return name
    reason = why_not("torch", call, statuses)
    raise NotImplementedError(f"{call.op}: no backend can run this call: {reason}")


def resolve_backend(call: Call, per_call: str = AUTO) -> str:
    """``select_backend`` for this process: the requested backend and the probed statuses
    (memoized per call summary and request; call it only inside the custom ops)."""
    requested = requested_backend(per_call)
    key = (call, requested, triton_interpret_enabled())
    name = _selection_cache.get(key)
    if name is None:
        name = _selection_cache[key] = select_backend(call, requested, _statuses())
    return name


def features(**flags: bool) -> frozenset:
    """``features(causal=True, dropout=False)`` -> frozenset({"causal"})."""
    return frozenset(name for name, present in flags.items() if present)
