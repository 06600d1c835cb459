"""Test-session setup shared by tests/ and benchmarks/."""

import os

import pytest

# The Triton kernels run on CPU tensors only under Triton's interpreter, which must be chosen
# before triton is first imported. A machine with a GPU runs them natively instead.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption(
        "--full-grid",
        action="store_true",
        help="run the whole parity grid on every backend (the default run samples the product grid)",
    )
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=0,
        help="tests/test_fuzz.py: run N random examples per backend and op family "
        "(default: a short deterministic run)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full-grid"):
        return
    skip = pytest.mark.skip(reason="exhaustive sweep: run with --full-grid")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
