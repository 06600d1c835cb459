"""fusedce.distributed against single-process torch on the gathered logits, over real gloo groups.

Each test starts one world of processes (``spawn``) that runs a whole batch of cases, because
process start-up dominates; a world that does not finish within its timeout is killed and the
test fails, so a hang cannot block CI. Every rank compares its own results (the global loss, the
gradient of its slice of the logits and of a probability target, a weight's gradient) with
``torch.nn.functional.cross_entropy`` on the full logits, which every rank builds from one seed.
"""

from __future__ import annotations

import itertools
import queue as queue_module
import socket
import traceback
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)

WORLD_TIMEOUT_S = 150
F64 = (1e-9, 1e-9)
F32 = (2e-5, 2e-5)


# --------------------------------------------------------------------------------------------
# Starting a world
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int, job: str) -> None:
    """Run ``JOBS[job](rank, world)`` on ``world`` gloo ranks; fail with every rank's failures."""
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(rank, world, port, job, results)) for rank in range(world)]
    for p in procs:
        p.start()
    failures: dict[int, list[str]] = {}
    try:
        for _ in range(world):
            rank, found = results.get(timeout=WORLD_TIMEOUT_S)
            failures[rank] = found
    except queue_module.Empty:
        pytest.fail(f"world of {world} for {job!r} did not finish in {WORLD_TIMEOUT_S}s (a hang?); got {failures}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    bad = {rank: found for rank, found in failures.items() if found}
    assert not bad, "\n".join(f"rank {r}: {line}" for r, found in sorted(bad.items()) for line in found[:20])


def _entry(rank: int, world: int, port: int, job: str, results: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=WORLD_TIMEOUT_S),
        )
        failures = JOBS[job](rank, world)
    except BaseException:
        failures = [traceback.format_exc()]
    results.put((rank, failures))
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    from tests.helpers import assert_close_report

    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert_close_report(actual.detach(), expected.detach(), tol, what)


def _outcome(fn: Any) -> tuple[Any, Any]:
    try:
        return fn(), None
    except Exception as e:
        return None, (type(e), str(e))


