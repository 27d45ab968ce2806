# syntax=docker/dockerfile:1
# wicket-control: the control service (policy, approvals, audit, console).
# Build from the repository root:
#   docker build -f deploy/docker/wicket-control.Dockerfile -t wicket-control .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wicket-control --bin wicket-control \
    && install -D -m 0755 target/release/wicket-control /out/wicket-control
# The state directory (owned by the runtime user; the final image has no shell).
RUN install -d -m 0750 -o 65532 -g 65532 /out/state

# glibc, libgcc and CA certificates, no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wicket-control /usr/local/bin/wicket-control
COPY --from=build --chown=65532:65532 /out/state /var/lib/wicket
ENV WICKET_LISTEN=0.0.0.0:7470
ENV WICKET_DATABASE_URL=sqlite:/var/lib/wicket/wicket.db
VOLUME /var/lib/wicket
EXPOSE 7470 7480
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/wicket-control"]
