"""How much of fusedce.linear_cross_entropy's time is spent outside the matmuls (issue 7).

Times, side by side on the lmhead shape (4096×512 hidden states, 32000 classes, CPU):

1. fusedce's forward + backward ('mean', so the gradients are made in the forward pass);
2. the same block loop with the matmuls only: for each block, logits = x_rows @ W.T into the
   reused buffer, grad_x_rows = buffer @ W, grad_W += buffer.T @ x_rows, nothing else.

The difference is what the fused loss, the bookkeeping and the Python around them cost.

Usage: ``python scripts/linear_matmul_share.py [--dtype bf16] [--repeats 5]`` in ./.venv.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import fusedce
from fusedce.linear.chunked import block_rows


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(4096, 512, 32000), metavar=("N", "H", "C"))
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows, hidden, classes = args.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(classes, hidden, generator=gen) * hidden**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=gen)

    def fused() -> None:
        x.grad = w.grad = None
        fusedce.linear_cross_entropy(x, w, target).backward()

    chunk = block_rows(rows, classes, dtype, x.device, None)
    xd, wd = x.detach(), w.detach()

    def matmuls_only() -> None:
        buffer = torch.empty(chunk, classes, dtype=dtype)
        grad_x = torch.empty_like(xd)
        grad_w = torch.zeros(classes, hidden, dtype=torch.float32)
        w_block = None if dtype == torch.float32 else torch.empty_like(wd)
        for start in range(0, rows, chunk):
            x_rows = xd[start : start + chunk]
            out = buffer[: x_rows.shape[0]]
            torch.mm(x_rows, wd.t(), out=out)
            torch.mm(out, wd, out=grad_x[start : start + chunk])
            if w_block is None:
                grad_w.addmm_(out.t(), x_rows)
            else:
                torch.mm(out.t(), x_rows, out=w_block)
                grad_w.add_(w_block)

    total, floor = median_s(fused, args.repeats), median_s(matmuls_only, args.repeats)
    print(f"{rows}x{hidden}x{classes} {args.dtype}, {chunk} rows per block, {torch.get_num_threads()} threads")
    print(f"fusedce forward+backward: {total * 1e3:.0f} ms; its matmuls alone: {floor * 1e3:.0f} ms")
    print(f"outside the matmuls: {100 * (total - floor) / total:.1f}% of the time")


if __name__ == "__main__":
    main()
