"""How much of fusedce.linear_cross_entropy's time is spent outside the matmuls (issue 7).

Times, side by side on the lmhead shape (4096×512 hidden states, 32000 classes, CPU):

1. fusedce's forward + backward ('mean', so the gradients are made in the forward pass);
2. the same block loop with the matmuls only: for each block of the rows fusedce computes (it
   skips wholly ignored rows, see fusedce/linear/rows.py), logits = x_rows @ W.T into the reused
   buffer, grad_x_rows = buffer @ W, grad_W += buffer.T @ x_rows (bf16: the block's grad_W in
   bf16, without its widening into the float32 sum), nothing else.

The difference is what the fused loss, the bookkeeping and the Python around them cost.

Usage: ``python scripts/linear_matmul_share.py [--dtype bf16] [--repeats 5] [--ignore-every 9]``
in ./.venv (every 9th target ignored by default, as in the bench's lmhead workload).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import fusedce
from fusedce.bench.workloads import IGNORE_EVERY, IGNORE_INDEX
from fusedce.linear.chunked import block_rows
from fusedce.linear.rows import computed_rows, selections, take


def medians_s(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each, called in turn (interleaved, so load changes hit all alike)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ignore-every", type=int, default=IGNORE_EVERY,
                        help="every k-th target is ignore_index, as in the bench's lmhead (0: none)")
    parser.add_argument("--shape", type=int, nargs=3, default=(4096, 512, 32000), metavar=("N", "H", "C"))
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows, hidden, classes = args.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(classes, hidden, generator=gen) * hidden**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=gen)
    if args.ignore_every:
        target[:: args.ignore_every] = IGNORE_INDEX

    def fused() -> None:
        x.grad = w.grad = None
        fusedce.linear_cross_entropy(x, w, target).backward()

    chunk = block_rows(rows, classes, dtype, x.device, None)
    xd, wd = x.detach(), w.detach()
    kept = computed_rows(xd, wd, None, target.view(-1, 1), False, IGNORE_INDEX)

    def matmuls_only() -> None:
        buffer = torch.empty(chunk, classes, dtype=dtype)
        grad_x = torch.empty_like(xd)
        grad_w = torch.empty(classes, hidden, dtype=torch.float32)
        w_block = None if dtype == torch.float32 else torch.empty_like(wd)
        first = True
        for sel in selections(rows, chunk, kept):
            x_rows = take(xd, sel)
            out = buffer[: x_rows.shape[0]]
            torch.mm(x_rows, wd.t(), out=out)
            torch.mm(out, wd, out=grad_x[: x_rows.shape[0]])
            if w_block is not None:
                torch.mm(out.t(), x_rows, out=w_block)
            elif first:
                torch.mm(out.t(), x_rows, out=grad_w)
            else:
                grad_w.addmm_(out.t(), x_rows)
            first = False

    total, floor = medians_s([fused, matmuls_only], args.repeats)
    computed = rows if kept is None else kept.shape[0]
    print(f"{rows}x{hidden}x{classes} {args.dtype}, {chunk} rows per block, {computed} rows computed, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"fusedce forward+backward: {total * 1e3:.0f} ms; its matmuls alone: {floor * 1e3:.0f} ms")
    print(f"outside the matmuls: {100 * (total - floor) / total:.1f}% of the time")


if __name__ == "__main__":
    main()
