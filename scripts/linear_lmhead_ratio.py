"""fusedce.linear_cross_entropy against torch on the lmhead shape, interleaved (issue 7).

Times forward + backward of three providers on the same inputs, round-robin, so that a change in
the machine's load hits them all alike: fusedce, eager (``F.linear`` then ``F.cross_entropy``) and
torch 2.13's chunked path (``options=nn.LinearCrossEntropyOptions()``). Prints each provider's
median and fusedce's speed-up over the other two, with the load average before and after.

Run it with ``THP_MEM_ALLOC_ENABLE=1`` (as ``python -m fusedce bench`` runs torch), in ./.venv:
``THP_MEM_ALLOC_ENABLE=1 python scripts/linear_lmhead_ratio.py [--dtype bf16] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fusedce
from fusedce.bench.workloads import IGNORE_EVERY, IGNORE_INDEX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(4096, 512, 32000), metavar=("N", "H", "C"))
    parser.add_argument("--ignore-every", type=int, default=IGNORE_EVERY,
                        help="every k-th target is ignore_index, as in the bench's lmhead (0: none)")
    parser.add_argument("--providers", nargs="+", default=("fusedce", "eager", "torch-chunked"))
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows, hidden, classes = args.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(classes, hidden, generator=gen) * 2 * hidden**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=gen)
    if args.ignore_every:
        target[:: args.ignore_every] = IGNORE_INDEX
    chunked = torch.nn.LinearCrossEntropyOptions()
    losses: dict[str, Callable[[], torch.Tensor]] = {
        "fusedce": lambda: fusedce.linear_cross_entropy(x, w, target),
        "eager": lambda: F.cross_entropy(F.linear(x, w), target),
        "torch-chunked": lambda: F.linear_cross_entropy(x, w, target, options=chunked),
    }
    times: dict[str, list[float]] = {name: [] for name in args.providers}
    load = os.getloadavg()[0]
    for step in range(args.repeats + 1):  # the first round warms up
        for name in args.providers:
            x.grad = w.grad = None
            start = time.perf_counter()
            losses[name]().backward()
            if step:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{rows}x{hidden}x{classes} {args.dtype}, every {args.ignore_every or 'no'} target ignored, "
          f"{torch.get_num_threads()} threads, "
          f"load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, m in medians.items():
        print(f"  {name:14s} {m * 1e3:7.0f} ms  (min {min(times[name]) * 1e3:.0f})")
    if "fusedce" in medians:
        for name, m in medians.items():
            if name != "fusedce":
                print(f"  fusedce vs {name}: {m / medians['fusedce']:.2f}x")


if __name__ == "__main__":
    main()
