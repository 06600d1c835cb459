"""Kernel backends and the per-call choice between them.

A backend is a module that implements every function of ``reference`` with the same signature.
The choice is made per call from the tensor's device, so one process can mix CPU and CUDA
tensors, and it can be forced with ``FUSEDCE_BACKEND`` or, in tests, with ``use_backend``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton")
_ENV = "FUSEDCE_BACKEND"

_loaded: dict[str, ModuleType | None] = {}
_unavailable_reason: dict[str, str] = {}
_override = threading.local()


def _load(name: str) -> ModuleType | None:
    """Import a backend once; remember why it is unavailable instead of raising."""
    if name not in _loaded:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            # A backend module may refuse late, e.g. when its compiler is missing.
            probe = getattr(module, "ensure_available", None)
            if probe is not None:
                probe()
            _loaded[name] = module
        except Exception as exc:
            _loaded[name] = None
            _unavailable_reason[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def empty_cache() -> None:
    """Release the memory that fusedce's kernels keep for reuse between calls: on CPU, recent
    outputs that nobody holds any more (gradients, softmax outputs, per-row losses and stats; up
    to eight of 1 to 64 MiB, 128 MiB in all, and the two most recent larger ones, 1 GiB in all),
    kept so that the next step's outputs skip the page faults of fresh memory. Outputs still in
    use are not touched. Like ``torch.cuda.empty_cache``, it changes no result."""
    cpu = _loaded.get("cpu")
    if cpu is not None:
        cpu.empty_cache()


def unavailable_reason(name: str) -> str | None:
    """Why a backend could not be loaded, or None if it loads."""
    _load(name)
    return _unavailable_reason.get(name)


def available_backends(device_type: str = "cpu") -> list[str]:
    """The backends that can run on tensors of this device type here."""
    names = ["reference"]
    if device_type == "cpu" and _load("cpu") is not None:
        names.append("cpu")
    triton_can_run = device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if triton_can_run and _load("triton") is not None:
        names.append("triton")
    return names


def requested_backend() -> str:
    """The forced backend name, or 'auto'."""
    name = getattr(_override, "name", None) or os.environ.get(_ENV, "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r}: expected one of auto, {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for the calls made in this thread inside the block."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of auto, {', '.join(BACKENDS)}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


_warned_fallback: set[str] = set()


_resolved: dict[tuple[str, str], ModuleType] = {}


def backend_for(device: torch.device) -> ModuleType:
    """The kernel module to use for tensors on ``device``. Called twice per loss, so the answer
    is cached per (requested backend, device type)."""
    key = (getattr(_override, "name", None) or os.environ.get(_ENV, "auto") or "auto", device.type)
    module = _resolved.get(key)
    if module is None:
        module = _resolved[key] = _resolve(device)
    return module


def _resolve(device: torch.device) -> ModuleType:
    name = requested_backend()
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "reference"
        module = _load(name)
        if module is None:
            if name not in _warned_fallback:
                _warned_fallback.add(name)
                warnings.warn(
                    f"fusedce: the {name} backend is unavailable ({_unavailable_reason[name]}); "
                    "using the slower reference backend",
                    RuntimeWarning,
                    stacklevel=2,
                )
            name = "reference"
    module = _load(name)
    if module is None:
        raise RuntimeError(f"fusedce: backend {name!r} is unavailable: {_unavailable_reason[name]}")
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"fusedce: the cpu backend cannot run on a {device.type} tensor")
    return module
