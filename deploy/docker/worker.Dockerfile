# syntax=docker/dockerfile:1
# IndexRelay worker image on a CUDA runtime base. Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t indexrelay/worker:0.1.0 .
# (worker.Dockerfile.dockerignore beside this file keeps target/ out of the context.)
#
# The CUDA runtime base carries the CUDA user-space libraries (cudart, NVRTC, cuBLAS); the
# driver (libcuda) is mounted from the node by the NVIDIA container toolkit. Without a GPU
# the same binary runs its CPU kernels.

# Any Rust >= 1.88 (tonic 0.14's minimum); pin a version for reproducible images.
ARG RUST_IMAGE=rust:1-bookworm
# Match the CUDA major version to the cudarc CUDA-version feature in kernels/Cargo.toml
# (`cuda-13000`: cudarc looks for the CUDA 13 library file names first); the 580 driver of
# the project's GPU machines runs CUDA 13 user-space libraries.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${RUST_IMAGE} AS build
# Cargo features for the worker build: `cuda` is the GPU engine and stage server (cudarc
# loads the CUDA libraries at run time, so no CUDA toolkit is needed to build); "" builds a
# CPU-only binary.
ARG WORKER_FEATURES="cuda"
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Built on Debian bookworm (glibc 2.36): runs on the Ubuntu 24.04 base (glibc 2.39).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p worker --bin worker ${WORKER_FEATURES:+--features "$WORKER_FEATURES"} \
 && install -D target/release/worker /out/worker

FROM ${CUDA_IMAGE}
# tini as PID 1: `worker serve` stops on SIGINT only, and a PID 1 without a SIGTERM
# handler would ignore Kubernetes' SIGTERM until the grace period ends; under tini the
# worker gets SIGTERM's default action and exits at once.
# NCCL for the GPU-to-GPU data plane between stages (from the CUDA apt repository the base
# image configures). cudarc opens `libnccl.so`, which only NCCL's development package
# provides, so link the runtime library under that name.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini ca-certificates libnccl2 \
 && rm -rf /var/lib/apt/lists/* \
 && so2=$(ldconfig -p | awk '/libnccl\.so\.2 /{print $NF; exit}') \
 && if [ -n "$so2" ] && [ ! -e "$(dirname "$so2")/libnccl.so" ]; then ln -s "$so2" "$(dirname "$so2")/libnccl.so"; fi
COPY --from=build /out/worker /usr/local/bin/worker
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
# Stage gRPC (Stage service, grpc.health.v1).
EXPOSE 7001
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/worker"]
CMD ["serve", "--help"]
