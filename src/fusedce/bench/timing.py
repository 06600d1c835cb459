"""Timing: one step per (provider, mode), its median over repeats after a warm-up.

A step is a ``setup`` run outside the timer and a ``run`` inside it. On CUDA both end with a
synchronize, so host timers (here, and pytest-benchmark's) see the device's work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .providers import Provider
from .workloads import MODES, Inputs

__all__ = ["MODES", "Step", "auto_repeats", "copy_bandwidth", "make_step", "measure", "median_ms", "warm_up"]


@dataclass
class Step:
    setup: Callable[[], None]
    run: Callable[[], None]


def _nothing() -> None:
    pass


def make_step(provider: Provider, inputs: Inputs, mode: str) -> Step:
    """The setup and the timed call of ``mode``.

    forward: the forward with autograd recording, as in training. backward: the forward runs in
    setup, only ``.backward()`` is timed. full: both, timed together. no-grad-forward: the forward
    under ``torch.no_grad()``. The input's ``.grad`` is dropped in setup, as ``zero_grad()`` does,
    so each backward allocates its gradients afresh rather than accumulating into the last one.
    A provider that overwrites its input gets it restored from the master copy in setup.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    cuda = inputs.x.is_cuda
    sync = torch.cuda.synchronize if cuda else _nothing
    pending: list[Tensor] = []  # backward mode: the forward's output, from setup to run

    def setup() -> None:
        pending.clear()
        if provider.overwrites_input:
            inputs.restore()
        inputs.drop_grads()
        if mode == "backward":
            pending.append(provider.forward(inputs))
        sync()

    def run() -> None:
        if mode == "forward":
            provider.forward(inputs)
        elif mode == "no-grad-forward":
            with torch.no_grad():
                provider.forward(inputs)
        elif mode == "backward":
            provider.backward(pending.pop(), inputs)
        else:
            provider.backward(provider.forward(inputs), inputs)
        sync()

    return Step(setup, run)


def measure(step: Step, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per timed call, ``repeats`` of them, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step.setup()
        step.run()
    times = []
    for _ in range(repeats):
        step.setup()
        start = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def warm_up(step: Step, calls: int, budget_s: float) -> float:
    """Run ``calls`` untimed calls (at least one) and return the seconds the last one took with
    its setup, which is timed again when it fits the budget: a first call that compiled would
    overstate a fast op. With the setup, because that is what each repeat costs: the backward
    mode's setup is a whole forward, and counting only its timed backward once made the bench
    repeat the linear head's millisecond backward (and its 1.2 s setup) a thousand times."""
    last = 0.0
    for _ in range(max(calls, 1)):
        last = _one_repeat_s(step)
    if last < budget_s:
        last = _one_repeat_s(step)
    return last


def _one_repeat_s(step: Step) -> float:
    start = time.perf_counter()
    step.setup()
    step.run()
    return time.perf_counter() - start


def auto_repeats(once_s: float, budget_s: float, lo: int, hi: int) -> int:
    """How many calls of ``once_s`` seconds fit in ``budget_s``, within [lo, hi]."""
    return max(lo, min(hi, int(budget_s / max(once_s, 1e-6))))


def copy_bandwidth(device: str, nbytes: int, repeats: int) -> tuple[float, float]:
    """The bandwidth yardstick: ``y.copy_(x)`` on ``nbytes`` of fp32, already touched, so no page
    faults are timed. Returns (median ms, GB/s counting bytes read plus written)."""
    x = torch.ones(max(nbytes // 4, 1), device=device)
    y = torch.zeros_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else _nothing

    def run() -> None:
        y.copy_(x)
        sync()

    ms = median_ms(measure(Step(sync, run), repeats, warmup=2))
    return ms, 2 * x.numel() * 4 / (ms * 1e-3) / 1e9
