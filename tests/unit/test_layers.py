"""The layers stay apart: the domain imports no I/O library, no clock and nothing of the
service, the adapters or the wiring; nothing but the command line's entry point imports the
composition root (cistate.bootstrap)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "cistate"
# what the pure domain may import (standard library modules without I/O, and the libraries
# it is built on: pydantic for the specs, transitions for the machines, yaml/orjson parsing)
DOMAIN_MAY_IMPORT = {
    "__future__", "collections", "copy", "dataclasses", "datetime", "difflib", "enum",
    "fnmatch", "functools", "hashlib", "heapq", "hmac", "json", "random", "re", "typing", "uuid",
    "urllib.parse",  # URL parsing only (urllib.request does I/O)
    "orjson", "pydantic", "transitions", "yaml", "cistate.domain",
}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "cistate":
                found |= {f"cistate.{alias.name}" for alias in node.names}
    return found


def allowed(module: str, roots: set[str]) -> bool:
    return any(module == root or module.startswith(f"{root}.") for root in roots)


@pytest.mark.parametrize("path", sorted((PACKAGE / "domain").glob("*.py")), ids=lambda p: p.name)
def test_the_domain_imports_nothing_that_does_io(path: Path) -> None:
    wrong = sorted(m for m in imports(path) if not allowed(m, DOMAIN_MAY_IMPORT))
    assert not wrong, f"cistate/domain/{path.name} imports {wrong}"


def test_only_the_command_line_imports_the_composition_root() -> None:
    importers = sorted(
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
        if any(allowed(m, {"cistate.bootstrap"}) for m in imports(path)))
    assert importers == ["adapters/cli/main.py"]
