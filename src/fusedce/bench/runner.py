"""The run: which (workload, mode, provider) to time, in what order, and the loop that times them."""

from __future__ import annotations

import gc
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import memory, timing
from .providers import Provider, providers
from .report import Results, Timing
from .workloads import Inputs, Workload, make_inputs, minimal_bytes, select

QUICK_MODES = {"cross_entropy/lm-32k/fp32": ("full", "forward"), "cross_entropy/imagenet/fp32": ("full",),
               "cross_entropy/seg/fp32": ("full",), "cross_entropy/tiny/fp32": ("full",)}
QUICK_MEMORY = ("cross_entropy/lm-32k/fp32",)
# On CPU, the resident set cannot resolve the memory of a workload much smaller than this.
CPU_MEMORY_MIN_BYTES = 8 * 2**20
MEMORY_PROCESSES = 2


@dataclass
class Plan:
    device: str
    workloads: list[tuple[Workload, tuple[str, ...]]]  # each with its modes
    providers: list[str] | None
    memory: list[Workload]
    repeats: int | None  # None: as many as fit in budget_s, within [min_repeats, max_repeats]
    budget_s: float
    min_repeats: int
    max_repeats: int
    warmup: int = 1
    backend: str | None = None


def make_plan(device: str, quick: bool, selectors: list[str] | None, modes: list[str] | None,
              provider_names: list[str] | None, repeats: int | None, with_memory: bool,
              backend: str | None = None) -> Plan:
    chosen = select(device, selectors)
    if quick and not selectors:
        chosen = [w for w in chosen if w.key in QUICK_MODES]
    planned = []
    for w in chosen:
        w_modes = tuple(modes) if modes else QUICK_MODES.get(w.key, timing.MODES) if quick else timing.MODES
        planned.append((w, w_modes))
    mem: list[Workload] = []
    if with_memory:
        mem = [w for w in chosen if not quick or selectors or w.key in QUICK_MEMORY]
        if device == "cpu":
            mem = [w for w in mem if w.logits_bytes >= CPU_MEMORY_MIN_BYTES or w.hidden]
    budget = (0.5 if quick else 2.0) if device == "cpu" else (0.2 if quick else 1.0)
    return Plan(device, planned, provider_names, mem, repeats, budget,
                min_repeats=3 if quick else 5, max_repeats=200 if quick else 1000, backend=backend)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _copy_bytes(plan: Plan) -> int:
    largest = max((w.logits_bytes for w, _ in plan.workloads), default=0)
    return max(128 * 2**20, min(largest, 2**30))  # far beyond any cache


def execute(plan: Plan, env: dict[str, str]) -> Results:
    started = time.perf_counter()
    _progress(f"bench: copy bandwidth on {_copy_bytes(plan) / 2**20:.0f} MiB")
    copy_ms, copy_gbps = timing.copy_bandwidth(plan.device, _copy_bytes(plan), repeats=5)
    results = Results(env, copy_ms, copy_gbps, _copy_bytes(plan))
    total = sum(len(m) for _, m in plan.workloads)
    done = 0
    for workload, modes in plan.workloads:
        chosen = providers(workload, plan.device, plan.providers)
        if any(p.name == "compile" for p in chosen):
            torch._dynamo.reset()  # a fresh cache per workload keeps clear of the recompile limit
        inputs = make_inputs(workload, plan.device, restorable=any(p.overwrites_input for p in chosen))
        for mode in modes:
            done += 1
            for provider in chosen:
                if mode == "no-grad-forward" and not provider.no_grad:
                    continue
                _progress(f"bench [{done}/{total}] {workload.key} {mode} {provider.name} "
                          f"({time.perf_counter() - started:.0f} s)")
                results.timings.append(_time_one(plan, workload, inputs, provider, mode))
        del inputs
        gc.collect()
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    results.peaks = _memory(plan, started)
    _progress(f"bench: done in {time.perf_counter() - started:.0f} s")
    return results


def _memory(plan: Plan, started: float) -> list[memory.Peak]:
    """Every planned peak. On CPU each is its own process, mostly importing torch, and a peak is
    per process: two run at once, which halves the wait and changes no figure."""
    jobs = [(w, p.name) for w in plan.memory for p in providers(w, plan.device, plan.providers)]

    def one(job: tuple[Workload, str]) -> memory.Peak:
        workload, name = job
        _progress(f"bench memory {workload.key} {name} ({time.perf_counter() - started:.0f} s)")
        return memory.peak_extra(workload, name, plan.device, plan.backend)

    if plan.device == "cuda":
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=MEMORY_PROCESSES) as pool:
        return list(pool.map(one, jobs))


def _time_one(plan: Plan, workload: Workload, inputs: Inputs, provider: Provider, mode: str) -> Timing:
    record = Timing(workload.key, workload.name, workload.op, workload.dtype_name, list(workload.shape), mode,
                    provider.name, None, 0, minimal_bytes(workload, mode))
    try:
        step = timing.make_step(provider, inputs, mode)
        once = timing.warm_up(step, plan.warmup, 0.0 if plan.repeats else plan.budget_s)
        repeats = plan.repeats or timing.auto_repeats(once, plan.budget_s, plan.min_repeats, plan.max_repeats)
        record.ms = timing.median_ms(timing.measure(step, repeats, warmup=0))
        record.repeats = repeats
    except Exception as exc:  # report it and go on with the other providers
        first_line = (str(exc).strip().splitlines() or [""])[0]
        record.error = f"{type(exc).__name__}: {first_line[:200]}"
        _progress(f"  failed: {record.error}")
    finally:
        inputs.drop_grads()
        if provider.overwrites_input:
            inputs.restore()
    return record
