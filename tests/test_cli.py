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
