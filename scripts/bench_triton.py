"""Time the triton backend's cross-entropy against torch on one CUDA GPU.

For each workload (BENCHMARKS.md: lm-128k bf16 at 16384 rows, lm-32k fp32, imagenet fp32, seg
fp32) it measures, with CUDA events after a warm-up, the median time of:

* ours: ``ce_forward`` plus the 'mean' reduction in torch (fwd), and that plus ``ce_backward``
  (full), called on the backend module directly;
* torch eager ``F.cross_entropy``, forward and forward+backward;
* ``torch.compile(F.cross_entropy)``, the same (skipped with a message if it fails);
* ``y.copy_(x)`` on the logits, the bandwidth yardstick (bytes read plus written);

and the peak memory of one forward+backward beyond what was allocated before it
(``torch.cuda.max_memory_allocated``), as a multiple of the logits' size. Bandwidth uses the
minimal bytes: the logits read once for fwd; read twice and the gradient written once for full.

Usage: ``PYTHONPATH=src python scripts/bench_triton.py [--reps N] [--no-compile] [--only NAME]``.
Must run on a CUDA machine; it prints one summary table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

WORKLOADS: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    ("lm-128k bf16", (16384, 128256), torch.bfloat16),
    ("lm-32k fp32", (4096, 32000), torch.float32),
    ("imagenet fp32", (16384, 1000), torch.float32),
    ("seg fp32", (16, 21, 128, 128), torch.float32),
]
IGNORE = -100


@dataclass
class Result:
    name: str
    nbytes: int
    times: dict[str, float] = field(default_factory=dict)  # ms, by "provider mode"
    peaks: dict[str, float] = field(default_factory=dict)  # × logits, by provider
    loss_diff: float = float("nan")
    grad_diff: float = float("nan")
    notes: list[str] = field(default_factory=list)


SMOKE_WORKLOADS: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    ("smoke-2d bf16", (6, 700), torch.bfloat16),
    ("smoke-seg fp32", (2, 5, 4, 3), torch.float32),
]
DEVICE = "cuda"


def cuda_time(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, each timed with its own CUDA events."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":  # --smoke: host timing, only to exercise this script
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_time(x: torch.Tensor, reps: int) -> float:
    """Median milliseconds of ``y.copy_(x)``: the bandwidth yardstick (the buffer is freed after)."""
    y = torch.empty_like(x)
    return cuda_time(lambda: y.copy_(x), reps)


def peak_memory(fn: Callable[[], object], nbytes: int) -> float:
    """Peak bytes allocated by one call beyond those live before it, as a multiple of ``nbytes``."""
    if DEVICE != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    keep = fn()  # the gradient stays alive until the peak is read, as it does in training
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del keep
    return peak / nbytes


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(shape, device=DEVICE, generator=gen, dtype=torch.float32) * 2).to(dtype)
    target_shape = (shape[0], *shape[2:])
    target = torch.randint(0, shape[1], target_shape, device=DEVICE, generator=gen)
    target.view(-1)[::9] = IGNORE
    return x, target


def bench_workload(
    backend, name: str, shape: tuple[int, ...], dtype: torch.dtype, reps: int, use_compile: bool
) -> Result:
    x, target = make_inputs(shape, dtype)
    res = Result(name, x.numel() * x.element_size())
    outer, classes = shape[0], shape[1]
    x3 = x.view(outer, classes, -1)  # canonical (outer, C, inner), no copy
    t2 = target.view(outer, -1)
    inner = x3.shape[2]

    def ours_fwd():
        loss, lse = backend.ce_forward(x3, t2, None, IGNORE, 0.0)
        count = (t2 != IGNORE).sum()
        return loss.sum() / count, lse, count

    def ours_full():
        mean, lse, count = ours_fwd()
        grad_loss = (1.0 / count).to(lse.dtype).expand(outer, inner)  # 'mean': broadcast
        return mean, backend.ce_backward(grad_loss, x3, t2, None, lse, IGNORE, 0.0, False)

    res.times["copy"] = copy_time(x, reps)
    res.times["ours fwd"] = cuda_time(ours_fwd, reps)
    res.times["ours full"] = cuda_time(ours_full, reps)
    res.peaks["ours"] = peak_memory(lambda: ours_full()[1], res.nbytes)
    ours_loss, ours_grad = ours_full()

    xg = x.detach().requires_grad_()

    def torch_fwd(fn):
        return lambda: fn(xg, target, ignore_index=IGNORE)

    def torch_full(fn):
        def run():
            xg.grad = None
            fn(xg, target, ignore_index=IGNORE).backward()
            return xg.grad

        return run

    eager_loss = F.cross_entropy(xg, target, ignore_index=IGNORE)
    eager_loss.backward()
    assert xg.grad is not None
    res.loss_diff = abs(ours_loss.item() - eager_loss.item())
    res.grad_diff = float((ours_grad.view_as(x).float() - xg.grad.float()).abs().max())
    del eager_loss, ours_grad
    xg.grad = None

    providers: list[tuple[str, Callable]] = [("eager", F.cross_entropy)]
    if use_compile:
        torch._dynamo.reset()
        providers.append(("compile", torch.compile(F.cross_entropy, dynamic=False)))
    for label, fn in providers:
        try:
            started = time.perf_counter()
            torch_full(fn)()  # compiles, for torch.compile
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            if label == "compile":
                res.notes.append(f"torch.compile warm-up {time.perf_counter() - started:.1f} s")
            xg.grad = None
            res.times[f"{label} fwd"] = cuda_time(torch_fwd(fn), reps)
            res.times[f"{label} full"] = cuda_time(torch_full(fn), reps)
            xg.grad = None
            res.peaks[label] = peak_memory(torch_full(fn), res.nbytes)
            xg.grad = None
        except Exception as exc:  # report it, and go on with the other providers
            res.notes.append(f"{label} failed: {type(exc).__name__}: {str(exc)[:200]}")
    return res


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


SUMMARY_HEADER = (
    f"{'workload':14s} {'copy GB/s':>9s} {'fwd GB/s':>8s} {'%copy':>6s} {'full GB/s':>9s} {'%copy':>6s}"
    f" {'×eager f/full':>13s} {'×compile f/full':>15s} {'peak/logits ours/eager/compile':>31s}"
)


def summary_line(r: Result) -> str:
    """One row of the summary table (also printed as each workload finishes, in case of a kill)."""

    def ratio(other: str, mode: str) -> str:
        if f"{other} {mode}" not in r.times:
            return "  -  "
        return f"{r.times[f'{other} {mode}'] / r.times[f'ours {mode}']:5.2f}"

    def peak(who: str) -> str:
        return f"{r.peaks[who]:.2f}" if who in r.peaks else "-"

    copy_bw = gbps(2 * r.nbytes, r.times["copy"])
    fwd_bw = gbps(r.nbytes, r.times["ours fwd"])
    full_bw = gbps(3 * r.nbytes, r.times["ours full"])
    peaks = f"{peak('ours')}/{peak('eager')}/{peak('compile')}"
    return (
        f"{r.name:14s} {copy_bw:9.0f} {fwd_bw:8.0f} {100 * fwd_bw / copy_bw:5.0f}% {full_bw:9.0f}"
        f" {100 * full_bw / copy_bw:5.0f}% {ratio('eager', 'fwd'):>6s}/{ratio('eager', 'full'):<6s}"
        f" {ratio('compile', 'fwd'):>7s}/{ratio('compile', 'full'):<7s} {peaks:>31s}"
    )


def report(results: list[Result]) -> None:
    print("\nper provider (median ms):")
    for r in results:
        cells = "  ".join(f"{k} {v:.3f}" for k, v in r.times.items())
        print(f"  {r.name:14s} {cells}")
        print(f"  {'':14s} |loss - eager| {r.loss_diff:.2e}  max|grad - eager| {r.grad_diff:.2e}")
        for note in r.notes:
            print(f"  {'':14s} {note}")
    print("\nsummary (fwd: logits read once; full: read twice + gradient written; % of a copy's GB/s)")
    print(SUMMARY_HEADER)
    for r in results:
        print(summary_line(r))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--budget-s", type=float, default=200.0, help="skip torch.compile for the workloads left after this long"
    )
    parser.add_argument("--only", help="run only workloads whose name contains this")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (tests this script)"
    )
    args = parser.parse_args(argv)
    global DEVICE
    workloads = WORKLOADS
    if args.smoke:
        DEVICE, workloads, args.reps, args.no_compile = "cpu", SMOKE_WORKLOADS, 1, True
    elif not torch.cuda.is_available():
        print("bench_triton: no CUDA device; nothing to time", file=sys.stderr)
        return 1

    from fusedce.kernels import _load, unavailable_reason

    backend = _load("triton")
    if backend is None:
        print(f"bench_triton: triton backend unavailable: {unavailable_reason('triton')}", file=sys.stderr)
        return 1
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    print(f"{device_name}  torch {torch.__version__}", flush=True)
    results = []
    began = time.perf_counter()
    for name, shape, dtype in workloads:
        if args.only and args.only not in name:
            continue
        started = time.perf_counter()
        use_compile = not args.no_compile and started - began < args.budget_s
        if not args.no_compile and not use_compile:
            print(f"  {name}: over the {args.budget_s:.0f} s budget, torch.compile skipped", flush=True)
        results.append(bench_workload(backend, name, shape, dtype, args.reps, use_compile))
        print(f"  {name}: {time.perf_counter() - started:.1f} s | {summary_line(results[-1])}", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
