#!/usr/bin/env bash
# Creates .venv with everything keisei-stream needs (idempotent, quick when already done).
# Sourced by run.sh and test.sh. torch is pinned to 2.13.0: on a machine where nvidia-smi lists a
# GPU, the CUDA build from PyPI (and nvidia-ml-py for the GPU figures); elsewhere (CI, laptops) the
# CPU wheel, never the CUDA packages.
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
  EXTRAS="test,tensorboard,docs"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    # PyPI's Linux build of torch is the CUDA one; local CPU wheels (find-links) are not looked at,
    # and a CPU build already in the venv is replaced
    if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
      PIP_FIND_LINKS="" "$VENV/bin/python" -m pip install -q --force-reinstall "torch==2.13.0"
    fi
    EXTRAS="$EXTRAS,gpu"
  else
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
