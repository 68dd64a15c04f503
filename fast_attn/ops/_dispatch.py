"""One dispatch for every op: resolve the backend, then the empty-input result, then the kernel.

Every custom op's implementation calls ``dispatch``: the backend is resolved first (so
an explicitly requested backend that cannot serve the call raises even on empty input,
the same rule for every op), then an empty call returns its empty result without
launching anything, then the backend's kernel runs. Kernels are found by one naming
scheme: backend module ``fast_attn.{torch_backend,triton_kernels,cuda_backend}.<family>``
and function ``<name>`` (``attention_fwd``, ``norm_bwd``, ``glu_fwd``, ...), imported on
first use (so triton is imported only when the triton backend runs).

A CUDA extension that fails to load (e.g. a failed JIT build) makes the cuda backend
unavailable for the process: a call that asked for it by name raises the reason, a call
under ``auto`` falls back to the next backend.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

from fast_attn import backends

_MODULES = {
    "torch": "fast_attn.torch_backend",
    "triton": "fast_attn.triton_kernels",
    "cuda": "fast_attn.cuda_backend",
}
_kernels: dict = {}


_CALLS: dict = {}  # call summaries by their inputs (a few dozen per process), built once each


def call_summary(op: str, t, **flags: bool) -> backends.Call:
    """The ``backends.Call`` of an op on tensor ``t`` with the given feature flags
    (memoized: a call site passes its flags in one fixed order)."""
    key = (op, t.device, t.dtype, *flags.values())
    call = _CALLS.get(key)
    if call is None:
        call = _CALLS[key] = backends.Call(op, t.device.type, t.dtype, backends.features(**flags),
                                           arch=backends.device_arch(t.device))
    return call


def kernel(backend: str, family: str, name: str) -> Callable:
    """Backend ``backend``'s function ``name`` of op family ``family`` (imported once)."""
    key = (backend, family, name)
    fn = _kernels.get(key)
    if fn is None:
        module = importlib.import_module(f"{_MODULES[backend]}.{family}")
        fn = _kernels[key] = getattr(module, name)
    return fn


def choose(call: backends.Call, per_call: str) -> str:
    """The backend that runs ``call``; loads the CUDA extension when cuda is chosen."""
    name = backends.resolve_backend(call, per_call)
    if name == "cuda":
        from fast_attn._extension import ExtensionUnavailable, load_extension

        try:
            load_extension()
        except ExtensionUnavailable:
            if backends.requested_backend(per_call) != backends.AUTO:
                raise
            name = backends.resolve_backend(call, per_call)  # cuda is unavailable now
    return name


def dispatch(call: backends.Call, per_call: str, family: str, name: str,
             empty: Optional[Callable[[], object]], *args):
    """Resolve, then ``empty()`` when given (an empty call), else the kernel on ``args``."""
    backend = choose(call, per_call)
    if empty is not None:
        return empty()
    return kernel(backend, family, name)(*args)
