#!/usr/bin/env bash
# Set up (first time) and run the whole test suite (unit tests on fakeredis, integration
# tests on a real redis-server that the suite starts itself). Arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
