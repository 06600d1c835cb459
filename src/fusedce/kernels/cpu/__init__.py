"""The C++ CPU backend: ATen ``Vectorized`` kernels, parallel over rows with ``at::parallel_for``.

Every function has reference.py's signature and semantics; each wrapper is one call into the
extension. The extension is compiled on first use with ``torch.utils.cpp_extension`` (ninja and a
C++ compiler are needed) and cached per user, keyed on a hash of the sources, the torch and Python
versions, the compiler and the flags (which include the vector ISA chosen for this CPU). Compiling
prints one line to stderr; loading from the cache prints nothing. ``ensure_available()`` raises
when the extension cannot be built or loaded, and the backend loader then falls back to the
reference backend with one warning.

Environment:
  FUSEDCE_CACHE_DIR   where compiled kernels are cached (default: $XDG_CACHE_HOME/fusedce, or
                      ~/.cache/fusedce)
  FUSEDCE_CPU_ISA     force the vector ISA: avx512, avx2 or default (default: the best this CPU
                      has), for testing the other code paths
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..reference import accumulation_dtype
from ..reference import ce_prob_target_grad as ce_prob_target_grad
from ..reference import ce_prob_weight_grad as ce_prob_weight_grad

# ce_prob_target_grad and ce_prob_weight_grad are re-exported from the reference backend: they run
# only when a probability target or a weight requires grad, which is rare, and they are N×C
# elementwise expressions that torch already runs at memory speed.

__all__ = [
    "accumulation_dtype",
    "ce_backward",
    "ce_forward",
    "ce_prob_backward",
    "ce_prob_forward",
    "ce_prob_target_grad",
    "ce_prob_weight_grad",
    "ce_reduced_backward",
    "ce_reduced_forward",
    "ensure_available",
    "log_softmax_backward",
    "log_softmax_forward",
    "nll_backward",
    "nll_forward",
    "softmax_backward",
    "softmax_forward",
]

_SOURCES = ("cross_entropy.cpp", "cross_entropy_reduced.cpp", "nll.cpp", "softmax.cpp", "bindings.cpp")
_HEADERS = ("common.h", "ops.h")

# ATen picks its Vectorized implementation at compile time from CPU_CAPABILITY; these are the
# flags torch itself builds each capability with. The chosen set is part of the cache key.
_ISA_FLAGS = {
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}
# -fopenmp: at::parallel_for is a header template that runs serially unless the including file is
# compiled with OpenMP. The extension then needs libgomp.so.1, which resolves to the copy torch has
# already loaded (one OpenMP runtime, one thread pool, torch.set_num_threads respected).
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
_LINK_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_ext: ModuleType | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa() -> str:
    forced = os.environ.get("FUSEDCE_CPU_ISA")
    if forced:
        if forced not in _ISA_FLAGS:
            raise ValueError(f"FUSEDCE_CPU_ISA={forced!r}: expected one of {', '.join(_ISA_FLAGS)}")
        return forced
    if sys.platform != "linux" or not sysconfig.get_platform().endswith("x86_64"):
        return "default"
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def _cache_root() -> Path:
    explicit = os.environ.get("FUSEDCE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fusedce"


def _build_key(source_dir: Path, cflags: list[str]) -> str:
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update(name.encode())
        digest.update((source_dir / name).read_bytes())
    for part in (torch.__version__, sys.version, os.environ.get("CXX", "c++"), *cflags, *_LINK_FLAGS):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _import_built(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    source_dir = Path(__file__).resolve().parent
    cflags = [*_BASE_FLAGS, *_ISA_FLAGS[_isa()]]
    key = _build_key(source_dir, cflags)
    name = f"fusedce_cpu_{key}"
    build_dir = _cache_root() / name
    library = build_dir / f"{name}.so"
    done = build_dir / "complete"  # written after a successful build, so a half-written .so is never loaded
    if done.exists() and library.exists():
        return _import_built(name, library)

    cpp_extension.verify_ninja_availability()  # raises RuntimeError without ninja
    # Private to this user: a shared world-writable cache would let others plant a library.
    build_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    build_dir.mkdir(mode=0o700, exist_ok=True)
    print("fusedce: compiling CPU kernels (one time, ~1 min)...", file=sys.stderr, flush=True)
    # load() serializes concurrent builds of one directory with a file baton.
    module = cpp_extension.load(
        name=name,
        sources=[str(source_dir / s) for s in _SOURCES],
        extra_cflags=cflags,
        extra_ldflags=_LINK_FLAGS,
        build_directory=str(build_dir),
        verbose=False,
    )
    done.touch()
    return module


def ensure_available() -> ModuleType:
    """Build or load the extension once; raise if that is impossible here."""
    global _ext
    with _lock:
        if _ext is None:
            _ext = _build()
        return _ext


def _kernels() -> ModuleType:
    return _ext if _ext is not None else ensure_available()


# --------------------------------------------------------------------------------------------
# The kernels (reference.py documents each one)
# --------------------------------------------------------------------------------------------


def ce_forward(
    x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, smoothing: float
) -> tuple[Tensor, Tensor]:
    return tuple(_kernels().ce_forward(x, target, weight, ignore_index, smoothing))


def ce_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    lse: Tensor,
    ignore_index: int,
    smoothing: float,
    inplace: bool,
) -> Tensor:
    # max(ε, 0) exactly as reference: a negative ε is no smoothing, and NaN stays NaN.
    return _kernels().ce_backward(
        grad_loss, x, target, weight, lse, ignore_index, max(smoothing, 0.0), inplace
    )


def ce_prob_forward(
    x: Tensor, target: Tensor, weight: Tensor | None, smoothing: float
) -> tuple[Tensor, Tensor]:
    return tuple(_kernels().ce_prob_forward(x, target, weight, smoothing))


def ce_prob_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    lse: Tensor,
    smoothing: float,
    inplace: bool,
) -> Tensor:
    return _kernels().ce_prob_backward(grad_loss, x, target, weight, lse, smoothing, inplace)


def ce_reduced_forward(x: Tensor, target: Tensor, ignore_index: int, mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    # Not a reference function: the one-call form of functional's plain 2-D 'mean'/'sum' loss
    # (_ops.py composes it from ce_forward for the backends that lack it).
    return tuple(_kernels().ce_reduced_forward(x, target, ignore_index, mean))


def ce_reduced_backward(
    grad_out: Tensor, x: Tensor, target: Tensor, lse: Tensor, denominator: Tensor, ignore_index: int
) -> Tensor:
    return _kernels().ce_reduced_backward(grad_out, x, target, lse, denominator, ignore_index)


def nll_forward(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    return _kernels().nll_forward(x, target, weight, ignore_index)


def nll_backward(
    grad_loss: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    num_classes: int,
    dtype: torch.dtype,
) -> Tensor:
    return _kernels().nll_backward(grad_loss, target, weight, ignore_index, num_classes, dtype)


def log_softmax_forward(x: Tensor) -> Tensor:
    return _kernels().log_softmax_forward(x)


def log_softmax_backward(grad_out: Tensor, out: Tensor) -> Tensor:
    return _kernels().log_softmax_backward(grad_out, out)


def softmax_forward(x: Tensor) -> Tensor:
    return _kernels().softmax_forward(x)


def softmax_backward(grad_out: Tensor, out: Tensor) -> Tensor:
    return _kernels().softmax_backward(grad_out, out)
