"""The workloads of docs/benchmarks.md: which op, which input shape and dtype, and the inputs themselves.

A workload's ``name`` is the row of the table in docs/benchmarks.md (``lm-32k``); its ``key`` adds the op
and dtype (``cross_entropy/lm-32k/fp32``). ``--workload`` matches either, or an op name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

OPS = ("cross_entropy", "log_softmax", "softmax", "linear_cross_entropy")
MODES = ("forward", "backward", "full", "no-grad-forward")
IGNORE_INDEX = -100
# Every IGNORE_EVERY-th target is ignore_index, as padding is in a language-model batch.
IGNORE_EVERY = 9

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass(frozen=True)
class Workload:
    name: str
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    hidden: bool = False  # not run unless named: the test suite's own small cases
    in_features: int = 0  # linear_cross_entropy: H; its shape is the logits' (N, C) (see bench.linear)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}/{self.dtype_name}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def logits_bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def matches(self, selector: str) -> bool:
        """A hidden workload answers only to its own name, never to its op's."""
        return selector in (self.name, self.key, f"{self.op}/{self.name}") or (
            selector == self.op and not self.hidden
        )

    def scaled_down(self) -> Workload:
        """The same op, dtype, rank and class count on a small shape: to warm up (imports, the JIT,
        compilation) cheaply. The class count stays, as compiled kernels specialise on it; the
        other sizes are distinct, so that a dynamic-shape graph does not specialise on equal ones."""
        shape = (3, self.shape[1], *(5, 7, 11)[: len(self.shape) - 2])
        return Workload(f"{self.name}-warmup", self.op, shape, self.dtype, hidden=True, in_features=self.in_features)


def _ce(name: str, shape: tuple[int, ...], *dtypes: torch.dtype, hidden: bool = False) -> list[Workload]:
    return [Workload(name, "cross_entropy", shape, dtype, hidden) for dtype in dtypes]


def workloads(device: str) -> list[Workload]:
    """Every workload for this device type, in the order the table shows them."""
    from . import linear  # it builds on this module

    fp32, bf16 = torch.float32, torch.bfloat16
    lm128k_rows = 16384 if device == "cuda" else 1024
    return [
        *_ce("lm-32k", (4096, 32000), fp32, bf16),
        *_ce("lm-128k", (lm128k_rows, 128256), fp32, bf16),
        *_ce("imagenet", (16384, 1000), fp32),
        *_ce("seg", (16, 21, 128, 128), fp32),
        *_ce("tiny", (256, 10), fp32),
        Workload("lm-32k", "log_softmax", (4096, 32000), fp32),
        Workload("lm-32k", "softmax", (4096, 32000), fp32),
        # Hidden: for the test suite, which needs something faster than every real shape.
        *_ce("micro", (16, 7), fp32, hidden=True),
        *_ce("micro-seg", (2, 5, 3, 4), fp32, hidden=True),
        Workload("micro", "log_softmax", (16, 7), fp32, hidden=True),
        Workload("micro", "softmax", (16, 7), fp32, hidden=True),
        *linear.workloads(device),
    ]


def select(device: str, selectors: list[str] | None) -> list[Workload]:
    """The workloads any selector names (all visible ones when there are none); unknown names raise."""
    every = workloads(device)
    if not selectors:
        return [w for w in every if not w.hidden]
    for selector in selectors:
        if not any(w.matches(selector) for w in every):
            known = sorted({w.name for w in every if not w.hidden} | set(OPS))
            raise ValueError(f"unknown workload {selector!r}: expected one of {', '.join(known)} "
                             "(or op/name/dtype, e.g. cross_entropy/lm-32k/bf16)")
    return [w for w in every if any(w.matches(s) for s in selectors)]


@dataclass
class Inputs:
    """One workload's tensors. ``master`` is the pristine input: ``x`` is restored from it when a
    provider overwrites its input (``inplace_backward``)."""

    master: Tensor | None
    x: Tensor  # requires grad
    target: Tensor | None  # cross_entropy: class indices, some ignore_index
    grad_out: Tensor | None  # softmax and log_softmax: a fixed random upstream gradient
    linear_weight: Tensor | None = None  # linear_cross_entropy: (C, H), requires grad

    def drop_grads(self) -> None:
        """What ``zero_grad()`` does between steps: drop every input's gradient."""
        self.x.grad = None
        if self.linear_weight is not None:
            self.linear_weight.grad = None

    def restore(self) -> None:
        if self.master is None:
            raise RuntimeError("these inputs were made without a master copy to restore from")
        with torch.no_grad():
            self.x.copy_(self.master)
        self.drop_grads()


def make_inputs(workload: Workload, device: str, seed: int = 0, restorable: bool = True) -> Inputs:
    """Logits ~ N(0, 2²), drawn on the device itself (an lm-128k batch on a GPU is 8 GiB). Without
    ``restorable`` there is no master copy (for a provider that leaves its input alone)."""
    if workload.op == "linear_cross_entropy":
        from . import linear  # it builds on this module

        return linear.make_inputs(workload, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    drawn = torch.randn(workload.shape, generator=gen, device=device).mul_(2)
    x = drawn if workload.dtype == torch.float32 else drawn.to(workload.dtype)
    del drawn
    master = x.clone() if restorable else None
    x.requires_grad_()
    target = grad_out = None
    if workload.op == "cross_entropy":
        classes = workload.shape[1]
        target_shape = (workload.shape[0], *workload.shape[2:])
        target = torch.randint(0, classes, target_shape, generator=gen, device=device)
        target.view(-1)[::IGNORE_EVERY] = IGNORE_INDEX
    else:
        grad_out = torch.randn(workload.shape, generator=gen, device=device).to(workload.dtype)
    return Inputs(master, x, target, grad_out)


def minimal_bytes(workload: Workload, mode: str) -> int:
    """The fewest bytes any implementation must move in this mode.

    cross_entropy: forward reads the logits once; backward reads them once and writes the gradient
    once; full is both. softmax and log_softmax: forward reads the input and writes the output;
    backward reads the output and the upstream gradient and writes the input's gradient.
    (The targets and the per-row results are negligible beside an N×C tensor and are left out.)
    """
    n = workload.logits_bytes
    forward, backward = (n, 2 * n) if workload.op == "cross_entropy" else (2 * n, 3 * n)
    return {"forward": forward, "no-grad-forward": forward, "backward": backward,
            "full": forward + backward}[mode]
