# syntax=docker/dockerfile:1
# wicket-pg: the PostgreSQL gate.
# Build from the repository root:
#   docker build -f deploy/docker/wicket-pg.Dockerfile -t wicket-pg .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
# pg_query builds its bindings with bindgen, which needs libclang.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wicket-pg --bin wicket-pg \
    && install -D -m 0755 target/release/wicket-pg /out/wicket-pg
# The state directory (owned by the runtime user; the final image has no shell).
RUN install -d -m 0750 -o 65532 -g 65532 /out/state

# glibc, libgcc and CA certificates, no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wicket-pg /usr/local/bin/wicket-pg
COPY --from=build --chown=65532:65532 /out/state /var/lib/wicket
ENV WICKET_PG_LISTEN=0.0.0.0:6432
ENV WICKET_ADMIN_LISTEN=0.0.0.0:9470
ENV WICKET_STATE_DIR=/var/lib/wicket
VOLUME /var/lib/wicket
EXPOSE 6432 9470
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/wicket-pg"]
