#!/usr/bin/env bash
# GPU check for the CUDA kernels, in two halves so the GPU host builds nothing:
#
#   scripts/gpu-check.sh prepare [DIR]   # on a build machine (no GPU needed): builds the GPU
#                                        # test binaries (kernels' parity and NCCL tests, the
#                                        # worker's GPU engine and GPU stage servers vs its CPU
#                                        # engine) and cuda-bench, compiles every
#                                        # kernel with NVRTC for common architectures into a
#                                        # kernel cache, strips, and puts it all in DIR
#   scripts/gpu-check.sh run [DIR]       # on the GPU host: runs the parity tests (--ignored
#                                        # ones included) and cuda-bench from DIR; needs only
#                                        # the NVIDIA driver (kernels come from DIR's cache)
#
# DIR defaults to target/gpu-check (small enough to carry to a GPU host: some tens of MiB).
# The worker's gpu_parity reads the golden fixtures of the checkout it runs in
# (tests/fixtures/golden, or $INDEXRELAY_FIXTURES).
# `run` writes its logs to $OUT when that is set (the device tool collects it), else DIR/results.
# Environment: NVRTC must be loadable for `prepare` (LD_LIBRARY_PATH or INDEXRELAY_NVRTC_LIB;
# .ci/run shows how to get it from PyPI); ARCHES overrides the precompiled architectures;
# BENCH_ARGS is passed to cuda-bench (default: 32K and 128K contexts, 10 repetitions).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
dir="${2:-target/gpu-check}"
arches="${ARCHES:-sm_80,sm_86,sm_89,sm_90,sm_100,sm_120}"

prepare() {
  local target="${CARGO_TARGET_DIR:-target}"
  rm -rf "$dir" && mkdir -p "$dir/bin" "$dir/kernel-cache"
  cargo build --release --locked -p kernels --features cuda --bin cuda-bench
  cp "$target/release/cuda-bench" "$dir/bin/"
  # The test binaries' paths come from cargo's JSON messages.
  cargo test --locked -p kernels --features cuda --no-run --message-format=json \
      --test cuda_parity --test cuda_parity_dsa --test cuda_device --test cuda_rows --test cuda_nccl \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("cuda_"):
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$dir/bin/$name"; done
  # The worker's GPU engine path: gpu_parity (GPU vs CPU engine on the golden fixtures, a
  # 2-stage split on one GPU), gpu_stage (two stage servers on one GPU vs the CPU engine,
  # Reconfigure on the GPU) and the worker's unit tests built with the `cuda` feature
  # (device resolution with a driver present).
  cargo test --locked -p worker --features cuda --no-run --message-format=json --test gpu_parity \
      --test gpu_stage --lib \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    name = m["target"]["name"]
    if name in ("gpu_parity", "gpu_stage"):
        print(name, m["executable"])
    elif name == "worker" and "lib" in m["target"]["kind"]:
        print("worker_cuda_unit", m["executable"])
' | while read -r name exe; do cp "$exe" "$dir/bin/$name"; done
  for t in cuda_parity cuda_parity_dsa cuda_device cuda_rows cuda_nccl gpu_parity gpu_stage worker_cuda_unit; do
    test -x "$dir/bin/$t" || { echo "gpu-check: test binary $t was not built" >&2; exit 1; }
  done
  strip "$dir"/bin/* 2>/dev/null || true
  INDEXRELAY_KERNEL_CACHE="$dir/kernel-cache" "$dir/bin/cuda-bench" --precompile "$arches" >/dev/null
  echo "gpu-check: prepared $dir ($(du -sh "$dir" | cut -f1)): $(ls "$dir/bin" | tr '\n' ' ')"
}

# cudarc loads NCCL as libnccl.so, but NCCL's packages ship libnccl.so.2 (the bare name is a
# development link): when the bare name does not load, link the first libnccl.so.2 found (the
# loader cache, CUDA's and the usual library folders, a pip `nvidia-nccl-cu*` wheel) as
# libnccl.so in a temporary folder put first on LD_LIBRARY_PATH.
nccl_path() {
  if python3 -c 'import ctypes; ctypes.CDLL("libnccl.so")' 2>/dev/null; then
    echo "gpu-check: libnccl.so loads"
    return
  fi
  local so2
  so2=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}')
  if [ -z "$so2" ]; then
    so2=$( (ls /usr/lib/x86_64-linux-gnu/libnccl.so.2 /usr/local/cuda*/lib64/libnccl.so.2 /usr/lib64/libnccl.so.2 \
              $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | \
                tr ' ' '\n' | sed 's|$|/nvidia/nccl/lib/libnccl.so.2|') 2>/dev/null || true) | head -n1)
  fi
  if [ -z "$so2" ]; then
    echo "gpu-check: no NCCL (libnccl.so.2) on this host: the NCCL tests check only the fallback"
    return
  fi
  local link_dir
  link_dir=$(mktemp -d)
  ln -s "$so2" "$link_dir/libnccl.so"
  export LD_LIBRARY_PATH="$link_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-check: linked $so2 as $link_dir/libnccl.so"
}

run() {
  test -d "$dir/bin" || { echo "gpu-check: $dir/bin is missing; run '$0 prepare' on a build machine first" >&2; exit 1; }
  local out="${OUT:-$dir/results}"
  mkdir -p "$out"
  export INDEXRELAY_KERNEL_CACHE="$dir/kernel-cache"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
  local status=0
  # gpu_parity reads the golden fixtures of this checkout (its compiled-in path is the build
  # machine's).
  export INDEXRELAY_FIXTURES="${INDEXRELAY_FIXTURES:-$PWD/tests/fixtures/golden}"
  nccl_path
  # The NCCL data-plane tests between two GPUs need two; on a one-GPU host they are not run
  # (said here, and in the log), the one-GPU NCCL and fallback checks still are.
  local gpus skip=()
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "$gpus" -lt 2 ]; then
    skip=(--skip two_gpus_exchange_hidden_states_and_indices_over_nccl --skip stage_servers_on_two_gpus_move_hidden_states_over_nccl)
    echo "gpu-check: $gpus GPU(s): the two-GPU NCCL tests are NOT RUN on this host" | tee "$out/nccl-two-gpu-not-run.txt"
  fi
  for t in cuda_device cuda_parity cuda_parity_dsa cuda_rows cuda_nccl gpu_parity gpu_stage; do
    echo "== $t"
    # --include-ignored: the parity tests are #[ignore]d where there is no GPU.
    if ! "$dir/bin/$t" --include-ignored --test-threads=1 ${skip[@]+"${skip[@]}"} 2>&1 | tee "$out/$t.log"; then
      status=1
    fi
  done
  echo "== worker_cuda_unit (gpu::device)"
  if ! "$dir/bin/worker_cuda_unit" gpu::device --test-threads=1 2>&1 | tee "$out/worker_cuda_unit.log"; then
    status=1
  fi
  echo "== cuda-bench"
  # shellcheck disable=SC2086
  if ! "$dir/bin/cuda-bench" ${BENCH_ARGS:-} 2>&1 | tee "$out/cuda-bench.md"; then
    status=1
  fi
  echo "gpu-check: logs in $out; $( [ $status = 0 ] && echo PASSED || echo FAILED )"
  return $status
}

case "$mode" in
  prepare) prepare ;;
  run) run ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
