"""The event store's batch append against real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

import handlers
from cistate.adapters.postgres.store import Append, Conflict, Duplicate, Store, connect
from cistate.domain import run as r
from cistate.domain.messages import Push
from cistate.domain.pipeline import parse

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


@pytest.mark.parametrize(("parts", "batch"), [(1, 500), (2, 3), (3, 2)])
async def test_rebuild_over_run_id_ranges_repairs_exactly_the_damaged_rows_in_id_order(
        store: Store, parts: int, batch: int) -> None:
    items = [decided(uuid.uuid4()) for _ in range(16)]
    assert not any(isinstance(x, Exception) for x in await store.append_many(items))
    ids = sorted(item.state.id for item in items)
    # damage rows spread over the id space: both ends and the middle
    damaged = [ids[0], ids[5], ids[9], ids[15]]
    await store.pool.execute("DELETE FROM runs WHERE id = $1", damaged[0])
    await store.pool.execute(
        "UPDATE runs SET state = 'failed', steps = '[]' WHERE id = ANY($1::uuid[])", damaged[1:])

    report = await store.rebuild_projections(batch=batch, parts=parts)

    assert report.runs == 16 and report.events == 32
    assert report.differed == damaged  # in run_id order, whichever range found them
    for run_id in damaged:
        run = await store.load(run_id)
        assert run is not None and run.status == "running" and run.steps["a"].state == "running"
    again = await store.rebuild_projections(batch=batch, parts=parts)
    assert again.differed == [] and again.runs == 16


async def test_rebuild_on_a_pool_too_small_for_two_ranges_still_finishes(
        store: Store, database_url: str) -> None:
    items = [decided(uuid.uuid4()) for _ in range(6)]
    assert not any(isinstance(x, Exception) for x in await store.append_many(items))
    await store.pool.execute("TRUNCATE runs")
    small = await connect(database_url, min_size=1, max_size=2)
    try:
        report = await asyncio.wait_for(small.rebuild_projections(parts=2), timeout=20)
    finally:
        await small.close()
    assert report.runs == 6 and len(report.differed) == 6


async def test_a_run_that_does_not_fold_is_reported_and_the_rest_is_rebuilt(
        store: Store) -> None:
    items = [decided(uuid.uuid4()) for _ in range(12)]
    assert not any(isinstance(x, Exception) for x in await store.append_many(items))
    ids = sorted(item.state.id for item in items)
    await store.pool.execute("UPDATE runs SET state = 'failed' WHERE id = ANY($1::uuid[])",
                             [ids[0], ids[-1]])
    # a damaged first event (no fields) in the upper half, stored with its chain (as a
    # faulty writer would have stored it, not an edit): that run cannot be folded
    await store.pool.execute(
        "UPDATE events SET data = '{}', hash = cistate_event_hash(NULL, cistate_event_canonical("
        " run_id, seq, type, '{}', meta, message_id, recorded_at)) WHERE run_id = $1 AND seq = 1",
        ids[-1])
    await store.pool.execute(
        "UPDATE events e SET hash = cistate_event_hash(p.hash, cistate_event_canonical("
        " e.run_id, e.seq, e.type, e.data, e.meta, e.message_id, e.recorded_at))"
        " FROM events p WHERE e.run_id = $1 AND e.seq = 2 AND p.run_id = $1 AND p.seq = 1",
        ids[-1])

    report = await store.rebuild_projections(batch=2, parts=2)

    assert report.broken == []
    assert [run_id for run_id, _ in report.unfoldable] == [ids[-1]]
    assert "KeyError" in report.unfoldable[0][1]
    assert report.differed == [ids[0]] and report.runs == 11
    states = dict(await store.pool.fetch(
        "SELECT id, state FROM runs WHERE id = ANY($1::uuid[])", [ids[0], ids[-1]]))
    assert states == {ids[0]: "running", ids[-1]: "failed"}, "repaired / left as it was"
    assert store.pool.get_idle_size() == store.pool.get_size()
