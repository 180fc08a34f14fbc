#!/usr/bin/env bash
# Usage: scripts/check-unit.sh BINARY [UNIT...]
#
# Runs `systemd-analyze verify` on copies of the shipped unit files and fails (exit 1,
# showing the output) if it exits non-zero or prints anything at all: warnings count.
# verify insists that every ExecStart= binary exists, so the copies run BINARY (e.g.
# target/release/etcd-backupd, or /bin/true) in place of /usr/local/bin/etcd-backupd.
#
# Without UNIT arguments it checks systemd/etcd-backupd.service and
# packaging/etcd-backupd-install.service together, then etcd-backupd.service again with
# the systemd/native-only.conf drop-in applied.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 BINARY [UNIT...]" >&2
  exit 2
fi
if [ ! -f "$1" ] || [ ! -x "$1" ]; then
  echo "$0: $1: not an executable file" >&2
  exit 2
fi
binary=$(realpath "$1")
shift
units=()
for unit in "$@"; do units+=("$(realpath "$unit")"); done
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# verify DIR UNIT...: copy the units into DIR (ExecStart binary swapped) and verify them there.
verify() {
  local dir=$1 out rc=0 names=()
  shift
  mkdir -p "$dir"
  for unit in "$@"; do
    sed -E "s|^(Exec[A-Za-z]*=[-@:+!]*)/usr/local/bin/etcd-backupd( \|$)|\1${binary}\2|" \
      "$unit" >"$dir/$(basename "$unit")"
    names+=("$dir/$(basename "$unit")")
  done
  out=$(systemd-analyze verify "${names[@]}" 2>&1) || rc=$?
  if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    echo "systemd-analyze verify $* (exit $rc):" >&2
    printf '%s\n' "$out" >&2
    return 1
  fi
  echo "ok: systemd-analyze verify $* (no output)"
}

if [ ${#units[@]} -gt 0 ]; then
  verify "$tmp/given" "${units[@]}"
  exit 0
fi

verify "$tmp/shipped" systemd/etcd-backupd.service packaging/etcd-backupd-install.service
mkdir -p "$tmp/native/etcd-backupd.service.d"
cp systemd/native-only.conf "$tmp/native/etcd-backupd.service.d/50-native-only.conf"
verify "$tmp/native" systemd/etcd-backupd.service
echo "  (with systemd/native-only.conf as etcd-backupd.service.d/50-native-only.conf)"
