#!/usr/bin/env bash
# The main job (the README's first command): parity against torch on every backend here, then
# the benchmark report for this machine. Installs what it needs into ./.venv.
. "$(dirname "$0")/_env.sh"
python -m fusedce check --quick
python -m fusedce bench --quick "$@"
