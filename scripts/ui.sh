#!/usr/bin/env bash
# The web UI's assets, built from cistate/adapters/http/ui/src/ by tsc (a strict type check)
# and esbuild (both from npm, pinned in that folder's package-lock.json) into
# cistate/adapters/http/ui/dist/, which is committed and shipped in the package:
#   bash scripts/ui.sh build   rebuild dist/ after changing src/
#   bash scripts/ui.sh check   build into a temporary folder; fail if dist/ differs from it
# dist/BUILD lists the sha256 of every source and output file: tests/unit/test_ui_build.py
# fails when src/ changed without a rebuild, or dist/ was edited by hand.
set -euo pipefail
cd "$(dirname "$0")/../cistate/adapters/http/ui"
if ! node -e '
  const wanted = require("./package.json").devDependencies;
  for (const [name, version] of Object.entries(wanted))
    if (require(`./node_modules/${name}/package.json`).version !== version) process.exit(1);
' 2>/dev/null; then
  echo "ui: npm ci in cistate/adapters/http/ui" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
fi

build() {  # build OUT_DIR
  local out=$1
  mkdir -p "$out"
  local esbuild=(node_modules/.bin/esbuild --bundle --minify --legal-comments=none
                 --charset=utf8 --log-level=warning)
  node_modules/.bin/tsc -p .  # the types (strict); esbuild only strips them
  "${esbuild[@]}" src/main.ts --format=iife --target=es2020 --outfile="$out/app.js"
  "${esbuild[@]}" src/style.css --outfile="$out/app.css"
  cp src/index.html "$out/index.html"
  {
    echo "# sha256 of the web UI's sources and of what bash scripts/ui.sh build made of them"
    (LC_ALL=C; sha256sum package.json package-lock.json tsconfig.json src/*)
    (cd "$out" && LC_ALL=C sha256sum app.css app.js index.html | sed 's|  |  dist/|')
  } >"$out/BUILD"
}

case "${1:-}" in
  build)
    build dist
    echo "ui: built $(cd dist && ls | tr '\n' ' ')" >&2
    ;;
  check)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    build "$tmp"
    if ! diff -r "$tmp" dist >&2; then
      echo "ui: dist/ is not what src/ builds to: run bash scripts/ui.sh build" >&2
      exit 1
    fi
    echo "ui: dist/ is up to date" >&2
    ;;
  *)
    echo "usage: bash scripts/ui.sh build|check" >&2
    exit 2
    ;;
esac
