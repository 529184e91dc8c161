"""Reading runs from their projection rows: the queries of `cistate runs list` and
`runs show`, asked by the store (for the API and the service) with its pool and by the
command line with one connection of its own.

This module loads asyncpg and the run's state, and nothing of the writing (appends, hash
chains, the outbox, the live log) that `store` loads; the resources' model only for a run
that waits for one. The command line reads runs in little more than the time asyncio and
asyncpg take to import (bench/cli.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from cistate.domain.jsontext import dumps, loads
from cistate.domain.state import RunState, StepState

if TYPE_CHECKING:
    from cistate.domain.resource import ResourceState

# what answers a query: the store's pool, or a connection
Db = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True)
class RunQuery:
    state: str | None = None
    repo: str | None = None
    ref: str | None = None
    commit: str | None = None  # a prefix is enough
    step: str | None = None  # the step the run is in, or ended in
    since: datetime | None = None
    until: datetime | None = None
    before: tuple[datetime, uuid.UUID] | None = None  # keyset cursor: older than this run
    pipeline: str | None = None  # the name of the pipeline the run pinned
    limit: int = 50


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb as cistate's JSON, on every connection the store or a reader opens."""
    await conn.set_type_codec("jsonb", encoder=dumps, decoder=loads,
                              schema="pg_catalog")


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection for a few reads (the command line's): no pool to start or drain.
    It is dropped, not closed: a read leaves nothing to finish, and a graceful close
    waits ~4 ms for the server's backend to exit."""
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        yield conn
    finally:
        conn.terminate()


_SUMMARY_COLUMNS = ("id, repo, ref, commit, pipeline, pipeline_sha256, state, step,"
                    " machine_state, active, push, version, created_at, updated_at, holds,"
                    " notices")
_LIST_RUNS_SQL = (
    f"SELECT {_SUMMARY_COLUMNS}, '[]'::jsonb AS steps FROM runs WHERE"  # noqa: S608
    " ($1::text IS NULL OR state = $1)"
    " AND ($2::text IS NULL OR repo = $2) AND ($3::text IS NULL OR ref = $3)"
    " AND ($4::text IS NULL OR commit LIKE $4 || '%') AND ($5::text IS NULL OR step = $5)"
    " AND ($6::timestamptz IS NULL OR created_at >= $6)"
    " AND ($7::timestamptz IS NULL OR created_at < $7)"
    " AND ($8::timestamptz IS NULL OR (created_at, id) < ($8, $9::uuid))"
    " AND ($11::text IS NULL OR pipeline = $11)"
    " ORDER BY created_at DESC, id DESC LIMIT $10")


async def list_runs(db: Db, query: RunQuery) -> list[RunState]:
    """Runs matching the query, newest first (keyset pagination on created_at, id),
    without their steps (a listing shows none; decoding them is most of its cost)."""
    q = query
    records = await db.fetch(
        _LIST_RUNS_SQL, q.state, q.repo, q.ref, q.commit, q.step, q.since, q.until,
        q.before[0] if q.before else None, q.before[1] if q.before else None, q.limit,
        q.pipeline)
    return [state_from_row(r) for r in records]


async def load(db: Db, run_id: uuid.UUID) -> RunState | None:
    """The run's state from its projection row (a snapshot kept with every append)."""
    record = await db.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    return state_from_row(record) if record else None


async def resources(db: Db, names: Sequence[str] | None = None) -> list[ResourceState]:
    """The resources named (every one when None), by name: who holds each and who
    waits for it, for runs show, the API and metrics."""
    if names is None:
        records = await db.fetch("SELECT * FROM resources ORDER BY name")
    else:
        records = await db.fetch(
            "SELECT * FROM resources WHERE name = ANY($1::text[]) ORDER BY name", list(names))
    return [resource_from_row(r) for r in records]


async def waits_of(db: Db, state: RunState) -> list[dict[str, Any]]:
    """What the run waits for: each concurrency group or lock its claim still waits
    for, with the run that holds it now and the claim's place in the queue (1: next)."""
    waiting = {name: hold for name, hold in state.holds.items()
               if hold["state"] == "waiting"}
    if not waiting:
        return []
    found = {r.name: r for r in await resources(db, list(waiting))}
    waits: list[dict[str, Any]] = []
    for name, hold in waiting.items():
        resource = found.get(name)
        place = next((n for n, c in enumerate(resource.waiting, 1)
                      if str(c.claim) == hold["claim"]), None) if resource else None
        holder = resource.holder if resource else None
        kind, _, label = name.partition(":")
        waits.append({"resource": name, "kind": kind, "name": label,
                      "holder_run_id": str(holder.run_id) if holder else None,
                      "position": place})
    return waits


def state_from_row(r: asyncpg.Record) -> RunState:
    steps = [StepState.from_json(raw) for raw in r["steps"]]
    return RunState(
        id=r["id"], repo=r["repo"], ref=r["ref"], commit=r["commit"], pipeline=r["pipeline"],
        machine_state=r["machine_state"], step=r["step"],
        steps={s.name: s for s in steps}, active=list(r["active"]), push=r["push"],
        version=r["version"], created_at=r["created_at"], updated_at=r["updated_at"],
        pipeline_sha256=r.get("pipeline_sha256"), holds=r.get("holds") or {},
        notices=r.get("notices") or {},
    )


def resource_from_row(r: asyncpg.Record) -> ResourceState:
    from cistate.domain.resource import Claim, ResourceState  # not for a run that waits for none

    holder = r["holder"]
    return ResourceState(
        name=r["name"], version=r["version"],
        holder=Claim.from_json(holder) if holder else None,
        waiting=[Claim.from_json(c) for c in r["waiting"]],
        holder_superseded=r["holder_superseded"])
