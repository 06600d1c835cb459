"""The CPU measurements behind benchmarks/RESULTS.md's notes on the missed targets, side by side.

1. tiny (256×10): what a Python ``autograd.Function`` alone costs. A bare Function that calls the
   C++ kernels directly (no validation, no reduction inside) against torch eager and fusedce.
2. seg (16×21×128×128): the forward kernel's cost per logit on seg's tile path (class dim not
   last, C = 21) against the row path of an lm-32k-shaped input (4096×32000).
3. lm-32k bf16 (4096×32000): the forward and backward kernels over all 4096 rows, from memory,
   against the same work on 32 rows at a time that stay in cache (128 calls): a kernel that
   takes as long from cache is bound by its arithmetic, not by memory.

Usage: ``python scripts/cpu_floors.py`` (after ``bash scripts/test.sh`` or in ./.venv).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function

import fusedce
from fusedce.kernels import cpu


def median_us(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(max(calls // 10, 3)):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


class BareCrossEntropy(Function):
    """The least a Python Function can do: one kernel forward, one kernel backward."""

    @staticmethod
    def forward(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cpu.ce_forward(x, target, None, -100, 0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _: Any) -> tuple[torch.Tensor, None]:
        x, target, lse = ctx.saved_tensors
        return cpu.ce_backward(grad_loss, x, target, None, lse, -100, 0.0, False), None


def tiny() -> None:
    x = torch.randn(256, 10, requires_grad=True)
    t = torch.randint(0, 10, (256,))
    bare_apply = super(Function, BareCrossEntropy).apply  # type: ignore[misc]

    def bare() -> None:
        rows = t.view(256, 1)
        loss, _ = bare_apply(x.view(256, 10, 1), rows)
        (loss.sum() / (rows != -100).sum()).backward()
        x.grad = None

    def eager() -> None:
        F.cross_entropy(x, t).backward()
        x.grad = None

    def ours() -> None:
        fusedce.cross_entropy(x, t).backward()
        x.grad = None

    results = {name: median_us(fn, 3000) for name, fn in (("eager", eager), ("bare Function", bare),
                                                          ("fusedce", ours))}
    print("tiny 256x10 fp32, forward+backward (median µs, ratio to eager's time):")
    for name, us in results.items():
        print(f"  {name:>14}: {us:7.1f} µs  {us / results['eager']:.2f}x")


def seg() -> None:
    x = torch.randn(16, 21, 128, 128, requires_grad=True)
    t = torch.randint(0, 21, (16, 128, 128))
    x3, t2 = x.detach().view(16, 21, -1), t.view(16, -1)
    lm = torch.randn(4096, 32000, 1)
    lm_t = torch.randint(0, 32000, (4096, 1))

    def eager() -> None:
        F.cross_entropy(x, t).backward()
        x.grad = None

    def ours() -> None:
        fusedce.cross_entropy(x, t).backward()
        x.grad = None

    tile_us = median_us(lambda: cpu.ce_forward(x3, t2, None, -100, 0.0), 40)
    row_us = median_us(lambda: cpu.ce_forward(lm, lm_t, None, -100, 0.0), 10)
    eager_us, ours_us = median_us(eager, 40), median_us(ours, 40)
    print("forward kernel, ns per logit:")
    print(f"  seg (tile path): {tile_us * 1e3 / x3.numel():.3f}   lm-32k (row path): {row_us * 1e3 / lm.numel():.3f}")
    print(f"seg forward+backward: fusedce {ours_us / 1e3:.2f} ms, eager {eager_us / 1e3:.2f} ms "
          f"({eager_us / ours_us:.2f}x)")


def lm_bf16() -> None:
    classes, calls = 32000, 128
    print("lm-32k bf16, 4096 rows' worth (median ms): forward, backward")
    for rows in (4096, 4096 // calls):
        x = (torch.randn(rows, classes, 1) * 3).bfloat16()
        t = torch.randint(0, classes, (rows, 1))
        _, stats = cpu.ce_forward(x, t, None, -100, 0.0)
        g = torch.ones(rows, 1)
        repeat = 4096 // rows

        def forward(x: torch.Tensor = x, t: torch.Tensor = t, repeat: int = repeat) -> None:
            for _ in range(repeat):
                cpu.ce_forward(x, t, None, -100, 0.0)

        def backward(x: torch.Tensor = x, t: torch.Tensor = t, stats: torch.Tensor = stats,
                     g: torch.Tensor = g, repeat: int = repeat) -> None:
            for _ in range(repeat):
                cpu.ce_backward(g, x, t, None, stats, -100, 0.0, False)

        where = "from memory" if rows == 4096 else f"{rows} rows x {repeat}, in cache"
        print(f"  {where:>24}: {median_us(forward, 20) / 1e3:6.2f}  {median_us(backward, 20) / 1e3:6.2f}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tiny()
    seg()
    lm_bf16()
