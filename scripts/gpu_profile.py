"""Where the host time of a small CUDA cross-entropy goes (imagenet-sized), for tuning.

Usage on a GPU machine: ``PYTHONPATH=src python3 scripts/gpu_profile.py``.
"""

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import fusedce
from fusedce.kernels import _load

x = torch.randn(16384, 1000, device="cuda", requires_grad=True)
t = torch.randint(0, 1000, (16384,), device="cuda")
triton_backend = _load("triton")
x3, t2 = x.detach().view(16384, 1000, 1), t.view(16384, 1)


def ours() -> None:
    fusedce.cross_entropy(x, t).backward()
    x.grad = None


def eager() -> None:
    F.cross_entropy(x, t).backward()
    x.grad = None


def kernels_only() -> None:
    loss, lse = triton_backend.ce_forward(x3, t2, None, -100, 0.0)
    triton_backend.ce_backward(loss, x3, t2, None, lse, -100, 0.0, False)


def host_us(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / n * 1e6
    return host, total


for name, fn in [("fusedce", ours), ("eager", eager), ("triton kernels only", kernels_only)]:
    host, total = host_us(fn)
    print(f"{name:>20}: host {host:8.1f} us/iter, with sync {total:8.1f} us/iter")

cProfile.run("for _ in range(100): ours()", "/tmp/prof")
pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(22)
