# syntax=docker/dockerfile:1
# wicket: the wicket command-line tool.
# Build from the repository root:
#   docker build -f deploy/docker/wicket.Dockerfile -t wicket .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wicket-cli --bin wicket \
    && install -D -m 0755 target/release/wicket /out/wicket

# glibc, libgcc and CA certificates, no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wicket /usr/local/bin/wicket
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/wicket"]
