#!/usr/bin/env bash
# Installs what building and testing etcd-backupd needs on Debian 12 / Ubuntu:
# a real etcd and etcdctl, Apache httpd (mod_dav), rclone and tinyproxy for the integration
# tests (which start their own instances on free loopback ports), protoc for the etcd gRPC
# client's build, systemd-analyze and ignition-validate for the shipped unit and the rendered
# MachineConfig, a C toolchain, and Rust (through rustup) when cargo is missing.
set -euo pipefail

packages=(etcd-server etcd-client protobuf-compiler build-essential ca-certificates curl tar coreutils mount
          apache2 apache2-utils tinyproxy rclone
          systemd ignition python3-yaml    # systemd-analyze verify, ignition-validate, YAML parsing
          age zstd openssh-client          # the standard tools that must open sealed sets
          faketime)                        # libfaketime: the clock-jump tests
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
