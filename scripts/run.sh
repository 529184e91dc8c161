#!/usr/bin/env bash
# Set up and run cistate on this machine: virtualenv, database migrations, then
# `cistate serve` (HTTP API on CISTATE_LISTEN, default 127.0.0.1:8080, orchestrator, workers).
# Pass `--role ...` to run a subset. CISTATE_PIPELINE picks the pipeline file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/cistate db upgrade
# The steps' settings, checked before anything starts (a worker would refuse to start).
case " $* " in
  *" --role "*) [[ " $* " == *" --role worker "* ]] && check=1 || check=0 ;;
  *) check=1 ;;
esac
if ((check)) && ! problems=$(.venv/bin/cistate check 2>&1); then
  printf '%s\n' "$problems" | sed 's/^cistate: /run: /' >&2
  cat >&2 <<'HELP'
run: the pipeline's steps are not configured for this machine (see above). Set the
run: variables of README "Step settings" (CISTATE_REGISTRY, CISTATE_CHART_REPO, ...), or
run: try cistate on a pipeline that needs none: CISTATE_PIPELINE=examples/hello.yaml bash scripts/run.sh
HELP
  exit 2
fi
# One machine, one user: reads (runs, events, logs) open without a token. `cistate serve`
# alone, the chart and compose.yaml keep them closed.
export CISTATE_API_READ_AUTH="${CISTATE_API_READ_AUTH:-0}"
if [[ "$CISTATE_API_READ_AUTH" == 0 ]]; then
  echo "run: reads of the HTTP API are open without a token (CISTATE_API_READ_AUTH=0, a local setup)" >&2
fi
exec .venv/bin/cistate serve "$@"
