"""The outbox lease against real PostgreSQL: an orchestrator's rows are published once while
their confirms are slow, and still published by a relay when their orchestrator stopped or
failed to publish them."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any, cast

import pytest

import handlers
from cistate.adapters.postgres.store import Store
from cistate.adapters.rabbitmq.bus import Bus
from cistate.domain import run as r
from cistate.domain.messages import Push
from cistate.domain.pipeline import parse
from cistate.service import orchestrator as orchestrating
from cistate.service.orchestrator import Orchestrator
from cistate.service.relay import Relay

pytestmark = pytest.mark.integration

PIPELINE = parse("name: p\nsteps:\n  - {name: a, uses: noop, timeout: 0}\n", "<test>",
                 handlers.names())
GRACE = timedelta(seconds=0.6)
PUSH = Push(repo="https://git.example.com/a.git", ref="main", commit="ab" * 20)


class SlowBus:
    """Publishes (records) only once `confirm` is set, or fails if `fail` is."""

    def __init__(self, fail: bool = False) -> None:
        self.confirm = asyncio.Event()
        self.fail = fail
        self.published: list[str] = []

    async def publish(self, routing_key: str, body: Any, message_id: Any, **_: Any) -> None:
        if self.fail:
            raise ConnectionError("the broker is away")
        await self.confirm.wait()
        self.published.append(routing_key)


def as_bus(bus: SlowBus) -> Bus:
    return cast(Bus, bus)


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orchestrating, "OUTBOX_GRACE", GRACE)


async def unsent(store: Store) -> int:
    count: int = await store.pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    return count


async def test_rows_whose_confirms_are_slow_are_published_once_by_anyone(store: Store) -> None:
    bus, theirs = SlowBus(), SlowBus()
    theirs.confirm.set()
    orchestrator = Orchestrator(store, r.Decider(PIPELINE), as_bus(bus))
    own_relay = Relay(store, as_bus(bus), held=orchestrator.held)
    other_relay = Relay(store, as_bus(theirs))  # another replica's: it sees only the table
    renewing = asyncio.create_task(orchestrator.renew_leases_forever(interval=0.1))
    try:
        submitting = asyncio.create_task(orchestrator.submit(PUSH, uuid.uuid4()))
        for _ in range(50):  # committed, and waiting for its confirm
            await asyncio.sleep(0.02)
            if orchestrator.held():
                break
        assert len(orchestrator.held()) == 1
        for _ in range(4):  # four graces go by while the confirm is outstanding
            await asyncio.sleep(GRACE.total_seconds())
            assert await own_relay.publish_due() == 0
            assert await other_relay.publish_due() == 0
        bus.confirm.set()
        assert (await submitting).status == "recorded"
        await orchestrator.flush_sent()
        assert orchestrator.held() == [] and await unsent(store) == 0
        await asyncio.sleep(GRACE.total_seconds() * 1.5)
        assert await own_relay.publish_due() == 0 and await other_relay.publish_due() == 0
        assert bus.published == ["step.a.run"] and theirs.published == []
    finally:
        renewing.cancel()


async def test_a_stopped_orchestrators_rows_are_published_by_a_relay_after_the_grace(
        store: Store) -> None:
    stuck, survivor = SlowBus(), SlowBus()
    survivor.confirm.set()
    orchestrator = Orchestrator(store, r.Decider(PIPELINE), as_bus(stuck))
    renewing = asyncio.create_task(orchestrator.renew_leases_forever(interval=0.1))
    submitting = asyncio.create_task(orchestrator.submit(PUSH, uuid.uuid4()))
    for _ in range(50):
        await asyncio.sleep(0.02)
        if orchestrator.held():
            break
    assert await unsent(store) == 1
    # the process dies: no more renewals, and what it held is gone with it
    for task in (renewing, submitting):
        task.cancel()
    await asyncio.gather(renewing, submitting, return_exceptions=True)
    relay = Relay(store, as_bus(survivor))
    assert await relay.publish_due() == 0, "the lease still runs"
    await asyncio.sleep(GRACE.total_seconds() + 0.2)
    assert await relay.publish_due() == 1
    assert survivor.published == ["step.a.run"] and await unsent(store) == 0


async def test_rows_that_failed_to_publish_go_to_this_processs_relay(store: Store) -> None:
    failing, relaying = SlowBus(fail=True), SlowBus()
    relaying.confirm.set()
    orchestrator = Orchestrator(store, r.Decider(PIPELINE), as_bus(failing))
    with pytest.raises(ConnectionError):
        await orchestrator.submit(PUSH, uuid.uuid4())
    assert orchestrator.held() == []
    relay = Relay(store, as_bus(relaying), held=orchestrator.held)
    await asyncio.sleep(GRACE.total_seconds() + 0.2)
    assert await relay.publish_due() == 1 and relaying.published == ["step.a.run"]


async def test_rows_held_past_the_longest_hold_are_left_to_the_relay(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orchestrating, "OUTBOX_MAX_HOLD", timedelta(seconds=1))
    stuck, relaying = SlowBus(), SlowBus()
    relaying.confirm.set()
    orchestrator = Orchestrator(store, r.Decider(PIPELINE), as_bus(stuck))
    renewing = asyncio.create_task(orchestrator.renew_leases_forever(interval=0.1))
    submitting = asyncio.create_task(orchestrator.submit(PUSH, uuid.uuid4()))
    relay = Relay(store, as_bus(relaying), held=orchestrator.held)
    try:
        await asyncio.sleep(0.5)
        assert await relay.publish_due() == 0
        await asyncio.sleep(1.0 + GRACE.total_seconds())  # past the hold and its last lease
        assert await relay.publish_due() == 1 and relaying.published == ["step.a.run"]
    finally:
        for task in (renewing, submitting):
            task.cancel()
        await asyncio.gather(renewing, submitting, return_exceptions=True)
