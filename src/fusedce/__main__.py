"""Command line: ``check`` (parity with torch), ``bench`` (speed and memory against torch),
``doctor`` (what works on this machine, and why not) and ``build`` (compile the CPU kernels now)."""

from __future__ import annotations

import argparse
import sys

from . import bench, buildcli, checkcli, doctor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedce", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    checkcli.add_parser(commands)
    bench.add_parser(commands)
    doctor.add_parser(commands)
    buildcli.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
