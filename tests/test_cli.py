"""``python -m fusedce check``: exit status, the table, and checking a user's own candidate."""

from __future__ import annotations

import torch

from fusedce.__main__ import main


def test_check_passes_and_prints_the_table(capsys):
    assert main(["check", "--op", "softmax", "--backend", "reference", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "softmax" in out and "reference@cpu" in out and "0 failed" in out
    assert f"reference: torch {torch.__version__}, the torch running this check" in out


def test_check_a_candidate_that_is_wrong_fails_with_details(capsys):
    code = main(["check", "--candidate", "tests.test_cli:wrong_softmax", "--op", "softmax", "--quick",
                 "--failures", "3"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED [tests.test_cli:wrong_softmax@cpu]" in out


def test_check_a_candidate_that_is_torch_itself_passes(capsys):
    assert main(["check", "--candidate", "torch.nn.functional:log_softmax", "--op", "log_softmax",
                 "--quick"]) == 0


def wrong_softmax(input, dim=None, _stacklevel=3, dtype=None):
    import torch.nn.functional as F

    return F.softmax(input, dim, _stacklevel + 1, dtype) * 1.001


def _without(monkeypatch, *names):
    """As on a machine where these backends cannot load (no compiler, no Triton)."""
    from fusedce import checkcli

    real = checkcli.unavailable_reason
    monkeypatch.setattr(checkcli, "unavailable_reason",
                        lambda name: "RuntimeError: no C++ compiler" if name in names else real(name))


def test_check_fails_when_the_fused_backend_could_not_run(monkeypatch, capsys):
    _without(monkeypatch, "cpu", "triton")
    assert main(["check", "--op", "softmax", "--quick"]) == 1
    captured = capsys.readouterr()
    assert "NOT CHECKED cpu@cpu: RuntimeError: no C++ compiler" in captured.err
    assert "cpu@cpu (RuntimeError: no C++ compiler)" in captured.out
    assert "NOT CHECKED triton@cpu" in captured.err  # listed, though not required on CPU
    assert main(["check", "--op", "softmax", "--quick", "--allow-missing"]) == 0


def test_check_fails_when_a_requested_backend_could_not_run(monkeypatch, capsys):
    _without(monkeypatch, "cpu")
    assert main(["check", "--op", "softmax", "--quick", "--backend", "reference", "--backend", "cpu"]) == 1
    assert "NOT CHECKED cpu@cpu" in capsys.readouterr().err


def test_check_with_nothing_to_run_is_an_error_not_a_crash(monkeypatch, capsys):
    _without(monkeypatch, "cpu")
    assert main(["check", "--op", "softmax", "--backend", "cpu"]) == 1
    assert "error: no case was checked" in capsys.readouterr().err


def test_check_refuses_backend_with_candidate(capsys):
    assert main(["check", "--candidate", "torch.nn.functional:softmax", "--op", "softmax", "--backend", "cpu"]) == 2
    assert "--backend" in capsys.readouterr().err


def test_check_prints_a_diagnosis_of_the_failures(capsys):
    assert main(["check", "--candidate", "tests.test_cli:wrong_softmax", "--op", "softmax", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "diagnosis of" in out and "failures of kind 'value'" in out
