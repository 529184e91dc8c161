"""Bad input is refused at the door, once, with a reason a person can act on, and nothing is
lost or held up: real RabbitMQ and PostgreSQL, a real `cistate serve` in this process."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aio_pika
import pytest

from cistate.adapters.postgres.store import Store
from cistate.adapters.rabbitmq.bus import REASON_HEADER
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

ONE_STEP = """
name: one-step
steps:
  - name: only
    uses: script
    run: echo ok
"""

WAITING = """
name: waiting
steps:
  - name: wait
    uses: script
    run: sleep 30
"""

GOOD = {"repo": "https://git.example.com/team/app.git", "ref": "refs/heads/main"}


async def dead_letters(amqp_url: str, prefix: str, count: int, settle: float = 1.0
                       ) -> list[tuple[str, bytes]]:
    """The reason and body of the dead letters, once `count` arrived and `settle` seconds
    passed without more (so a redelivery loop would show as extra letters)."""
    connection = await aio_pika.connect(amqp_url)
    found: list[tuple[str, bytes]] = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(f"{prefix}.dead")
        quiet_since = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                if len(found) >= count:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > settle:
                        break
                await asyncio.sleep(0.05)
                continue
            quiet_since = None
            found.append((str((message.headers or {}).get(REASON_HEADER)), message.body))
            await message.ack()
    finally:
        await connection.close()
    return found


async def test_a_nul_in_a_push_is_dead_lettered_once_and_holds_up_nothing(
        serve: Serve, producer: Producer, store: Store, amqp_url: str, bus_prefix: str
) -> None:
    await serve(ONE_STEP)
    poisoned = {**GOOD, "repo": "https://git.example.com/team/a\u0000pp.git",
                "commit": "ab" * 20}
    for _ in range(20):
        await producer.publish("push", poisoned, str(uuid.uuid4()))
    started = time.monotonic()
    good = await producer.push(**GOOD)
    run = await wait_for_run(store, good)
    assert run.status == "succeeded"
    assert time.monotonic() - started < 10, "poisoned pushes held up a good one"

    letters = await dead_letters(amqp_url, bus_prefix, 20)
    assert len(letters) == 20, "each poisoned push is dead-lettered once, not redelivered"
    assert all("repo: contains a NUL character" in reason for reason, _ in letters)
    assert [r.id for r in await store.list_runs()] == [good]


async def test_a_lone_surrogate_or_a_huge_number_is_refused_with_the_reason(
        serve: Serve, producer: Producer, store: Store, amqp_url: str, bus_prefix: str
) -> None:
    settings = await serve(ONE_STEP)
    surrogate = json.dumps({**GOOD, "commit": "ab" * 20}).replace(
        "app.git", "app\\ud800.git").encode()
    await producer.publish("push", surrogate, str(uuid.uuid4()))
    run_id = uuid.uuid4()
    await producer.publish("control", {"run_id": str(run_id), "action": "retry",
                                       "attempt": 10**30}, str(uuid.uuid4()),
                           signed_by=settings)
    letters = await dead_letters(amqp_url, bus_prefix, 2)
    reasons = sorted(reason for reason, _ in letters)
    assert len(reasons) == 2
    assert any("surrogate" in reason for reason in reasons), reasons
    assert any("attempt" in reason for reason in reasons), reasons
    assert await store.list_runs() == []


async def test_a_push_naming_a_local_path_is_refused_unless_the_deployment_allows_it(
        serve: Serve, producer: Producer, store: Store, amqp_url: str, bus_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await serve(ONE_STEP)
    for repo in ("/srv/git/secret-infra.git", "file:///srv/git/secret-infra.git"):
        await producer.push(repo=repo)
    letters = await dead_letters(amqp_url, bus_prefix, 2)
    assert len(letters) == 2
    assert all("a path on the worker's disk" in reason and "CISTATE_ALLOW_LOCAL_REPOS"
               in reason for reason, _ in letters)
    assert await store.list_runs() == []


async def test_local_repos_are_accepted_when_allowed(
        serve: Serve, producer: Producer, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CISTATE_ALLOW_LOCAL_REPOS", "1")
    await serve(ONE_STEP)
    run = await wait_for_run(store, await producer.push(repo="/srv/git/app.git"))
    assert run.status == "succeeded"


def result_body(run_id: uuid.UUID, step: str, attempt: int, **extra: Any) -> dict[str, Any]:
    return {"run_id": str(run_id), "step": step, "attempt": attempt, "status": "succeeded",
            **extra}


async def test_a_result_for_a_step_that_is_not_running_is_recorded_by_identity_and_size(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve(WAITING)
    run_id = await producer.push(**GOOD)
    await wait_for_run(store, run_id, states=("running",))
    big_outputs = {"blob": "x" * 60_000}
    await producer.publish("step.wait.result",
                           result_body(run_id, "wait", 7, outputs=big_outputs,
                                       log="L" * 500_000), str(uuid.uuid4()),
                           signed_by=settings)

    async def rejected() -> list[Any]:
        return [e for e in await store.events(run_id) if e.type == "message.rejected"]

    for _ in range(100):
        found = await rejected()
        if found:
            break
        await asyncio.sleep(0.1)
    [event] = found
    kept = event.data["message"]
    assert kept["step"] == "wait" and kept["attempt"] == 7 and kept["status"] == "succeeded"
    assert kept["outputs_bytes"] > 60_000 and kept["log_chars"] == 500_000
    stored = json.dumps(event.data)
    assert "xxxxxxxxxx" not in stored and "LLLLLLLLLL" not in stored
    assert len(stored) < 2_000


async def test_an_oversized_result_is_dead_lettered_and_nothing_is_stored(
        serve: Serve, producer: Producer, store: Store, amqp_url: str, bus_prefix: str
) -> None:
    settings = await serve(WAITING)
    run_id = await producer.push(**GOOD)
    await wait_for_run(store, run_id, states=("running",))
    await producer.publish("step.wait.result",
                           result_body(run_id, "wait", 1, outputs={"blob": "y" * 70_000}),
                           str(uuid.uuid4()), signed_by=settings)
    await producer.publish("step.wait.result",
                           result_body(run_id, "wait", 1, log="z" * 9_000_000),
                           str(uuid.uuid4()), signed_by=settings)
    letters = await dead_letters(amqp_url, bus_prefix, 2)
    reasons = " | ".join(reason for reason, _ in letters)
    assert len(letters) == 2
    assert "outputs are" in reasons and "at most 65536" in reasons
    assert "log" in reasons
    types = [e.type for e in await store.events(run_id)]
    assert types == ["run.requested", "step.started"], "nothing of either result is stored"
