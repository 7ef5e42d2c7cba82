#!/usr/bin/env bash
# Set up (first time) and start a whole local run: private Redis, learner, workers.
# Arguments go to `keisei run`; default: the quickstart config.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/setup.sh"
cd "$ROOT"
if [[ $# -eq 0 ]]; then set -- --config configs/quickstart.yaml; fi
exec keisei run "$@"
