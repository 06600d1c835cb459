"""Where one forward+backward of the CUDA lmhead (16384 x 4096 x 128256 bf16) spends its GPU time:
fusedce.linear_cross_entropy and, for comparison, Liger's fused linear cross-entropy when
installed, each profiled with torch.profiler (CUDA kernels by total time).

Usage on a GPU machine: ``PYTHONPATH=src python3 scripts/gpu_lmhead_profile.py [--block ROWS]``.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

import fusedce

ROWS, HIDDEN, CLASSES = 16384, 4096, 128256


def _table(name: str, step: Callable[[], None]) -> None:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"== {name}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=None, help="fusedce's rows per block (default: its own)")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, HIDDEN, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(CLASSES, HIDDEN, device="cuda", generator=gen) * (2 / HIDDEN**0.5)).bfloat16()
    w.requires_grad_()
    target = torch.randint(0, CLASSES, (ROWS,), device="cuda", generator=gen)
    target[::9] = -100
    options = None if args.block is None else SimpleNamespace(batch_chunk_size=args.block)

    def ours() -> None:
        x.grad = w.grad = None
        fusedce.linear_cross_entropy(x, w, target, options=options).backward()

    _table("fusedce", ours)
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

        def theirs() -> None:
            x.grad = w.grad = None
            liger(w, x, target).backward()

        _table("liger", theirs)


if __name__ == "__main__":
    main()
