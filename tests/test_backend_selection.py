"""Which backend runs: forced by name, chosen per device, and the fallback when C++ cannot build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fusedce
from fusedce.kernels import backend_for, reference, use_backend


def test_use_backend_forces_the_reference_backend():
    with use_backend("reference"):
        assert backend_for(torch.device("cpu")) is reference


def test_an_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"), use_backend("cuda"):
        pass


def test_an_unknown_environment_backend_is_refused(monkeypatch):
    monkeypatch.setenv("FUSEDCE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSEDCE_BACKEND='fast'"):
        fusedce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_no_compiler_falls_back_to_reference_with_one_warning(tmp_path):
    """With a compiler that cannot run, the auto backend warns once and still computes."""
    script = (
        "import warnings, torch, fusedce\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        loss = fusedce.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))\n"
        "notes = [str(w.message) for w in caught if 'fusedce:' in str(w.message)]\n"
        "print(len(notes), notes[0][:60] if notes else '', bool(torch.isfinite(loss)))\n"
    )
    env = {**os.environ, "CXX": "/nonexistent/c++", "FUSEDCE_CACHE_DIR": str(tmp_path)}
    env.pop("FUSEDCE_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    count, *rest = done.stdout.split()
    assert count == "1" and rest[-1] == "True", done.stdout
    assert "the cpu backend is unavailable" in done.stdout
