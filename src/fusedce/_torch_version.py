"""The torch versions fusedce supports, checked once, when fusedce is first imported.

MINIMUM_TORCH is the oldest torch fusedce runs on: CI runs the whole suite on torch 2.13, and the
GPU check (scripts/gpu_check.sh) runs the CUDA kernel tests and the parity checker on torch 2.11.
A feature that needs a newer torch (torch 2.13's linear_cross_entropy) calls ``require`` and
raises a clear error on an older one, instead of an AttributeError from deep inside.
"""

from __future__ import annotations

import re

import torch

MINIMUM_TORCH = (2, 11)


def parse(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string: '2.13.0+cpu', '2.11.0a0+git1234' -> (2, 13), (2, 11)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(found.group(1)), int(found.group(2))


def _text(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def check_minimum(version: str | None = None) -> None:
    """Raise ImportError when this torch is older than MINIMUM_TORCH."""
    found = version or torch.__version__
    if parse(found) < MINIMUM_TORCH:
        raise ImportError(
            f"fusedce needs torch >= {_text(MINIMUM_TORCH)}, but torch {found} is installed: "
            f"pip install --upgrade 'torch>={_text(MINIMUM_TORCH)}'"
        )


def require(feature: str, minimum: tuple[int, int], version: str | None = None) -> None:
    """Raise RuntimeError when ``feature`` needs a newer torch than the one running."""
    found = version or torch.__version__
    if parse(found) < minimum:
        raise RuntimeError(
            f"fusedce: {feature} needs torch >= {_text(minimum)} (torch {found} is installed); "
            f"pip install --upgrade 'torch>={_text(minimum)}'"
        )


check_minimum()
