#!/usr/bin/env bash
# Set up and run cistate on this machine: virtualenv, database migrations, then
# `cistate serve` (HTTP API on CISTATE_LISTEN, default 127.0.0.1:8080, orchestrator, workers).
# Pass `--role ...` to run a subset. CISTATE_PIPELINE picks the pipeline file.
# With no step settings at all (a fresh machine), it runs the quickstart instead: the
# default pipeline from a `git push` to the QA GitOps commit, against local stand-ins.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
# A fresh machine: nothing says where images, charts and GitOps commits go, so show the
# whole flow against local stand-ins (scripts/quickstart.py says what each one replaces).
if [[ $# -eq 0 && -z "${CISTATE_PIPELINE:-}" && -z "${CISTATE_REGISTRY:-}" \
      && -z "${CISTATE_CHART_REPO:-}" && -z "${CISTATE_GITOPS_REPO:-}" ]]; then
  exec .venv/bin/python scripts/quickstart.py
fi
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
