"""``python -m fusedce check``: the parity grid on this machine, for every backend and device."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import functional, testing
from ._progress import Progress
from .kernels import available_backends, unavailable_reason, use_backend

# Under Triton's interpreter every program instance runs in Python: check a spread-out sample.
INTERPRETER_SAMPLE = 40
# On CUDA an out-of-range target makes torch fire a device-side assert, which leaves the CUDA
# context unusable for the rest of the run (fusedce returns NaN there instead: see the README).
CUDA_UNSAFE_SPECIALS = ("target_out_of_bounds", "target_negative")


def _safe_on_cuda(case: testing.Case) -> bool:
    """Whether torch can run the case on CUDA without a device-side assert: no out-of-range
    target, which includes any index target at all when there are no classes."""
    if case.special in CUDA_UNSAFE_SPECIALS:
        return False
    no_classes = case.op in ("cross_entropy", "nll_loss") and len(case.shape) > 1 and case.shape[1] == 0
    return not (no_classes and case.target == "index" and case.shape[0] > 0)


def add_parser(commands: Any) -> None:
    p = commands.add_parser("check", help="compare against torch over the argument grid; exit 1 on any failure")
    p.add_argument("--backend", action="append", help="backend(s) to check (default: every one available)")
    p.add_argument("--device", action="append", help="device(s) to check (default: cpu, and cuda if present)")
    p.add_argument("--op", action="append", choices=testing.OPS, help="op(s) to check (default: all)")
    p.add_argument("--candidate", help="check your own function instead, as module:function")
    p.add_argument("--quick", action="store_true", help="a 1-in-10 sample of the product grid, plus every special case")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="check one case in N of the chosen grid, spread evenly (a faster smoke check)")
    p.add_argument("--failures", type=int, default=10, help="how many failures to show in detail")
    p.set_defaults(run=run)


def _load_candidate(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--candidate wants module:function, got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def _progress(label: str) -> Callable[[int, int], None]:
    """One live line on a terminal; a line per 10% in a log."""
    return Progress(label, unit="cases", every_percent=10).update


def _grid(ops: tuple[str, ...], quick: bool, every: int = 1, device: str = "cpu", thin: int = 1) -> list[testing.Case]:
    cases = testing.default_grid(ops)
    if device.startswith("cuda"):
        cases = [c for c in cases if _safe_on_cuda(c)]
    if quick:
        every = max(every, 10)
    if every > 1:
        cases = [c for c in testing.sample(cases, every) if not c.special] + [
            c for c in cases if c.special or c.extra
        ]
    return cases[::thin]


def run(args: argparse.Namespace) -> int:
    ops = tuple(args.op or testing.OPS)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    report = testing.Report()
    print(f"reference: torch {torch.__version__}, the torch running this check (its behaviour is what passes)")
    if args.candidate:
        candidate = _load_candidate(args.candidate)
        ops = tuple(args.op or ("cross_entropy",))
        for device in devices:
            cases = _grid(ops, args.quick, device=device, thin=args.every)
            print(f"checking {args.candidate} on {device}: {len(cases)} cases", file=sys.stderr)
            report.extend(testing.check({op: candidate for op in ops}, cases, label=f"{args.candidate}@{device}",
                                        device=device, progress=_progress(args.candidate)))
    else:
        ours = {op: getattr(functional, op) for op in ops}
        for device in devices:
            for backend in args.backend or available_backends(device):
                reason = unavailable_reason(backend)
                if reason is not None:
                    print(f"skipping backend {backend}: {reason}", file=sys.stderr)
                    continue
                interpreted = backend == "triton" and device == "cpu"
                cases = _grid(ops, args.quick, INTERPRETER_SAMPLE if interpreted else 1, device, args.every)
                label = f"{backend}@{device}"
                note = f" (Triton interpreter: 1 in {INTERPRETER_SAMPLE} of the product grid)" if interpreted else ""
                print(f"checking {label}: {len(cases)} cases{note}", file=sys.stderr)
                with use_backend(backend):
                    report.extend(testing.check(ours, cases, label=label, device=device,
                                                progress=_progress(label)))
    print()
    print(report.table())
    print()
    print(report.summary())
    if not report.ok:
        print()
        print(report.details(args.failures))
        return 1
    env = os.environ.get("FUSEDCE_BACKEND")
    if env:
        print(f"(FUSEDCE_BACKEND={env} was set)")
    return 0
