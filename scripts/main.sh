#!/usr/bin/env bash
# The main job (the README's first command): what fusedce can do here (doctor), parity against
# torch on every backend here, then the benchmark report for this machine. Installs what it needs
# into ./.venv.
. "$(dirname "$0")/_env.sh"
doctor=0
python -m fusedce doctor || doctor=$?   # printed first; a missing fused backend is reported, not fatal here
echo
python -m fusedce check --quick
python -m fusedce bench --quick "$@"
exit "$doctor"
