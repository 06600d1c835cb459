"""The linear head's block size on CUDA: time and peak memory of fusedce.linear_cross_entropy at
the Llama-3 head (16384 x 4096 x 128256 bf16) for several row blocks, beside torch eager and Liger
(when installed), in one process.

Each row: the median of 5 forward+backward steps after 2 warm-ups (synchronised), and the peak
memory beyond the inputs during one step, gradients included, in MiB and as a multiple of the
logits. ``default`` is the block ``fusedce.linear.chunked.block_rows`` picks.

Usage on a GPU machine: ``PYTHONPATH=src python3 scripts/gpu_lmhead_blocks.py``.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import fusedce
from fusedce.linear.chunked import block_rows

ROWS, HIDDEN, CLASSES = 16384, 4096, 128256
IGNORE = -100


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, HIDDEN, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(CLASSES, HIDDEN, device="cuda", generator=gen) * (2 / HIDDEN**0.5)).bfloat16()
    w.requires_grad_()
    target = torch.randint(0, CLASSES, (ROWS,), device="cuda", generator=gen)
    target[::9] = IGNORE
    return x, w, target


def _measure(loss_fn: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...]) -> tuple[float, int]:
    """(median ms of a synchronised forward+backward, peak bytes beyond the inputs in one step)."""

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        loss_fn().backward()

    times = []
    for i in range(7):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for leaf in leaves:
        leaf.grad = None
    return statistics.median(times) * 1e3, peak


def main() -> None:
    x, w, target = _inputs()
    logits_bytes = ROWS * CLASSES * 2
    default = block_rows(ROWS, CLASSES, torch.bfloat16, x.device, None)
    runs: list[tuple[str, Callable[[], torch.Tensor]]] = []
    for rows in (256, 384, 512, 1024, None):
        options = None if rows is None else SimpleNamespace(batch_chunk_size=rows)
        name = f"fusedce block {default} (default)" if rows is None else f"fusedce block {rows}"
        runs.append((name, lambda o=options: fusedce.linear_cross_entropy(x, w, target, options=o)))
    runs.append(("torch eager", lambda: F.cross_entropy(F.linear(x, w), target)))
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        runs.append(("liger", lambda: liger(w, x, target)))
    print("provider                      |      ms | peak extra MiB | ×logits")
    for name, fn in runs:
        try:
            ms, peak = _measure(fn, (x, w))
        except Exception as exc:  # report and go on
            print(f"{name:<29} | failed: {type(exc).__name__}: {exc}")
            continue
        print(f"{name:<29} | {ms:7.2f} | {peak / 2**20:14.0f} | {peak / logits_bytes:7.3f}")


if __name__ == "__main__":
    main()
