"""``python -m fusedce doctor`` and ``build``, the build path's messages, and the torch-version gate."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from fusedce import _torch_version
from fusedce.__main__ import main
from fusedce.kernels import cpu


def test_doctor_reports_every_backend_and_the_toolchain(capsys):
    assert main(["doctor"]) == 0  # the test machine has a compiler: the cpu backend is usable
    out = capsys.readouterr().out
    for needle in (f"torch     {torch.__version__}", "python    ", "fusedce   ", "triton    ", "compiler  /",
                   "ninja     /", f"ATen {torch.backends.cpu.get_cpu_capability()}", str(cpu.kernel_dir()),
                   "reference [any]", "cpu       [cpu]  ok", "triton    [cuda]", "verdict: the fused backend for cpu"):
        assert needle in out, (needle, out)


def test_doctor_without_a_compiler_names_it_and_the_fix_and_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("FUSEDCE_CACHE_DIR", str(tmp_path))  # nothing built there
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "compiler  not found" in out
    assert "cpu       [cpu]  NO  cannot be built: no C++ compiler ('/nonexistent/c++'" in out
    assert cpu.install_command("compiler") in out
    assert "(cpu) is NOT usable" in out


def test_the_build_error_names_the_missing_piece_the_fix_and_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("FUSEDCE_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError) as raised:
        cpu._build()
    message = str(raised.value)
    assert "no C++ compiler" in message and cpu.install_command("compiler") in message
    assert "reference backend" in message
    assert not any(tmp_path.iterdir())  # it gave up before creating anything


@pytest.mark.parametrize(("family", "command"), [("debian", "apt-get install g++"), ("fedora", "dnf install gcc-c++"),
                                                 ("alpine", "apk add g++"), ("", "install g++")])
def test_the_compiler_install_command_follows_the_distribution(monkeypatch, family, command):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(cpu, "_os_family", lambda: family)
    assert cpu.install_command("compiler").startswith(command)


def test_the_ninja_wheel_is_found_when_ninja_is_not_on_path(monkeypatch, tmp_path):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))  # an unactivated venv: its bin/ is off PATH
    assert shutil.which("ninja") is None
    assert cpu._find_ninja() == f"{ninja.BIN_DIR}/ninja"


def test_no_ninja_at_all_is_a_named_problem(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "ninja", None)  # import ninja raises ImportError
    problem = cpu.toolchain()["problem"]
    assert problem is not None and "ninja is missing" in problem and "pip install ninja" in problem


def test_build_when_built_says_where(capsys):
    cpu.ensure_available()
    assert main(["build"]) == 0
    assert f"already built in {cpu.kernel_dir()}" in capsys.readouterr().out


def test_build_without_a_compiler_fails_and_says_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("FUSEDCE_CACHE_DIR", str(tmp_path))
    assert main(["build"]) == 1
    assert "no C++ compiler" in capsys.readouterr().err


@pytest.mark.slow
def test_build_compiles_into_fusedce_cache_dir(monkeypatch, tmp_path, capsys):
    """A real compile (about a minute): the kernels land in FUSEDCE_CACHE_DIR, complete."""
    monkeypatch.setenv("FUSEDCE_CACHE_DIR", str(tmp_path))
    assert not cpu.is_built()
    assert main(["build"]) == 0
    assert cpu.kernel_dir().parent == tmp_path and cpu.is_built()
    assert f"built the CPU kernels ({cpu.toolchain()['isa']}) in {cpu.kernel_dir()}" in capsys.readouterr().out


def test_the_torch_version_gate():
    assert _torch_version.parse("2.13.0+cpu") == (2, 13)
    assert _torch_version.parse("2.11.0a0+git1234abc") == (2, 11)
    _torch_version.check_minimum("2.11.0")
    with pytest.raises(ImportError, match=r"fusedce needs torch >= 2\.11, but torch 2\.10\.1 is installed"):
        _torch_version.check_minimum("2.10.1")
    _torch_version.require("linear_cross_entropy", (2, 13), "2.13.0")
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy needs torch >= 2\.13 \(torch 2\.11\.0"):
        _torch_version.require("linear_cross_entropy", (2, 13), "2.11.0")


def test_the_declared_minimum_is_the_one_enforced():
    """pyproject.toml's torch floor and MINIMUM_TORCH must not drift apart."""
    import pathlib
    import re

    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not running from the source tree")
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', pyproject.read_text())
    assert floor is not None
    assert (int(floor.group(1)), int(floor.group(2))) == _torch_version.MINIMUM_TORCH


def test_importing_fusedce_on_an_old_torch_fails_clearly():
    import subprocess

    script = "import torch\ntorch.__version__ = '2.10.0+cpu'\nimport fusedce\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ImportError: fusedce needs torch >= 2.11, but torch 2.10.0+cpu is installed" in done.stderr
