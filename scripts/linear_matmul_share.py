"""How much of fusedce.linear_cross_entropy's time is spent outside the matmuls, and how fast
the matmuls run in blocks against one full-size product each (issue 7).

Times, side by side on the lmhead shape (4096×512 hidden states, 32000 classes, CPU), interleaved:

1. fusedce's forward + backward ('mean', so the gradients are made in the forward pass);
2. the same block loop with the matmuls only, issued as fusedce issues them: for each block of the
   rows fusedce computes (it skips wholly ignored rows, see fusedce/linear/rows.py), the logits
   ``x_rows @ W.T``, the input gradient ``buffer @ W`` and ``grad_W += buffer.T @ x_rows`` (float32:
   the first two through oneDNN, see fusedce/linear/matmul.py, the last with ``addmm_``; bf16:
   ``mm``, the block's grad_W in bf16 without its widening into the float32 sum), nothing else;
3. the floor: the three products once each at full size (all 4096 rows), ``torch.mm`` into
   preallocated outputs (MKL in float32, oneDNN in bf16), and in float32 also through oneDNN.

1 − 2 is what the fused loss, the weight gradient's float32 widening (bf16), the bookkeeping and
the Python around them cost; 2 against 3 (per computed row) is what blocking costs the matmuls.

Usage: ``python scripts/linear_matmul_share.py [--dtype bf16] [--repeats 5] [--ignore-every 9]``
in ./.venv, with ``THP_MEM_ALLOC_ENABLE=1`` as the bench runs torch.
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
from fusedce.linear import matmul
from fusedce.linear.chunked import block_rows
from fusedce.linear.rows import computed_rows, selections, take


def medians_s(fns: list[Callable[[], object]], repeats: int, stat: Callable[[list[float]], float]
              = statistics.median) -> list[float]:
    """Median (or ``stat``) seconds of each, called in turn (interleaved, so load changes hit all
    alike)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [stat(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ignore-every", type=int, default=IGNORE_EVERY,
                        help="every k-th target is ignore_index, as in the bench's lmhead (0: none)")
    parser.add_argument("--shape", type=int, nargs=3, default=(4096, 512, 32000), metavar=("N", "H", "C"))
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="min: each one's fastest call, the closest to an idle machine's on a loaded one")
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
        onednn = matmul.onednn(xd, wd)
        buffer = None if onednn else torch.empty(chunk, classes, dtype=dtype)
        grad_x = torch.empty_like(xd)
        grad_w = torch.empty(classes, hidden, dtype=torch.float32)
        w_block = None if dtype == torch.float32 else torch.empty_like(wd)
        first = True
        for sel in selections(rows, chunk, kept):
            x_rows = take(xd, sel)
            n = x_rows.shape[0]
            if buffer is None:
                out = matmul.linear(x_rows, wd, None)
                grad_x[:n] = matmul.linear(out, wd.t(), None)
            else:
                out = buffer[:n]
                torch.mm(x_rows, wd.t(), out=out)
                torch.mm(out, wd, out=grad_x[:n])
            if w_block is not None:
                torch.mm(out.t(), x_rows, out=w_block)
            elif first:
                torch.mm(out.t(), x_rows, out=grad_w)
            else:
                grad_w.addmm_(out.t(), x_rows)
            first = False
            del out

    full_logits = torch.empty(rows, classes, dtype=dtype)
    full_grad = (torch.randn(rows, classes, generator=gen) * 1e-4).to(dtype)
    full_x, full_w = torch.empty_like(xd), torch.empty_like(wd)

    def full_mm() -> None:
        torch.mm(xd, wd.t(), out=full_logits)
        torch.mm(full_grad, wd, out=full_x)
        torch.mm(full_grad.t(), xd, out=full_w)

    def full_onednn() -> None:
        matmul.linear(xd, wd, None)
        matmul.linear(full_grad, wd.t(), None)
        matmul.linear(full_grad.t(), xd.t(), None)

    fns: list[Callable[[], object]] = [fused, matmuls_only, full_mm]
    if matmul.onednn(xd, wd):
        fns.append(full_onednn)
    total, floor, *full = medians_s(fns, args.repeats, statistics.median if args.stat == "median" else min)
    computed = rows if kept is None else kept.shape[0]
    flop = 3 * 2 * hidden * classes
    print(f"{rows}x{hidden}x{classes} {args.dtype}, {chunk} rows per block, {computed} rows computed, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}, {args.stat} of {args.repeats}")
    print(f"fusedce forward+backward: {total * 1e3:.0f} ms; its matmuls alone: {floor * 1e3:.0f} ms "
          f"({flop * computed / floor / 1e9:.0f} GFLOP/s)")
    for name, t in zip(("torch.mm", "oneDNN"), full, strict=False):
        print(f"the 3 full-size matmuls, {name}: {t * 1e3:.0f} ms ({flop * rows / t / 1e9:.0f} GFLOP/s); "
              f"for the computed rows at that rate: {t * computed / rows * 1e3:.0f} ms")
    print(f"outside the matmuls: {100 * (total - floor) / total:.1f}% of the time")


if __name__ == "__main__":
    main()
