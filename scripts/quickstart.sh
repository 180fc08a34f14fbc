#!/usr/bin/env bash
# See etcd-backupd do its main job on a built-in default: start a throwaway etcd on
# loopback, fill it, back it up to a local directory, list the set, and check it with
# `sha256sum -c` and `etcdctl snapshot status`. Everything lives in a temporary directory
# that is removed at the end (set KEEP=1 to keep it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
if ! command -v cargo >/dev/null 2>&1; then . "$HOME/.cargo/env"; fi

cargo build --locked --quiet
bin="$PWD/target/debug/etcd-backupd"

work=$(mktemp -d /tmp/etcd-backupd-quickstart.XXXXXX)
etcd_pid=""
cleanup() {
  if [ -n "$etcd_pid" ]; then kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

port=$(shuf -i 20000-45000 -n 1)
peer=$((port + 10000))
endpoint="http://127.0.0.1:$port"
echo "== starting a throwaway etcd on $endpoint"
etcd --name quickstart --data-dir "$work/etcd" \
  --listen-client-urls "$endpoint" --advertise-client-urls "$endpoint" \
  --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
  --initial-cluster "quickstart=http://127.0.0.1:$peer" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
export ETCDCTL_API=3
for _ in $(seq 1 100); do
  etcdctl --endpoints "$endpoint" endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done
etcdctl --endpoints "$endpoint" endpoint health

echo "== writing 1000 keys"
for batch in $(seq 0 9); do
  { echo; for i in $(seq 0 99); do echo "put /registry/demo/key-$batch-$i value-$batch-$i-$(printf 'x%.0s' $(seq 1 64))"; done; echo; echo; } |
    etcdctl --endpoints "$endpoint" txn >/dev/null
done

mkdir -p "$work/target"
sed -e "s|http://127.0.0.1:2379|$endpoint|" \
    -e "s|/var/lib/etcd-backupd|$work/staging|" \
    -e "s|file:///var/backups/etcd|file://$work/target|" \
    examples/plain-etcd/config.toml >"$work/config.toml"

echo "== etcd-backupd backup --no-election --config $work/config.toml"
"$bin" backup --no-election --config "$work/config.toml"
echo "== etcd-backupd list"
"$bin" list --config "$work/config.toml"
set_dir=$(find "$work/target/lab" -mindepth 1 -maxdepth 1 -type d | head -n1)
echo "== the set: $set_dir"
ls -l "$set_dir"
echo "== sha256sum -c SHA256SUMS"
(cd "$set_dir" && sha256sum -c SHA256SUMS)
echo "== etcdctl snapshot status"
etcdctl snapshot status "$set_dir"/snapshot_*.db -w table
echo "quickstart: OK"
