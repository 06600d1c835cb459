"""Launching compiled Triton kernels without Triton's per-call binder (CUDA only).

``kernel[grid](*args, **kwargs)`` goes through ``JITFunction.run`` on every call: it binds and
specialises every argument, builds a cache key string, looks the compiled kernel up and only then
calls its launcher. For our kernels (20-30 arguments) that is about 85 µs of host time a launch,
more than the kernel itself at small and medium shapes.

This module does the same lookup once per *specialisation* and then calls the compiled kernel's
launcher directly. ``key()`` maps the arguments to a tuple that is at least as fine as Triton's own
specialisation of them; the first call with a new key goes through ``kernel[grid](...)`` (which
compiles or finds the kernel, exactly as without this module) and keeps the ``CompiledKernel`` it
returns. Later calls with the same key call ``compiled.run(...)`` with the arguments Triton would
pass (``JITFunction.run``: grid, the current stream, ``function``, ``packed_metadata``, launch
metadata and hooks, then every bound argument in signature order, constexprs included; the launcher
drops the constexprs itself).

Why the key is safe: for the arguments we accept, Triton's specialisation
(``create_function_from_signature`` -> ``native_specialize_impl`` in ``triton/runtime/jit.py``,
with ``BaseBackend.get_int_specialization``/``get_tensor_specialization`` in
``triton/backends/compiler.py`` for the rules; the same in 3.6 and 3.9) depends on:

* a tensor: its dtype and whether ``data_ptr() % 16 == 0``;
* an int: its width (``i32`` in [-2^31, 2^31), else ``i64`` below 2^63, else ``u64``), and, when
  specialised, whether it is 1 (it becomes a constexpr) or divisible by 16 (``D``);
* a float: nothing (always ``fp32``); a bool: nothing (``u1``); ``None``: a constexpr None;
* the constexpr keyword arguments' values, the options (``num_warps``, ...), the current device and
  the knobs ``JITFunction.run`` folds into the options (``debug``, ``instrumentation_mode``,
  ``fpsan_homomorphic_casts``).

``key()`` records each of these (more finely where Triton ignores it, e.g. for unspecialised
ints), so two calls with one key get the same compiled kernel. ``specialisation_agrees`` checks the
rules against the installed ``native_specialize_impl`` once per backend before the fast path is
used. Anything else falls back to the plain ``kernel[grid](...)`` launch, decided once per kernel
or per key, never by catching a failed launch:

* the mode is ``plain`` (``FUSEDCE_TRITON_LAUNCH=plain``, or ``set_mode("plain")``);
* the Triton version is outside the range whose source this was written against (3.6 - 3.9), or
  ``JITFunction.run`` does not contain the launch call this module mirrors, or an attribute it uses
  is missing (``CHECKED_ATTRIBUTES``), or the installed specialisation rules disagree with ``key()``;
* the kernel is not a ``JITFunction`` (e.g. autotuned), or has pre-run hooks;
* launch enter/exit hooks are installed (a profiler), or ``add_stages_inspection_hook`` is set;
* an argument of another type (tuple, numpy scalar, descriptor ...), a constexpr passed by position,
  a non-constexpr argument other than a float passed by keyword;
* the plain launch did not return a loaded ``CompiledKernel`` (e.g. a ``jit_cache_hook`` skipped it),
  or reading what the launcher needs from it and from the kernel failed;
* a global that the kernel's source uses has changed since it was compiled (Triton then raises).
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

MODE_ENV = "FUSEDCE_TRITON_LAUNCH"
MODES = ("fast", "plain")

# The Triton releases whose launch path this module was written against (read from their source).
SUPPORTED_VERSIONS = ((3, 6), (3, 9))

# What this module reads from Triton, listed so that a missing one disables the fast path.
CHECKED_ATTRIBUTES = {
    "triton.runtime.jit": ("JITFunction", "native_specialize_impl"),
    "triton.compiler": ("CompiledKernel",),
    "triton.knobs": ("runtime", "compilation", "HookChain"),
    "JITFunction instance": ("params", "pre_run_hooks", "used_global_vals", "device_caches", "run"),
    "KernelParam": ("name", "is_constexpr", "default"),
    "CompiledKernel": ("run", "function", "packed_metadata"),
    "driver.active": ("get_current_device", "get_current_stream"),
}

# The launch statement of ``JITFunction.run`` (whitespace removed) that the fast path reproduces.
_RUN_LAUNCH = (
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())"
)

# Entries per kernel before the cache is dropped (a guard against unbounded growth; our kernels
# have a handful of specialisations each).
MAX_ENTRIES = 4096

# Launch counts: ``fast`` through the cached launcher, ``plain`` through ``kernel[grid](...)``.
counters = {"fast": 0, "plain": 0}


def parse_mode(value: str | None) -> str:
    """``FUSEDCE_TRITON_LAUNCH``'s value: ``fast`` (the default, also for unset or empty) or
    ``plain``."""
    if value is None or value.strip() == "":
        return "fast"
    mode = value.strip().lower()
    if mode not in MODES:
        raise ValueError(f"fusedce: {MODE_ENV} must be one of {', '.join(MODES)} (got {value!r})")
    return mode


_mode: str | None = None


def set_mode(mode: str | None) -> None:
    """Force ``fast`` or ``plain``; ``None`` re-reads ``FUSEDCE_TRITON_LAUNCH`` at the next launch."""
    global _mode
    _mode = None if mode is None else parse_mode(mode)


def mode() -> str:
    global _mode
    if _mode is None:
        _mode = parse_mode(os.environ.get(MODE_ENV))
    return _mode


# --------------------------------------------------------------------------------------------
# The specialisation key
# --------------------------------------------------------------------------------------------

# Tokens for the argument classes. Tensors give two tokens (dtype, alignment); the alignment
# tokens are negative and the int tokens non-negative, so a key decodes to one argument sequence.
ALIGNED, MISALIGNED = -1, -2
FLOAT, BOOL, NONE = "f", "b", "n"

_I32_MIN, _I32_END = -(2**31), 2**31
_I64_MIN, _I64_END, _U64_END = -(2**63), 2**63, 2**64


def int_token(v: int) -> int | None:
    """The class of an int argument: 100·width (0 i32, 1 i64, 2 u64) + 1 for the value 1 (i32
    only), + 16 for a multiple of 16, + 0 otherwise. None outside [-2^63, 2^64), which Triton
    refuses (an OverflowError from ``native_specialize_impl``)."""
    if _I32_MIN <= v < _I32_END:
        return 1 if v == 1 else (16 if v % 16 == 0 else 0)
    if _I64_MIN <= v < _I64_END:
        return 116 if v % 16 == 0 else 100
    if _I64_END <= v < _U64_END:
        return 216 if v % 16 == 0 else 200
    return None


def key(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The classes of the positional arguments, or None when one has a type we do not handle."""
    out: list[Any] = []
    append = out.append
    for a in args:
        t = type(a)
        if t is int:
            if _I32_MIN <= a < _I32_END:  # int_token's common case, inline
                append(1 if a == 1 else (0 if a & 15 else 16))
            else:
                token = int_token(a)
                if token is None:
                    return None
                append(token)
        elif t is torch.Tensor:
            append(a.dtype)
            append(MISALIGNED if a.data_ptr() & 15 else ALIGNED)
        elif t is float:
            append(FLOAT)
        elif t is bool:
            append(BOOL)
        elif a is None:
            append(NONE)
        elif isinstance(a, torch.Tensor):  # a subclass (e.g. a Parameter)
            append(a.dtype)
            append(MISALIGNED if a.data_ptr() & 15 else ALIGNED)
        else:
            return None
    return tuple(out)


