# syntax=docker/dockerfile:1
# wicket-demo-idp: the demo identity provider (signs whatever it is asked: demos only).
# Build from the repository root:
#   docker build -f deploy/docker/wicket-demo-idp.Dockerfile -t wicket-demo-idp .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wicket-testkit --bin wicket-demo-idp \
    && install -D -m 0755 target/release/wicket-demo-idp /out/wicket-demo-idp

# glibc, libgcc and CA certificates, no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wicket-demo-idp /usr/local/bin/wicket-demo-idp
EXPOSE 7480
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/wicket-demo-idp"]
