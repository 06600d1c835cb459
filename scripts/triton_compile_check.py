"""Compile every fusedce Triton kernel variant to Hopper (sm_90) machine code, with no GPU.

The triton backend's functions run on CPU tensors with each launch replaced by
``JITFunction.warmup`` (compile only), under a stand-in driver that names an sm_90 target, and
with the tiling a GPU would get. A kernel that the installed Triton cannot compile (an API an
older Triton lacks, a type error only the compiler sees) fails here, before a GPU session. Run
it with the Triton the GPU machine has, e.g. in a scratch venv with ``triton==3.6.0``:

    PYTHONPATH=src python scripts/triton_compile_check.py

TRITON_INTERPRET must be unset. It prints the number of distinct variants compiled and exits 1
on any failure. Used before the H200 run of 2026-11-28: 107 variants, all compiled by Triton 3.6.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class HopperStandIn:
    """The driver calls that compilation makes: device 0, stream 0, an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self) -> Any:
        return torch.cuda

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> None:
        return None

    def is_active(self) -> bool:
        return True


def _patch_backend() -> tuple[Any, ...]:
    """The backend modules, with launches compiling only, the GPU's tiling and no device check."""
    from fusedce.kernels.triton import _common, cross_entropy, nll, reduced, softmax

    modules = (_common, cross_entropy, nll, softmax, reduced)
    gpu_plan = _common.plan

    def plan_for_gpu(*args: Any) -> Any:
        return gpu_plan(*args[:-1], torch.device("cuda"))

    def compile_only(kernel: Any, grid: int, *args: Any, **kwargs: Any) -> None:
        kernel.warmup(*args, grid=(grid,), **kwargs)
        COMPILED.add((kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items()))))

    for module in modules:
        for name, replacement in (("launch", compile_only), ("plan", plan_for_gpu),
                                  ("check_device", lambda x: None)):
            if hasattr(module, name):
                setattr(module, name, replacement)
    return cross_entropy, nll, softmax, reduced


COMPILED: set[tuple[Any, ...]] = set()


def _cases(ce: Any, nll: Any, sm: Any, red: Any) -> list[tuple[str, Callable[[], Any]]]:
    """Every backend function, for each dtype, on the three tilings (many classes; small C with
    a spatial dim; many rows), with and without a weight and smoothing."""
    cases: list[tuple[str, Callable[[], Any]]] = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for shape in ((5, 1500, 1), (3, 21, 37), (4096, 1000, 1)):
            outer, classes, inner = shape
            x = torch.randn(shape).to(dtype)
            t = torch.randint(0, classes, (outer, inner))
            p = torch.softmax(torch.randn(shape), 1).to(dtype)
            stats = torch.zeros(outer, inner, 2, dtype=acc)
            g = torch.rand(outer, inner, dtype=acc)
            tag = f"{dtype} {shape}"
            for w, eps in ((None, 0.0), (torch.rand(classes).to(dtype), 0.1)):
                cases += [
                    (f"ce_forward {tag}", lambda x=x, t=t, w=w, e=eps: ce.ce_forward(x, t, w, -100, e)),
                    (f"ce_backward {tag}", lambda x=x, t=t, w=w, e=eps, g=g, s=stats:
                        ce.ce_backward(g, x, t, w, s, -100, e, False)),
                    (f"ce_extras_forward {tag}", lambda x=x, t=t, w=w, e=eps:
                        ce.ce_extras_forward(x, t, w, -100, e, 1e-4, 30.0)),
                    (f"ce_extras_backward {tag}", lambda x=x, t=t, w=w, e=eps, g=g, s=stats:
                        ce.ce_extras_backward(g, x, t, w, s, -100, e, 1e-4, 30.0, False)),
                    (f"ce_prob_forward {tag}", lambda x=x, p=p, w=w, e=eps: ce.ce_prob_forward(x, p, w, e)),
                    (f"ce_prob_backward {tag}", lambda x=x, p=p, w=w, e=eps, g=g, s=stats:
                        ce.ce_prob_backward(g, x, p, w, s, e, False)),
                    (f"nll_forward {tag}", lambda x=x, t=t, w=w: nll.nll_forward(x, t, w, -100)),
                    (f"nll_backward {tag}", lambda t=t, w=w, g=g, c=classes, d=dtype:
                        nll.nll_backward(g, t, w, -100, c, d)),
                ]
            for op in ("log_softmax", "softmax"):
                cases += [
                    (f"{op}_forward {tag}", lambda x=x, op=op: getattr(sm, f"{op}_forward")(x)),
                    (f"{op}_backward {tag}", lambda x=x, op=op: getattr(sm, f"{op}_backward")(x, x)),
                ]
        for rows, classes in ((16384, 1000), (37, 5000), (300, 10), (5, 3)):
            x2 = torch.randn(rows, classes).to(dtype)
            t1 = torch.randint(0, classes, (rows,))
            for mean in (True, False):

                def both(x2: torch.Tensor = x2, t1: torch.Tensor = t1, mean: bool = mean,
                         dtype: torch.dtype = dtype) -> None:
                    _, lse, denominator = red.ce_reduced_forward(x2, t1, -100, mean)
                    red.ce_reduced_backward(torch.ones((), dtype=dtype), x2, t1, lse, denominator, -100)

                cases.append((f"ce_reduced {dtype} {rows}x{classes} mean={mean}", both))
    return cases


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: this compiles the kernels, the interpreter runs them", file=sys.stderr)
        return 2
    driver.set_active(HopperStandIn())
    import triton

    failures = 0
    for name, case in _cases(*_patch_backend()):
        try:
            case()
        except Exception as exc:  # report every kernel that does not compile, then fail
            failures += 1
            print(f"FAILED {name}: {type(exc).__name__}: {str(exc)[:2000]}")
            traceback.print_exc(limit=3)
    print(f"triton {triton.__version__}, sm_90: {len(COMPILED)} distinct kernel variants compiled, "
          f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
