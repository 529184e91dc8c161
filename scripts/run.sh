#!/usr/bin/env bash
# Set up and run cistate on this machine: virtualenv, database migrations, then
# `cistate serve` (HTTP API on CISTATE_LISTEN, default 127.0.0.1:8080, orchestrator, workers).
# Pass `--role ...` to run a subset. CISTATE_PIPELINE picks the pipeline file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/cistate db upgrade
exec .venv/bin/cistate serve "$@"
