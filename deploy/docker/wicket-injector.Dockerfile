# syntax=docker/dockerfile:1
# wicket-injector: the sidecar injection webhook.
# Build from the repository root:
#   docker build -f deploy/docker/wicket-injector.Dockerfile -t wicket-injector .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wicket-injector --bin wicket-injector \
    && install -D -m 0755 target/release/wicket-injector /out/wicket-injector

# glibc, libgcc and CA certificates, no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wicket-injector /usr/local/bin/wicket-injector
ENV WICKET_INJECTOR_LISTEN=0.0.0.0:8443
EXPOSE 8443
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/wicket-injector"]
