"""pytest-benchmark over fusedce's bench package: the workloads, providers and modes of
``python -m fusedce bench``, one test per (workload, mode, provider).

Run with ``python -m pytest benchmarks --benchmark-enable``. Without it (pyproject disables
benchmarks by default) each case runs once, as a smoke test, and only the small workloads run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fusedce.bench import timing
from fusedce.bench.providers import cases, providers
from fusedce.bench.workloads import make_inputs, minimal_bytes, workloads

# Without --benchmark-enable, workloads whose logits are larger than this are skipped.
SMOKE_MAX_BYTES = 2**20
# With it: rounds to fill about this many seconds per case, within [MIN_ROUNDS, MAX_ROUNDS].
BUDGET_S, MIN_ROUNDS, MAX_ROUNDS = 2.0, 5, 1000


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_enable")) or not config.getoption("benchmark_disable")


@pytest.fixture
def run_case(benchmark, request) -> Callable[[str, str, str], None]:
    """Time one case: the step's setup outside the timer and its run inside (on CUDA the run
    synchronises), after a warm-up that also compiles. The device is chosen here, at run time."""

    def run(key: str, mode: str, name: str) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        (workload,) = [w for w in workloads(device) if w.key == key]
        enabled = _enabled(request.config)
        if not enabled and workload.logits_bytes > SMOKE_MAX_BYTES:
            pytest.skip("a large workload: run with --benchmark-enable")
        found = providers(workload, device, [name])
        if not found:
            pytest.skip(f"{name} is not available for {key} on {device}")
        (provider,) = found
        if name == "compile":
            torch.compiler.reset()  # one graph per test, clear of dynamo's recompile limit
        inputs = make_inputs(workload, device, restorable=provider.overwrites_input)
        step = timing.make_step(provider, inputs, mode)
        rounds = 1
        if enabled:
            once = timing.warm_up(step, 1, BUDGET_S)
            rounds = timing.auto_repeats(once, BUDGET_S, MIN_ROUNDS, MAX_ROUNDS)
        benchmark.extra_info.update(device=device, minimal_bytes=minimal_bytes(workload, mode))
        benchmark.pedantic(step.run, setup=step.setup, rounds=rounds, warmup_rounds=0, iterations=1)

    return run


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking ``key, mode, provider`` runs once per case of its module's ``OPS``, each in
    the benchmark group of its (workload, mode), so that pytest-benchmark's table sets the
    providers side by side."""
    if {"key", "mode", "provider"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("key", "mode", "provider"), [
            pytest.param(w.key, mode, name, id=f"{w.name}-{w.dtype_name}-{mode}-{name}",
                         marks=pytest.mark.benchmark(group=f"{w.key} {mode}"))
            for op in metafunc.module.OPS
            for w, mode, name in cases(op)
        ])
