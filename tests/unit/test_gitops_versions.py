"""QA never moves backwards: which writes the gitops step refuses (handlers.gitops)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from handlers.gitops import held_version, moves_backwards

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("held", "version", "backwards"), [
    ("0.0.5", "0.0.3", True),
    ("1.2.0", "1.10.0", False),  # numbers, not strings: 10 > 2
    ("0.9.9", "1.0.0", False),
    ("0.0.5", "0.0.5", False),  # the same version: written (no change) as before
    (None, "0.0.1", False),  # nothing there yet
    ("latest", "0.0.1", False),  # not X.Y.Z: written as before
    ("0.0.5", "0.0.3-rc1", False),
])
def test_only_an_older_release_than_the_one_held_moves_backwards(
        held: str | None, version: str, backwards: bool) -> None:
    assert moves_backwards(held, version) is backwards


def test_the_held_version_is_the_charts_dependency(tmp_path: Path) -> None:
    (tmp_path / "requirements.yaml").write_text(yaml.safe_dump({"dependencies": [
        {"name": "redis", "version": "9.9.9"}, {"name": "app", "version": "0.0.5"}]}))
    assert held_version(tmp_path, "app", "requirements.yaml") == "0.0.5"
    assert held_version(tmp_path, "other", "requirements.yaml") is None
    assert held_version(tmp_path / "missing", "app", "requirements.yaml") is None
    (tmp_path / "requirements.yaml").write_text("dependencies: [unclosed")
    assert held_version(tmp_path, "app", "requirements.yaml") is None
