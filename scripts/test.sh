#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, then formatting, lints,
# unit tests and the integration tests against real etcd processes, and last a check that
# no process the tests started is still running.
# Run as root: some tests mount a small tmpfs to fill a disk or make one read-only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
if ! command -v cargo >/dev/null 2>&1; then . "$HOME/.cargo/env"; fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

# Every temporary directory of the suite lives under one folder, so a process left behind
# (an Apache worker, an etcd, a daemon) is found by its command line naming it.
suite_tmp=$(mktemp -d /tmp/etcd-backupd-suite.XXXXXX)
chmod 0755 "$suite_tmp" # Apache and tinyproxy drop privileges and must traverse it
trap 'rm -rf --one-file-system "$suite_tmp" 2>/dev/null || true' EXIT
TMPDIR="$suite_tmp" cargo test --locked --all-targets

left=$(pgrep -a -f -- "$suite_tmp" || true)
if [ -n "$left" ]; then
  echo "processes started by the tests are still running:" >&2
  echo "$left" >&2
  pkill -KILL -f -- "$suite_tmp" || true
  exit 1
fi
echo "no process of the suite is left"
