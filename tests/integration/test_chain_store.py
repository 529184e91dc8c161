"""The event store's hash chain against real PostgreSQL: what the batch append writes under
concurrent writers, and what the migration computes for the events of an older store."""

from __future__ import annotations

import asyncio
import copy
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import handlers
from cistate.adapters.postgres import store as store_module
from cistate.adapters.postgres.store import Append, Conflict, Store, connect
from cistate.domain import run as r
from cistate.domain.events import MISMATCH
from cistate.domain.messages import Push, StepResult
from cistate.domain.pipeline import parse
from tests.conftest import _admin, _pg_url

pytestmark = pytest.mark.integration

PIPELINE = parse("name: p\nsteps:\n  - {name: a, uses: noop}\n  - {name: b, uses: noop}\n",
                 "<test>", handlers.names())
CHAIN_MIGRATION = "004_event_hash_chain.sql"


def opened(delivery: uuid.UUID, now: datetime) -> tuple[r.RunState, Append]:
    """A new push's decision (two events), ready to store, and the state it leads to."""
    state = r.RunState(id=r.run_id_for(delivery))
    push = Push(repo="https://git.example.com/a.git", ref="refs/heads/main", commit="ab" * 20)
    return state, decided(state, r.Decider(PIPELINE).decide(state, push, delivery, now), delivery,
                          now)


def decided(state: r.RunState, decision: r.Decision, message_id: uuid.UUID,
            now: datetime) -> Append:
    version = state.version
    for event in decision.events:
        r.apply(state, event.type, event.data, now)
    return Append(state, version, decision.events, decision.outgoing, message_id, now, None)


def succeeded(state: r.RunState, step: str, now: datetime, outputs: dict[str, object]
              ) -> Append:
    """The decision on the step's success (two events), ready to store; applied to state."""
    result = StepResult(run_id=state.id, step=step, attempt=1, status="succeeded",
                        outputs=outputs)
    message_id = uuid.uuid4()
    return decided(state, r.Decider(PIPELINE).decide(state, result, message_id, now),
                   message_id, now)


async def test_batches_and_racing_writers_leave_every_chain_whole(store: Store) -> None:
    now = datetime.now(UTC)
    opening = [opened(uuid.uuid4(), now) for _ in range(8)]
    assert not any(isinstance(x, Exception)
                   for x in await store.append_many([item for _, item in opening]))
    # the next decision of each run in one batch, two events each, chained onto the first two
    later = now + timedelta(seconds=1)
    nexts = [succeeded(state, "a", later, {"image": f"app:{i}", "big": 1e16, "é": "ü\n"})
             for i, (state, _) in enumerate(opening)]
    assert not any(isinstance(x, Exception) for x in await store.append_many(nexts))
    # two writers decide on the same version of one run at once: one wins, one must reload
    state, _ = opening[0]
    racing = [succeeded(copy.deepcopy(state), "b", later, {"n": n}) for n in range(2)]
    results = await asyncio.gather(*(store.append_many([item]) for item in racing))
    assert sorted(type(result[0]).__name__ for result in results) == ["Conflict", "list"]

    report = await store.verify()
    assert (report.runs, report.events, report.broken) == (8, 8 * 4 + 2, [])


async def test_a_conflict_in_a_batch_still_chains_the_other_decisions(store: Store) -> None:
    now = datetime.now(UTC)
    (_, first), (_, second) = opened(uuid.uuid4(), now), opened(uuid.uuid4(), now)
    assert not any(isinstance(x, Exception) for x in await store.append_many([first]))
    stale = Append(first.state, 0, first.events, first.outgoing, uuid.uuid4(), now, None)
    results = await store.append_many([second, stale])  # retried one by one after the clash
    assert isinstance(results[0], list) and isinstance(results[1], Conflict)
    assert (await store.verify()).broken == []


@pytest.fixture
async def old_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Store]:
    """A store migrated up to the migration before the chain, as one made before it was."""
    old = tmp_path / "migrations"
    old.mkdir()
    for path in sorted(store_module.MIGRATIONS.glob("*.sql")):
        if path.name < CHAIN_MIGRATION:
            shutil.copy(path, old / path.name)
    name = f"cistate_old_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    store = await connect(_pg_url(name), min_size=1, max_size=4)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(store_module, "MIGRATIONS", old)
            assert CHAIN_MIGRATION not in await store.migrate()
        yield store
    finally:
        await store.close()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# how the store inserted events before the chain
OLD_INSERT = ("INSERT INTO events (run_id, seq, type, data, meta, message_id, recorded_at)"
              " VALUES ($1, $2, $3, $4, $5, $6, $7)")


async def test_the_migration_chains_the_events_an_older_store_holds(old_store: Store) -> None:
    now = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)
    runs = []
    for _ in range(5):
        state, opening = opened(uuid.uuid4(), now)
        step = succeeded(state, "a", now + timedelta(seconds=2),
                         {"image": "app:1", "big": 1e16, "ratio": 1.5, "é": "ü\n\u2028"})
        runs.append((state, [*opening.events, *step.events]))
    for state, events in runs:
        for seq, event in enumerate(events, start=1):
            await old_store.pool.execute(OLD_INSERT, state.id, seq, str(event.type),
                                         event.data, event.meta, uuid.uuid4(), now)
    # an event deleted before the chain existed
    gap = runs[-1][0].id
    await old_store.pool.execute("DELETE FROM events WHERE run_id = $1 AND seq = 2", gap)

    assert (await old_store.migrate())[0] == CHAIN_MIGRATION  # and those after it

    assert await old_store.pool.fetchval("SELECT count(*) FROM events WHERE hash IS NULL") == 0
    report = await old_store.verify()
    assert (report.runs, report.events) == (5, 5 * 4 - 1)
    assert [(check.run_id, [(p.seq, p.problem.split(":")[0]) for p in check.problems])
            for check in report.broken] == [(gap, [(2, "missing"), (3, "hash mismatch")])]
    rebuilt = await old_store.rebuild_projections()  # writes the runs rows the fold gives
    assert [run_id for run_id, _ in rebuilt.broken] == [gap] and rebuilt.unfoldable == []
    # the chain goes on from the migrated events
    state, _ = runs[0]
    more = succeeded(state, "b", now + timedelta(seconds=4), {})
    assert not any(isinstance(x, Exception) for x in await old_store.append_many([more]))
    check = await old_store.verify_run(state.id)
    assert check is not None and check.ok and check.events == 6
    # and an edit after the migration is found
    await old_store.pool.execute(
        "UPDATE events SET meta = meta || '{\"actor\": \"cli:mallory\"}'"
        " WHERE run_id = $1 AND seq = 5", state.id)
    check = await old_store.verify_run(state.id)
    assert check is not None and [(p.seq, p.problem) for p in check.problems] == [(5, MISMATCH)]
