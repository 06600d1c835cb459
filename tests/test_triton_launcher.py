"""The cached Triton launcher (``fusedce.kernels.triton.launcher``) without a GPU.

* ``key`` against Triton's own specialisation (``native_specialize_impl``, the function the
  binder of ``triton/runtime/jit.py`` calls): equal keys must mean equal specialisations;
* the ``FUSEDCE_TRITON_LAUNCH`` switch;
* the caching logic, on a ``JITFunction`` whose ``run`` is replaced by a recorder: the first call
  per key is the plain launch, later calls hand the compiled kernel's launcher exactly the
  arguments ``JITFunction.run`` would, and every fallback condition goes the plain way;
* under the interpreter, ``_common.launch`` never reaches the launcher.

``tests/test_triton_cuda.py`` runs both paths on real kernels on a GPU.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from fusedce.kernels.triton import launcher  # noqa: E402


def _triton_class(arg: Any, specialize: bool = True) -> tuple[Any, ...]:
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return tuple(native_specialize_impl(BaseBackend, arg, False, specialize, True))


# --------------------------------------------------------------------------------------------
# The key against Triton's rules
# --------------------------------------------------------------------------------------------


def test_key_is_at_least_as_fine_as_triton():
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    assert launcher.specialisation_agrees(native_specialize_impl, BaseBackend)


def test_specialisation_agrees_detects_a_coarser_key(monkeypatch):
    """If ``key`` stopped telling multiples of 16 apart, the check must say so."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    monkeypatch.setattr(launcher, "int_token", lambda v: 0 if -(2**31) <= v < 2**31 else 100)
    assert not launcher.specialisation_agrees(native_specialize_impl, BaseBackend)


@pytest.mark.parametrize(
    "a, b",
    [
        (1, 17),  # 1 is a constexpr for Triton
        (16, 17),  # divisibility by 16
        (1, 16),
        (17, 2**31 + 1),  # i32 against i64
        (2**31, 2**31 + 1),
        (2**63 - 16, 2**63),  # i64 against u64
        (-(2**31), -(2**31) - 16),
    ],
)
def test_int_classes_that_triton_separates_have_different_keys(a, b):
    assert _triton_class(a) != _triton_class(b)
    assert launcher.key((a,)) != launcher.key((b,))


def test_tensor_alignment_and_dtype_are_in_the_key():
    x = torch.zeros(64)
    assert _triton_class(x) != _triton_class(x[1:])
    assert launcher.key((x,)) != launcher.key((x[1:],))
    assert launcher.key((x[4:],)) == launcher.key((x,))  # 16 bytes further: still aligned
    h = torch.zeros(64, dtype=torch.bfloat16)
    assert launcher.key((h[8:],)) == launcher.key((h,)) != launcher.key((h[1:],))
    assert launcher.key((x,)) != launcher.key((h,))


def test_key_refuses_types_it_does_not_classify():
    assert launcher.key((torch.zeros(2), (1, 2))) is None
    assert launcher.key((2**64,)) is None  # Triton raises OverflowError on it
    assert launcher.key((1.5, True, None, torch.nn.Parameter(torch.zeros(4)))) is not None


def test_key_decodes_to_one_argument_sequence():
    """A tensor's two tokens cannot be mistaken for two ints (alignment tokens are negative)."""
    x = torch.zeros(64)
    assert launcher.key((x, 17)) != launcher.key((x, 0, 17))
    assert launcher.key((True,)) != launcher.key((1,))


# --------------------------------------------------------------------------------------------
# The mode switch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, mode", [(None, "fast"), ("", "fast"), ("fast", "fast"), ("plain", "plain"), (" PLAIN ", "plain")]
)
def test_parse_mode(value, mode):
    assert launcher.parse_mode(value) == mode


def test_parse_mode_refuses_other_values():
    with pytest.raises(ValueError, match="FUSEDCE_TRITON_LAUNCH must be one of fast, plain"):
        launcher.parse_mode("fastest")


def test_mode_reads_the_environment_until_set(monkeypatch):
    monkeypatch.setattr(launcher, "_mode", None)
    monkeypatch.setenv(launcher.MODE_ENV, "plain")
    assert launcher.mode() == "plain"
    launcher.set_mode("fast")
    assert launcher.mode() == "fast"
    launcher.set_mode(None)
    monkeypatch.delenv(launcher.MODE_ENV)
    assert launcher.mode() == "fast"


# --------------------------------------------------------------------------------------------
# The caching logic, on a recording kernel
# --------------------------------------------------------------------------------------------


