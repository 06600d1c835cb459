"""Command line: ``python -m fusedce check`` (parity with torch) and ``python -m fusedce bench``."""

from __future__ import annotations

import argparse
import sys

from . import bench, checkcli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedce", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    checkcli.add_parser(commands)
    bench.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
