#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, then formatting, lints, the
# supply-chain checks (deny.toml, the third-party notices), unit tests and the integration
# tests against real etcd processes, and last a check that no process the tests started is
# still running.
# Run as root: some tests mount a small tmpfs to fill a disk or make one read-only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --supply-chain
if ! command -v cargo >/dev/null 2>&1; then . "$HOME/.cargo/env"; fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

# Supply chain (docs/dependencies.md, "Supply chain"), with no network past crates.io's own `cargo fetch`:
# the dependency policy in deny.toml (licenses, bans, sources; `advisories` needs the
# RustSec database, which CI cannot fetch), and the third-party notices, regenerated from
# Cargo.lock and compared with the committed packaging/THIRD-PARTY-LICENSES.txt.
cargo fetch --locked --quiet # every platform's crates, which both tools read offline
cargo deny --locked --offline check licenses bans sources
notices=$(mktemp /tmp/etcd-backupd-notices.XXXXXX)
if ! cargo about generate --frozen --fail -o "$notices" packaging/about.hbs 2>"$notices.err" ||
   [ -s "$notices.err" ]; then # a warning too: a clarification that no longer matches its crate
  cat "$notices.err" >&2; rm -f "$notices" "$notices.err"
  echo "cargo about generate failed or warned (about.toml)" >&2; exit 1
fi
if ! diff -u packaging/THIRD-PARTY-LICENSES.txt "$notices" >"$notices.err"; then
  head -n 60 "$notices.err" >&2; rm -f "$notices" "$notices.err"
  echo "packaging/THIRD-PARTY-LICENSES.txt differs from what Cargo.lock gives: regenerate it" \
       "(packaging/README.md \"Third-party notices\") and commit it" >&2
  exit 1
fi
rm -f "$notices" "$notices.err"
# The RPM's License: tag (and the image's licenses label, the same expression) is
# etcd-backupd's license and every license in the notices.
spec_license=$(sed -n 's/^License: *//p' packaging/etcd-backupd.spec)
if ! grep -qF "org.opencontainers.image.licenses=\"$spec_license\"" packaging/Containerfile; then
  echo "packaging/Containerfile: the licenses label should be \"$spec_license\", as in the spec" >&2
  exit 1
fi
spec_ids=$(printf '%s\n' "${spec_license// AND /$'\n'}" | sort -u)
notice_ids=$({ echo Apache-2.0; sed -n '/^Licenses$/,/^=====/s/.* (\([^ ()]*\))$/\1/p' \
  packaging/THIRD-PARTY-LICENSES.txt; } | sort -u)
if [ "$spec_ids" != "$notice_ids" ]; then
  echo "packaging/etcd-backupd.spec: License: should be $(paste -sd ' ' <<<"$notice_ids" | sed 's/ / AND /g')" >&2
  exit 1
fi
echo "dependency policy and third-party notices ok"

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
