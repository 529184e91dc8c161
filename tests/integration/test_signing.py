"""Forged messages change nothing: anyone who can publish on the bus tried these, and each
is refused (dead-lettered with the reason, or recorded as rejected), with nothing run and
nothing changed. Real RabbitMQ, PostgreSQL and `cistate serve` in this process."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from cistate.adapters.postgres.store import Store
from cistate.adapters.rabbitmq.bus import REASON_HEADER
from cistate.adapters.rabbitmq.signing import SENDER_HEADER, SIGNATURE_HEADER, Signer
from cistate.config import Settings
from tests.conftest import free_port
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration


async def dead_reasons(amqp_url: str, prefix: str, count: int) -> list[str]:
    connection = await aio_pika.connect(amqp_url)
    reasons: list[str] = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(f"{prefix}.dead")
        deadline = time.monotonic() + 20
        while len(reasons) < count and time.monotonic() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            reasons.append(str((message.headers or {}).get(REASON_HEADER)))
            await message.ack()
    finally:
        await connection.close()
    return reasons


def command(run_id: uuid.UUID, step: str, marker: Path) -> dict[str, Any]:
    return {"run_id": str(run_id), "step": step, "attempt": 1, "uses": "script",
            "run": f"touch {marker}", "repo": "https://git.example.com/a.git",
            "ref": "refs/heads/main", "commit": "ab" * 20}


async def test_a_forged_command_runs_nothing(
        serve: Serve, producer: Producer, amqp_url: str, bus_prefix: str,
        visible_dir: Path, tmp_path: Path) -> None:
    settings = await serve("""
name: tests-only
steps:
  - name: test
    uses: noop
""")
    markers = [visible_dir / f"ran-{i}" for i in range(3)]
    run_id = uuid.uuid4()
    # unsigned; signed with another key; signed with the key but not by the orchestrator
    await producer.publish("step.test.run", command(run_id, "test", markers[0]),
                           str(uuid.uuid4()))
    body = command(run_id, "test", markers[1])
    message_id = str(uuid.uuid4())
    await publish_signed(producer, Signer(b"not-the-deployments-key-42"), "step.test.run",
                         body, message_id, "system")
    await producer.publish("step.test.run", command(run_id, "test", markers[2]),
                           str(uuid.uuid4()), signed_by=settings, sender="handler:rogue")

    reasons = await dead_reasons(amqp_url, bus_prefix, 3)
    assert len(reasons) == 3, reasons
    assert any("must be signed" in r for r in reasons), reasons
    assert any("signature does not match" in r for r in reasons), reasons
    assert any("not 'handler:rogue'" in r for r in reasons), reasons
    assert all("nothing was run" in r for r in reasons)
    await asyncio.sleep(0.5)
    assert not any(marker.exists() for marker in markers), "a forged command ran"


async def publish_signed(producer: Producer, signer: Signer, routing_key: str,
                         body: dict[str, Any], message_id: str, sender: str) -> None:
    import json

    payload = json.dumps(body).encode()
    channel = await producer.connection.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(producer.prefix)
        await exchange.publish(aio_pika.Message(
            payload, message_id=message_id, headers={
                SENDER_HEADER: sender,
                SIGNATURE_HEADER: signer.sign(routing_key, message_id, sender, payload)}),
            routing_key=routing_key)
    finally:
        await channel.close()


FAILING_THEN_RELEASE = """
name: guarded
steps:
  - name: test
    uses: script
    run: sleep 2; echo "tests failed" >&2; exit 1
  - name: release
    uses: script
    run: echo released
"""


async def test_a_forged_result_cannot_pass_a_failing_step(
        serve: Serve, producer: Producer, store: Store, amqp_url: str, bus_prefix: str
) -> None:
    settings = await serve(FAILING_THEN_RELEASE)
    run_id = await producer.push()
    await wait_for_run(store, run_id, states=("running",))
    forged = {"run_id": str(run_id), "step": "test", "attempt": 1, "status": "succeeded",
              "outputs": {"image_digest": "sha256:" + "0" * 64}}
    await producer.publish("step.test.result", forged, str(uuid.uuid4()))  # unsigned
    # signed with the key (a worker's), but without the attempt's token
    await producer.publish("step.test.result", forged, str(uuid.uuid4()), signed_by=settings)

    run = await wait_for_run(store, run_id)
    assert run.status == "failed" and run.steps["test"].state == "failed"
    assert "release" not in run.steps or run.steps["release"].state != "succeeded"
    events = await store.events(run_id)
    assert not any(e.type == "step.succeeded" for e in events), "the forged result counted"
    rejected = [e for e in events if e.type == "message.rejected"]
    assert len(rejected) == 1 and "token" in rejected[0].data["reason"]
    reasons = await dead_reasons(amqp_url, bus_prefix, 1)
    assert reasons and "must be signed" in reasons[0]


async def test_a_forged_control_message_names_no_actor_of_its_own(
        serve: Serve, producer: Producer, store: Store, amqp_url: str, bus_prefix: str
) -> None:
    settings = await serve(FAILING_THEN_RELEASE)
    run_id = await producer.push()
    await wait_for_run(store, run_id)
    retry = {"run_id": str(run_id), "action": "retry", "reason": "trust me"}
    await producer.publish("control", {**retry, "actor": "api:alice"}, str(uuid.uuid4()),
                           signed_by=settings, sender="api:alice")
    await producer.publish("control", retry, str(uuid.uuid4()))  # unsigned
    reasons = await dead_reasons(amqp_url, bus_prefix, 2)
    assert len(reasons) == 2
    assert any("actor" in r and "schema" in r for r in reasons), reasons
    assert any("must be signed" in r for r in reasons), reasons
    types = [e.type for e in await store.events(run_id)]
    assert "run.retried" not in types

    # signed by a role, the retry counts, credited to the signed sender
    await producer.publish("control", retry, str(uuid.uuid4()), signed_by=settings,
                           sender="cli:operator")
    for _ in range(100):
        retried = [e for e in await store.events(run_id) if e.type == "run.retried"]
        if retried:
            break
        await asyncio.sleep(0.1)
    assert retried and retried[0].data["actor"] == "cli:operator"
    assert retried[0].meta["actor"] == "cli:operator"


async def test_a_push_cannot_carry_a_command_a_script_or_an_actor(
        serve: Serve, producer: Producer, store: Store, amqp_url: str, bus_prefix: str
) -> None:
    await serve(FAILING_THEN_RELEASE)
    base = {"repo": "https://git.example.com/a.git", "ref": "refs/heads/main",
            "commit": "cd" * 20}
    for extra in ({"uses": "script"}, {"run": "id"}, {"actor": "api:alice"}):
        await producer.publish("push", {**base, **extra}, str(uuid.uuid4()))
    reasons = await dead_reasons(amqp_url, bus_prefix, 3)
    assert len(reasons) == 3 and all("schema" in r for r in reasons), reasons
    assert await store.list_runs() == []


def key_of(settings: Settings) -> bytes:
    return (settings.workdir / "bus.key").read_bytes().strip()


async def test_serve_makes_a_private_key_file_once_and_keeps_it(serve: Serve) -> None:
    settings = await serve(FAILING_THEN_RELEASE)
    path = settings.workdir / "bus.key"
    assert path.stat().st_mode & 0o777 == 0o600
    first = key_of(settings)
    assert len(first) >= 32
    again = settings.model_copy(update={"listen": f"127.0.0.1:{free_port()}"})
    await serve(FAILING_THEN_RELEASE, settings=again)  # a second role on this machine
    assert key_of(settings) == first, "a second start uses the key that is there"
