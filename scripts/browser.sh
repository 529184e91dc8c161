#!/usr/bin/env bash
# The e2e tier's browser: Debian's Chromium and Playwright's driver library (playwright-core,
# which drives a browser it is given and never downloads one), installed from
# tests/browser/package-lock.json. Prints the Chromium it installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
  echo "browser: apt-get install chromium" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
    >/tmp/cistate-browser-apt.log 2>&1 || { tail -20 /tmp/cistate-browser-apt.log >&2; exit 1; }
fi
wanted=$(node -p 'require("./tests/browser/package.json").dependencies["playwright-core"]')
have=$(node -p 'try { require("./tests/browser/node_modules/playwright-core/package.json").version } catch { "" }')
if [ "$have" != "$wanted" ]; then
  echo "browser: npm ci in tests/browser" >&2
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
command -v chromium