def _splits(num_classes: int, world: int, kind: str) -> list[int]:
    """Uneven class counts per rank: 'uneven' (the last rank smaller) or 'empty' (rank 1 none)."""
    if kind == "empty" and world > 1:
        sizes = [num_classes // (world - 1)] * (world - 1)
        sizes[0] += num_classes - sum(sizes)
        return [sizes[0], 0, *sizes[1:]]
    base = -(-num_classes // world)
    return [max(0, min(base, num_classes - i * base)) for i in range(world)]


class Case:
    """One argument combination, built identically on every rank from its index as the seed."""

    def __init__(self, seed: int, shape: tuple[int, ...], kind: str, *, weight: bool = False, ignore: int = -100,
                 smoothing: float = 0.0, reduction: str = "mean", dtype: torch.dtype = torch.float64,
                 targets: str = "random", split: str = "uneven", legacy: dict[str, Any] | None = None,
                 shift: float = 0.0) -> None:
        self.label = (f"#{seed} {shape} {kind} w={weight} ignore={ignore} eps={smoothing} {reduction} "
                      f"{dtype} targets={targets} split={split} legacy={legacy} shift={shift}")
        gen = torch.Generator().manual_seed(seed)
        self.class_dim = 0 if len(shape) == 1 else 1
        classes = shape[self.class_dim]
        self.logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + shift).to(dtype)
        rows = shape[:self.class_dim] + shape[self.class_dim + 1:]
        if kind == "prob":
            self.target = torch.randn(shape, generator=gen, dtype=torch.float64).softmax(self.class_dim).to(dtype)
        else:
            high = {"random": classes, "first_rank_only": 2}.get(targets, classes)
            self.target = torch.randint(0, high, rows, generator=gen)
            if targets == "some_ignored" and self.target.dim():
                self.target.view(-1)[::2] = ignore
            if targets == "all_ignored":
                self.target.fill_(ignore)
        if targets == "neg_inf":
            # A row whose slice on the last rank is masked, and one masked everywhere but its target.
            self.logits.narrow(self.class_dim, classes - 2, 2).select(0, 0).fill_(float("-inf"))
        if targets == "neg_inf_shard":
            # The last 3 classes of row 0 masked: the whole row on the last rank of 2 (4 + 3) and of
            # 3 (3 + 3 + 1), where the fused kernel's sums of that row cannot serve.
            self.logits.narrow(self.class_dim, classes - 3, 3).select(0, 0).fill_(float("-inf"))
        self.weight = torch.rand(classes, generator=gen, dtype=torch.float64).add(0.5).to(dtype) if weight else None
        self.kwargs: dict[str, Any] = dict(ignore_index=ignore, label_smoothing=smoothing)
        self.kwargs.update(legacy if legacy else {"reduction": reduction})
        self.reduction = reduction if legacy is None else "sum"
        out_shape = () if self.reduction != "none" else rows
        self.grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
        self.split = split
        self.kind = kind
        self.tol = F64 if dtype == torch.float64 else F32


def _check_case(case: Case, rank: int, world: int) -> list[str]:
    from fusedce import distributed as fdist

    classes = case.logits.shape[case.class_dim]
    sizes = _splits(classes, world, case.split)
    offset = sum(sizes[:rank])
    prob = case.kind == "prob"
    full = case.logits.clone().requires_grad_()
    target_full = case.target.clone().requires_grad_(prob)
    weight_full = None if case.weight is None else case.weight.clone().requires_grad_(prob)
    expected, expected_err = _outcome(lambda: F.cross_entropy(full, target_full, weight_full, **case.kwargs))

    local = case.logits.narrow(case.class_dim, offset, sizes[rank]).clone().requires_grad_()
    local_target = case.target.narrow(case.class_dim, offset, sizes[rank]) if prob else case.target
    local_target = local_target.clone().requires_grad_(prob)
    weight = None if case.weight is None else case.weight.clone().requires_grad_(prob)
    got, got_err = _outcome(lambda: fdist.cross_entropy(local, local_target, weight, **case.kwargs))
    if expected_err or got_err:
        return [] if expected_err == got_err else [f"{case.label}: torch raised {expected_err}, fusedce {got_err}"]
    try:
        _close(got, expected, case.tol, f"{case.label}: loss")
        (expected * case.grad_out).sum().backward()
        (got * case.grad_out).sum().backward()
        assert local.grad is not None and full.grad is not None
        _close(local.grad, full.grad.narrow(case.class_dim, offset, sizes[rank]), case.tol, f"{case.label}: grad")
        if prob:
            assert local_target.grad is not None and target_full.grad is not None
            expected_t = target_full.grad.narrow(case.class_dim, offset, sizes[rank])
            _close(local_target.grad, expected_t, case.tol, f"{case.label}: target grad")
            if weight is not None:
                assert weight.grad is not None and weight_full is not None and weight_full.grad is not None
                _close(weight.grad, weight_full.grad, case.tol, f"{case.label}: weight grad")
    except AssertionError as e:
        return [str(e)]
    return []


def _grid() -> list[Case]:
    cases: list[Case] = []
    shapes = [(5, 7), (3, 7, 2), (7,)]
    seed = itertools.count()
    reductions = ("none", "mean", "sum")
    for shape, weight, smoothing, reduction in itertools.product(shapes, (False, True), (0.0, 0.25), reductions):
        for ignore in (-100, 3):
            cases.append(Case(next(seed), shape, "index", weight=weight, ignore=ignore, smoothing=smoothing,
                              reduction=reduction, targets="some_ignored"))
        cases.append(Case(next(seed), shape, "prob", weight=weight, smoothing=smoothing, reduction=reduction))
    # The special cases: the all-ignored batch (NaN mean, zero gradients), a rank that holds no
    # row's target, -inf masks, an empty shard, legacy arguments, float32, K = 2.
    for weight, smoothing, reduction in itertools.product((False, True), (0.0, 0.25), ("none", "mean", "sum")):
        cases.append(Case(next(seed), (4, 7), "index", weight=weight, smoothing=smoothing, reduction=reduction,
                          targets="all_ignored"))
    for smoothing in (0.0, 0.25):
        cases.append(Case(next(seed), (6, 7), "index", smoothing=smoothing, targets="first_rank_only"))
        cases.append(Case(next(seed), (4, 7), "index", weight=True, smoothing=smoothing, targets="neg_inf",
                          reduction="none"))
        cases.append(Case(next(seed), (4, 7), "prob", smoothing=smoothing, targets="neg_inf", reduction="none"))
        cases.append(Case(next(seed), (4, 7), "index", smoothing=smoothing, targets="neg_inf_shard",
                          reduction="none"))
        for kind in ("index", "prob"):
            cases.append(Case(next(seed), (4, 9), kind, weight=True, smoothing=smoothing, split="empty"))
            cases.append(Case(next(seed), (8, 11), kind, weight=True, smoothing=smoothing, dtype=torch.float32))
            cases.append(Case(next(seed), (2, 7, 2, 3), kind, weight=True, smoothing=smoothing))
            # Shift invariance: logits near 60000 in float32, where x - lse with a rounded lse
            # would be off by ulp(60000) = 0.004.
            cases.append(Case(next(seed), (6, 9), kind, smoothing=smoothing, dtype=torch.float32, shift=6e4,
                              reduction="none"))
    cases.append(Case(next(seed), (4, 7), "index", legacy={"size_average": False}))
    cases.append(Case(next(seed), (4, 7), "index", weight=True, legacy={"reduce": False}))
    cases.append(Case(next(seed), (0, 7), "index", reduction="mean"))
    return cases


def _errors() -> list[Case]:
    """Cases torch refuses: the same exception type and message must come from every rank."""
    def case(seed: int, **kw: Any) -> Case:
        return Case(1000 + seed, (4, 7), kw.pop("kind", "index"), **kw)

    out_of_range = case(0)
    out_of_range.target[1] = 7  # the global C: outside every rank's slice
    negative = case(1)
    negative.target[2] = -1
    wrong_weight = case(2, weight=True)
    wrong_weight.weight = torch.ones(6, dtype=torch.float64)
    batch = case(3)
    batch.target = batch.target[:3]
    smoothing = case(4, smoothing=1.5)
    prob_ignore = case(5, kind="prob", ignore=0)
    prob_weight = case(6, kind="prob", weight=True)
    prob_weight.weight = torch.ones(8, dtype=torch.float64)
    return [out_of_range, negative, wrong_weight, batch, smoothing, prob_ignore, prob_weight]


def _job_grid(rank: int, world: int) -> list[str]:
    failures: list[str] = []
    for case in _grid() + _errors():
        failures += _check_case(case, rank, world)
    return failures


def _job_grid_and_dtensor(rank: int, world: int) -> list[str]:
    return _job_grid(rank, world) + _job_dtensor_1d(rank, world)


# --------------------------------------------------------------------------------------------
# DTensor
# --------------------------------------------------------------------------------------------


def _dtensor_case(
    mesh: Any, placements: Any, target_placements: Any, case: Case, call: str = "functional"
) -> list[str]:
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    import fusedce

    full = case.logits.clone().requires_grad_()
    expected = F.cross_entropy(full, case.target, case.weight, **case.kwargs)
    (expected * case.grad_out).sum().backward()

    dt = distribute_tensor(case.logits.clone(), mesh, placements).requires_grad_()
    target: Any = case.target if target_placements is None else distribute_tensor(case.target, mesh, target_placements)
    if call == "module":
        got = fusedce.CrossEntropyLoss(case.weight, **case.kwargs)(dt, target)
    elif call == "patch":
        with fusedce.patch():
            got = F.cross_entropy(dt, target, case.weight, **case.kwargs)
    else:
        got = fusedce.cross_entropy(dt, target, case.weight, **case.kwargs)
    label = f"DTensor {placements} target {target_placements} {call} {case.label}"
    try:
        assert isinstance(got, DTensor), f"{label}: got {type(got)}"
        _close(got.full_tensor(), expected, case.tol, f"{label}: loss")
        if case.reduction == "none":
            upstream = DTensor.from_local(case.grad_out, mesh, [Replicate()] * mesh.ndim)
            got.backward(upstream.redistribute(mesh, got.placements))
        else:
            (got * float(case.grad_out)).backward()
        assert dt.grad is not None and full.grad is not None
        _close(dt.grad.full_tensor(), full.grad, case.tol, f"{label}: grad")
    except AssertionError as e:
        return [str(e)]
    return []


def _job_dtensor_1d(rank: int, world: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    failures: list[str] = []
    seed = itertools.count(2000)
    for reduction, smoothing, weight in itertools.product(("none", "mean", "sum"), (0.0, 0.2), (False, True)):
        case = Case(next(seed), (5, 7), "index", weight=weight, smoothing=smoothing, reduction=reduction,
                    targets="some_ignored")
        failures += _dtensor_case(mesh, [Shard(1)], None, case)
        prob = Case(next(seed), (5, 7), "prob", weight=weight, smoothing=smoothing, reduction=reduction)
        failures += _dtensor_case(mesh, [Shard(1)], None, prob)
    failures += _dtensor_case(mesh, [Shard(1)], None, Case(next(seed), (3, 7, 2), "index", smoothing=0.1))
    failures += _dtensor_case(mesh, [Shard(1)], None, Case(next(seed), (5, 7), "index", weight=True), "module")
    failures += _dtensor_case(mesh, [Shard(1)], None, Case(next(seed), (5, 7), "index", smoothing=0.1), "patch")
    # Not class-sharded: replicated logits, and logits sharded by rows (a global mean regardless).
    failures += _dtensor_case(mesh, [Replicate()], None, Case(next(seed), (5, 7), "index", weight=True))
    for reduction in ("none", "mean", "sum"):
        case = Case(next(seed), (6, 7), "index", weight=True, smoothing=0.1, reduction=reduction,
                    targets="some_ignored")
        failures += _dtensor_case(mesh, [Shard(0)], [Shard(0)], case)
    return failures


def _job_dtensor_2d(rank: int, world: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import fusedce

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    failures: list[str] = []
    seed = itertools.count(3000)
    for reduction, smoothing, weight in itertools.product(("none", "mean", "sum"), (0.0, 0.2), (False, True)):
        # Uneven rows per data-parallel rank (5 = 3 + 2) and classes per tensor-parallel rank.
        case = Case(next(seed), (5, 7), "index", weight=weight, smoothing=smoothing, reduction=reduction,
                    targets="some_ignored")
        failures += _dtensor_case(mesh, [Shard(0), Shard(1)], [Shard(0), Replicate()], case)
        prob = Case(next(seed), (5, 7), "prob", weight=weight, smoothing=smoothing, reduction=reduction)
        failures += _dtensor_case(mesh, [Shard(0), Shard(1)], [Shard(0), Shard(1)], prob)
    # Sequence parallel: (batch, class, seq) with the sequence sharded over the first mesh dim.
    for reduction in ("none", "mean"):
        case = Case(next(seed), (2, 7, 3), "index", weight=True, smoothing=0.1, reduction=reduction)
        failures += _dtensor_case(mesh, [Shard(2), Shard(1)], [Shard(1), Replicate()], case)
    # Refusals: Partial logits, and a plain target whose rows are sharded (ambiguous).
    case = Case(next(seed), (4, 7), "index")
    partial = DTensor.from_local(case.logits, mesh, [Partial(), Shard(1)])
    _, err = _outcome(lambda: fusedce.cross_entropy(partial, case.target))
    if err is None or err[0] is not ValueError or "Partial" not in err[1]:
        failures.append(f"Partial logits: expected a ValueError naming Partial, got {err}")
    sharded = distribute_tensor(case.logits, mesh, [Shard(0), Shard(1)])
    _, err = _outcome(lambda: fusedce.cross_entropy(sharded, case.target))
    if err is None or err[0] is not ValueError or "DTensor" not in err[1]:
        failures.append(f"plain target on a batch-sharded mesh: expected a ValueError, got {err}")
    return failures


# --------------------------------------------------------------------------------------------
# linear_cross_entropy: the weight sharded by rows, against F.linear_cross_entropy on the whole
# --------------------------------------------------------------------------------------------


class LinearCase:
    """One linear_cross_entropy combination: hidden state (N, H) or (H,), weight (C, *out, H)."""

    def __init__(self, seed: int, batch: tuple[int, ...], hidden: int, classes: int, kind: str, *,
                 out: tuple[int, ...] = (), weight: bool = False, bias: bool = True, ignore: int | None = None,
                 smoothing: float = 0.0, reduction: str = "mean", dtype: torch.dtype = torch.float64,
                 targets: str = "random", split: str = "uneven", chunk: int | None = None,
                 target_grad: bool = True, sizes_given: bool = False, shift: float = 0.0) -> None:
        self.label = (f"linear #{seed} batch={batch} H={hidden} C={classes} out={out} {kind} w={weight} "
                      f"bias={bias} ignore={ignore} eps={smoothing} {reduction} {dtype} targets={targets} "
                      f"split={split} chunk={chunk} target_grad={target_grad} sizes={sizes_given} shift={shift}")
        gen = torch.Generator().manual_seed(seed)
        self.input = torch.randn((*batch, hidden), generator=gen, dtype=torch.float64).to(dtype)
        self.linear_weight = torch.randn((classes, *out, hidden), generator=gen, dtype=torch.float64).to(dtype)
        # `shift` moves every logit by about that much, through the bias (shift invariance).
        bias_values = torch.randn((classes, *out), generator=gen, dtype=torch.float64) + shift
        self.bias = bias_values.to(dtype) if bias else None
        rows = (*batch, *out)
        self.class_dim = 1 if batch else 0
        if kind == "prob":
            shape = (*batch, classes, *out)
            self.target = torch.randn(shape, generator=gen, dtype=torch.float64).softmax(self.class_dim).to(dtype)
        else:
            high = {"first_rank_only": 2}.get(targets, classes)
            self.target = torch.randint(0, high, rows, generator=gen)
            fill = -100 if ignore is None else ignore
            if targets == "some_ignored" and self.target.dim():
                self.target.view(-1)[::2] = fill
            if targets == "all_ignored":
                self.target.fill_(fill)
        self.weight = torch.rand(classes, generator=gen, dtype=torch.float64).add(0.5).to(dtype) if weight else None
        self.kwargs: dict[str, Any] = dict(reduction=reduction, ignore_index=ignore, label_smoothing=smoothing)
        out_shape = () if reduction != "none" else rows
        self.grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
        self.kind, self.split, self.chunk = kind, split, chunk
        self.target_grad = target_grad and kind == "prob"
        self.sizes_given = sizes_given
        self.tol = F64 if dtype == torch.float64 else F32


def _check_linear_case(case: LinearCase, rank: int, world: int) -> list[str]:
    from fusedce import distributed as fdist

    classes = case.linear_weight.shape[0]
    sizes = _splits(classes, world, case.split)
    offset, count = sum(sizes[:rank]), sizes[rank]
    prob = case.kind == "prob"

    def leaf(t: torch.Tensor | None, grad: bool = True) -> Any:
        return None if t is None else t.clone().requires_grad_(grad)

    x_full, w_full, b_full = leaf(case.input), leaf(case.linear_weight), leaf(case.bias)
    t_full, cw_full = leaf(case.target, case.target_grad), leaf(case.weight, case.target_grad)
    expected, expected_err = _outcome(lambda: F.linear_cross_entropy(
        x_full, w_full, t_full, linear_bias=b_full, weight=cw_full, **case.kwargs))

    x = leaf(case.input)
    w = leaf(case.linear_weight[offset : offset + count])
    b = None if case.bias is None else leaf(case.bias[offset : offset + count])
    t = case.target.narrow(case.class_dim, offset, count) if prob else case.target
    t, cw = leaf(t, case.target_grad), leaf(case.weight, case.target_grad)
    options = None if case.chunk is None else torch.nn.LinearCrossEntropyOptions(batch_chunk_size=case.chunk)
    got, got_err = _outcome(lambda: fdist.linear_cross_entropy(
        x, w, t, linear_bias=b, weight=cw, options=options, shard_sizes=sizes if case.sizes_given else None,
        **case.kwargs))
    if expected_err or got_err:
        return [] if expected_err == got_err else [f"{case.label}: torch raised {expected_err}, fusedce {got_err}"]
    try:
        _close(got, expected, case.tol, f"{case.label}: loss")
        (expected * case.grad_out).sum().backward()
        (got * case.grad_out).sum().backward()
        _close(x.grad, x_full.grad, case.tol, f"{case.label}: input grad")
        _close(w.grad, w_full.grad[offset : offset + count], case.tol, f"{case.label}: weight slice grad")
        if b is not None:
            _close(b.grad, b_full.grad[offset : offset + count], case.tol, f"{case.label}: bias slice grad")
        if case.target_grad:
            expected_t = t_full.grad.narrow(case.class_dim, offset, count)
            _close(t.grad, expected_t, case.tol, f"{case.label}: target grad")
            if cw is not None:
                _close(cw.grad, cw_full.grad, case.tol, f"{case.label}: class weight grad")
    except AssertionError as e:
        return [str(e)]
    return []


def _linear_grid() -> list[LinearCase]:
    cases: list[LinearCase] = []
    seed = itertools.count(5000)
    # (batch, H, C, out): batched, unbatched, K-dim; the chunk size 2 makes several row chunks.
    shapes = [((5,), 4, 7, (), 2), ((), 4, 7, (), None), ((3,), 4, 7, (2,), 2)]
    for (batch, hidden, classes, out, chunk), weight, smoothing, reduction in itertools.product(
        shapes, (False, True), (0.0, 0.25), ("none", "mean", "sum")
    ):
        bias = next(seed) % 2 == 0
        cases.append(LinearCase(next(seed), batch, hidden, classes, "index", out=out, weight=weight, bias=bias,
                                ignore=3 if bias else None, smoothing=smoothing, reduction=reduction,
                                targets="some_ignored", chunk=chunk))
        cases.append(LinearCase(next(seed), batch, hidden, classes, "prob", out=out, weight=weight, bias=bias,
                                smoothing=smoothing, reduction=reduction, chunk=chunk,
                                target_grad=next(seed) % 2 == 0))
    # The special cases: all ignored, a rank that holds no target, an empty shard, float32 (with
    # logits near 2000: shift invariance), no rows, shard_sizes given.
    for smoothing, reduction in itertools.product((0.0, 0.25), ("none", "mean", "sum")):
        cases.append(LinearCase(next(seed), (4,), 3, 7, "index", weight=True, smoothing=smoothing,
                                reduction=reduction, targets="all_ignored", chunk=3))
    for smoothing in (0.0, 0.25):
        cases.append(LinearCase(next(seed), (6,), 3, 7, "index", smoothing=smoothing, targets="first_rank_only"))
        for kind in ("index", "prob"):
            cases.append(LinearCase(next(seed), (4,), 3, 9, kind, weight=True, smoothing=smoothing, split="empty",
                                    chunk=3))
            cases.append(LinearCase(next(seed), (8,), 6, 11, kind, weight=True, smoothing=smoothing,
                                    dtype=torch.float32, shift=2000.0, chunk=3, sizes_given=True))
            cases.append(LinearCase(next(seed), (0,), 3, 7, kind, smoothing=smoothing, reduction="mean"))
    return cases


def _linear_errors() -> list[LinearCase]:
    """Arguments torch refuses: the same exception type and message on every rank."""
    def case(seed: int, **kw: Any) -> LinearCase:
        return LinearCase(6000 + seed, (4,), 3, 7, kw.pop("kind", "index"), **kw)

    out_of_range = case(0)
    out_of_range.target[1] = 7  # the global C
    wrong_weight = case(1, weight=True)
    wrong_weight.weight = torch.ones(6, dtype=torch.float64)
    prob_ignore = case(2, kind="prob", ignore=-100)
    smoothing = case(3, smoothing=1.5)
    batch = case(4)
    batch.target = batch.target[:3]
    hidden = case(5)
    hidden.input = hidden.input[:, :2]
    return [out_of_range, wrong_weight, prob_ignore, smoothing, batch, hidden]


def _linear_traffic(rank: int, world: int) -> list[str]:
    """No op allocates more than a row chunk of logits, each chunk makes two all-reduces of
    O(rows) floats, and the backward one (the input gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fusedce import distributed as fdist

    rows, hidden, classes, chunk = 64, 3, 40, 8
    sizes = _splits(classes, world, "uneven")
    offset = sum(sizes[:rank])
    gen = torch.Generator().manual_seed(7000)
    x = torch.randn(rows, hidden, generator=gen).requires_grad_()
    w = torch.randn(classes, hidden, generator=gen)[offset : offset + sizes[rank]].clone().requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=gen)

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):  # its storage: an expanded stand-in holds one element
                    Largest.numel = max(Largest.numel, t.untyped_storage().nbytes() // t.element_size())
            return out

    calls: list[int] = []
    all_reduce = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    failures = []
    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        for reduction in ("mean", "none"):
            calls.clear()
            options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
            with Largest():
                loss = fdist.linear_cross_entropy(x, w, target, reduction=reduction, options=options,
                                                  shard_sizes=sizes)
            forward = list(calls)
            loss.sum().backward()
            backward = calls[len(forward):]
            if forward != [chunk, 2 * chunk] * (rows // chunk):
                failures.append(f"linear traffic {reduction}: forward all-reduces {forward}")
            if backward != [rows * hidden]:
                failures.append(f"linear traffic {reduction}: backward all-reduces {backward}, expected one")
            largest_logits = max(sizes) * chunk
            if Largest.numel > max(largest_logits, rows * hidden, sizes[rank] * hidden):
                failures.append(f"linear traffic {reduction}: a {Largest.numel}-element tensor was allocated")
    finally:
        dist.all_reduce = all_reduce
    return failures


def _linear_backward_twice(rank: int, world: int) -> list[str]:
    """A second backward through the same graph (the forward's precomputed gradients are used
    once, then recomputed) accumulates the same gradients again."""
    from fusedce import distributed as fdist

    case = LinearCase(7100, (5,), 4, 7, "index", weight=True, smoothing=0.1, chunk=2)
    sizes = _splits(7, world, "uneven")
    offset = sum(sizes[:rank])
    x, w = case.input.clone().requires_grad_(), case.linear_weight[offset : offset + sizes[rank]].clone()
    w.requires_grad_()
    loss = fdist.linear_cross_entropy(x, w, case.target, weight=case.weight, label_smoothing=0.1,
                                      options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2))
    loss.backward(retain_graph=True)
    assert x.grad is not None and w.grad is not None
    once = (x.grad.clone(), w.grad.clone())
    loss.backward()
    try:
        _close(x.grad, 2 * once[0], F64, "linear backward twice: input grad")
        _close(w.grad, 2 * once[1], F64, "linear backward twice: weight grad")
    except AssertionError as e:
        return [str(e)]
    return []


def _job_linear(rank: int, world: int) -> list[str]:
    failures: list[str] = []
    for case in _linear_grid() + _linear_errors():
        failures += _check_linear_case(case, rank, world)
    return failures + _linear_traffic(rank, world) + _linear_backward_twice(rank, world)


JOBS = {
    "grid+dtensor+linear": lambda rank, world: _job_grid_and_dtensor(rank, world) + _job_linear(rank, world),
    "grid+linear": lambda rank, world: _job_grid(rank, world) + _job_linear(rank, world),
    "dtensor2d": _job_dtensor_2d,
}


# --------------------------------------------------------------------------------------------
# The tests: one world each
# --------------------------------------------------------------------------------------------


def test_grid_and_dtensor_world_2():
    """2 ranks (classes split 4 + 3, or 9 + 0 for the empty shard): the grid, the refusals, and
    DTensor on a 1-D mesh."""
    _run_world(2, "grid+dtensor+linear")


def test_grid_world_3():
    """3 ranks with uneven shards (3 + 3 + 1), and an empty middle shard."""
    _run_world(3, "grid+linear")


def test_dtensor_2d_mesh_world_4():
    """A 2 × 2 mesh, data × tensor parallel: a global 'mean' and every reduction."""
    _run_world(4, "dtensor2d")


def test_grid_size():
    """The grid the worlds run (so that a change that empties it fails here)."""
    assert len(_grid()) >= 100 and len(_errors()) == 7
    assert len(_linear_grid()) >= 80 and len(_linear_errors()) == 6
