#!/usr/bin/env bash
# One prepared check of the CUDA path on a GPU machine (H100/H200 with torch and triton
# preinstalled, no network). The package is not installed: it runs from the source tree with
# PYTHONPATH=src. Liger (the peer provider) is installed from wheels in .whl/ when they travel
# with the tree. Each step has its own time limit; the whole script stays under 8 minutes.
#
#   1. device and versions
#   2. kernel parity: the compiled Triton kernels on CUDA tensors against the reference, and
#      linear_cross_entropy on CUDA against a float64 truth (no worse than torch eager). If tests
#      fail with the fast Triton launcher, the later steps run with the plain one
#      (FUSEDCE_TRITON_LAUNCH=plain), and the summary says so.
#   3. the benchmark, most important first: the lmhead (16384 x 4096 x 128256 bf16) against eager,
#      torch's chunked path where this torch has it, and liger, with peak memory; the small fp32
#      workloads (tiny, imagenet, seg, lm-32k) against eager (and liger, 2-D)
#   4. host time per forward+backward against torch eager, for each Triton launch mode, and a
#      cProfile of fusedce at the imagenet shape
#   5. lm-128k bf16 with peak memory; the lmhead's time and memory per row-block size
#      (scripts/gpu_lmhead_blocks.py)
#   6. end-to-end parity against torch on CUDA (`python -m fusedce check`, a sample)
#
# Logs and the benchmarks' JSON end up in $OUT/gpu_check_logs.tgz (or ./gpu_out/). A short table is
# printed last.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FUSEDCE_BACKEND
# The device tool returns at most 8 files from $OUT: the logs are written apart and tarred there.
out=$(mktemp -d /tmp/gpu_check.XXXX)
status=0
began=$SECONDS
step() { echo; echo "== $1 ($((SECONDS - began)) s)"; }

step "device and versions"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || status=1
python3 - <<'EOF' || status=1
import importlib.util
import platform

import torch
import triton

print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"triton {triton.__version__}  device {torch.cuda.get_device_name()}")
from fusedce.kernels import _load, unavailable_reason

print("triton backend:", "ok" if _load("triton") is not None else unavailable_reason("triton"))
print("liger:", "installed" if importlib.util.find_spec("liger_kernel") else "absent")
print("torch linear_cross_entropy:", hasattr(torch.nn, "LinearCrossEntropyLoss"))
EOF

step "kernel parity: triton on CUDA against the reference; linear_cross_entropy against float64"
launch_note="fast launcher (default)"
# Most of this step is Triton compiling ~100 kernel variants: spread over processes when
# pytest-xdist is there (the GPU machine's image has it).
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
timeout 170 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rfs --tb=short --durations=8 "${parallel[@]}" \
    tests/test_triton_cuda.py tests/test_linear_cuda.py 2>&1 | tee "$out/kernel_parity.log"
parity=$?
if [ $parity -ne 0 ]; then
    status=1
fi
if [ $parity -eq 1 ]; then  # tests failed (not a time-out): measure with the plain launcher
    export FUSEDCE_TRITON_LAUNCH=plain
    launch_note="PLAIN launcher: kernel parity failed with the default one"
fi

step "benchmark: lmhead 16384 x 4096 x 128256 bf16, with peak memory"
timeout 120 python3 -m fusedce bench --device cuda --quick --provider fusedce --provider eager \
    --provider torch-chunked --provider liger --workload linear_cross_entropy/lmhead/bf16 --mode full \
    --json "$out/bench_lmhead.json" 2>"$out/bench_lmhead.err" | tee "$out/bench_lmhead.txt" || status=1
tail -3 "$out/bench_lmhead.err"

step "benchmark: tiny, imagenet, seg, lm-32k fp32, full, against eager"
timeout 60 python3 -m fusedce bench --device cuda --quick --no-memory --provider fusedce \
    --provider fusedce-inplace --provider eager --provider liger --workload cross_entropy/tiny/fp32 \
    --workload cross_entropy/imagenet/fp32 --workload cross_entropy/seg/fp32 \
    --workload cross_entropy/lm-32k/fp32 --mode full \
    --json "$out/bench_small.json" 2>"$out/bench_small.err" | tee "$out/bench_small.txt" || status=1
tail -3 "$out/bench_small.err"

step "host time per forward+backward against torch eager"
timeout 60 python3 scripts/gpu_host_time.py --calls 100 --profile "$out/profile.txt" 2>&1 \
    | tee "$out/host_time.txt" || status=1

step "benchmark: lm-128k bf16 (16384 x 128256), with peak memory"
timeout 90 python3 -m fusedce bench --device cuda --quick --provider fusedce --provider fusedce-inplace \
    --provider eager --provider liger --workload cross_entropy/lm-128k/bf16 --mode forward --mode full \
    --json "$out/bench_lm128k.json" 2>"$out/bench_lm128k.err" | tee "$out/bench_lm128k.txt" || status=1
tail -3 "$out/bench_lm128k.err"

step "lmhead row blocks: time and peak memory per block size, beside eager and liger"
timeout 60 python3 scripts/gpu_lmhead_blocks.py 2>&1 | tee "$out/lmhead_blocks.txt" || status=1

step "end-to-end parity against torch on CUDA (one case in 20 of the quick grid)"
timeout 50 python3 -m fusedce check --device cuda --backend triton --quick --every 20 --op cross_entropy \
    --failures 8 2>&1 | tee "$out/check.txt" || status=1

step "summary"
echo "launch: $launch_note"
echo "kernel parity: $(tail -1 "$out/kernel_parity.log")"
echo "end-to-end parity: $(grep -E 'cases, .* passed' "$out/check.txt" || echo 'did not finish')"
grep -hE '^(copy|workload|lm-|imagenet|seg|tiny|linear_cross_entropy)' "$out"/bench_*.txt | head -24
grep -E '^(shape|tiny|imagenet|seg|lm-)' "$out/host_time.txt" | head -12
grep -E '^(provider|fusedce|torch|liger)' "$out/lmhead_blocks.txt"
echo "total $((SECONDS - began)) s; status $status"
dest=${OUT:-gpu_out}
mkdir -p "$dest"
tar czf "$dest/gpu_check_logs.tgz" -C "$out" . && echo "logs: $dest/gpu_check_logs.tgz"
exit $status
