#!/usr/bin/env bash
# Builds, once, the Debian 12 root that the rollout test (tests/it/rollout.rs) boots with
# systemd under systemd-nspawn, and prints its path. Later calls find it built and only print
# the path, so the test calls this script every time.
#
#   scripts/nspawn-root.sh [DIR]      # default $ETCD_BACKUPD_NSPAWN_ROOT or
#                                     # /var/tmp/etcd-backupd-nspawn/base
#
# debootstrap --variant=minbase bookworm, plus systemd (and systemd-sysv, so /sbin/init is
# systemd), dbus (systemctl's and journald's peers) and procps (/bin/kill, which the unit's
# ExecReload runs: minbase has no kill binary). Needs root, debootstrap (and network access
# to $DEBIAN_MIRROR, default http://deb.debian.org/debian) for the first build only; the
# rollout test itself needs systemd-nspawn (Debian package systemd-container). Each test
# run works on a copy and never changes this root. A finished root holds the stamp file
# below; a build that was interrupted leaves only DIR.tmp.*, which the next build removes.
# To rebuild (e.g. for Debian's latest point release): rm -rf DIR, then run this again.
set -euo pipefail

root=${1:-${ETCD_BACKUPD_NSPAWN_ROOT:-/var/tmp/etcd-backupd-nspawn/base}}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
stamp=.etcd-backupd-nspawn-root
# Bump when the recipe below changes: a root built by an older recipe is rebuilt.
recipe=1

built() { [ "$(cat "$root/$stamp" 2>/dev/null)" = "$recipe" ]; }

if built; then
  echo "$root"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "nspawn-root.sh: building $root needs root" >&2
  exit 1
fi
command -v debootstrap >/dev/null || {
  echo "nspawn-root.sh: debootstrap is missing: run scripts/install-deps.sh" >&2
  exit 1
}

parent=$(dirname "$root")
mkdir -p "$parent"
# One build at a time (two test runs may start together); the second waits, then finds it.
exec 9>"$parent/.$(basename "$root").lock"
flock 9
if built; then
  echo "$root"
  exit 0
fi

rm -rf "$root".tmp.*
tmp="$root.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
started=$(date +%s)
echo "nspawn-root.sh: building $root (debootstrap bookworm from $mirror)" >&2
keyring=/usr/share/keyrings/debian-archive-keyring.gpg # Debian's, also on an Ubuntu host
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps --keyring="$keyring" \
  bookworm "$tmp" "$mirror" >"$parent/debootstrap.log" 2>&1 || {
  echo "nspawn-root.sh: debootstrap failed; see $parent/debootstrap.log:" >&2
  tail -n 20 "$parent/debootstrap.log" >&2
  exit 1
}

# A machine id is made at each boot (a copy of this root boots many times, each a new
# machine); an empty file tells systemd so without a "first boot".
: >"$tmp/etc/machine-id"
echo node-rollout >"$tmp/etc/hostname"
# Keep the journal in /var/log/journal, where journalctl finds it as on a node.
mkdir -p "$tmp/var/log/journal"
# What a container boot does not need and would only slow it or log noise: timers, the
# console login, and remounting the root (nspawn mounts it).
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
  fstrim.timer console-getty.service getty@.service systemd-remount-fs.service \
  systemd-timesyncd.service; do
  ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
done
# The unit's file:// target roots: /var/backups exists in Debian; /mnt too.
mkdir -p "$tmp/var/backups" "$tmp/mnt"
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
for tool in /lib/systemd/systemd /bin/systemctl /bin/journalctl /bin/kill; do
  [ -x "$tmp$tool" ] || {
    echo "nspawn-root.sh: $tool is missing from the new root" >&2
    exit 1
  }
done
echo "$recipe" >"$tmp/$stamp"

rm -rf "$root"
mv "$tmp" "$root"
trap - EXIT
echo "nspawn-root.sh: built $root in $(($(date +%s) - started)) s ($(du -sh "$root" | cut -f1))" >&2
echo "$root"
