"""``python -m fusedce bench``: time fusedce against torch on this machine and print the table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch

from ..kernels import BACKENDS, use_backend
from . import report
from .environment import environment
from .providers import NAMES
from .runner import execute, execute_in, make_plan
from .timing import MODES


def add_parser(commands: Any) -> None:
    p = commands.add_parser("bench", help="time fusedce against torch eager and torch.compile (docs/benchmarks.md)",
                            description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="a two-minute subset: lm-32k fp32 (full, forward), imagenet, seg, tiny (full); "
                        "memory for lm-32k only; fewer repeats")
    p.add_argument("--workload", action="append", metavar="NAME",
                   help="workload(s) to run: a name (lm-32k), an op (softmax) or op/name/dtype "
                        "(cross_entropy/lm-32k/bf16); default: all for the device")
    p.add_argument("--mode", action="append", choices=MODES, help="mode(s) to run (default: all)")
    p.add_argument("--provider", action="append", choices=NAMES, help="provider(s) to run (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="fusedce backend (default: auto, as FUSEDCE_BACKEND or the device decides)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement (default: as many as fit a "
                   "time budget, at least 5, or 3 with --quick)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="also plot the speed-ups (needs matplotlib)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--torch-env", choices=("both", "thp", "default", "inherit"),
                   help="CPU only. both (the default): time every provider in a fresh process with "
                        "THP_MEM_ALLOC_ENABLE=1, torch's best environment (the figures), then in another with "
                        "it unset (the 'default env' columns); thp or default: only that one; inherit: in this "
                        "process, with the environment as it is (the only choice on CUDA)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print("bench: --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.plot:
        try:
            report.require_matplotlib()  # fail now, not after the run
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    forced = None if args.backend == "auto" else args.backend
    try:
        plan = make_plan(device, args.quick, args.workload, args.mode, args.provider, args.repeats,
                         not args.no_memory, forced)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    torch_env = args.torch_env or ("both" if device == "cpu" else "inherit")
    if device == "cuda" and torch_env != "inherit":
        print("bench: --torch-env is for CPU runs (THP_MEM_ALLOC_ENABLE changes torch's CPU allocator only)",
              file=sys.stderr)
        return 2
    with use_backend(args.backend):
        # Also compiles the CPU kernels, if need be, before any timing.
        env = environment(device, this_process=torch_env == "inherit")
        print("\n".join(report.environment_lines(env)), flush=True)
        if torch_env == "inherit":
            results = execute(plan, env)
        else:
            results = execute_in(plan, "default" if torch_env == "default" else "thp")
            if torch_env == "both":
                # The memory figures come from the first run; the second only times.
                results.baseline = execute_in(dataclasses.replace(plan, memory=[]), "default")
    print()
    for line in report.environment_note(results):
        print(line)
    print(report.copy_line(results))
    print(report.table(results))
    print()
    print(report.legend(results))
    problems = report.notes(results)
    if problems:
        print()
        print("\n".join(problems))
    if args.json:
        results.write_json(args.json)
    if args.plot:
        report.plot(results, args.plot)
    return 1 if problems else 0
