#!/usr/bin/env bash
# Builds the CUDA kernels for the CPU emulator (emu.h) and checks them against reference
# semantics: a logic check that needs no GPU (timing and real-GPU numerics still need
# scripts/gpu-check.sh). Usage: kernels/cuda/emu/run.sh [elementwise|topk|validate|indexer|attention|moe|sampling|rows]
set -euo pipefail
cd "$(dirname "$0")"
out="${TMPDIR:-/tmp}/indexrelay-cuda-emu"
g++ -std=c++20 -O1 -ffp-contract=off -pthread -Wall -Wno-unused-function -Wno-unknown-pragmas -o "$out" check.cpp
"$out" "$@"
