"""The run: which (workload, mode, provider) to time, in what order, and the loop that times them.

On CPU the loop runs in a fresh process per torch environment (``execute_in``; ``main`` is that
process), because torch reads THP_MEM_ALLOC_ENABLE
once, at its first allocation: it cannot be switched inside a process that has imported torch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._progress import Progress, note
from . import memory, timing
from .environment import ENVIRONMENT_LABELS, TORCH_ENVIRONMENTS, environment
from .providers import Provider, providers
from .report import Results, Timing
from .workloads import Inputs, Workload, make_inputs, minimal_bytes, select, workloads

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
    note(message, sys.stderr)  # clears the live line on a terminal, and draws it again underneath


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
    bar = Progress("bench", total, unit="steps")
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
                bar.update(done - 1, total, f"{workload.key} {mode} {provider.name}")
                results.timings.append(_time_one(plan, workload, inputs, provider, mode))
        del inputs
        gc.collect()
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    bar.update(total, total)
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


# --------------------------------------------------------------------------------------------
# One environment per process
# --------------------------------------------------------------------------------------------

CHILD_TIMEOUT_S = 6 * 3600


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON for the child process: workloads by key."""
    return {**dataclasses.asdict(plan), "workloads": [[w.key, list(modes)] for w, modes in plan.workloads],
            "memory": [w.key for w in plan.memory]}


def plan_from_json(fields: dict[str, Any]) -> Plan:
    by_key = {w.key: w for w in workloads(fields["device"])}
    return Plan(**{**fields, "workloads": [(by_key[key], tuple(modes)) for key, modes in fields["workloads"]],
                   "memory": [by_key[key] for key in fields["memory"]]})


def execute_in(plan: Plan, name: str) -> Results:
    """Run ``plan`` in a fresh process whose environment is TORCH_ENVIRONMENTS[name] (and the
    plan's forced backend), and return its results."""
    env = dict(os.environ)
    for variable, value in TORCH_ENVIRONMENTS[name].items():
        if value is None:
            env.pop(variable, None)
        else:
            env[variable] = value
    if plan.backend is not None:
        env["FUSEDCE_BACKEND"] = plan.backend
    _progress(f"bench: timing in a fresh process with {ENVIRONMENT_LABELS[name]}")
    with tempfile.TemporaryDirectory(prefix="fusedce-bench-") as tmp:
        plan_path, out_path = Path(tmp) / "plan.json", Path(tmp) / "results.json"
        plan_path.write_text(json.dumps(plan_to_json(plan)))
        # -c, not -m: fusedce.bench imports this module, and runpy warns when asked to run it again.
        child = "import sys; from fusedce.bench.runner import main; sys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", child, str(plan_path), str(out_path)]
        done = subprocess.run(command, env=env, timeout=CHILD_TIMEOUT_S, check=False)  # progress shows live
        if done.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"the benchmark process for {ENVIRONMENT_LABELS[name]} exited {done.returncode}")
        results = Results.from_json(json.loads(out_path.read_text()))
    results.env["torch environment"] = ENVIRONMENT_LABELS[name]
    return results


def main(argv: list[str] | None = None) -> int:
    """The child: run the plan in this process's environment and write the results as JSON."""
    plan_path, out_path = argv if argv is not None else sys.argv[1:]
    plan = plan_from_json(json.loads(Path(plan_path).read_text()))
    results = execute(plan, environment(plan.device, this_process=True))
    results.write_json(out_path)
    return 0

