"""Host time per fwd+bwd of fusedce's cross entropy with each Triton launch mode, and torch eager.

``FUSEDCE_TRITON_LAUNCH=plain`` launches every kernel through ``kernel[grid](...)`` (Triton binds
and specialises every argument on each call); ``fast`` (the default) calls the compiled kernel's
launcher directly once a specialisation is known (``fusedce/kernels/triton/launcher.py``). Both are
timed in this one process through ``launcher.set_mode``, at 16384×1000 fp32 (imagenet-sized),
with no synchronisation inside the timed loop, as ``scripts/gpu_profile.py`` does. It also checks
that both modes give the same loss and gradient bits, and prints the launch counters.

Usage on a GPU machine: ``PYTHONPATH=src python3 scripts/gpu_launch_bench.py`` (about 10 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fusedce
from fusedce.kernels.triton import launcher

ROWS, CLASSES = 16384, 1000
WARMUP, ITERS, REPEATS = 20, 200, 3


def host_us(fn: Callable[[], None]) -> tuple[float, float]:
    """The best of ``REPEATS`` runs: (host µs per call without a sync, µs per call with the final
    sync, i.e. at least the GPU time)."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    best_host = best_total = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(ITERS):
            fn()
        host = (time.perf_counter() - start) / ITERS * 1e6
        torch.cuda.synchronize()
        total = (time.perf_counter() - start) / ITERS * 1e6
        best_host, best_total = min(best_host, host), min(best_total, total)
    return best_host, best_total


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_launch_bench.py needs a CUDA device")
    x = torch.randn(ROWS, CLASSES, device="cuda", requires_grad=True)
    t = torch.randint(0, CLASSES, (ROWS,), device="cuda")

    def ours() -> None:
        fusedce.cross_entropy(x, t).backward()
        x.grad = None

    def eager() -> None:
        F.cross_entropy(x, t).backward()
        x.grad = None

    def result() -> tuple[torch.Tensor, torch.Tensor]:
        loss = fusedce.cross_entropy(x, t)
        loss.backward()
        grad = x.grad.clone()
        x.grad = None
        return loss.detach().clone(), grad

    print(f"fast path: {launcher.fast_path_unavailable() or 'available'}")
    rows = []
    outputs = {}
    for mode in ("plain", "fast"):
        launcher.set_mode(mode)
        before = dict(launcher.counters)
        host, total = host_us(ours)
        counts = {k: launcher.counters[k] - before[k] for k in before}
        outputs[mode] = result()
        rows.append((f"fusedce launch={mode}", host, total, counts))
    launcher.set_mode(None)
    host, total = host_us(eager)
    rows.append(("torch eager", host, total, None))

    print(f"cross entropy fwd+bwd, {ROWS}x{CLASSES} fp32, best of {REPEATS}x{ITERS} calls")
    print(f"{'':>22} {'host us/call':>13} {'with sync':>10}  launches (fast/plain)")
    for name, host, total, counts in rows:
        launches = "" if counts is None else f"{counts['fast']}/{counts['plain']}"
        print(f"{name:>22} {host:13.1f} {total:10.1f}  {launches}")
    same = all(
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        for a, b in zip(outputs["plain"], outputs["fast"], strict=True)
    )
    print(f"plain and fast give the same loss and gradient bits: {same}")


if __name__ == "__main__":
    main()
