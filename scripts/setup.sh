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
    # The CUDA build of torch, whatever pip's configuration says: a configured find-links folder of
    # CPU wheels offers torch-2.13.0+cpu, which outranks 2.13.0, and an empty PIP_FIND_LINKS="" is
    # ignored by pip. So: no configuration files (PIP_CONFIG_FILE=/dev/null), no PIP_* variables
    # (--isolated), one index: PyPI, whose Linux torch is the CUDA build (CUDA 13.0 for 2.13.0, which
    # needs an NVIDIA driver >= 580), or KEISEI_TORCH_INDEX, e.g. https://download.pytorch.org/whl/cu126
    # for an older driver. A CPU build already in the venv is replaced, and so is any build when
    # KEISEI_TORCH_INDEX names the index to take it from.
    if [[ -n "${KEISEI_TORCH_INDEX:-}" ]] \
       || ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
      PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip install -q --isolated --force-reinstall \
        --index-url "${KEISEI_TORCH_INDEX:-https://pypi.org/simple}" "torch==2.13.0"
    fi
    EXTRAS="$EXTRAS,gpu"
  else
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
  if [[ "$EXTRAS" == *gpu* ]] && ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    # nvidia-smi lists a GPU but torch cannot use it: say why and what to do (the runs would train
    # on the CPU with device auto, and stop at once with device cuda)
    "$VENV/bin/python" - <<'PY' >&2 || true
import torch
from keisei_stream.rl.device import cuda_unavailable_reason, describe_cuda
print(f"WARNING: nvidia-smi lists a GPU but torch cannot use it: {cuda_unavailable_reason()} ({describe_cuda()}).")
print("  If the driver is too old for this CUDA build: update the NVIDIA driver (CUDA 13 needs >= 580, CUDA 12.6 >= 560),")
print("  or install a build for the driver you have, e.g.")
print("    rm -f .venv/.keisei-installed; KEISEI_TORCH_INDEX=https://download.pytorch.org/whl/cu126 source scripts/setup.sh")
print("  Until then device auto trains on the CPU, and device cuda stops with this message.")
PY
  fi
fi
export PATH="$VENV/bin:$PATH"