def _samples() -> list[Any]:
    """Arguments of every class ``key`` distinguishes, several per class, edges included."""
    base = torch.zeros(64, dtype=torch.float32)
    half = torch.zeros(64, dtype=torch.bfloat16)
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 1, 2**31 - 16, -(2**31), -(2**31) + 1]
    ints += [2**31, 2**31 + 1, -(2**31) - 1, -(2**31) - 16, 2**63 - 1, 2**63 - 16, -(2**63)]
    ints += [2**63, 2**63 + 1, 2**64 - 16, 2**64 - 1]
    tensors = [base, base[4:], base[1:], base[3:], half, half[8:], half[1:], half[7:]]
    tensors += [torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64)[1:]]
    return [*ints, *tensors, 0.5, 1.0, 3.0, True, False, None]


def specialisation_agrees(specialize_impl: Any, backend: Any) -> bool:
    """Whether ``key`` is at least as fine as Triton's specialisation on the sample arguments:
    two samples with one token get the same ``specialize_impl(backend, arg, is_const, specialize,
    align)`` result, for every flag combination the binder uses."""
    seen: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for arg in _samples():
        token = key((arg,))
        if token is None:
            continue
        triton_class = tuple(
            tuple(specialize_impl(backend, arg, False, specialize, align))
            for specialize in (True, False)
            for align in (True, False)
        )
        if seen.setdefault(token, triton_class) != triton_class:
            return False
    return True


