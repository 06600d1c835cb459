"""What the figures depend on, printed above them: versions, CPU and ISA, threads, backend, and
transparent huge pages (the system's policy, the allocator setting, and whether torch's tensors
actually got huge pages, measured)."""

from __future__ import annotations

import os
import sys

import torch

from .. import __version__
from ..doctor import cpu_name, isa_line, thp_policy
from ..kernels import available_backends, requested_backend, unavailable_reason

# torch reads THP_MEM_ALLOC_ENABLE once, at its first CPU allocation (a function-local static in
# c10's alloc_cpu.cpp), so it must be in the environment before the process starts: the runner
# starts a fresh process per environment. With it, every CPU allocation of 2 MiB or more is
# madvise(MADV_HUGEPAGE)d, which spares the 4 KiB page faults a fresh N×C tensor otherwise pays.
THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
# The environments a CPU run can time torch in: torch's best (the figures) and its default.
TORCH_ENVIRONMENTS: dict[str, dict[str, str | None]] = {
    "thp": {THP_VARIABLE: "1"},
    "default": {THP_VARIABLE: None},
}
ENVIRONMENT_LABELS = {"thp": f"{THP_VARIABLE}=1", "default": f"{THP_VARIABLE} unset (torch's default)"}


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


def _anon_huge_kib() -> int | None:
    try:
        with open("/proc/self/smaps_rollup") as smaps:
            for line in smaps:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def torch_huge_pages(mib: int = 64) -> str:
    """Whether a large tensor torch allocates here is backed by huge pages: allocate and touch one
    and count the growth of the process's anonymous huge pages. This is what THP_MEM_ALLOC_ENABLE
    changes, so the figure shows the setting took effect (the kernel may still refuse, e.g. when
    memory is fragmented, which this shows too)."""
    before = _anon_huge_kib()
    if before is None:
        return "unknown (no /proc/self/smaps_rollup)"
    probe = torch.ones(mib * 2**20 // 4)
    grown = max((_anon_huge_kib() or 0) - before, 0) // 1024
    del probe
    return f"{grown} of a fresh {mib} MiB tensor"


def environment(device: str, this_process: bool = True) -> dict[str, str]:
    """The environment lines. ``this_process=False``: the timings run in child processes, each
    with its own THP_MEM_ALLOC_ENABLE, which the report states per run; this one's would mislead."""
    env = {
        "fusedce": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": device_name(device),
        "threads": str(torch.get_num_threads()),
        "backend": active_backend(device),
    }
    if device == "cpu":
        env["isa"] = isa_line()
        env["hugepages"] = thp_policy()
        if this_process:
            env[THP_VARIABLE] = os.environ.get(THP_VARIABLE, "unset")
            env["torch huge pages (MiB)"] = torch_huge_pages()
        else:
            env[THP_VARIABLE] = "set per run, below"
    env["load average"] = load_average()
    return env