def _example(x_ptr, out_ptr, n, stride, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


class _Compiled:
    """A stand-in ``CompiledKernel``: its ``run`` records what the launcher is given."""

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls
        self.function = 0xF00
        self.packed_metadata = (4, 1, 0)

    def run(self, *args: Any) -> None:
        self.calls.append(("fast", args))


class _Backend:
    """What the binder of the recording kernel specialises with (Triton's base rules)."""


def _recording_kernel(calls: list[Any]) -> Any:
    """A ``JITFunction`` whose ``run`` records the arguments Triton would pass to the launcher
    (``*bound_args.values()``: the signature bound with its defaults applied) instead of compiling."""
    from triton.runtime.jit import JITFunction

    class Recording(JITFunction):
        def run(self, *args, grid, warmup, **kwargs):
            sig = inspect.signature(self.fn)
            names = set(sig.parameters)
            bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
            bound.apply_defaults()
            calls.append(("plain", grid, tuple(bound.arguments.values())))
            self.device_caches[0] = ({}, {}, None, _Backend, None)
            return self.compiled

    kernel = Recording(_example)
    kernel.compiled = _Compiled(calls)
    return kernel


@pytest.fixture
def fake_triton(monkeypatch):
    """The launcher's view of Triton, with device 0, stream 77 and ``_Compiled`` as the kernel
    type, but the installed Triton's knobs and specialisation function."""
    import triton.knobs

    tr = launcher._Triton.__new__(launcher._Triton)
    tr.reason = None
    tr.JITFunction = triton.runtime.jit.JITFunction
    tr.specialize_impl = triton.runtime.jit.native_specialize_impl
    tr.CompiledKernel = _Compiled
    tr.runtime = triton.knobs.runtime
    tr.compilation = triton.knobs.compilation
    tr.HookChain = triton.knobs.HookChain
    tr.get_device = lambda: 0
    tr.get_stream = lambda device: 77
    tr.agreeing_backends = {}
    monkeypatch.setattr(launcher, "_triton", tr)
    monkeypatch.setattr(launcher, "_mode", "fast")
    monkeypatch.setattr(launcher, "_states", {})
    monkeypatch.setattr(launcher, "counters", {"fast": 0, "plain": 0})
    # the recording kernel's backend is a plain class: specialise it with Triton's base rules
    from triton.backends.compiler import BaseBackend

    spec = tr.specialize_impl
    tr.specialize_impl = lambda backend, *a: spec(BaseBackend, *a)
    return tr


def _args(x: torch.Tensor, n: int = 1024) -> tuple[Any, ...]:
    return (x, x, n, 1, 0.5)


def test_second_call_uses_the_cached_launcher_with_tritons_arguments(fake_triton):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    x = torch.zeros(64)
    launcher.launch(kernel, 3, _args(x), {"BLOCK": 32, "num_warps": 4})
    launcher.launch(kernel, 5, _args(x, 2048), {"BLOCK": 32, "num_warps": 4})
    assert [c[0] for c in calls] == ["plain", "fast"]
    assert launcher.counters == {"fast": 1, "plain": 1}
    assert launcher.kernel_entries(kernel) == 1
    # what JITFunction.run passes: grid, stream, function, packed metadata, no launch metadata
    # and no hooks (both chains empty), then the bound arguments, defaults included
    _, plain_grid, plain_bound = calls[0]
    _, fast = calls[1]
    assert plain_grid == (3,)
    assert fast[:9] == (5, 1, 1, 77, 0xF00, (4, 1, 0), None, None, None)
    assert fast[9:] == (x, x, 2048, 1, 0.5, 32, False)
    assert len(fast[9:]) == len(plain_bound)


@pytest.mark.parametrize(
    "change",
    [
        lambda a, k: ((a[0][1:], *a[1:]), k),  # misaligned tensor
        lambda a, k: ((a[0].double(), *a[1:]), k),  # dtype
        lambda a, k: ((*a[:2], 1, *a[3:]), k),  # an int becomes 1
        lambda a, k: ((*a[:2], 1000, *a[3:]), k),  # an int no longer divisible by 16
        lambda a, k: ((*a[:2], 2**31 + 16, *a[3:]), k),  # an int becomes i64
        lambda a, k: (a, {**k, "BLOCK": 64}),  # a constexpr
        lambda a, k: (a, {**k, "num_warps": 8}),  # an option
        lambda a, k: (a, {**k, "FLAG": True}),  # a defaulted constexpr given
    ],
)
def test_a_new_specialisation_goes_the_plain_way_first(fake_triton, change):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    args, kwargs = _args(torch.zeros(64)), {"BLOCK": 32, "num_warps": 4}
    launcher.launch(kernel, 1, args, kwargs)
    launcher.launch(kernel, 1, *change(args, kwargs))
    launcher.launch(kernel, 1, *change(args, kwargs))
    assert [c[0] for c in calls] == ["plain", "plain", "fast"]
    assert launcher.kernel_entries(kernel) == 2


def test_the_same_class_of_values_reuses_the_entry(fake_triton):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    x = torch.zeros(64)
    launcher.launch(kernel, 1, (x, x, 32, 3, 0.5), {"BLOCK": 32})
    launcher.launch(kernel, 1, (x[4:], x[8:], 4096, 5, 2.5), {"BLOCK": 32})
    assert [c[0] for c in calls] == ["plain", "fast"]


def test_launch_hooks_force_the_plain_path(fake_triton):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    args, kwargs = _args(torch.zeros(64)), {"BLOCK": 32}
    launcher.launch(kernel, 1, args, kwargs)
    hook = fake_triton.runtime.launch_enter_hook

    def profiler(metadata: Any) -> None:
        pass

    hook.add(profiler)
    try:
        launcher.launch(kernel, 1, args, kwargs)
    finally:
        hook.remove(profiler)
    launcher.launch(kernel, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain", "plain", "fast"]


def test_pre_run_hooks_force_the_plain_path(fake_triton):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    args, kwargs = _args(torch.zeros(64)), {"BLOCK": 32}
    launcher.launch(kernel, 1, args, kwargs)
    kernel.add_pre_run_hook(lambda *a, **k: None)
    launcher.launch(kernel, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain", "plain"]


def test_plain_mode_never_caches(fake_triton):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    launcher.set_mode("plain")
    args, kwargs = _args(torch.zeros(64)), {"BLOCK": 32}
    for _ in range(3):
        launcher.launch(kernel, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain"] * 3
    assert launcher.kernel_entries(kernel) == 0


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((torch.zeros(4), torch.zeros(4), 10, 1, 0.5, 32), {}),  # a constexpr by position
        ((torch.zeros(4), torch.zeros(4), 10), {"stride": 1, "scale": 0.5, "BLOCK": 32}),  # an int by name
        ((torch.zeros(4), torch.zeros(4), (10,), 1, 0.5), {"BLOCK": 32}),  # a tuple argument
    ],
)
def test_layouts_the_key_does_not_capture_stay_plain(fake_triton, args, kwargs):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    for _ in range(3):
        launcher.launch(kernel, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain"] * 3
    assert launcher.kernel_entries(kernel) == 0


def test_a_runtime_float_by_name_is_cached_with_its_value(fake_triton):
    """The extras' coefficients come by keyword: a float's class is fixed (fp32), so the fast path
    takes it, and each value has its own entry (the tail holds the value it was learnt with)."""
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    args = (torch.zeros(4), torch.zeros(4), 10, 1)
    for scale in (0.5, 0.5, 0.25, 0.25):
        launcher.launch(kernel, 1, args, {"scale": scale, "BLOCK": 32})
    assert [c[0] for c in calls] == ["plain", "fast", "plain", "fast"]
    # the bound values: recorded by the binder (plain), or after the launcher's 9 leading arguments
    bound = [c[2] if c[0] == "plain" else c[1][9:] for c in calls]
    assert [b[4] for b in bound] == [0.5, 0.5, 0.25, 0.25]  # scale
    assert launcher.kernel_entries(kernel) == 2


def test_a_result_that_is_not_a_compiled_kernel_is_not_cached(fake_triton):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    kernel.compiled = None  # what JITFunction.run returns when a jit_cache_hook skips the launch
    args, kwargs = _args(torch.zeros(64)), {"BLOCK": 32}
    launcher.launch(kernel, 1, args, kwargs)
    launcher.launch(kernel, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain", "plain"]


def test_an_unreadable_kernel_keeps_the_plain_path(fake_triton):
    """A kernel whose binder cache does not look as expected (another Triton's layout) is launched
    the plain way, without an error, from its first call on."""
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    kernel.compiled.function = None  # not loaded: nothing to launch it with
    args, kwargs = _args(torch.zeros(64)), {"BLOCK": 32}
    for _ in range(2):
        launcher.launch(kernel, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain", "plain"]

    calls.clear()
    other = _recording_kernel(calls)
    other.run = lambda *a, grid, warmup, **k: (calls.append(("plain",)), other.compiled)[1]  # no device_caches
    for _ in range(2):
        launcher.launch(other, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain", "plain"]


def test_disagreeing_rules_keep_the_plain_path(fake_triton, monkeypatch):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    monkeypatch.setattr(launcher, "specialisation_agrees", lambda impl, backend: False)
    args, kwargs = _args(torch.zeros(64)), {"BLOCK": 32}
    for _ in range(3):
        launcher.launch(kernel, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain"] * 3


def test_a_changed_global_goes_the_plain_way(fake_triton):
    calls: list[Any] = []
    kernel = _recording_kernel(calls)
    scope = {"LIMIT": 1}
    kernel.used_global_vals = {("LIMIT", id(scope)): (1, scope)}
    args, kwargs = _args(torch.zeros(64)), {"BLOCK": 32}
    launcher.launch(kernel, 1, args, kwargs)
    launcher.launch(kernel, 1, args, kwargs)
    scope["LIMIT"] = 2  # Triton raises on its plain launch; the fast path must not hide that
    launcher.launch(kernel, 1, args, kwargs)
    assert [c[0] for c in calls] == ["plain", "fast", "plain"]


def test_an_interpreted_or_foreign_kernel_stays_plain(fake_triton):
    calls: list[Any] = []

    class Foreign:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(("plain", grid))

    kernel = Foreign()
    for _ in range(2):
        launcher.launch(kernel, 1, (torch.zeros(4),), {})
    assert [c[0] for c in calls] == ["plain", "plain"]


def test_the_installed_triton_launches_the_way_the_launcher_mirrors():
    """``JITFunction.run`` still contains the launch statement the fast path reproduces."""
    import re

    from triton.runtime.jit import JITFunction

    assert launcher._RUN_LAUNCH in re.sub(r"\s+", "", inspect.getsource(JITFunction.run))
    version = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    assert launcher.SUPPORTED_VERSIONS[0] <= version <= launcher.SUPPORTED_VERSIONS[1]


# --------------------------------------------------------------------------------------------
# Under the interpreter
# --------------------------------------------------------------------------------------------


def test_interpreter_launches_never_reach_the_launcher(monkeypatch):
    from fusedce.kernels import _load, available_backends

    if "triton" not in available_backends("cpu"):
        pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")

    def refuse(*args: Any) -> None:
        raise AssertionError("the interpreter went through the cached launcher")

    monkeypatch.setattr(launcher, "launch", refuse)
    backend = _load("triton")
    x = torch.randn(4, 10, 1)
    target = torch.randint(0, 10, (4, 1))
    loss, _ = backend.ce_forward(x, target, None, -100, 0.0)
    assert torch.isfinite(loss).all()


def test_key_and_tail_agree_with_tritons_binder_on_our_kernels(monkeypatch):
    """Every launch of the backend's kernels, recorded under the interpreter and replayed through
    Triton's own binder (``create_function_from_signature`` with the base backend's rules): the
    bound values are the positional arguments followed by ``bound_tail``, and launches with one
    key get one specialisation (``str`` of it, as ``compute_cache_key`` uses)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from fusedce.kernels import _load, available_backends
    from fusedce.kernels.triton import cross_entropy, nll, softmax

    if "triton" not in available_backends("cpu"):
        pytest.skip("records the launches under TRITON_INTERPRET=1")
    recorded: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
    for module in (cross_entropy, nll, softmax):

        def recording(kernel, grid, *args, _original=module.launch, **kwargs):
            recorded.append((kernel, args, kwargs))
            _original(kernel, grid, *args, **kwargs)

        monkeypatch.setattr(module, "launch", recording)
    backend = _load("triton")
    for rows, classes, offset in [(48, 300, 0), (64, 316, 0), (48, 300, 1), (64, 316, 1), (1, 300, 0)]:
        x = torch.randn(rows * classes + offset)[offset:].view(rows, classes, 1)
        target = torch.randint(0, classes, (rows, 1))
        grad = torch.rand(rows, 1)
        _, lse = backend.ce_forward(x, target, None, -100, 0.1)
        backend.ce_backward(grad, x, target, None, lse, -100, 0.1, False)
        backend.nll_backward(grad, target, None, -100, classes, x.dtype)
        backend.softmax_backward(x, backend.softmax_forward(x))
        # the extras pass their coefficients (runtime floats) by keyword
        _, lse = backend.ce_extras_forward(x, target, None, -100, 0.0, 1e-4, 30.0)
        backend.ce_extras_backward(grad, x, target, None, lse, -100, 0.0, 1e-4, 30.0, False)

    binders: dict[Any, Any] = {}
    specs: dict[Any, str] = {}
    shared = 0
    for kernel, args, kwargs in recorded:
        if kernel.fn not in binders:
            options = {k: v for k, v in kernel.kwargs.items() if k.startswith("do_not_specialize")}
            jitted = JITFunction(kernel.fn, **options)
            binders[kernel.fn] = (jitted, create_function_from_signature(jitted.signature, jitted.params, BaseBackend))
        jitted, binder = binders[kernel.fn]
        bound, specialization, _ = binder(*args, **kwargs)
        tail = launcher.bound_tail(jitted.params, len(args), kwargs)
        assert tail is not None
        ours = (*args, *tail)
        assert len(ours) == len(bound)
        pairs = zip(ours, bound.values(), strict=True)
        assert all(a is b or (not isinstance(a, torch.Tensor) and a == b) for a, b in pairs)
        group = (kernel.fn, launcher.key(args), tuple(kwargs.items()))
        if group in specs:
            shared += 1
        assert specs.setdefault(group, str(specialization)) == str(specialization), kernel.fn.__name__
    assert shared >= 4  # launches with new values in an old class were compared
