#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs what the tests exec (the real CNI
# plugins, etcd, podman with runc and a static busybox for its image) and what the build needs
# (protoc) when missing and running as root, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
ensure_packages iproute2 iputils-ping containernetworking-plugins etcd-server etcd-client protobuf-compiler \
  podman runc busybox-static

locked=()
[ -n "${CI:-}" ] && locked=(--locked)
cargo test --workspace "${locked[@]}"
