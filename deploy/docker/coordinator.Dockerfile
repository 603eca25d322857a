# syntax=docker/dockerfile:1
# IndexRelay coordinator image. Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t indexrelay/coordinator:0.1.0 .
# (coordinator.Dockerfile.dockerignore beside this file keeps target/ out of the context.)

# Any Rust >= 1.88 (tonic 0.14's minimum); pin a version for reproducible images.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# protoc and the well-known .proto files for the gRPC code generation (proto, etcd-client).
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p coordinator --bin coordinator \
 && install -D target/release/coordinator /out/coordinator

FROM ${RUNTIME_IMAGE}
# tini as PID 1: forwards SIGTERM and reaps children (the coordinator can also spawn
# local stage processes when run without --etcd).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/coordinator /usr/local/bin/coordinator
USER 10001:10001
# Public gRPC, OpenAI-compatible HTTP.
EXPOSE 50051 8000
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/coordinator"]
