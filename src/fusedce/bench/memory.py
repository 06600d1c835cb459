"""Peak memory of one forward plus backward, beyond the inputs, as a multiple of the logits' bytes.

On CUDA, ``torch.cuda.max_memory_allocated`` in this process. On CPU, each provider runs in a fresh
subprocess (``memory_probe``), so one provider's freed-but-cached memory cannot hide another's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from .providers import providers
from .timing import make_step
from .workloads import Workload, make_inputs

PROBE_TIMEOUT_S = 600


@dataclass
class Peak:
    workload: str  # Workload.key
    provider: str
    extra_bytes: int | None
    logits_bytes: int
    method: str
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.extra_bytes is None else self.extra_bytes / self.logits_bytes


def peak_extra(workload: Workload, provider: str, device: str, backend: str | None = None) -> Peak:
    if device == "cuda":
        return _cuda_peak(workload, provider)
    return _cpu_peak(workload, provider, backend)


def _cuda_peak(workload: Workload, name: str) -> Peak:
    (provider,) = providers(workload, "cuda", [name])
    inputs = make_inputs(workload, "cuda")
    step = make_step(provider, inputs, "full")
    step.setup()
    step.run()  # warm-up: Triton and Inductor compile outside the measurement
    step.setup()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step.run()  # the gradient stays alive in inputs.x.grad until the peak is read, as in training
    extra = torch.cuda.max_memory_allocated() - before
    del inputs, step
    torch.cuda.empty_cache()
    return Peak(workload.key, name, extra, workload.logits_bytes, "cuda.max_memory_allocated")


def _cpu_peak(workload: Workload, name: str, backend: str | None) -> Peak:
    # glibc keeps freed blocks under its mmap threshold (up to 32 MiB) resident for reuse, so a
    # smaller gradient would land in the warm-up's freed memory and not show. A low threshold
    # makes every block of 64 KiB or more its own mapping, returned to the kernel when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    if backend is not None:
        env["FUSEDCE_BACKEND"] = backend
    command = [sys.executable, "-m", "fusedce.bench.memory_probe", workload.key, name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return Peak(workload.key, name, None, workload.logits_bytes, "-", f"timed out after {PROBE_TIMEOUT_S} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Peak(workload.key, name, None, workload.logits_bytes, "-",
                    f"probe exited {done.returncode}: {tail[:200]}")
    found = json.loads(lines[-1])
    return Peak(workload.key, name, found["extra_bytes"], workload.logits_bytes, found["method"])
