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
from .kernels import BACKENDS, unavailable_reason, use_backend

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
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="backend(s) to check (default: every one that can run here); not with --candidate")
    p.add_argument("--device", action="append", help="device(s) to check (default: cpu, and cuda if present)")
    p.add_argument("--op", action="append", choices=testing.OPS, help="op(s) to check (default: all)")
    p.add_argument("--candidate", help="check your own function instead, as module:function")
    p.add_argument("--quick", action="store_true", help="a 1-in-10 sample of the product grid, plus every special case")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="check one case in N of the chosen grid, spread evenly (a faster smoke check)")
    p.add_argument("--failures", type=int, default=10, help="how many failures to show in detail")
    p.add_argument("--allow-missing", action="store_true",
                   help="exit 0 even when a requested backend, or the device's fused backend, could not be checked")
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
        cases = [c for c in testing.sample(cases, every) if not c.special] + [c for c in cases if c.special]
    return cases[::thin]


# The backend that does the work on each device type: a check that did not run it proves nothing.
FUSED_BACKEND = {"cpu": "cpu", "cuda": "triton"}


def why_not_runnable(backend: str, device: str) -> str | None:
    """None when the backend can run on this device's tensors here, else the reason."""
    device_type = torch.device(device).type
    if backend == "cpu" and device_type != "cpu":
        return f"the cpu backend runs on CPU tensors only, not {device_type}"
    if backend == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under its interpreter (set TRITON_INTERPRET=1)"
    if backend == "triton" and device_type not in ("cpu", "cuda"):
        return f"Triton does not run on {device_type} tensors"
    return unavailable_reason(backend)


def _check_candidate(args: argparse.Namespace, devices: list[str], report: testing.Report) -> None:
    candidate = _load_candidate(args.candidate)
    ops = tuple(args.op or ("cross_entropy",))
    for device in devices:
        cases = _grid(ops, args.quick, device=device, thin=args.every)
        print(f"checking {args.candidate} on {device}: {len(cases)} cases", file=sys.stderr)
        report.extend(testing.check({op: candidate for op in ops}, cases, label=f"{args.candidate}@{device}",
                                    device=device, progress=_progress(args.candidate)))


def _check_backends(args: argparse.Namespace, devices: list[str], report: testing.Report) -> list[str]:
    """Check every requested (or every runnable) backend; return what must have run and did not."""
    ops = tuple(args.op or testing.OPS)
    ours = {op: getattr(functional, op) for op in ops}
    missing: list[str] = []
    for device in devices:
        device_type = torch.device(device).type
        for backend in args.backend or BACKENDS:
            reason = why_not_runnable(backend, device)
            if reason is not None:
                print(f"NOT CHECKED {backend}@{device}: {reason}", file=sys.stderr)
                if args.backend or backend == FUSED_BACKEND.get(device_type):
                    missing.append(f"{backend}@{device} ({reason})")
                continue
            interpreted = backend == "triton" and device_type == "cpu"
            cases = _grid(ops, args.quick, INTERPRETER_SAMPLE if interpreted else 1, device, args.every)
            label = f"{backend}@{device}"
            note = f" (Triton interpreter: 1 in {INTERPRETER_SAMPLE} of the product grid)" if interpreted else ""
            print(f"checking {label}: {len(cases)} cases{note}", file=sys.stderr)
            with use_backend(backend):
                report.extend(testing.check(ours, cases, label=label, device=device, progress=_progress(label)))
    return missing


def run(args: argparse.Namespace) -> int:
    if args.candidate and args.backend:
        print("error: --backend chooses among fusedce's own backends; a --candidate is checked as it is. "
              "Drop one of the two.", file=sys.stderr)
        return 2
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    report = testing.Report()
    print(f"reference: torch {torch.__version__}, the torch running this check (its behaviour is what passes)")
    missing: list[str] = []
    if args.candidate:
        _check_candidate(args, devices, report)
    else:
        missing = _check_backends(args, devices, report)
    if not report.results:
        print("error: no case was checked (no backend could run, or the selection is empty)", file=sys.stderr)
        for line in missing:
            print(f"  not checked: {line}", file=sys.stderr)
        return 1
    print()
    print(report.table())
    print()
    print(report.summary())
    if missing:
        print()
        print("NOT CHECKED (a requested backend, or the one fusedce uses on this device):")
        print("\n".join(f"  {line}" for line in missing))
    if not report.ok:
        print()
        print(report.diagnosis())
        print()
        print(report.details(args.failures))
        return 1
    env = os.environ.get("FUSEDCE_BACKEND")
    if env:
        print(f"(FUSEDCE_BACKEND={env} was set)")
    if missing and not args.allow_missing:
        print("exit status 1: the backends above were not checked (pass --allow-missing to accept that)")
        return 1
    return 0
