"""The pytest plugin: a project that installs fusedce gets the ``fusedce_parity`` fixture, which
passes a correct loss and fails a wrong one with the check's report. Each run here samples the
grid (``--fusedce-quick --fusedce-every 60``: about fifty cross_entropy cases)."""

from __future__ import annotations

import os

import pytest
import torch

from fusedce.checkcli import _grid

pytest_plugins = ["pytester"]

# pytester points HOME at a fresh folder; the runs keep the real one so that they find the C++
# kernels already compiled in ~/.cache/fusedce instead of compiling them again (a minute or more).
HOME = os.environ.get("HOME")

SAMPLED = ("--fusedce-quick", "--fusedce-every", "60")

CANDIDATES = '''
import torch.nn.functional as F

import fusedce


def my_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                     reduction="mean", label_smoothing=0.0):
    return fusedce.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                 label_smoothing)


def no_smoothing(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0):
    """The planted bug: the label-smoothing term is dropped."""
    return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction)
'''


@pytest.fixture
def project(pytester, monkeypatch):
    """A fresh project: its own losses module, and nothing of fusedce's test setup."""
    if HOME is not None:
        monkeypatch.setenv("HOME", HOME)
    pytester.makepyfile(losses=CANDIDATES)
    pytester.syspathinsert()
    return pytester


def test_a_correct_loss_passes_in_a_fresh_interpreter(project):
    project.makepyfile(test_mine='''
        from losses import my_cross_entropy

        def test_my_loss(fusedce_parity):
            report = fusedce_parity(my_cross_entropy, op="cross_entropy")
            assert report.ok and len(report.results) > 20
    ''')
    # A subprocess: the fixture comes from the installed entry point, not from this session.
    result = project.runpytest_subprocess(*SAMPLED, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_planted_bug_fails_with_a_readable_report(project):
    project.makepyfile(test_mine='''
        from losses import no_smoothing

        def test_my_loss(fusedce_parity):
            fusedce_parity(no_smoothing, op="cross_entropy")
    ''')
    result = project.runpytest(*SAMPLED)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*fusedce parity: no_smoothing differs from torch on cpu: * cases, * passed, * failed",
        "op * no_smoothing@cpu",
        "cross_entropy * passed, * FAILED",
        "FAILED [[]no_smoothing@cpu[]] cross_entropy-*label_smoothing=*",
        "    value: *",
    ])
    text = result.stdout.str()
    assert "def __call__" not in text and "pytest_plugin.py" not in text  # the report, not the plugin's code
    assert "FAILED [no_smoothing@cpu] cross_entropy-" in text and "label_smoothing=None" not in text.split(
        "FAILED [no_smoothing@cpu]")[1].splitlines()[0]


def test_the_ini_options_choose_the_grid(project):
    project.makeini("[pytest]\nfusedce_quick = true\nfusedce_every = 20\nfusedce_device = cpu\n")
    project.makepyfile(test_mine='''
        import fusedce

        def test_softmaxes(fusedce_parity):
            report = fusedce_parity({"softmax": fusedce.softmax, "log_softmax": fusedce.log_softmax})
            print("CASES", len(report.results), ",".join(sorted({r.case.op for r in report.results})))
    ''')
    result = project.runpytest("-s")
    result.assert_outcomes(passed=1)
    expected = len(_grid(("softmax", "log_softmax"), quick=True, thin=20))
    result.stdout.fnmatch_lines([f"*CASES {expected} log_softmax,softmax"])


def test_the_command_line_wins_over_the_ini(project):
    project.makeini("[pytest]\nfusedce_every = 1000\n")
    project.makepyfile(test_mine='''
        import fusedce

        def test_count(fusedce_parity):
            print("CASES", len(fusedce_parity(fusedce.nll_loss, op="nll_loss").results))
    ''')
    result = project.runpytest("-s", *SAMPLED)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*CASES {len(_grid(('nll_loss',), quick=True, thin=60))}"])


def test_an_unusable_device_fails_clearly(project):
    project.makepyfile(test_mine='''
        from losses import my_cross_entropy

        def test_my_loss(fusedce_parity):
            fusedce_parity(my_cross_entropy)
    ''')
    result = project.runpytest(*SAMPLED, "--fusedce-device", "nosuchdevice")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*fusedce_parity: device 'nosuchdevice' is not usable here (RuntimeError: *"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_device_option_runs_the_cases_there(project):
    project.makepyfile(test_mine='''
        from losses import my_cross_entropy

        def test_my_loss(fusedce_parity):
            report = fusedce_parity(my_cross_entropy)
            assert {r.label for r in report.results} == {"my_cross_entropy@cuda"}
    ''')
    project.runpytest(*SAMPLED, "--fusedce-device", "cuda").assert_outcomes(passed=1)


def test_bad_arguments_are_refused(project):
    project.makepyfile(test_mine='''
        import pytest
        from losses import my_cross_entropy

        def test_unknown_op(fusedce_parity):
            with pytest.raises(ValueError, match="op must be among cross_entropy, nll_loss"):
                fusedce_parity(my_cross_entropy, op="cross_entropi")
    ''')
    project.runpytest(*SAMPLED).assert_outcomes(passed=1)
    result = project.runpytest("--fusedce-every", "0")
    result.stderr.fnmatch_lines(["*--fusedce-every (ini: fusedce_every) must be an integer of at least 1, got 0*"])
