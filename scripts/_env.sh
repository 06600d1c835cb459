# Sourced by the scripts here: make ./.venv (once) with fusedce and its test extras installed,
# torch pinned to the CPU wheel by .ci/constraints.txt, and activate it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Reinstall when pyproject.toml changes (cheap when nothing changed).
stamp=.venv/.fusedce-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c .ci/constraints.txt -e ".[test,lint]"
    touch "$stamp"
fi
# shellcheck disable=SC1091
. .venv/bin/activate
