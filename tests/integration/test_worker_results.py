"""What the worker reports for a handler's outcome (no broker needed: Worker.execute), here a
handler that finds nothing to do: the result says skipped, with the reason, masked."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, cast

import pytest

from cistate.domain.messages import StepCommand
from cistate.service.worker import Worker
from handlers.base import Handler, StepRequest, StepSkipped

pytestmark = pytest.mark.integration


async def test_a_handler_that_skips_gives_a_skipped_result_with_its_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISTATE_SECRET_TOKEN", "tok-3f9a-very-secret")

    async def nothing_to_do(request: StepRequest) -> dict[str, Any]:
        raise StepSkipped("QA already holds 0.0.5 (token tok-3f9a-very-secret)",
                          outputs={"held_version": "0.0.5"})

    def load(name: str) -> Handler:
        return nothing_to_do

    worker = Worker(cast(Any, None), tmp_path, load)
    command = StepCommand(run_id=uuid.uuid4(), step="gitops", attempt=1, uses="noop",
                          repo="https://git.example.com/a.git", ref="refs/heads/main",
                          commit="ab" * 20, secrets=[{"name": "TOKEN"}])
    result = await worker.execute(command)
    assert result.status == "skipped"
    assert result.reason == "QA already holds 0.0.5 (token ***)"
    assert result.outputs == {"held_version": "0.0.5"}
    assert result.error is None
    assert "skipped: QA already holds 0.0.5" in (result.log or "")


@pytest.mark.parametrize("untrusted", [False, True])
async def test_a_step_gets_the_workers_cache_folder_and_whether_its_run_is_a_forks(
        tmp_path: Path, untrusted: bool) -> None:
    seen: list[StepRequest] = []

    async def record(request: StepRequest) -> dict[str, Any]:
        seen.append(request)
        return {}

    worker = Worker(cast(Any, None), tmp_path, lambda name: record)
    command = StepCommand(run_id=uuid.uuid4(), step="test", attempt=1, uses="noop",
                          repo="https://git.example.com/a.git", ref="refs/heads/main",
                          commit="ab" * 20, untrusted=untrusted)
    assert (await worker.execute(command)).status == "succeeded"
    [request] = seen
    assert request.cache_root == tmp_path / "cache" and request.untrusted is untrusted
    assert tmp_path in request.sandbox.hidden, "the caches are hidden with the workdir"
