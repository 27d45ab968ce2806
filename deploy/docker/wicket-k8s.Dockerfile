# syntax=docker/dockerfile:1
# wicket-k8s: the Kubernetes API gate.
# Build from the repository root:
#   docker build -f deploy/docker/wicket-k8s.Dockerfile -t wicket-k8s .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wicket-k8s --bin wicket-k8s \
    && install -D -m 0755 target/release/wicket-k8s /out/wicket-k8s
# The state directory (owned by the runtime user; the final image has no shell).
RUN install -d -m 0750 -o 65532 -g 65532 /out/state

# glibc, libgcc and CA certificates, no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wicket-k8s /usr/local/bin/wicket-k8s
COPY --from=build --chown=65532:65532 /out/state /var/lib/wicket
ENV WICKET_K8S_LISTEN=0.0.0.0:6443
ENV WICKET_ADMIN_LISTEN=0.0.0.0:9470
ENV WICKET_STATE_DIR=/var/lib/wicket
VOLUME /var/lib/wicket
EXPOSE 6443 9470
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/wicket-k8s"]
