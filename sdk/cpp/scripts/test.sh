#!/usr/bin/env bash
# Builds and tests the dagmesh C++ SDK and the cpp-gpu-tool example. CI entry point.
#
#   sdk/cpp/scripts/test.sh [--setup-only]
#
# 1. installs the Debian/Ubuntu packages it needs when any is missing (apt-get, with sudo when
#    not root; `apt-get update` first unless DAGMESH_APT_UPDATED=1 says this run did it already);
#    --setup-only stops here;
# 2. configures and builds sdk/cpp (Release) into sdk/cpp/build and installs it into
#    sdk/cpp/build/install;
# 3. builds examples/cpp-gpu-tool into examples/cpp-gpu-tool/build (SDK by add_subdirectory) and
#    into examples/cpp-gpu-tool/build-installed (SDK by find_package from the install);
# 4. runs ctest --output-on-failure in both: unit tests, the fake-executor security tests,
#    end-to-end tests against a real `dagmesh up`, the example's selftest.
#
# Environment:
#   JOBS=2                     parallel build jobs
#   DAGMESH_BIN=...            dagmesh binary (default <repo>/target/debug/dagmesh, built with
#                              cargo when missing and cargo is available)
#   DAGMESH_E2E_REQUIRED=1     fail (not skip) the end-to-end tests when a binary is missing
#   DAGMESH_WITH_CUDA=OFF      ON builds the example's CUDA path (needs nvcc)
#   DAGMESH_SKIP_APT=1         never touch apt
set -euo pipefail
setup_only=false
case "${1:-}" in
  "") ;;
  --setup-only) setup_only=true ;;
  *) echo "usage: sdk/cpp/scripts/test.sh [--setup-only]" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
sdk="$(cd "$here/.." && pwd)"
repo="$(cd "$sdk/../.." && pwd)"
example="$repo/examples/cpp-gpu-tool"
jobs="${JOBS:-2}"
start=$(date +%s)

step() { printf '\n==> %s\n' "$*"; }

# --- 1. packages ---------------------------------------------------------------------------------
# openssl: the CLI makes the certificates of the TLS tests (tests/make_certs.sh).
packages=(g++ make cmake pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler
          protobuf-compiler-grpc nlohmann-json3-dev openssl)
if [[ "${DAGMESH_SKIP_APT:-0}" != 1 ]] && command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]})); then
    step "installing ${missing[*]}"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    if [[ "${DAGMESH_APT_UPDATED:-}" != 1 ]]; then
      "${sudo[@]}" apt-get update -q >/dev/null
      export DAGMESH_APT_UPDATED=1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    step "apt packages present"
  fi
fi
$setup_only && exit 0

# --- the dagmesh server for the end-to-end tests ----------------------------------------------------
export DAGMESH_BIN="${DAGMESH_BIN:-$repo/target/debug/dagmesh}"
if [[ ! -x "$DAGMESH_BIN" && "$DAGMESH_BIN" == "$repo/target/debug/dagmesh" ]] && command -v cargo >/dev/null 2>&1; then
  step "building the dagmesh server (cargo build -p dagmesh)"
  (cd "$repo" && cargo build -p dagmesh)
fi
export DAGMESH_E2E_REQUIRED="${DAGMESH_E2E_REQUIRED:-1}"

# --- 2. the SDK --------------------------------------------------------------------------------------
step "configure + build sdk/cpp (Release, -j$jobs)"
cmake -S "$sdk" -B "$sdk/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$sdk/build/install"
cmake --build "$sdk/build" -j"$jobs"
cmake --install "$sdk/build" --prefix "$sdk/build/install" >/dev/null

# --- 3. the example, both ways -------------------------------------------------------------------------
step "configure + build examples/cpp-gpu-tool (add_subdirectory)"
cmake -S "$example" -B "$example/build" -DCMAKE_BUILD_TYPE=Release -DDAGMESH_WITH_CUDA="${DAGMESH_WITH_CUDA:-OFF}"
cmake --build "$example/build" -j"$jobs"

step "configure + build examples/cpp-gpu-tool (installed package, find_package(dagmesh))"
cmake -S "$example" -B "$example/build-installed" -DCMAKE_BUILD_TYPE=Release \
  -DDAGMESH_USE_INSTALLED_SDK=ON -DCMAKE_PREFIX_PATH="$sdk/build/install" \
  -DDAGMESH_WITH_CUDA="${DAGMESH_WITH_CUDA:-OFF}"
cmake --build "$example/build-installed" -j"$jobs"
build_done=$(date +%s)

# --- 4. tests ------------------------------------------------------------------------------------------
export DAGMESH_GPU_TOOL_WORKER="$example/build/cpp-gpu-tool-worker"
status=0
step "ctest sdk/cpp"
(cd "$sdk/build" && ctest --output-on-failure) || status=1
step "ctest examples/cpp-gpu-tool"
(cd "$example/build" && ctest --output-on-failure) || status=1
"$example/build-installed/cpp-gpu-tool-worker" --selftest --iterations 20 >/dev/null || status=1

end=$(date +%s)
printf '\nbuild %ds, tests %ds, total %ds: %s\n' $((build_done - start)) $((end - build_done)) \
  $((end - start)) "$([[ $status -eq 0 ]] && echo PASSED || echo FAILED)"
exit $status
