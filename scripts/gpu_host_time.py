"""Host time of one cross-entropy forward+backward on CUDA, fusedce against torch eager.

Small losses on a GPU are bound by the host: the kernels take microseconds, the Python, the
dispatcher and the launches around them take more. For each shape this prints the host time per
call (the loop queues its work without synchronising; a synchronize after it) and the wall time
with a synchronize per call, for torch eager and for fusedce with each Triton launch mode that
this fusedce has (``FUSEDCE_TRITON_LAUNCH``, see src/fusedce/kernels/triton/). With ``--profile``
it also writes a cProfile of fusedce's calls at the imagenet shape.

Usage on a GPU machine: ``PYTHONPATH=src python3 scripts/gpu_host_time.py [--profile PATH]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fusedce
from fusedce.kernels.triton import launcher

SHAPES = {
    "tiny 256x10": ((256, 10), 10),
    "imagenet 16384x1000": ((16384, 1000), 1000),
    "seg 16x21x128x128": ((16, 21, 128, 128), 21),
    "lm-32k 4096x32000": ((4096, 32000), 32000),
}


def _inputs(shape: tuple[int, ...], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(shape, device="cuda", requires_grad=True)
    target_shape = (shape[0], *shape[2:])
    return x, torch.randint(0, classes, target_shape, device="cuda")


def _step(loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss_fn(x, target).backward()
        x.grad = None

    return step


def host_and_wall_us(step: Callable[[], None], calls: int) -> tuple[float, float]:
    """(host µs per call with no synchronisation in the loop, median wall µs per synchronised call)."""
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    walls = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    return host, statistics.median(walls) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--profile", help="write a cProfile of fusedce at the imagenet shape here")
    args = parser.parse_args()
    rows = []
    for name, (shape, classes) in SHAPES.items():
        x, target = _inputs(shape, classes)
        eager_host, eager_wall = host_and_wall_us(_step(F.cross_entropy, x, target), args.calls)
        for mode in launcher.MODES:
            launcher.set_mode(mode)
            host, wall = host_and_wall_us(_step(fusedce.cross_entropy, x, target), args.calls)
            rows.append((name, mode, host, wall, eager_host, eager_wall))
    launcher.set_mode(None)  # back to FUSEDCE_TRITON_LAUNCH
    print(
        "shape               | launch | fusedce host µs | eager host µs | host ×eager | fusedce wall µs "
        "| eager wall µs | eager/fusedce wall"
    )
    for name, mode, host, wall, eager_host, eager_wall in rows:
        print(
            f"{name:<19} | {mode:<6} | {host:15.1f} | {eager_host:13.1f} | {host / eager_host:11.2f} "
            f"| {wall:15.1f} | {eager_wall:13.1f} | {eager_wall / wall:18.2f}"
        )
    if args.profile:
        x, target = _inputs(*SHAPES["imagenet 16384x1000"])
        step = _step(fusedce.cross_entropy, x, target)
        profile = cProfile.Profile()
        profile.runcall(lambda: [step() for _ in range(100)])
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        with open(args.profile, "w") as out:
            out.write(text.getvalue())


if __name__ == "__main__":
    main()
