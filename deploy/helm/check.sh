#!/usr/bin/env bash
# Checks the Helm chart without a helm binary: renders every template for the default values
# and each indexrelay/ci/*-values.yaml with tools/ (a Go text/template subset faithful to
# Helm), validates the manifests with `kubernetes-validate --strict`, checks that bad values
# fail values.schema.json, and that every flag the chart passes exists in the binaries.
#
#   bash deploy/helm/check.sh [pytest args]
#
# Environment: INDEXRELAY_BIN_DIR (folder with the coordinator and worker binaries; default
# ${CARGO_TARGET_DIR:-target}/debug, built here when missing), HELM_CHECK_VENV (default
# target/helm-check-venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${HELM_CHECK_VENV:-$root/target/helm-check-venv}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/deploy/helm/tools/requirements.txt"

target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
bin_dir="${INDEXRELAY_BIN_DIR:-$target/debug}"
if [ ! -x "$bin_dir/coordinator" ] || [ ! -x "$bin_dir/worker" ]; then
  echo "building the coordinator and worker binaries (their --help is checked against the chart)" >&2
  (cd "$root" && cargo build --locked -q -p coordinator -p worker --bin coordinator --bin worker)
  bin_dir="$target/debug"
fi
export INDEXRELAY_BIN_DIR="$bin_dir"

cd "$root/deploy/helm/tools"
exec "$venv/bin/python" -m pytest "$@"
