# syntax=docker/dockerfile:1
#
# whereabouts-rs: one binary, /whereabouts, that is the CNI plugin (copied onto every node by
# `whereabouts install`), the installer and the controller. deploy/whereabouts.yaml and the Helm chart
# run it as /whereabouts.
#
#   docker build -t ghcr.io/example/whereabouts-rs:0.1.0 .

FROM rust:1-bookworm AS build
# protoc: etcd-client's build script compiles etcd's protocol definitions.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p whereabouts \
    && strip target/release/whereabouts

# distroless/cc: glibc and libgcc only (the binary links them dynamically; TLS is rustls, with no
# OpenSSL), no shell. The plugin is copied from here onto the hosts, where it runs against the
# host's glibc: build on a base no newer than the oldest node's distribution.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/whereabouts /whereabouts
# The image runs as non-root (65532, distroless's "nonroot") unless a pod says otherwise:
# - the controllers (Deployment, the DaemonSet's node controller, the reconciler CronJob) only talk
#   to the API server and keep non-root;
# - the installer (`whereabouts install`, the DaemonSet's init container and token refresher) sets
#   runAsUser: 0: it writes into the host's /opt/cni/bin and /etc/cni/net.d (hostPath, root-owned)
#   and makes the flat file and kubeconfig readable by root only, as the container runtime that
#   execs the plugin runs as root.
USER 65532:65532
ENTRYPOINT ["/whereabouts"]
