#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs the real CNI plugins and tools the
# end-to-end tests exec (when missing and running as root), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 iputils-ping containernetworking-plugins etcd-server etcd-client protobuf-compiler)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]} (run as root, or install them first)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

locked=()
[ -n "${CI:-}" ] && locked=(--locked)
cargo test --workspace "${locked[@]}"
