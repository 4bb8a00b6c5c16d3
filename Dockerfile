# syntax=docker/dockerfile:1
#
# whereabouts-rs: one binary, /whereabouts, that is the CNI plugin (copied onto every node by
# `whereabouts install`), the installer and the controller. deploy/whereabouts.yaml and the Helm chart
# run it as /whereabouts.
#
#   docker build -t REGISTRY/whereabouts-rs:0.1.0 . && docker push REGISTRY/whereabouts-rs:0.1.0
#
# with REGISTRY one every node can pull from (README.md, "Installing": no public registry has it).
#
# The binary is linked statically (musl): the plugin is executed by the container runtime on the
# host, whose C library may be older than any build image's (upstream's Go binary is static too).

FROM rust:1-bookworm AS build
# protoc: etcd-client's build script compiles etcd's protocol definitions. musl-tools: musl-gcc for
# ring's C and assembly.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler musl-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
    && rustup target add "$target" \
    && cargo build --release --locked -p whereabouts --target "$target" \
    && cp "target/$target/release/whereabouts" /whereabouts \
    && strip /whereabouts

# distroless/static: no shell, no C library (none needed), CA certificates and /etc/passwd only.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /whereabouts /whereabouts
# The image runs as non-root (65532, distroless's "nonroot") unless a pod says otherwise:
# - the controllers (Deployment, the DaemonSet's node controller, the reconciler CronJob) only talk
#   to the API server and stay non-root;
# - the installer (`whereabouts install`: the DaemonSet's init container and token refresher) sets
#   runAsUser: 0 (and privileged, for SELinux hosts): it writes into the host's /opt/cni/bin and
#   /etc/cni/net.d (hostPath, root-owned) and makes the flat file and the kubeconfig readable by root
#   only, as the container runtime that executes the plugin runs as root.
USER 65532:65532
ENTRYPOINT ["/whereabouts"]
