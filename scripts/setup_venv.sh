#!/usr/bin/env bash
# Creates (or refreshes) the project's Python environment with the pinned packages of
# python/requirements.txt, including the onnxruntime wheel whose libonnxruntime.so the Rust
# side loads, and those of python/requirements-deploy.txt (the deploy/ manifests' validator).
# Idempotent: does nothing when the venv already matches the requirements files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDPO_VENV:-$HOME/.cache/edpo/venv}"

# Installs requirements file $1 unless the venv's stamp $2 says it is installed already.
sync() {
  if [ -x "$VENV/bin/python" ] && cmp -s "$1" "$2"; then
    return 0
  fi
  command -v python3 >/dev/null || { echo "error: python3 is needed for the export pipeline (apt-get install python3 python3-venv)" >&2; exit 2; }
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with pinned packages (first time: a few minutes, ~6 GB for torch)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  echo "[setup] installing $1 into $VENV" >&2
  "$VENV/bin/python" -m pip install -q -r "$1"
  cp "$1" "$2"
  echo "[setup] venv ready: $VENV" >&2
}

sync python/requirements.txt "$VENV/.edpo-requirements.txt"
sync python/requirements-deploy.txt "$VENV/.edpo-requirements-deploy.txt"
