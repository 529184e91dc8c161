#!/usr/bin/env bash
# Set up and run the whole test suite: lint and type checks, then the unit, integration and
# end-to-end tiers against real PostgreSQL, RabbitMQ, git, npm, registry, buildah, helm and
# kube-apiserver (installed and started by the project's own scripts).
# Extra arguments go to pytest (e.g. `-m unit`, `-k retry`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
if [ -x tests/infra/install.sh ]; then bash tests/infra/install.sh; fi

echo "== ruff" >&2
.venv/bin/ruff check cistate handlers
echo "== mypy --strict" >&2
.venv/bin/mypy cistate handlers
echo "== pytest" >&2
# pytest exits 5 when it collected no test: that is a failure here, as is any failed test.
exec .venv/bin/pytest "$@"
