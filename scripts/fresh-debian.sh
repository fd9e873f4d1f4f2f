#!/usr/bin/env bash
# Runs a command of this repository in a clean Debian 12 (bookworm) chroot, as root: how the
# README's claim "scripts/test.sh sets up a fresh Debian machine" was proven.
#
#   scripts/fresh-debian.sh [options] [--] [COMMAND...]      (default COMMAND: scripts/test.sh)
#
# Each run (unless --reuse):
#   1. recreates DIR/root from DIR/pristine.tar, which is made on first use with
#      `debootstrap --variant=minbase bookworm` (88 packages: no python3, compiler, procps or CA
#      certificates; installs the host's `debootstrap` package if missing), then gives it what
#      the host's machines have before any project runs and no project installs: the host's apt
#      sources and apt settings, extra CA certificates (a proxy's), /etc/pip.conf, /etc/hosts,
#      resolv.conf;
#   2. mounts proc, sys, dev and binds the host's Rust toolchain read-only at /opt/rust-toolchain
#      (on PATH; there is no rustup in the chroot); CARGO_HOME is the chroot's own, empty
#      /root/.cargo (plus the host's cargo config, if it has one);
#   3. clones the repository (HEAD, committed files only) into /root/dagmesh in the chroot;
#      --overlay copies the work tree's uncommitted changes on top, --overlay-path P only P;
#   4. runs COMMAND there with `bash -lc`, env -i plus HOME, PATH, LANG=C.UTF-8, CARGO_HOME and
#      DAGMESH_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5433/postgres (the chroot shares
#      the host's network, where a PostgreSQL may hold 5432: test.sh must then install and start
#      its own); --ci adds CI=true, as .ci/run gets; output goes to the terminal and to the log;
#   5. at the end stops the chroot's PostgreSQL clusters, ends any process still running in the
#      chroot, and unmounts everything it mounted (the chroot's files stay: inspect them, or run
#      again with --reuse).
#
# Options:
#   --dir DIR            where the chroot and its pristine image live (default /var/tmp/dagmesh-debian)
#   --overlay            copy uncommitted changes of the work tree on top of the clone
#   --overlay-path P     copy P (relative to the repository) on top of the clone; repeatable
#   --ci                 set CI=true inside
#   --reuse              keep the chroot as the last run left it (no recreate, no clone, no overlay)
#   --log FILE           log file (default DIR/logs/run-DATE.log)
# Exit status: the command's.
set -euo pipefail

dir=/var/tmp/dagmesh-debian
repo=$(cd "$(dirname "$0")/.." && pwd)
inside=/root/dagmesh
db_url=postgres://postgres@127.0.0.1:5433/postgres
log=""
overlay=false
overlay_paths=()
ci=false
reuse=false
while (($#)); do
  case $1 in
    --overlay) overlay=true ;;
    --overlay-path) overlay_paths+=("$2"); shift ;;
    --ci) ci=true ;;
    --reuse) reuse=true ;;
    --log) log=$2; shift ;;
    --dir) dir=$2; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
