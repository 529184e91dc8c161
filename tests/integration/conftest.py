"""Integration fixtures: cistate served in-process, and a producer on the bus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import pytest

from cistate import bootstrap as wiring
from cistate.adapters.postgres.store import Store
from cistate.adapters.rabbitmq.signing import SENDER_HEADER, SIGNATURE_HEADER
from cistate.config import ROLES, Settings
from cistate.domain.run import RunState, run_id_for
from tests.conftest import wait_until
from tests.integration.processes import ServeProcess

Serve = Callable[..., Awaitable[Settings]]

TERMINAL = ("succeeded", "failed", "cancelled")
READY_SECONDS = 60  # a start takes ~1 s; a loaded 2-core machine, much more


@pytest.fixture
async def serve(make_settings: Callable[..., Settings]) -> AsyncIterator[Serve]:
    """Start `cistate serve` in this process with the given pipeline; stopped after the test."""
    tasks: list[asyncio.Task[None]] = []

    async def start(pipeline_yaml: str, roles: tuple[str, ...] = ROLES,
                    settings: Settings | None = None, **overrides: Any) -> Settings:
        s = settings or make_settings(pipeline_yaml, **overrides)
        ready = asyncio.Event()
        task = asyncio.create_task(wiring.serve(s, roles, ready=ready))
        tasks.append(task)
        done, _ = await asyncio.wait([task, asyncio.create_task(ready.wait())],
                                     timeout=READY_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            tasks.remove(task)  # over already: what stopped it is raised here, once
            task.result()
        assert ready.is_set(), f"cistate serve did not get ready within {READY_SECONDS} s"
        return s

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def processes() -> Iterator[list[ServeProcess]]:
    """`cistate serve` subprocesses a test starts (ServeProcess); stopped after it."""
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        proc.stop()


class Producer:
    """Publishes on the bus as an outside producer would (its own connection)."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection, prefix: str) -> None:
        self.connection = connection
        self.prefix = prefix

    async def publish(self, routing_key: str, body: dict[str, Any] | bytes,
                      message_id: str | None, *, signed_by: Settings | None = None,
                      sender: str = "handler:test-worker") -> None:
        """Publish as an outside producer; with `signed_by`, signed with the bus key of that
        deployment as one of its roles (`sender`) would sign it."""
        channel = await self.connection.channel(publisher_confirms=True)
        try:
            exchange = await channel.get_exchange(self.prefix)
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers: dict[str, Any] = {}
            if signed_by is not None:
                signer = wiring.signer_for(signed_by)
                headers = {SENDER_HEADER: sender, SIGNATURE_HEADER: signer.sign(
                    routing_key, message_id or "", sender, payload)}
            await exchange.publish(
                aio_pika.Message(payload, message_id=message_id, headers=headers,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=routing_key)
        finally:
            await channel.close()

    async def push(self, repo: str = "https://git.example.com/team/app.git",
                   ref: str = "refs/heads/main", commit: str | None = None,
                   delivery_id: str | None = None, **extra: Any) -> uuid.UUID:
        """Publish a push; returns the id of the run it opens."""
        delivery = uuid.UUID(delivery_id) if delivery_id else uuid.uuid4()
        body = {"repo": repo, "ref": ref, "commit": commit or uuid.uuid4().hex + "00000000",
                **extra}
        await self.publish("push", body, str(delivery))
        return run_id_for(delivery)


@pytest.fixture
async def producer(amqp_url: str, bus_prefix: str) -> AsyncIterator[Producer]:
    connection = await aio_pika.connect_robust(amqp_url)
    yield Producer(connection, bus_prefix)
    await connection.close()


async def wait_for_run(store: Store, run_id: uuid.UUID, states: tuple[str, ...] = TERMINAL,
                       timeout: float = 30.0) -> RunState:
    async def check() -> RunState | None:
        state = await store.load(run_id)
        return state if state is not None and state.status in states else None

    result: RunState = await wait_until(check, timeout, what=f"run {run_id} to be {states}")
    return result
