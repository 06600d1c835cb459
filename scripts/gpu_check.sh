#!/usr/bin/env bash
# One prepared check of the triton backend on a GPU machine (H100/H200 with torch and triton
# preinstalled, no network). The package is not installed: it runs from the source tree with
# PYTHONPATH=src. Run it from anywhere: it changes to the repository root.
#
#   1. device and versions
#   2. parity: tests/test_triton_cuda.py, the compiled kernels on CUDA tensors against the
#      reference (every op and dtype, the three tiling layouts, poisoned out-of-range targets,
#      16384 x 128256 bf16). About 150 Triton compilations: budget ~90 s (killed at 110 s).
#   3. timings: scripts/bench_triton.py (ours vs torch eager vs torch.compile vs a copy, and peak
#      memory) for lm-128k bf16, lm-32k fp32, imagenet fp32, seg fp32. Budget ~3 min: it skips
#      torch.compile for the workloads left after 150 s, and is killed at 230 s.
#
# tests/test_kernels.py is not run here by default: its tensors are on the CPU, so without
# TRITON_INTERPRET it has no triton cases on this machine, and collecting it compiles the C++ CPU
# backend (about a minute). Set GPU_CHECK_KERNELS=1 to run it anyway (under the interpreter).
#
# Exit status: 0 when every step passed. Each step has its own timeout; the whole script stays
# under 6 minutes.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET FUSEDCE_BACKEND
status=0
began=$SECONDS

echo "== device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
python - <<'EOF' || status=1
import platform

import torch
import triton

print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"triton {triton.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
from fusedce.kernels import _load, unavailable_reason

print("triton backend:", "ok" if _load("triton") is not None else unavailable_reason("triton"))
EOF

echo "== parity: the triton backend on CUDA tensors against the reference"
start=$SECONDS
if python -c "import pytest" 2>/dev/null; then
    # -o addopts='' drops pyproject's --benchmark-disable, in case pytest-benchmark is missing.
    timeout 110 python -m pytest -o addopts="" -p no:cacheprovider -q -x -rs --durations=5 \
        tests/test_triton_cuda.py || status=1
    if [ "${GPU_CHECK_KERNELS:-0}" = "1" ]; then
        TRITON_INTERPRET=1 timeout 240 python -m pytest -o addopts="" -p no:cacheprovider -q -x \
            -k triton tests/test_kernels.py || status=1
    fi
else
    echo "pytest is not installed: parity tests skipped (bench_triton.py still compares with eager)"
    status=1
fi
echo "parity took $((SECONDS - start)) s"

echo "== timings"
start=$SECONDS
timeout 230 python scripts/bench_triton.py --budget-s 150 || status=1
echo "timings took $((SECONDS - start)) s; total $((SECONDS - began)) s; status $status"
exit $status
