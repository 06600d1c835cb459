#!/usr/bin/env bash
# The test suite (the README's test command; CI runs it): installs what it needs into ./.venv,
# then runs pytest. Extra arguments go to pytest, e.g. `bash scripts/test.sh --full-grid`.
. "$(dirname "$0")/_env.sh"
python -m pytest -q "$@"
