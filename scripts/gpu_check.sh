#!/usr/bin/env bash
# One prepared check of the CUDA path on a GPU machine (H100/H200 with torch and triton
# preinstalled, no network). The package is not installed: it runs from the source tree with
# PYTHONPATH=src. Each step has its own time limit; the whole script stays under 8 minutes.
#
#   1. device and versions
#   2. kernel parity: tests/test_triton_cuda.py, the compiled Triton kernels on CUDA tensors
#      against the reference (every op and dtype, the three tiling layouts, poisoned out-of-range
#      targets, 16384 x 128256 bf16)
#   3. the benchmark: `python -m fusedce bench --device cuda`. lm-128k bf16 with every provider
#      (fusedce, in-place, torch eager, torch.compile, liger-kernel when installed) and peak
#      memory; then lm-32k, imagenet and seg fp32, full, against torch eager
#   4. end-to-end parity against torch on CUDA: `python -m fusedce check --device cuda --quick`
#      for cross_entropy (the other ops, when time is left)
#
# Logs and the benchmark's JSON go to $OUT (or ./gpu_out). The bench table is printed last.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FUSEDCE_BACKEND
out=${OUT:-gpu_out}
mkdir -p "$out"
status=0
began=$SECONDS
step() { echo; echo "== $1 ($((SECONDS - began)) s)"; }

step "device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
python3 - <<'EOF' || status=1
import platform

import torch
import triton

print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"triton {triton.__version__}  device {torch.cuda.get_device_name()}")
from fusedce.kernels import _load, unavailable_reason

print("triton backend:", "ok" if _load("triton") is not None else unavailable_reason("triton"))
EOF

step "kernel parity: the triton backend on CUDA tensors against the reference"
timeout 100 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs --durations=5 \
    tests/test_triton_cuda.py 2>&1 | tee "$out/kernel_parity.log" || status=1

step "benchmark: lm-128k bf16 (16384 x 128256), every provider, with peak memory"
timeout 200 python3 -m fusedce bench --device cuda --quick --workload cross_entropy/lm-128k/bf16 \
    --mode forward --mode full --json "$out/bench_lm128k.json" 2>"$out/bench_lm128k.err" \
    | tee "$out/bench_lm128k.txt" || status=1
tail -3 "$out/bench_lm128k.err"

step "benchmark: lm-32k, imagenet, seg fp32 against torch eager"
timeout 90 python3 -m fusedce bench --device cuda --quick --no-memory --provider fusedce \
    --provider fusedce-inplace --provider eager --workload cross_entropy/lm-32k/fp32 \
    --workload cross_entropy/imagenet/fp32 --workload cross_entropy/seg/fp32 --mode full \
    --json "$out/bench_fp32.json" 2>>"$out/bench_lm128k.err" | tee "$out/bench_fp32.txt" || status=1

step "end-to-end parity against torch on CUDA"
timeout 90 python3 -m fusedce check --device cuda --backend triton --quick --op cross_entropy \
    --failures 8 2>&1 | tee "$out/check.txt" || status=1

step "summary"
echo "kernel parity: $(tail -1 "$out/kernel_parity.log")"
echo "end-to-end parity: $(grep -E 'cases, .* passed' "$out/check.txt" || echo 'did not finish')"
grep -hE '^(workload|lm-|imagenet|seg)' "$out/bench_lm128k.txt" "$out/bench_fp32.txt" | head -20
echo "total $((SECONDS - began)) s; status $status"
exit $status
