#!/usr/bin/env bash
# Tests of the Python SDK, as CI runs them:
#   1. a virtual environment at $VENV (default: <repo>/.venv-python),
#   2. `pip install ./sdk/python[otel,test]` from PyPI (the pinned grpcio/protobuf/grpcio-tools),
#   3. pytest against a real `dagmesh up` ($DAGMESH_BIN, default <repo>/target/debug/dagmesh,
#      built with cargo when missing).
# Extra arguments go to pytest, e.g. `sdk/python/scripts/test.sh -k drain -v`.
set -euo pipefail

sdk_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo=$(cd "$sdk_dir/../.." && pwd)
venv=${VENV:-$repo/.venv-python}
python=${PYTHON:-python3}
export DAGMESH_BIN=${DAGMESH_BIN:-$repo/target/debug/dagmesh}

if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
  # Keep the environment out of git status without touching the repository's .gitignore.
  echo '*' > "$venv/.gitignore"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# setuptools builds in sdk/python/build; a stale copy there could ship modules deleted since.
rm -rf "$sdk_dir/build"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$sdk_dir[otel,test]"

if [ ! -x "$DAGMESH_BIN" ]; then
  echo "building $DAGMESH_BIN" >&2
  (cd "$repo" && cargo build -p dagmesh)
fi

cd "$sdk_dir"
status=0
"$venv/bin/python" -m pytest tests -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
fi
exit "$status"
