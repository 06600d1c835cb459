"""One provider's peak memory on CPU, in a fresh process: ``python -m fusedce.bench.memory_probe KEY PROVIDER``.

It warms up once (so imports, the C++ JIT load and torch.compile's compilation are not
counted), then runs one forward and backward and prints one JSON line: the resident set's peak
growth over what was resident before the call (the inputs), in bytes.

The high-water mark comes from ``/proc/self/status`` (VmHWM), reset just before the measured call
through ``/proc/self/clear_refs``; torch.compile's warm-up then runs on the real shape, so the
measured call runs exactly the graph the timings run. ``getrusage(RUSAGE_SELF).ru_maxrss`` is the
fallback where that is missing: on Linux it also carries the peak of the process that spawned
this one (the kernel keeps it across fork and exec), so a large parent would hide the probe's own
peak; every warm-up then runs on a small shape, lest its own peak count.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys

import torch

import fusedce

from .providers import providers
from .timing import make_step
from .workloads import make_inputs, workloads

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _maxrss_kib() -> int:
    scale = 1024 if sys.platform == "darwin" else 1  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


def probe(key: str, name: str) -> dict[str, object]:
    (workload,) = [w for w in workloads("cpu") if w.key == key]
    resettable = _reset_high_water()
    # torch.compile's warm-up runs on the real shape, compiled as the timings compile it (static
    # shapes), where the high-water mark can be reset after it. Everything else, and compile
    # where the mark cannot be reset, warms up on a small shape, which loads what a first call
    # loads; compile then uses dynamic shapes, so that the small graph serves the real shape.
    real_warmup = resettable and name == "compile"
    (provider,) = providers(workload, "cpu", [name], dynamic_compile=not real_warmup)
    if not real_warmup:
        warm = make_step(provider, make_inputs(workload.scaled_down(), "cpu"), "full")
        warm.setup()
        warm.run()
        del warm
    inputs = make_inputs(workload, "cpu", restorable=provider.overwrites_input)
    step = make_step(provider, inputs, "full")
    if real_warmup:
        step.setup()
        step.run()
    step.setup()  # drops the warm-up's gradient
    gc.collect()
    fusedce.empty_cache()  # outputs kept for reuse count in the measured call's peak, not before it
    rss_before = _status_kib("VmRSS")
    maxrss_before = _maxrss_kib()
    use_hwm = rss_before is not None and _reset_high_water()
    if name == "compile":
        torch._dynamo.config.error_on_recompile = True  # compiling here would count the compiler
    step.run()  # the gradient stays alive in inputs.x.grad, as in training
    maxrss_after = _maxrss_kib()
    hwm_after = _status_kib("VmHWM")
    if use_hwm and rss_before is not None and hwm_after is not None:
        extra_kib, method = hwm_after - rss_before, "VmHWM - VmRSS"
    else:
        extra_kib, method = maxrss_after - maxrss_before, "ru_maxrss"
    return {
        "workload": key,
        "provider": name,
        "extra_bytes": max(extra_kib, 0) * 1024,
        "logits_bytes": workload.logits_bytes,
        "method": method,
        "ru_maxrss_before_kib": maxrss_before,
        "ru_maxrss_after_kib": maxrss_after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedce.bench.memory_probe", description=__doc__)
    parser.add_argument("workload", help="a workload key, e.g. cross_entropy/lm-32k/fp32")
    parser.add_argument("provider")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.workload, args.provider)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
