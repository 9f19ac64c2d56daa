#!/usr/bin/env bash
# Creates (or refreshes) the project's Python environment with the pinned packages of
# python/requirements.txt, including the onnxruntime wheel whose libonnxruntime.so the Rust
# side loads. Idempotent: does nothing when the venv already matches the requirements file.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDPO_VENV:-$HOME/.cache/edpo/venv}"
REQ=python/requirements.txt
STAMP="$VENV/.edpo-requirements.txt"
if [ -x "$VENV/bin/python" ] && cmp -s "$REQ" "$STAMP"; then
  exit 0
fi
command -v python3 >/dev/null || { echo "error: python3 is needed for the export pipeline (apt-get install python3 python3-venv)" >&2; exit 2; }
echo "[setup] creating $VENV with pinned packages (first time: a few minutes, ~6 GB for torch)" >&2
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REQ"
cp "$REQ" "$STAMP"
echo "[setup] venv ready: $VENV" >&2
