"""The pytest plugin (registered through the ``pytest11`` entry point): a ``fusedce_parity``
fixture that checks a loss against torch with the grid, rules and report of
``python -m fusedce check``.

    def test_my_loss(fusedce_parity):
        fusedce_parity(my_cross_entropy, op="cross_entropy")

Options (command line, or the ini keys of the same name with ``_`` for ``-``):
``--fusedce-quick`` (a 1-in-10 sample of the product grid plus every special case),
``--fusedce-every N`` (then one case in N of that, spread evenly) and ``--fusedce-device``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
import torch

from .. import testing
from ..checkcli import _grid

Candidate = Callable[..., Any] | Mapping[str, Callable[..., Any]]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedce", "fusedce parity checking (the fusedce_parity fixture)")
    group.addoption("--fusedce-quick", action="store_const", const=True, default=None,
                    help="check a 1-in-10 sample of the product grid plus every special case, as "
                         "`python -m fusedce check --quick` (ini: fusedce_quick)")
    group.addoption("--fusedce-every", type=int, default=None, metavar="N",
                    help="check one case in N of the chosen grid, spread evenly (ini: fusedce_every)")
    group.addoption("--fusedce-device", default=None, metavar="DEVICE",
                    help="the device the cases run on, e.g. cpu or cuda:0 (ini: fusedce_device; default cpu)")
    parser.addini("fusedce_quick", "as --fusedce-quick", type="bool", default=False)
    parser.addini("fusedce_every", "as --fusedce-every", default="1")
    parser.addini("fusedce_device", "as --fusedce-device", default="cpu")


def _option(config: pytest.Config, name: str) -> Any:
    """The command line wins over the ini file."""
    value = config.getoption(f"--fusedce-{name}")
    return config.getini(f"fusedce_{name}") if value is None else value


def _every(config: pytest.Config) -> int:
    value = _option(config, "every")
    try:
        every = int(value)
    except ValueError:
        every = 0
    if every < 1:
        raise pytest.UsageError(f"--fusedce-every (ini: fusedce_every) must be an integer of at least 1, got {value!r}")
    return every


def pytest_configure(config: pytest.Config) -> None:
    _every(config)  # a bad value is a usage error at start-up, not a failure in every test


def _ops(candidate: Candidate, op: str | Iterable[str] | None) -> tuple[str, ...]:
    if op is None:
        ops = tuple(candidate) if isinstance(candidate, Mapping) else ("cross_entropy",)
    else:
        ops = (op,) if isinstance(op, str) else tuple(op)
    unknown = [o for o in ops if o not in testing.OPS]
    if unknown or not ops:
        raise ValueError(f"fusedce_parity: op must be among {', '.join(testing.OPS)}; got {ops!r}")
    return ops


def _device_problem(device: str) -> str | None:
    """Why the cases cannot run on ``device``, if they cannot."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        return f"fusedce_parity: device {device!r} is not usable here ({type(exc).__name__}: {exc})"
    return None


class Parity:
    """The fixture's value: call it with a candidate; it fails the test with the check's report."""

    def __init__(self, config: pytest.Config) -> None:
        self.quick = bool(_option(config, "quick"))
        self.every = _every(config)
        self.device = str(_option(config, "device"))

    def cases(self, ops: tuple[str, ...], device: str | None = None) -> list[testing.Case]:
        """The cases ``python -m fusedce check --candidate ...`` would run with these options."""
        return _grid(ops, self.quick, device=device or self.device, thin=self.every)

    def __call__(
        self,
        candidate: Candidate,
        op: str | Iterable[str] | None = None,
        *,
        cases: Iterable[testing.Case] | None = None,
        device: str | None = None,
        label: str | None = None,
        failures: int = 10,
    ) -> testing.Report:
        """Check ``candidate`` (a function with the signature of torch's ``op``, or a mapping from
        op name to such functions) and fail the test, with the report, if it differs from torch.

        ``op`` is an op name or several (default: the mapping's keys, else "cross_entropy");
        ``cases`` replaces the grid the options choose; ``device`` overrides --fusedce-device.
        Returns the report when every case passes.
        """
        ops = _ops(candidate, op)
        device = device or self.device
        problem = _device_problem(device)
        if problem is not None:
            pytest.fail(problem, pytrace=False)
        chosen = list(cases) if cases is not None else self.cases(ops, device)
        functions = dict(candidate) if isinstance(candidate, Mapping) else {o: candidate for o in ops}
        name = label or getattr(candidate, "__qualname__", None) or type(candidate).__name__
        report = testing.check({o: functions[o] for o in ops}, chosen, label=f"{name}@{device}", device=device)
        if not report.results:
            pytest.fail(f"fusedce_parity: no cases to check for {', '.join(ops)}", pytrace=False)
        if not report.ok:
            pytest.fail("\n".join([
                f"fusedce parity: {name} differs from torch on {device}: {report.summary()}",
                "",
                report.table(),
                "",
                report.details(failures),
            ]), pytrace=False)
        return report


@pytest.fixture
def fusedce_parity(pytestconfig: pytest.Config) -> Parity:
    """Check a loss against torch over fusedce's parity grid; see ``fusedce.testing.pytest_plugin``."""
    return Parity(pytestconfig)