command=("$@")
((${#command[@]})) || command=(scripts/test.sh)
[[ $(id -u) -eq 0 ]] || { echo "run as root" >&2; exit 1; }
base=$dir/root
pristine=$dir/pristine.tar
log=${log:-$dir/logs/run-$(date +%Y%m%d-%H%M%S).log}
mkdir -p "$(dirname "$log")"

say() { printf '[chroot-run] %s\n' "$*" | tee -a "$log" >&2; }
mounts_under() { awk -v b="$base" '$2 == b || index($2, b "/") == 1 { print $2 }' /proc/mounts; }

# --- teardown (also on failure or Ctrl-C) ------------------------------------------------------
teardown() {
  set +e
  if [[ -x $base/usr/bin/pg_lsclusters ]] && mountpoint -q "$base/proc"; then
    chroot "$base" pg_lsclusters -h 2>/dev/null | while read -r version name _ status _; do
      [[ $status == online* ]] || continue
      say "stopping the chroot's PostgreSQL $version/$name"
      chroot "$base" pg_ctlcluster --skip-systemctl-redirect "$version" "$name" stop -m fast
    done
  fi
  # Processes still running inside the chroot (a server a test left behind): by pid.
  local pid pids=()
  for pid in /proc/[0-9]*; do
    [[ $(readlink "$pid/root" 2>/dev/null) == "$base" ]] && pids+=("${pid#/proc/}")
  done
  if ((${#pids[@]})); then
    say "ending processes left in the chroot: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null; sleep 3; kill -KILL "${pids[@]}" 2>/dev/null
  fi
  local m
  for m in $(mounts_under | sort -r); do umount -l "$m" 2>/dev/null || true; done
  if [[ -n $(mounts_under) ]]; then say "warning: still mounted: $(mounts_under | tr '\n' ' ')"; fi
}

# --- 1. a pristine chroot ------------------------------------------------------------------------
if [[ -n $(mounts_under) ]]; then
  echo "error: something is still mounted under $base (a run in progress?):" >&2
  mounts_under >&2
  exit 1
fi
start=$(date +%s)
if ! $reuse; then
  if [[ ! -f $pristine ]]; then
    command -v debootstrap >/dev/null ||
      { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; }
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    say "making $pristine: debootstrap --variant=minbase bookworm from ${mirror:-deb.debian.org}"
    rm -rf --one-file-system "$dir/pristine"
    debootstrap --variant=minbase bookworm "$dir/pristine" "${mirror:-http://deb.debian.org/debian}" \
      >"$dir/debootstrap.log" 2>&1 || { echo "debootstrap failed: see $dir/debootstrap.log" >&2; exit 1; }
    tar --numeric-owner -cpf "$pristine" -C "$dir/pristine" .
    rm -rf --one-file-system "$dir/pristine"
  fi
  say "recreating $base from $pristine"
  rm -rf --one-file-system "$base"
  mkdir -p "$base"
  tar --numeric-owner -xpf "$pristine" -C "$base"
  # What this workplace's machines have before any project runs (not the project's to install).
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    rm -f "$base/etc/apt/sources.list"
    cp /etc/apt/sources.list.d/*.sources "$base/etc/apt/sources.list.d/"
  fi
  # The host's apt settings about reaching its mirror (proxies, a snapshot's validity).
  for conf in /etc/apt/apt.conf.d/*; do
    if grep -q '^Acquire::' "$conf" 2>/dev/null; then cp "$conf" "$base/etc/apt/apt.conf.d/"; fi
  done
  mkdir -p "$base/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$base/usr/local/share/ca-certificates/" 2>/dev/null || true
  [[ ! -f /etc/pip.conf ]] || cp /etc/pip.conf "$base/etc/pip.conf"
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$base/etc/hosts"
  cp /etc/resolv.conf "$base/etc/resolv.conf"
  mkdir -p "$base/root/.cargo"
  host_cargo_home=${CARGO_HOME:-/root/.cargo}
  for f in config.toml config; do
    [[ ! -f $host_cargo_home/$f ]] || cp "$host_cargo_home/$f" "$base/root/.cargo/"
  done

  say "cloning $repo (HEAD $(git -C "$repo" rev-parse --short HEAD)) into $inside"
  git clone -q "$repo" "$base$inside"
  apply_overlay() {  # relative path: copy it, or delete it when the work tree no longer has it
    local p=$1
    if [[ -e $repo/$p || -L $repo/$p ]]; then
      mkdir -p "$(dirname "$base$inside/$p")"
      cp -a "$repo/$p" "$(dirname "$base$inside/$p")/"
    else
      rm -rf "${base:?}$inside/$p"
    fi
    say "overlay: $p"
  }
  if $overlay; then
    while IFS= read -r -d '' p; do apply_overlay "$p"; done < <(
      git -C "$repo" ls-files -z -m -d -o --exclude-standard | sort -zu)
  fi
  for p in "${overlay_paths[@]}"; do apply_overlay "$p"; done
fi

# --- 2. mounts -----------------------------------------------------------------------------------
trap teardown EXIT
trap 'exit 130' INT TERM
mount -t proc proc "$base/proc"
mount -t sysfs sysfs "$base/sys" 2>/dev/null || mount --rbind /sys "$base/sys"
mount --rbind /dev "$base/dev"
toolchain=$(dirname "$(dirname "$(readlink -f "$(rustup which cargo 2>/dev/null || command -v cargo)")")")
mkdir -p "$base/opt/rust-toolchain"
# bash -l reads /etc/profile, which sets PATH anew: the toolchain goes on it there, as a system-wide
# install would.
echo 'export PATH=/opt/rust-toolchain/bin:$PATH' > "$base/etc/profile.d/rust-toolchain.sh"
mount --bind "$toolchain" "$base/opt/rust-toolchain"
mount -o remount,bind,ro "$base/opt/rust-toolchain"
say "toolchain $toolchain -> /opt/rust-toolchain (read-only): $("$toolchain/bin/rustc" --version)"

# --- 4. the command ------------------------------------------------------------------------------
env_vars=(
  HOME=/root
  PATH=/opt/rust-toolchain/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  LANG=C.UTF-8
  TERM=dumb
  CARGO_HOME=/root/.cargo
  "DAGMESH_TEST_DATABASE_URL=$db_url"
  # The egress CA, as this workplace's environment names it (in the bundle once ca-certificates is in).
  SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  SSL_CERT_DIR=/etc/ssl/certs
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt
  REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
  CURL_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
  GIT_SSL_CAINFO=/etc/ssl/certs/ca-certificates.crt
)
$ci && env_vars+=(CI=true)
printf -v cmdline '%q ' "${command[@]}"
say "running in $base:$inside: $cmdline(log: $log)"
set +e
chroot "$base" /usr/bin/env -i "${env_vars[@]}" /bin/bash -lc "cd $inside && $cmdline" </dev/null 2>&1 |
  tee -a "$log"
status=${PIPESTATUS[0]}
set -e
say "exit status $status after $(($(date +%s) - start))s"
exit "$status"
