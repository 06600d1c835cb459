"""``python -m fusedce doctor``: what fusedce can do on this machine, on one screen.

Versions, every backend (usable or why not), the CPU's vector ISA, the compiler and ninja, the
kernel cache, Triton and the GPU. Paste it into a bug report. It builds nothing: a CPU backend that
is not compiled yet is reported as such (``python -m fusedce build`` compiles it). The exit status
is 1 when the fused backend of this machine's device (triton with a GPU, else cpu) is unusable.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from . import __version__, kernels
from ._torch_version import MINIMUM_TORCH
from .kernels import cpu

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def add_parser(commands: Any) -> None:
    p = commands.add_parser("doctor", help="report versions, backends, compiler, kernel cache and GPU; "
                            "exit 1 if this device's fused backend is unusable", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_line() -> str:
    """The vector ISA ATen's own kernels use (its Vectorized<T> dispatch), and fusedce's."""
    try:
        ours = cpu.toolchain()["isa"]
    except ValueError as exc:  # a bad FUSEDCE_CPU_ISA
        ours = f"? ({exc})"
    forced = " (forced by FUSEDCE_CPU_ISA)" if os.environ.get("FUSEDCE_CPU_ISA") else ""
    return f"ATen {torch.backends.cpu.get_cpu_capability()}; fusedce's kernels {ours}{forced}"


def thp_policy() -> str:
    """The kernel's transparent-huge-page policy: 'madvise' honours THP_MEM_ALLOC_ENABLE (and
    fusedce's own madvise); 'never' ignores both."""
    try:
        return f"system policy {THP_SETTING.read_text().strip()}"
    except OSError:
        return "system policy unknown"


def thp_line() -> str:
    """The policy, and whether torch's allocator asks for huge pages in this process."""
    return f"{thp_policy()}; THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"


def gpu_line() -> str:
    if torch.version.cuda is None and torch.version.hip is None:
        return "none (this torch is a CPU build)"
    if not torch.cuda.is_available():
        return f"none found (torch built for CUDA {torch.version.cuda})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{', '.join(names)} (CUDA {torch.version.cuda})"


def triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed (pip install 'fusedce[cuda]' on a CUDA machine)"
    try:
        import triton
    except Exception as exc:
        return f"installed but fails to import: {type(exc).__name__}: {exc}"
    return str(triton.__version__)


def cpu_backend_state() -> tuple[bool, str]:
    """(usable, why): loaded from the cache when built; otherwise whether it could be built."""
    try:
        built = cpu.is_built()
    except ValueError as exc:
        return False, str(exc)
    if built:
        reason = kernels.unavailable_reason("cpu")  # loads the cached library, compiles nothing
        return reason is None, reason or "usable"
    problem = cpu.toolchain()["problem"]
    if problem:
        return False, f"cannot be built: {problem}"
    return True, "usable, not compiled yet: the first call compiles it (~1 min), or run `python -m fusedce build`"


def triton_backend_state() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'fusedce[cuda]')"
    if not torch.cuda.is_available():
        return False, "no CUDA device (on CPU tensors it runs only under TRITON_INTERPRET=1, for tests)"
    reason = kernels.unavailable_reason("triton")
    return reason is None, reason or "usable"


def backend_states() -> dict[str, tuple[str, bool, str]]:
    """Every backend: (the device it runs on, usable, why)."""
    return {
        "reference": ("any", True, "usable (pure PyTorch, the slow fallback)"),
        "cpu": ("cpu", *cpu_backend_state()),
        "triton": ("cuda", *triton_backend_state()),
    }


def _found(path: str | None, version: str | None) -> str:
    return f"{path} ({version})" if path else "not found"


def report() -> tuple[list[str], bool]:
    """The lines to print, and whether this device's fused backend is usable."""
    states = backend_states()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = "triton" if device == "cuda" else "cpu"
    tools = cpu.toolchain()
    try:
        cache = f"{cpu.kernel_dir()} ({'built' if cpu.is_built() else 'not built: python -m fusedce build'})"
    except ValueError as exc:
        cache = f"? ({exc})"
    minimum = ".".join(map(str, MINIMUM_TORCH))
    package_dir = Path(__file__).resolve().parent
    lines = [
        f"fusedce   {__version__} ({package_dir})",
        f"python    {platform.python_version()} ({sys.executable})",
        f"torch     {torch.__version__} (fusedce needs >= {minimum}; CUDA {torch.version.cuda or 'none'})",
        f"triton    {triton_version()}",
        f"cpu       {cpu_name()}, {torch.get_num_threads()} threads",
        f"isa       {isa_line()}",
        f"hugepages {thp_line()}",
        f"gpu       {gpu_line()}",
        f"compiler  {_found(tools['compiler'], tools['compiler_version'])}",
        f"ninja     {_found(tools['ninja'], tools['ninja_version'])}",
        f"headers   {tools['python_headers'] or 'Python.h not found'}",
        f"kernels   {cache}",
        "backends:",
    ]
    for name, (runs_on, ok, why) in states.items():
        lines.append(f"  {name:<9} {'[' + runs_on + ']':<6} {'ok' if ok else 'NO':<3} {why}")
    forced = os.environ.get("FUSEDCE_BACKEND")
    if forced and forced != "auto":
        lines.append(f"note: FUSEDCE_BACKEND={forced} forces that backend for every call")
    usable = states[fused][1]
    verdict = "usable" if usable else "NOT usable: calls fall back to the slow reference backend"
    lines.append(f"verdict: the fused backend for {device} tensors ({fused}) is {verdict}")
    return lines, usable


def run(args: argparse.Namespace) -> int:
    lines, usable = report()
    print("\n".join(lines))
    return 0 if usable else 1
