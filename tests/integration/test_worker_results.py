"""What the worker reports for a handler's outcome (no broker needed: Worker.execute), here a
handler that finds nothing to do: the result says skipped, with the reason, masked."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
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


class _RecordingBus:
    """What Worker.on_command uses of the bus: the result published, the delivery acked;
    `seen` holds, for each publish, whether the attempt's folder was still on disk."""

    def __init__(self) -> None:
        self.attempts: list[Path] = []
        self.seen: list[bool] = []
        self.acked: list[Any] = []
        self.acker = self

    def verified(self, message: Any) -> str:
        return "system"

    async def publish(self, routing_key: str, body: bytes, message_id: str,
                      sender: str) -> None:
        self.seen.append(all(path.exists() for path in self.attempts))

    def ack(self, message: Any) -> None:
        self.acked.append(message)


async def test_the_result_goes_out_before_the_attempts_workspace_is_deleted_then_it_is(
        tmp_path: Path) -> None:
    bus = _RecordingBus()

    async def leave_files(request: StepRequest) -> dict[str, Any]:
        bus.attempts.append(request.sandbox.attempt)
        tree = request.workdir / "node_modules" / "a"
        tree.mkdir(parents=True)
        (tree / "index.js").write_text("module.exports = 1\n")
        return {}

    worker = Worker(cast(Any, bus), tmp_path, lambda name: leave_files, live_logs=False)
    command = StepCommand(run_id=uuid.uuid4(), step="build", attempt=1, uses="build",
                          repo="https://git.example.com/a.git", ref="refs/heads/main",
                          commit="ab" * 20)
    message = SimpleNamespace(routing_key="step.build.run", message_id=str(uuid.uuid4()),
                              body=command.model_dump_json().encode())
    await worker.on_command(cast(Any, message))
    assert bus.seen == [True], "the result is published while the workspace is still there"
    assert bus.acked == [message]
    [attempt] = bus.attempts
    assert not attempt.exists() and not attempt.parent.exists(), "then both are removed"


async def test_execute_returns_once_the_attempts_workspace_is_deleted(tmp_path: Path) -> None:
    attempts: list[Path] = []

    async def leave_files(request: StepRequest) -> dict[str, Any]:
        attempts.append(request.sandbox.attempt)
        (request.workdir / "out.txt").write_text("built\n")
        return {}

    worker = Worker(cast(Any, None), tmp_path, lambda name: leave_files)
    command = StepCommand(run_id=uuid.uuid4(), step="build", attempt=1, uses="build",
                          repo="https://git.example.com/a.git", ref="refs/heads/main",
                          commit="ab" * 20)
    assert (await worker.execute(command)).status == "succeeded"
    [attempt] = attempts
    assert not attempt.parent.exists()


async def test_a_cancelled_attempt_deletes_its_workspace_before_the_cancellation_goes_on(
        tmp_path: Path) -> None:
    attempts: list[Path] = []
    started = asyncio.Event()

    async def hang(request: StepRequest) -> dict[str, Any]:
        attempts.append(request.sandbox.attempt)
        (request.workdir / "out.txt").write_text("half built\n")
        started.set()
        await asyncio.Event().wait()
        return {}

    worker = Worker(cast(Any, None), tmp_path, lambda name: hang)
    command = StepCommand(run_id=uuid.uuid4(), step="build", attempt=1, uses="build",
                          repo="https://git.example.com/a.git", ref="refs/heads/main",
                          commit="ab" * 20)
    task = asyncio.create_task(worker.execute(command))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [attempt] = attempts
    assert not attempt.parent.exists()
