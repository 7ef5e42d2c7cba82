#!/usr/bin/env bash
# Creates .venv with everything keisei-stream needs (idempotent, quick when already done).
# Sourced by run.sh and test.sh. torch is pinned to 2.13.0 so pip takes the CPU wheel and
# never pulls the CUDA packages of a newer release.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KEISEI_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.keisei-installed"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
if [[ ! -f "$STAMP" || "$ROOT/pyproject.toml" -nt "$STAMP" ]]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,tensorboard]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
