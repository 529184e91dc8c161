"""The event store's batch append against real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

import handlers
from cistate import run as r
from cistate.messages import Push
from cistate.pipeline import parse
from cistate.store import Append, Conflict, Duplicate, Store

pytestmark = pytest.mark.integration

PIPELINE = parse("name: p\nsteps:\n  - {name: a, uses: noop}\n", "<test>", handlers.names())


def decided(delivery: uuid.UUID) -> Append:
    """The decision a new push makes, ready to store."""
    state = r.RunState(id=r.run_id_for(delivery))
    now = datetime.now(UTC)
    push = Push(repo="https://git.example.com/a.git", ref="main", commit="ab" * 20)
    decision = r.Decider(PIPELINE).decide(state, push, delivery, now)
    for event in decision.events:
        r.apply(state, event.type, event.data, now)
    return Append(state, 0, decision.events, decision.outgoing, delivery, now, None)


async def test_a_batch_stores_every_decision_and_gives_a_collision_to_its_own_message(
        store: Store) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    assert not any(isinstance(x, Exception) for x in await store.append_many([decided(first)]))

    again = decided(first)  # a redelivery of the first push: same message id, same run
    stale = decided(uuid.uuid4())
    stale_conflict = Append(stale.state, 0, stale.events, stale.outgoing,
                            uuid.uuid4(), stale.now, None)  # same run and seq, other message
    results = await store.append_many([decided(second), again, stale, stale_conflict])

    assert isinstance(results[0], list) and [row.routing_key for row in results[0]] \
        == ["step.a.run"]
    assert isinstance(results[1], Duplicate | Conflict)
    assert isinstance(results[2], list)
    assert isinstance(results[3], Conflict)
    for delivery in (first, second):
        run = await store.load(r.run_id_for(delivery))
        assert run is not None and run.status == "running"
        assert [e.seq for e in await store.events(run.id)] == [1, 2]
    assert await store.load(stale.state.id) is not None
    assert len(await store.events(stale.state.id)) == 2, "the conflicting decision wrote nothing"
