"""What the figures depend on, printed above them: versions, device, threads, backend, THP."""

from __future__ import annotations

import os
import platform
import sys

import torch

from .. import __version__
from ..kernels import available_backends, requested_backend, unavailable_reason


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {cpu_name()}"


def active_backend(device: str) -> str:
    """The backend fusedce's calls on this device use now, and why, when it is not the usual one.
    Loading it here also puts a first-use JIT compilation ahead of the timings."""
    requested = requested_backend()
    if requested != "auto":
        return f"{requested} (forced)"
    preferred = "triton" if device == "cuda" else "cpu"
    if preferred in available_backends(device):
        return preferred
    return f"reference (FALLBACK: the {preferred} backend is unavailable: {unavailable_reason(preferred)})"


def load_average() -> str:
    """Other work on a shared machine skews every figure; thread wake-ups suffer most."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" (over {os.cpu_count()} CPUs)"
    except OSError:
        return "unknown"


def environment(device: str) -> dict[str, str]:
    return {
        "fusedce": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": device_name(device),
        "threads": str(torch.get_num_threads()),
        "backend": active_backend(device),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "load average": load_average(),
    }
