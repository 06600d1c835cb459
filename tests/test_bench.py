"""``python -m fusedce bench``: the command end to end on tiny workloads, the JSON, the arithmetic of
the figures, the modes, the CPU memory probe, and torch's environments (one process each)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from fusedce.__main__ import main
from fusedce.bench import memory, report, timing
from fusedce.bench.providers import providers
from fusedce.bench.workloads import make_inputs, minimal_bytes, select, workloads

FAST = ["--device", "cpu", "--repeats", "2", "--no-memory", "--provider", "fusedce", "--provider", "eager"]
IN_PROCESS = ["--torch-env", "inherit"]


def test_the_command_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--workload", "micro", "--mode", "full", "--mode", "no-grad-forward", *FAST, *IN_PROCESS,
                 "--json", str(path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "THP_MEM_ALLOC_ENABLE" in captured.out and "threads" in captured.out and "backend" in captured.out
    assert "fusedce ms" in captured.out and "×eager" in captured.out and "log_softmax micro" in captured.out
    assert "cross_entropy/micro/fp32 full eager" in captured.err  # progress goes to stderr

    found = json.loads(path.read_text())
    assert set(found) == {"env", "copy", "timings", "memory", "rows", "baseline"}
    assert found["baseline"] is None  # inherit: one run, in this process
    assert found["copy"]["gbps"] > 0
    # micro: cross_entropy, log_softmax and softmax, two modes each, fusedce and eager each.
    assert len(found["rows"]) == 3 * 2
    assert len(found["timings"]) == 3 * 2 * 2
    for t in found["timings"]:
        assert t["error"] is None and t["ms"] > 0 and t["repeats"] == 2
    row = next(r for r in found["rows"] if r["workload"] == "cross_entropy/micro/fp32" and r["mode"] == "full")
    assert set(row["ms"]) == {"fusedce", "eager"}
    assert row["x_eager"] == pytest.approx(row["ms"]["eager"] / row["ms"]["fusedce"])
    assert row["x_compile"] is None
    assert row["bytes"] == 3 * 16 * 7 * 4
    assert row["pct_of_copy"] == pytest.approx(100 * row["gbps"] / found["copy"]["gbps"])


def test_the_command_refuses_an_unknown_workload(capsys):
    assert main(["bench", "--workload", "no-such-shape", *FAST]) == 2
    assert "unknown workload 'no-such-shape'" in capsys.readouterr().err


def test_quick_plans_the_documented_subset():
    from fusedce.bench.runner import make_plan

    plan = make_plan("cpu", True, None, None, None, None, True)
    assert [(w.key, modes) for w, modes in plan.workloads] == [
        ("cross_entropy/lm-32k/fp32", ("full", "forward")),
        ("cross_entropy/imagenet/fp32", ("full",)),
        ("cross_entropy/seg/fp32", ("full",)),
        ("cross_entropy/tiny/fp32", ("full",)),
    ]
    assert [w.key for w in plan.memory] == ["cross_entropy/lm-32k/fp32"]


def test_the_workload_table():
    cpu = {w.key: w for w in workloads("cpu") if not w.hidden}
    assert cpu["cross_entropy/lm-32k/bf16"].shape == (4096, 32000)
    assert cpu["cross_entropy/lm-128k/fp32"].shape == (1024, 128256)
    assert {w.key: w for w in workloads("cuda")}["cross_entropy/lm-128k/bf16"].shape == (16384, 128256)
    assert cpu["cross_entropy/seg/fp32"].shape == (16, 21, 128, 128)
    assert {"log_softmax/lm-32k/fp32", "softmax/lm-32k/fp32", "cross_entropy/imagenet/fp32",
            "cross_entropy/tiny/fp32"} <= set(cpu)
    assert [w.key for w in select("cpu", ["lm-32k"])] == [
        "cross_entropy/lm-32k/fp32", "cross_entropy/lm-32k/bf16", "log_softmax/lm-32k/fp32", "softmax/lm-32k/fp32"]
    assert [w.key for w in select("cpu", ["softmax"])] == ["softmax/lm-32k/fp32"]
    assert [w.key for w in select("cpu", ["micro"])] == [
        "cross_entropy/micro/fp32", "log_softmax/micro/fp32", "softmax/micro/fp32"]


def test_figures_from_a_fake_timing():
    lm = next(w for w in workloads("cpu") if w.key == "cross_entropy/lm-32k/fp32")
    n = 4096 * 32000 * 4
    assert (minimal_bytes(lm, "forward"), minimal_bytes(lm, "backward"), minimal_bytes(lm, "full")) == (n, 2 * n, 3 * n)
    soft = next(w for w in workloads("cpu") if w.key == "softmax/lm-32k/fp32")
    assert minimal_bytes(soft, "forward") == 2 * n and minimal_bytes(soft, "full") == 5 * n

    def fake(provider: str, ms: float) -> report.Timing:
        return report.Timing(lm.key, lm.name, lm.op, "fp32", list(lm.shape), "full", provider, ms, 3, 3 * n)

    # A 20 GB/s copy; fusedce moves 3 × 524.288 MB in 157.2864 ms: 10 GB/s, half the copy's.
    results = report.Results({"device": "test"}, copy_ms=1.0, copy_gbps=20.0, copy_bytes=1)
    results.timings = [fake("fusedce", 157.2864), fake("eager", 471.8592), fake("compile", 78.6432)]
    results.peaks = [memory.Peak(lm.key, "fusedce", n, n, "fake"), memory.Peak(lm.key, "eager", 3 * n, n, "fake")]
    (row,) = results.rows()
    assert row["gbps"] == pytest.approx(10.0)
    assert row["pct_of_copy"] == pytest.approx(50.0)
    assert row["x_eager"] == pytest.approx(3.0)  # eager is 3× slower: fusedce faster, ratio > 1
    assert row["x_compile"] == pytest.approx(0.5)
    assert row["peak_x_logits"] == {"fusedce": 1.0, "eager": 3.0}
    text = report.table(results)
    assert "3.00" in text and "0.50" in text and "50" in text and "1.00 / 3.00" in text
    assert report.speedup(None, 1.0) is None and report.percent_of_copy(1, None, 1.0) is None


@pytest.mark.parametrize("mode", timing.MODES)
@pytest.mark.parametrize("shape", ["micro", "micro-seg"])
def test_each_mode_times_what_it_says(mode, shape):
    (w,) = select("cpu", [f"cross_entropy/{shape}/fp32"])
    inputs = make_inputs(w, "cpu")
    for provider in providers(w, "cpu", ["fusedce", "fusedce-inplace"]):
        step = timing.make_step(provider, inputs, mode)
        times = timing.measure(step, 3)
        assert len(times) == 3 and all(t > 0 for t in times)
        has_grad = inputs.x.grad is not None
        assert has_grad == (mode in ("backward", "full"))
        if provider.overwrites_input and has_grad:
            # The in-place gradient overwrote the logits; setup restores them before every call.
            assert not torch.equal(inputs.x.detach(), inputs.master)
            step.setup()
            assert torch.equal(inputs.x.detach(), inputs.master)


def test_backward_mode_runs_the_forward_in_setup():
    (w,) = select("cpu", ["softmax/micro/fp32"])
    inputs = make_inputs(w, "cpu")
    calls = []
    (eager,) = providers(w, "cpu", ["eager"])
    counted = type(eager)("counted", lambda i: (calls.append("fwd"), eager.forward(i))[1])
    step = timing.make_step(counted, inputs, "backward")
    step.setup()
    assert calls == ["fwd"]
    step.run()
    assert calls == ["fwd"] and inputs.x.grad is not None


def test_the_repeat_budget_counts_the_setup():
    """A repeat costs its setup too (the backward mode's is a whole forward): a fast call behind a
    slow setup gets few repeats, not the hundreds its timed call alone would fit."""
    step = timing.Step(setup=lambda: time.sleep(0.05), run=lambda: None)
    once = timing.warm_up(step, 1, budget_s=1.0)
    assert once >= 0.05
    assert timing.auto_repeats(once, 1.0, 5, 1000) <= 20


def test_the_memory_probe_on_a_small_shape():
    (w,) = select("cpu", ["cross_entropy/micro-seg/fp32"])
    peak = memory.peak_extra(w, "eager", "cpu")
    assert peak.error is None, peak.error
    assert peak.extra_bytes is not None and peak.extra_bytes >= 0
    assert peak.logits_bytes == 2 * 5 * 3 * 4 * 4
    assert peak.method in ("VmHWM - VmRSS", "ru_maxrss")
    assert peak.ratio is not None and math.isfinite(peak.ratio)


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["bench", "--workload", "micro", *FAST, "--plot", "out.png"]) == 2
    assert "pip install 'fusedce[plot]'" in capsys.readouterr().err


def _huge_pages_honoured() -> bool:
    """Whether the kernel gives huge pages to a madvise()d region (the policy is not 'never')."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as policy:
            return "[never]" not in policy.read()
    except OSError:
        return False


def test_cpu_times_torch_with_huge_pages_and_reports_the_default_beside(tmp_path, capfd):
    """The default on CPU: every provider in a fresh process with THP_MEM_ALLOC_ENABLE=1 (the
    figures), then in one with it unset (the second figure), each process saying what torch got."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--workload", "cross_entropy/micro/fp32", "--mode", "full", *FAST, "--json", str(path)]) == 0
    out = capfd.readouterr().out
    assert "×eager default env" in out and "figures: THP_MEM_ALLOC_ENABLE=1 for every provider" in out
    found = json.loads(path.read_text())
    best, default = found["env"], found["baseline"]["env"]
    assert best["THP_MEM_ALLOC_ENABLE"] == "1" and default["THP_MEM_ALLOC_ENABLE"] == "unset"
    best_pages = int(best["torch huge pages (MiB)"].split()[0])
    default_pages = int(default["torch huge pages (MiB)"].split()[0])
    if _huge_pages_honoured():
        assert best_pages >= 32, best  # most of a 64 MiB tensor: torch honoured the variable
    if "[madvise]" in best["hugepages"]:
        assert default_pages == 0, default  # only madvise()d memory gets huge pages
    (row,) = found["rows"]
    assert row["x_eager"] is not None and row["x_eager_default"] is not None
    baseline_ms = {t["provider"]: t["ms"] for t in found["baseline"]["timings"]}
    assert row["x_eager_default"] == pytest.approx(baseline_ms["eager"] / baseline_ms["fusedce"])


def test_a_cuda_run_refuses_the_cpu_environments(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench", "--device", "cuda", "--torch-env", "both", "--workload", "micro"]) == 2
    assert "--torch-env is for CPU runs" in capsys.readouterr().err


def test_a_plan_survives_the_trip_to_the_child_process():
    from fusedce.bench.runner import make_plan, plan_from_json, plan_to_json

    plan = make_plan("cpu", True, None, None, ["fusedce", "eager"], 4, True, "cpu")
    again = plan_from_json(json.loads(json.dumps(plan_to_json(plan))))
    assert again == plan


def test_the_table_shows_the_default_environment_ratios():
    lm = next(w for w in workloads("cpu") if w.key == "cross_entropy/lm-32k/fp32")

    def run(fused_ms: float, eager_ms: float) -> report.Results:
        results = report.Results({}, copy_ms=1.0, copy_gbps=20.0, copy_bytes=1)
        results.timings = [report.Timing(lm.key, lm.name, lm.op, "fp32", list(lm.shape), "full", p, ms, 3, 1)
                           for p, ms in (("fusedce", fused_ms), ("eager", eager_ms))]
        return results

    best = run(155.0, 550.0)
    best.baseline = run(151.0, 755.0)
    (row,) = best.rows()
    assert row["x_eager"] == pytest.approx(550 / 155) and row["x_eager_default"] == pytest.approx(755 / 151)
    text = report.table(best)
    assert "×eager default env" in text and "3.55" in text and "5.00" in text
    again = report.Results.from_json(json.loads(json.dumps(best.to_json())))
    assert again.rows() == best.rows()