# --------------------------------------------------------------------------------------------
# The Triton internals, looked up once
# --------------------------------------------------------------------------------------------


class _Triton:
    """The pieces of Triton the fast path uses, or ``reason`` why it cannot be used."""

    def __init__(self) -> None:
        self.reason: str | None = None
        try:
            self._resolve()
        except Exception as exc:  # any import or attribute failure: the plain path, with a reason
            self.reason = f"{type(exc).__name__}: {exc}"

    def _resolve(self) -> None:
        import triton
        import triton.compiler
        import triton.knobs
        import triton.runtime.jit as jit
        from triton.runtime.driver import driver

        version = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
        if not SUPPORTED_VERSIONS[0] <= version <= SUPPORTED_VERSIONS[1]:
            raise RuntimeError(f"triton {triton.__version__} is outside the versions this launcher was read against")
        self.JITFunction = jit.JITFunction
        self.specialize_impl = jit.native_specialize_impl
        self.CompiledKernel = triton.compiler.CompiledKernel
        self.runtime = triton.knobs.runtime
        self.compilation = triton.knobs.compilation
        self.HookChain = triton.knobs.HookChain
        for name in ("launch_enter_hook", "launch_exit_hook", "add_stages_inspection_hook", "debug"):
            getattr(self.runtime, name)
        self.compilation.instrumentation_mode  # noqa: B018 - must exist
        run_source = re.sub(r"\s+", "", inspect.getsource(self.JITFunction.run))
        if _RUN_LAUNCH not in run_source:
            raise RuntimeError("JITFunction.run does not launch the way this module mirrors")
        active = driver.active
        self.get_device = active.get_current_device
        self.get_stream = active.get_current_stream
        self.agreeing_backends: dict[type, bool] = {}

    def hooks_idle(self) -> bool:
        """No launch hooks to call (an empty ``HookChain`` or None) and no pipeline inspection."""
        rt = self.runtime
        for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
            if hook is not None and (type(hook) is not self.HookChain or hook.calls):
                return False
        return rt.add_stages_inspection_hook is None

    def knob_state(self) -> tuple[Any, ...]:
        """The knobs ``JITFunction.run`` folds into the compile options on every call."""
        return (
            self.runtime.debug,
            self.compilation.instrumentation_mode,
            getattr(self.compilation, "fpsan_homomorphic_casts", None),
        )


_triton: _Triton | None = None


def _get_triton() -> _Triton:
    global _triton
    if _triton is None:
        _triton = _Triton()
    return _triton


def fast_path_unavailable() -> str | None:
    """Why the fast path cannot be used with this Triton at all (None when it can)."""
    return _get_triton().reason


# --------------------------------------------------------------------------------------------
# Per kernel and per specialisation
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """What the launcher needs for one specialisation, taken from the compiled kernel."""

    run: Any
    function: Any
    packed_metadata: Any
    tail: tuple[Any, ...]  # the bound values of the parameters after the positional ones
    used_globals: tuple[tuple[dict[str, Any], str, Any], ...]

    def globals_unchanged(self) -> bool:
        missing = object()
        return all(scope.get(name, missing) == value for scope, name, value in self.used_globals)


# A key whose launches always go the plain way (an argument layout the fast path does not handle).
_PLAIN = object()


class _KernelState:
    def __init__(self, kernel: Any, tr: _Triton) -> None:
        self.kernel = kernel  # kept alive, so that its id is not reused
        self.entries: dict[Any, Any] | None = None
        self.reason: str | None = tr.reason
        if self.reason is None and not isinstance(kernel, tr.JITFunction):
            self.reason = f"{type(kernel).__name__} is not a JITFunction"
        if self.reason is None:
            missing = [a for a in CHECKED_ATTRIBUTES["JITFunction instance"] if not hasattr(kernel, a)]
            if missing:
                self.reason = f"the kernel lacks {missing}"
        if self.reason is None:
            self.entries = {}


_states: dict[int, _KernelState] = {}


def _state(kernel: Any) -> _KernelState:
    state = _states.get(id(kernel))
    if state is None:
        state = _states[id(kernel)] = _KernelState(kernel, _get_triton())
    return state


