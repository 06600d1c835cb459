"""``python -m fusedce bench``: fusedce against torch eager and torch.compile, as docs/benchmarks.md describes.

workloads: the shapes and inputs; providers: the implementations; timing: the modes and the
median; memory (and memory_probe, its CPU subprocess): the peak extra memory; environment: what
the figures depend on; report: the figures, the table, JSON and the plot; runner: the plan and the
loop; cli: the command line.
"""

from .cli import add_parser, run

__all__ = ["add_parser", "run"]
