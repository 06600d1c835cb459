#!/usr/bin/env bash
# CI: the package ships what it claims. Builds the sdist and the wheel (`python -m build`), installs
# the wheel into a fresh venv with no extras, and from a temporary directory (so no source tree is
# on the path) runs `fusedce doctor` (the console script), `python -m fusedce build` into an empty
# cache (so the C++ sources and headers in the wheel compile), a first call that must build
# nothing, and a parity check on every backend available. About 2-3 minutes on 2 cores, most of it
# installing torch and compiling.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
began=$SECONDS
step() { echo; echo "== package: $1 ($((SECONDS - began)) s)"; }

step "build the sdist and the wheel"
if ! "$python" -c "import build" 2>/dev/null; then
    "$python" -m pip install -q "build>=1"
fi
# The wheel is built from the sdist, as pip would, so a file missing from the sdist shows too.
"$python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls "$work/dist"
wheel=$(ls "$work"/dist/fusedce-*.whl)
"$python" - "$wheel" <<'PY'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
sources = [f"fusedce/kernels/cpu/{p.name}" for p in pathlib.Path("src/fusedce/kernels/cpu").iterdir()
           if p.suffix in (".cpp", ".h")]
missing = [n for n in ["fusedce/py.typed", *sources] if n not in names]
entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
scripts = zipfile.ZipFile(sys.argv[1]).read(entry_points).decode()
assert not missing, f"missing from the wheel: {missing}"
assert "fusedce = fusedce.__main__:main" in scripts, scripts
print(f"the wheel holds py.typed, the console script and {len(sources)} C++ sources")
PY

step "install the wheel into a fresh venv, no extras"
"$python" -m venv "$work/venv"
# --no-compile: byte-compiling every file of torch costs install time, and nothing here needs it.
"$work/venv/bin/python" -m pip install -q --no-compile -c "$repo/.ci/constraints.txt" "$wheel" >"$work/pip.log" 2>&1 \
    || { cat "$work/pip.log"; exit 1; }

cd "$work"  # no source tree on sys.path from here on
unset PYTHONPATH FUSEDCE_BACKEND
export FUSEDCE_CACHE_DIR="$work/cache"
py="$work/venv/bin/python"

step "fusedce doctor (the console script)"
"$work/venv/bin/fusedce" doctor
"$py" - <<'PY'
import pathlib, sys
import fusedce
where = pathlib.Path(fusedce.__file__).resolve()
assert "site-packages" in where.parts, f"fusedce imported from {where}, not from the installed wheel"
assert (where.parent / "py.typed").exists(), "py.typed is not in the wheel"
print(f"imported from {where.parent}")
PY

step "python -m fusedce build (into an empty FUSEDCE_CACHE_DIR)"
"$py" -m fusedce build
test -n "$(ls "$FUSEDCE_CACHE_DIR")"

step "a first call compiles nothing and runs the cpu backend"
"$py" - <<'PY'
import contextlib, io, sys, warnings
import torch
import fusedce
from fusedce.kernels import backend_for, cpu
stderr = io.StringIO()
with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
    warnings.simplefilter("error")  # a fallback warning fails the step
    x = torch.randn(8, 11, requires_grad=True)
    t = torch.randint(0, 11, (8,))
    fusedce.cross_entropy(x, t).backward()
assert "compiling" not in stderr.getvalue(), stderr.getvalue()
assert backend_for(torch.device("cpu")) is cpu, backend_for(torch.device("cpu"))
expected = torch.nn.functional.cross_entropy(x.detach(), t)
assert torch.allclose(fusedce.cross_entropy(x.detach(), t), expected)
print("ok: the cpu backend ran, nothing compiled")
PY

step "parity check on every available backend (1 case in ${FUSEDCE_PACKAGE_EVERY:=20} of the quick grid)"
"$py" -m fusedce check --quick --every "$FUSEDCE_PACKAGE_EVERY"

step "done"
