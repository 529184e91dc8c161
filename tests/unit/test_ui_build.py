"""The web UI's committed build (cistate/adapters/http/ui/dist/) is what its sources build
to: dist/BUILD, written by `bash scripts/ui.sh build`, holds the sha256 of every source and
output file, so a source changed without a rebuild, or an output edited by hand, fails here
without Node. (tests/e2e/test_ui.py also rebuilds with esbuild and compares the bytes.)"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest

from cistate.adapters.http import pages

pytestmark = pytest.mark.unit

UI = pages.DIST.parent
ROOT = Path(__file__).resolve().parents[2]


def recorded() -> dict[str, str]:
    lines = (pages.DIST / "BUILD").read_text().splitlines()
    return {name: digest for digest, name in
            (line.split("  ", 1) for line in lines if line and not line.startswith("#"))}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_committed_build_is_made_from_the_sources_as_they_are() -> None:
    build = recorded()
    sources = {f"src/{path.name}" for path in (UI / "src").iterdir()}
    sources |= {"package.json", "package-lock.json", "tsconfig.json"}
    listed = {name for name in build if not name.startswith("dist/")}
    assert listed == sources, ("sources added or removed since the last build: run "
                               "bash scripts/ui.sh build")
    stale = sorted(name for name in sources if sha256(UI / name) != build[name])
    assert not stale, f"changed since the last build: {stale}; run bash scripts/ui.sh build"


def test_the_built_files_are_as_the_build_wrote_them() -> None:
    build = recorded()
    outputs = {name.removeprefix("dist/") for name in build if name.startswith("dist/")}
    assert outputs == {"app.js", "app.css", "index.html"}
    edited = sorted(name for name in outputs if sha256(pages.DIST / name) != build[f"dist/{name}"])
    assert not edited, f"dist/ edited by hand: {edited}; change src/ and rebuild instead"
    assert set(pages.ASSETS) <= outputs


def test_the_built_files_are_package_data_of_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "adapters/http/ui/dist/*" in config["tool"]["setuptools"]["package-data"]["cistate"]


def test_the_page_loads_nothing_from_outside_the_service() -> None:
    html = (pages.DIST / "index.html").read_text()
    bundle = (pages.DIST / "app.js").read_text() + (pages.DIST / "app.css").read_text()
    for text in (html, bundle):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text and "@import" not in text
    assert 'src="/ui/app.js"' in html and 'href="/ui/app.css"' in html
