#!/usr/bin/env bash
# Set up and run cistate on this machine: virtualenv, database migrations, then
# `cistate serve` (HTTP API on CISTATE_LISTEN, default 127.0.0.1:8080, orchestrator, workers).
# Pass `--role ...` to run a subset. CISTATE_PIPELINE picks the pipeline file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/cistate db upgrade
# One machine, one user: reads (runs, events, logs) open without a token. `cistate serve`
# alone, the chart and compose.yaml keep them closed.
export CISTATE_API_READ_AUTH="${CISTATE_API_READ_AUTH:-0}"
if [[ "$CISTATE_API_READ_AUTH" == 0 ]]; then
  echo "run: reads of the HTTP API are open without a token (CISTATE_API_READ_AUTH=0, a local setup)" >&2
fi
exec .venv/bin/cistate serve "$@"
