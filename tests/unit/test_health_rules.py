"""What of an app's answer the health step shows, and which URLs it asks."""

from __future__ import annotations

from pathlib import Path

import pytest

from handlers.base import StepFailed, StepLog, StepRequest
from handlers.cd_settings import for_request
from handlers.health import printable
from handlers.sandbox import Sandbox, SandboxSettings

pytestmark = pytest.mark.unit


def test_an_answer_is_shown_as_one_short_line_of_printable_text() -> None:
    assert printable(b"Service \x1b[31mUnavailable\x00\r\n\tretry later") == (
        "Service ?[31mUnavailable? retry later")
    assert printable(b"\xff\xfe caf\xc3\xa9 \xe2\x82") == "?? café ?"
    assert printable("x" * 1000) == "x" * 200
    assert printable(bytes(range(256)) * 100, limit=50).isprintable()
    assert len(printable(bytes(range(256)) * 100, limit=50)) <= 50


def request_with(tmp_path: Path, settings: dict[str, object]) -> StepRequest:
    sandbox = Sandbox(settings=SandboxSettings(), attempt=tmp_path / "attempt", identity={})
    return StepRequest(
        run_id="r", repo="https://git.example.com/app.git", ref="refs/heads/main",
        commit="a" * 40, step="health", attempt=1, settings=settings, script=None, inputs={},
        workdir=tmp_path, log=StepLog(), sandbox=sandbox,
    )


@pytest.mark.parametrize(("settings", "problem"), [
    ({"url": "ftp://app.example.com"}, "is not an http:// or https:// URL with a host"),
    ({"url": "/health"}, "is not an http:// or https:// URL with a host"),
    ({"health_path": "@db.internal:5432/"}, "must be a path on the app's host"),
    ({"health_protocol": "gopher"}, "health_protocol"),
])
def test_the_health_url_must_name_an_http_host_and_a_path_on_it(
    tmp_path: Path, settings: dict[str, object], problem: str
) -> None:
    with pytest.raises(StepFailed) as info:
        for_request(request_with(tmp_path, settings))
    assert problem in info.value.message and info.value.retryable is False