def kernel_entries(kernel: Any) -> int:
    """How many specialisations of ``kernel`` the fast path holds (for tests)."""
    state = _states.get(id(kernel))
    return 0 if state is None or state.entries is None else sum(e is not _PLAIN for e in state.entries.values())


def reset() -> None:
    """Forget every cached specialisation and the counters."""
    _states.clear()
    counters["fast"] = counters["plain"] = 0


def _plain(kernel: Any, grid: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    counters["plain"] += 1
    return kernel[(grid,)](*args, **kwargs)


def launch(kernel: Any, grid: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``kernel[(grid,)](*args, **kwargs)`` on CUDA, through the cached launcher when possible."""
    if mode() == "plain":
        _plain(kernel, grid, args, kwargs)
        return
    state = _states.get(id(kernel)) or _state(kernel)
    entries = state.entries
    tr = _triton
    if entries is None or tr is None or kernel.pre_run_hooks or not tr.hooks_idle():
        _plain(kernel, grid, args, kwargs)
        return
    arg_key = key(args)
    if arg_key is None:
        _plain(kernel, grid, args, kwargs)
        return
    device = tr.get_device()
    full_key = (device, tr.knob_state(), arg_key, tuple(kwargs.items()))
    try:
        entry = entries.get(full_key)
    except TypeError:  # an unhashable keyword value: nothing to cache it under
        _plain(kernel, grid, args, kwargs)
        return
    if entry is None:
        compiled = _plain(kernel, grid, args, kwargs)
        try:
            new = _make_entry(kernel, tr, device, compiled, args, kwargs)
        except Exception:  # the launch has happened; a kernel we cannot read stays on the plain path
            new = _PLAIN
        if new is not None:
            if len(entries) >= MAX_ENTRIES:
                entries.clear()
            entries[full_key] = new
        return
    if entry is _PLAIN or not entry.globals_unchanged():
        _plain(kernel, grid, args, kwargs)
        return
    counters["fast"] += 1
    entry.run(
        grid, 1, 1, tr.get_stream(device), entry.function, entry.packed_metadata, None, None, None, *args, *entry.tail
    )


def bound_tail(params: list[Any], n_args: int, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The values the binder gives the parameters after the ``n_args`` positional ones: the
    constexpr keyword arguments, else the defaults. None when the key would not capture them: a
    constexpr among the positional arguments (the key holds its class, not its value), or a
    runtime argument other than a float by keyword (its class is not in the key)."""
    if any(p.is_constexpr for p in params[:n_args]):
        return None
    tail = []
    for p in params[n_args:]:
        if p.name in kwargs:
            value = kwargs[p.name]
            # A runtime float by keyword (the extras' coefficients) is always an unspecialised
            # fp32, so its class is fixed; its value is part of the cache key (``launch``).
            if not p.is_constexpr and type(value) is not float:
                return None
            tail.append(value)
        else:
            tail.append(p.default)
    return tuple(tail)


def _make_entry(
    kernel: Any, tr: _Triton, device: int, compiled: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The cache entry for a key, from the kernel its first (plain) launch returned: an ``_Entry``,
    ``_PLAIN`` for an argument layout the key does not capture, or None to decide again next time."""
    if not isinstance(compiled, tr.CompiledKernel):
        return None  # e.g. a jit_cache_hook skipped the launch: nothing was launched to learn from
    tail = bound_tail(kernel.params, len(args), kwargs)
    if tail is None or not _backend_agrees(kernel, tr, device):
        return _PLAIN
    run = compiled.run  # loads the module if needed; the plain launch has done so already
    if compiled.function is None or not callable(run):
        return _PLAIN
    used = tuple((scope, name, value) for (name, _), (value, scope) in kernel.used_global_vals.items())
    return _Entry(run, compiled.function, compiled.packed_metadata, tail, used)


def _backend_agrees(kernel: Any, tr: _Triton, device: int) -> bool:
    """``specialisation_agrees`` for the backend the kernel's binder uses on this device."""
    backend = kernel.device_caches[device][3]
    agrees = tr.agreeing_backends.get(type(backend))
    if agrees is None:
        try:
            agrees = specialisation_agrees(tr.specialize_impl, backend)
        except Exception:  # a specialisation function that does not take these arguments: plain
            agrees = False
        tr.agreeing_backends[type(backend)] = agrees
    return agrees
