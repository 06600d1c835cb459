"""Vocabulary-parallel cross-entropy: fusedce.distributed against torch's loss_parallel().

    python benchmarks/bench_distributed.py                     # 2 gloo ranks, 2048 x 32000 fp32
    python benchmarks/bench_distributed.py --rows 512 --classes 8000 --steps 3
    python benchmarks/bench_distributed.py --hidden 0          # without the linear-head rows

Each rank holds ``classes / world`` columns of the logits (and, for the linear-head rows, the
same rows of an LM head of ``--hidden`` inputs). For each implementation the script
reports the payload bytes handed to collectives per row of logits (forward + backward), the
number of collectives, and the median time of a forward + backward step. fusedce's collectives
and torch's are counted by one TorchDispatchMode that sees every collective op with its tensors
(``c10d`` ops for torch.distributed's functions, ``_c10d_functional`` ops for DTensor's); the
number of collectives is cross-checked with torch's CommDebugMode.

The payload is what each rank hands to the collective; a ring all-reduce sends about
``2·(world-1)/world`` times it per rank (once, on 2 ranks).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class _Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()


# Op names that move data (not wait_tensor or _wrap_tensor_autograd, which DTensor also issues).
_COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


class _CountCollectives(TorchDispatchMode):
    """Count every collective by the tensors it is handed: ``c10d`` ops (what
    ``torch.distributed.all_reduce`` and friends dispatch to, fusedce's path) and the
    ``_c10d_functional`` ops DTensor issues (torch's loss_parallel)."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__
        if func.namespace in ("_c10d_functional", "c10d") and any(c in name for c in _COLLECTIVES):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.counter.add(a)
                elif isinstance(a, (list, tuple)):
                    for t in a:
                        if isinstance(t, torch.Tensor):
                            self.counter.add(t)
        return func(*args, **(kwargs or {}))


def _worker(rank: int, world: int, port: int, opts: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(opts.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel

    import fusedce
    from fusedce import distributed as fdist

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    local_classes = opts.classes // world
    local = torch.randn(opts.rows, local_classes, generator=gen) * 2
    target = torch.randint(0, opts.classes, (opts.rows,), generator=gen)

    def fusedce_step() -> None:
        x = local.clone().requires_grad_()
        fdist.cross_entropy(x, target, label_smoothing=opts.smoothing).backward()

    def fusedce_dtensor_step() -> None:
        x = DTensor.from_local(local.clone(), mesh, [Shard(1)]).requires_grad_()
        fusedce.cross_entropy(x, target, label_smoothing=opts.smoothing).backward()

    def torch_step() -> None:
        x = DTensor.from_local(local.clone(), mesh, [Shard(1)]).requires_grad_()
        with loss_parallel():
            loss = F.cross_entropy(x, target)
            loss.backward()

    steps: dict[str, Callable[[], None]] = {
        "fusedce.distributed.cross_entropy": fusedce_step,
        "fusedce.cross_entropy(DTensor)": fusedce_dtensor_step,
    }
    if opts.smoothing == 0:
        steps["torch loss_parallel()"] = torch_step
    if opts.hidden:
        # The LM head sharded by rows: fusedce's fused head + loss against the head's matmul then
        # loss_parallel(); both end with the full input gradient on every rank.
        hidden = torch.randn(opts.rows, opts.hidden, generator=gen)
        head = torch.randn(local_classes, opts.hidden, generator=gen) * opts.hidden**-0.5
        sizes = [local_classes] * world

        def fusedce_linear_step() -> None:
            x, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
            fdist.linear_cross_entropy(x, w, target, label_smoothing=opts.smoothing, shard_sizes=sizes).backward()

        def torch_linear_step() -> None:
            x, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
            logits = DTensor.from_local(x @ w.t(), mesh, [Shard(1)])
            with loss_parallel():
                F.cross_entropy(logits, target).backward()
            assert x.grad is not None
            dist.all_reduce(x.grad)  # each rank's share of the replicated input's gradient

        steps["fusedce.distributed.linear_cross_entropy"] = fusedce_linear_step
        if opts.smoothing == 0:
            steps["linear, then torch loss_parallel()"] = torch_linear_step
    report = {}
    for name, step in steps.items():
        counter = _Counter()
        comm = CommDebugMode()
        with _CountCollectives(counter), comm:
            step()
        times = []
        for _ in range(opts.steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        report[name] = (counter.calls, counter.bytes / opts.rows, comm.get_total_counts(), statistics.median(times))
    results.put((rank, report))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512,
                        help="hidden size of the linear-head rows (0: no linear_cross_entropy rows)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--smoothing", type=float, default=0.0, help="(torch's loss_parallel has none)")
    opts = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, opts.world, port, opts, results)) for r in range(opts.world)]
    for p in procs:
        p.start()
    reports = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    print(f"{opts.world} gloo ranks, {opts.rows} x {opts.classes} fp32 logits ({opts.classes // opts.world} classes "
          f"a rank), {opts.threads} thread(s) a rank, median of {opts.steps} steps, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    if opts.hidden:
        print(f"linear rows: hidden state {opts.rows} x {opts.hidden} fp32, the head's {opts.classes // opts.world} "
              "rows a rank; their bytes include the input gradient's all-reduce")
    print(f"{'implementation':40} {'collectives':>11} {'CommDebugMode':>13} {'bytes/row':>10} {'ms/step':>9}")
    for name, (calls, per_row, comm_counts, _) in reports[0].items():
        slowest = max(r[name][3] for r in reports.values())
        print(f"{name:40} {calls:>11} {comm_counts:>13} {per_row:>10.1f} {slowest * 1e3:>9.1f}")


if __name__ == "__main__":
    main()
