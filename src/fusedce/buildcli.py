"""``python -m fusedce build``: compile the C++ CPU kernels into the cache now, not on first use.

For Docker images and CI caches: run it once where the image is built, and the first
``cross_entropy`` call later compiles nothing. The cache is ``$FUSEDCE_CACHE_DIR`` when set (else
``$XDG_CACHE_HOME/fusedce`` or ``~/.cache/fusedce``), and the kernels are keyed on the sources,
torch, Python, the compiler and the vector ISA, so build with the same ones that will run them.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .kernels import cpu


def add_parser(commands: Any) -> None:
    p = commands.add_parser("build", help="compile the C++ CPU kernels into the cache now (for images and CI caches)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    where = cpu.kernel_dir()
    isa = cpu.toolchain()["isa"]
    if cpu.is_built():
        cpu.ensure_available()  # loads it, so a broken cache entry shows here rather than later
        print(f"fusedce: the CPU kernels ({isa}) are already built in {where}")
        return 0
    problem = cpu.toolchain()["problem"]
    if problem:
        print(f"fusedce build: cannot build the C++ CPU kernels: {problem}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        cpu.ensure_available()
    except Exception as exc:
        print(f"fusedce build: the C++ CPU kernels failed to build: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"fusedce: built the CPU kernels ({isa}) in {where} in {time.perf_counter() - started:.0f} s")
    return 0
