"""PostgreSQL event store (asyncpg): append, load, queries, the runs projection, the outbox.

One transaction per decision: its events (with the expected version and the hash that
chains each to the run's event before it), the `runs` row, the outbox rows and the step
log. A unique violation on (run_id, seq) means another writer got there first (Conflict:
reload and decide again); one on message_id means this message was already handled
(Duplicate: nothing to do). `verify` checks the chains.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from cistate import SOURCE_ROOT
from cistate.adapters.postgres import reads
from cistate.adapters.postgres.reads import RunQuery as RunQuery
from cistate.adapters.postgres.reads import init_connection
from cistate.domain.events import (
    Chained,
    ChainProblem,
    Event,
    NewEvent,
    chain_problems,
    derived_id,
    dumps,
    loads,
)
from cistate.domain.resource import ResourceDecision, ResourceState
from cistate.domain.resource import fold as fold_resource
from cistate.domain.state import RunState, StepState

if TYPE_CHECKING:
    # Reading runs (the command line's `runs list` and `runs show`) loads none of these:
    # the messages' models, the deciding (fold, in the methods that fold), the metrics.
    from pydantic import BaseModel

    from cistate.domain.messages import LogChunk, Outgoing
    from cistate.service.metrics import StoreState

MIGRATIONS = SOURCE_ROOT / "schema" / "migrations"
NOTIFY_CHANNEL = "cistate_outbox"
_MIGRATION_LOCK = 0x6369_7374  # advisory lock id: one migrator at a time

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class Conflict(Exception):
    """Another writer appended to the run first."""


class Duplicate(Exception):
    """The message was handled before."""


@dataclass(frozen=True)
class EventQuery:
    run_id: uuid.UUID | None = None
    repo: str | None = None
    ref: str | None = None
    commit: str | None = None
    type: str | None = None
    step: str | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: int | None = None  # keyset cursor: positions below this one
    limit: int = 100


@dataclass
class RebuildReport:
    runs: int = 0
    events: int = 0
    differed: list[uuid.UUID] = field(default_factory=list)
    # runs whose events do not fold (a damaged event): left as they are, with the error
    unfoldable: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    # runs whose events break their hash chain (tampered with): not folded, left as they
    # are, with what is wrong
    broken: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    resources: int = 0  # concurrency groups and locks refolded
    resources_differed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunCheck:
    """One run's stored events checked against their hash chain."""

    run_id: uuid.UUID
    events: int
    problems: list[ChainProblem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"run_id": str(self.run_id), "ok": self.ok, "events": self.events,
                "problems": [p.to_json() for p in self.problems]}


@dataclass
class VerifyReport:
    runs: int = 0
    events: int = 0
    broken: list[RunCheck] = field(default_factory=list)  # in run_id order

    def add(self, check: RunCheck) -> None:
        self.runs += 1
        self.events += check.events
        if not check.ok:
            self.broken.append(check)


@dataclass(frozen=True)
class Append:
    """One decision to store: its events on `expected_version`, the state they lead to,
    its outgoing messages and the step log it carries."""

    state: RunState
    expected_version: int
    events: Sequence[NewEvent]
    outgoing: Sequence[Outgoing]
    message_id: uuid.UUID
    now: datetime
    outbox_grace: datetime | None
    log: tuple[str, int, str] | None = None


def _violation(exc: asyncpg.UniqueViolationError, item: Append) -> Conflict | Duplicate:
    if exc.constraint_name == "events_message_id_key":
        return Duplicate(str(item.message_id))
    if exc.constraint_name in ("events_run_id_seq_key", "outbox_message_id_key"):
        return Conflict(str(item.state.id))
    raise exc


LIVE_LOG_BYTES = 16 << 20  # of live output stored for one step, all attempts together
LIVE_LOG_TRUNCATED = ("\n[live log truncated: this step's live output passed {limit} bytes;"
                      " the stored log keeps its head and tail]\n")


def _within_log_limit(text: str, used: int, limit: int) -> str:
    """The part of a piece that is stored when `used` bytes of its step are stored already:
    all of it, or its head and the marker (the piece that crosses the limit), or nothing."""
    if used >= limit:
        return ""
    raw = text.encode()
    if used + len(raw) <= limit:
        return text
    head = raw[:limit - used].decode(errors="ignore")
    return head + LIVE_LOG_TRUNCATED.format(limit=limit)


@dataclass(frozen=True)
class LiveChunk:
    """A stored piece of a step's live output (Store.log_chunks)."""

    id: int
    attempt: int
    execution: uuid.UUID
    seq: int
    text: str
    final: bool


@dataclass(frozen=True)
class OutboxRow:
    """A row to publish: its body as stored (a dict, read back by the relay), or as the JSON
    text it was stored from (bytes: the orchestrator's own rows, encoded once for both)."""

    id: int
    message_id: uuid.UUID
    routing_key: str
    body: dict[str, Any] | bytes


def encoded_body(body: BaseModel) -> bytes:
    """An outgoing message's body as JSON, as it is stored and published (aliases: `with`,
    `run`), serialised once by pydantic for both."""
    return body.model_dump_json(by_alias=True).encode()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's reset queries (a round trip each time): they hold
    no session state, the relay LISTENs on a connection of its own, and asyncpg still rolls
    back a transaction left open."""


async def connect(dsn: str, min_size: int = 2, max_size: int = 10) -> Store:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                     init=init_connection, reset=_keep_session)
    return Store(pool, dsn)


_GAUGES_SQL = """
SELECT (SELECT COALESCE(jsonb_object_agg(state, n), '{}')
        FROM (SELECT state, count(*) AS n FROM runs GROUP BY state) s) AS runs,
       count(*)::int AS due,
       COALESCE(EXTRACT(EPOCH FROM now() - min(COALESCE(not_before, created_at))),
                0)::float8 AS oldest,
       (SELECT jsonb_object_agg(name, jsonb_build_array(
                 (holder IS NOT NULL)::int, jsonb_array_length(waiting)))
        FROM resources WHERE holder IS NOT NULL) AS resources
FROM outbox WHERE sent_at IS NULL AND (not_before IS NULL OR not_before <= now())
"""

_FIRST_UUID = uuid.UUID(int=0)
_LAST_UUID = uuid.UUID(int=(1 << 128) - 1)


def run_id_ranges(parts: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """The id space cut into `parts` contiguous (first, last) ranges, in order. Run ids are
    UUIDs derived by hashing, so each range holds about the same share of the runs."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, not {parts}")
    starts = [(i << 128) // parts for i in range(parts + 1)]
    return [(uuid.UUID(int=first), uuid.UUID(int=after - 1))
            for first, after in itertools.pairwise(starts)]


class Store:
    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self.live_log_bytes = LIVE_LOG_BYTES  # see add_log_chunk

    async def close(self) -> None:
        await self.pool.close()

    # -- schema

    async def migrate(self) -> list[str]:
        """Apply the migrations not applied yet, in order; returns their names."""
        applied: list[str] = []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for path in sorted(MIGRATIONS.glob("*.sql")):
                if path.name in done:
                    continue
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
                applied.append(path.name)
        return applied

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    async def gauges(self) -> StoreState:
        """Runs by state, and the outbox's due messages not yet published (how far the
        relay is behind), for the metrics endpoint. One round trip."""
        from cistate.service.metrics import StoreState

        row = await self.pool.fetchrow(_GAUGES_SQL)
        assert row is not None
        return StoreState(runs=row["runs"], outbox_due=row["due"],
                          outbox_oldest_due_seconds=max(0.0, row["oldest"]),
                          resources={name: (int(held), int(waiting)) for name, (held, waiting)
                                     in (row["resources"] or {}).items()})

    # -- writing

    async def append(
        self,
        state: RunState,
        expected_version: int,
        events: Sequence[NewEvent],
        outgoing: Sequence[Outgoing],
        message_id: uuid.UUID,
        now: datetime,
        outbox_grace: datetime | None,
        log: tuple[str, int, str] | None = None,
    ) -> list[OutboxRow]:
        """Store events decided on `expected_version` and the state they lead to.

        Immediate outgoing rows get `outbox_grace` as not_before: the caller publishes them
        itself right after commit and the relay only steps in if it did not.
        """
        item = Append(state, expected_version, events, outgoing, message_id, now,
                      outbox_grace, log)
        result = (await self.append_many([item]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def append_many(self, items: Sequence[Append]
                          ) -> list[list[OutboxRow] | Conflict | Duplicate]:
        """Several decisions (of different runs) in ONE statement of data-modifying CTEs:
        events, runs rows, step logs and outbox rows, atomic together, one round trip.

        If the statement hits a unique violation, each decision is tried alone, so that a
        Conflict or Duplicate lands on its own message and the others are stored.
        """
        try:
            return list(await self._append_all(items))
        except asyncpg.UniqueViolationError as exc:
            if len(items) == 1:
                return [_violation(exc, items[0])]
        results: list[list[OutboxRow] | Conflict | Duplicate] = []
        for item in items:
            try:
                results.extend(await self._append_all([item]))
            except asyncpg.UniqueViolationError as exc:
                results.append(_violation(exc, item))
        return results

    async def _append_all(self, items: Sequence[Append]) -> list[list[OutboxRow]]:
        ev: list[list[Any]] = [[], [], [], [], [], [], []]
        runs: list[list[Any]] = [[] for _ in range(17)]
        logs: list[list[Any]] = [[], [], [], []]
        out: list[list[Any]] = [[], [], [], []]
        bodies: list[list[bytes]] = []
        notify = False
        for item in items:
            s, first = item.state, item.expected_version + 1
            mids = [item.message_id] + [derived_id(item.message_id, i)
                                        for i in range(1, len(item.events))]
            for n, (event, mid) in enumerate(zip(item.events, mids, strict=True)):
                for column, value in zip(ev, (s.id, first + n, str(event.type), event.data,
                                              event.meta, mid, item.now), strict=True):
                    column.append(value)
            for column, value in zip(runs, _run_row(s), strict=True):
                column.append(value)
            if item.log is not None:
                for column, value in zip(logs, (s.id, *item.log), strict=True):
                    column.append(value)
            item_bodies = [encoded_body(o.body) for o in item.outgoing]
            bodies.append(item_bodies)
            for o, body in zip(item.outgoing, item_bodies, strict=True):
                for column, value in zip(out, (o.message_id, o.routing_key, body.decode(),
                                               o.not_before or item.outbox_grace), strict=True):
                    column.append(value)
            notify = notify or bool(item.outgoing and item.outbox_grace is None)
        records = await self.pool.fetch(_APPEND_SQL, *ev, *runs, *logs, *out)
        if notify:
            await self.pool.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        ids = {r["message_id"]: r["id"] for r in records}
        return [
            [OutboxRow(ids[o.message_id], o.message_id, o.routing_key, body)
             for o, body in zip(item.outgoing, item_bodies, strict=True)
             if o.not_before is None]
            for item, item_bodies in zip(items, bodies, strict=True)
        ]

    # -- resources: concurrency groups and locks (cistate.domain.resource)

    async def append_resource(self, state: ResourceState, expected_version: int,
                              decision: ResourceDecision, message_id: uuid.UUID,
                              now: datetime, outbox_grace: datetime | None
                              ) -> list[OutboxRow]:
        """Store a resource's events decided on `expected_version`, its row, and the
        messages that tell runs, in one statement. Conflict: another process appended to
        the resource first (decide again); Duplicate: this request was handled before."""
        first = expected_version + 1
        events = decision.events
        mids = [message_id] + [derived_id(message_id, i) for i in range(1, len(events))]
        bodies = [encoded_body(o.body) for o in decision.outgoing]
        holder = state.holder.to_json() if state.holder else None
        try:
            records = await self.pool.fetch(
                _APPEND_RESOURCE_SQL, state.name, [first + n for n in range(len(events))],
                [str(e.type) for e in events], [e.data for e in events],
                [e.meta for e in events], mids, now, state.version, holder,
                [c.to_json() for c in state.waiting], state.holder_superseded,
                [o.message_id for o in decision.outgoing],
                [o.routing_key for o in decision.outgoing], [b.decode() for b in bodies],
                [o.not_before or outbox_grace for o in decision.outgoing])
        except asyncpg.UniqueViolationError as exc:
            # a message it would send is stored already: the same decision was made and
            # committed before (a resource tells a claim each answer once)
            if exc.constraint_name in ("resource_events_message_id_key",
                                       "outbox_message_id_key"):
                raise Duplicate(str(message_id)) from None
            if exc.constraint_name == "resource_events_resource_seq_key":
                raise Conflict(state.name) from None
            raise
        if decision.outgoing and outbox_grace is None:
            await self.pool.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        ids = {r["message_id"]: r["id"] for r in records}
        return [OutboxRow(ids[o.message_id], o.message_id, o.routing_key, body)
                for o, body in zip(decision.outgoing, bodies, strict=True)
                if o.not_before is None]

    async def load_resource(self, name: str) -> ResourceState:
        """A resource's state from its row (none yet: free, nobody waiting)."""
        record = await self.pool.fetchrow("SELECT * FROM resources WHERE name = $1", name)
        return reads.resource_from_row(record) if record else ResourceState(name)

    async def resources(self, names: Sequence[str] | None = None) -> list[ResourceState]:
        """The resources named (every one when None), by name (reads.resources)."""
        return await reads.resources(self.pool, names)

    async def waits_of(self, state: RunState) -> list[dict[str, Any]]:
        """What the run waits for, and who holds it (reads.waits_of)."""
        return await reads.waits_of(self.pool, state)

    async def resource_events(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """A resource's events in order, as (type, data), for folds and audits."""
        records = await self.pool.fetch(
            "SELECT type, data FROM resource_events WHERE resource = $1 ORDER BY seq", name)
        return [(r["type"], r["data"]) for r in records]

    # -- outbox relay

    async def mark_sent(self, ids: Sequence[int]) -> None:
        if ids:
            await self.pool.execute(
                "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", list(ids))

    async def renew_outbox_lease(self, ids: Sequence[int], until: datetime) -> None:
        """Unsent rows of `ids` are not due before `until` (their publisher still waits for
        their confirms); rows a relay has locked are skipped: it is publishing them."""
        await self.pool.execute(
            "UPDATE outbox SET not_before = $2 WHERE id IN (SELECT id FROM outbox"
            " WHERE id = ANY($1::bigint[]) AND sent_at IS NULL FOR UPDATE SKIP LOCKED)",
            list(ids), until)

    @asynccontextmanager
    async def due_outbox(self, limit: int = 500, skip: Sequence[int] = ()
                         ) -> AsyncIterator[list[OutboxRow]]:
        """Rows due for publishing but those in `skip`, locked for this relay until the
        block exits; the caller publishes them and they are marked sent when the block
        exits without error."""
        async with self.pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(
                "SELECT id, message_id, routing_key, body FROM outbox"
                " WHERE sent_at IS NULL AND (not_before IS NULL OR not_before <= now())"
                " AND NOT id = ANY($2::bigint[])"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                limit, list(skip),
            )
            rows = [OutboxRow(r["id"], r["message_id"], r["routing_key"], r["body"])
                    for r in records]
            yield rows
            if rows:
                await conn.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)",
                                   [r.id for r in rows])

    async def prune_outbox(self, older_than_seconds: float = 86400) -> int:
        result: str = await self.pool.execute(
            "DELETE FROM outbox WHERE sent_at < now() - make_interval(secs => $1)",
            older_than_seconds,
        )
        return int(result.split()[-1])

    # -- reading

    async def load(self, run_id: uuid.UUID) -> RunState | None:
        """The run's state from its projection row (reads.load)."""
        return await reads.load(self.pool, run_id)

    async def pinned_pipeline(self, run_id: uuid.UUID, sha256: str) -> dict[str, Any] | None:
        """The event data that pinned the run's pipeline of hash `sha256` (its
        pipeline_spec, pipeline_source, pipeline_origin), or None."""
        data: dict[str, Any] | None = await self.pool.fetchval(
            "SELECT data FROM events WHERE run_id = $1 AND type = ANY($2::text[])"
            " AND data->>'pipeline_sha256' = $3 ORDER BY seq DESC LIMIT 1",
            run_id, ["run.requested", "run.pipeline_pinned"], sha256)
        return data

    async def events(self, run_id: uuid.UUID, upto_seq: int | None = None,
                     after_seq: int = 0) -> list[Event]:
        """The run's events with after_seq < seq <= upto_seq, in order."""
        records = await self.pool.fetch(
            "SELECT * FROM events WHERE run_id = $1 AND ($2::int IS NULL OR seq <= $2)"
            " AND seq > $3 ORDER BY seq",
            run_id, upto_seq, after_seq,
        )
        return [_event(r) for r in records]

    async def step_log(self, run_id: uuid.UUID, step: str) -> list[tuple[int, str]]:
        records = await self.pool.fetch(
            "SELECT attempt, log FROM step_logs WHERE run_id = $1 AND step = $2 ORDER BY attempt",
            run_id, step,
        )
        return [(r["attempt"], r["log"]) for r in records]

    # -- live step logs

    async def add_log_chunks(self, chunks: Sequence[LogChunk]) -> int:
        """Store pieces of running steps' output (add_log_chunk, each in its turn, none
        waiting for an earlier piece). Returns how many were new."""
        new = 0
        for chunk in chunks:
            new += await self.add_log_chunk(chunk, in_turn=False) == "stored"
        return new

    async def add_log_chunk(self, chunk: LogChunk, *, in_turn: bool = True) -> str:
        """Store a piece of a running step's output: "stored"; "again" when it was stored
        before (a redelivery: left as it is); "early" when `in_turn` and the piece before it
        in its execution is not stored yet (store that one first: a follower reads a step's
        pieces by id, so an execution's pieces must get their ids in order).

        A follower reads on from the last id it saw, so the ids of one step's pieces must
        also commit in order (a bigserial taken by one transaction may commit after a larger
        one taken by another: the follower would skip it). A lock per step, held until
        commit, keeps them in order. A step keeps at most `live_log_bytes` of live output
        in all its attempts: the piece that crosses the limit ends with a marker, the
        pieces after it are stored empty (their order and `final` still count)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               f"log:{chunk.run_id}:{chunk.step}")
            known = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE execution = $3 AND seq = $4) AS stored,"
                " count(*) FILTER (WHERE execution = $3 AND seq = $4 - 1) AS previous,"
                " coalesce(sum(octet_length(text)), 0) AS used"
                " FROM step_log_chunks WHERE run_id = $1 AND step = $2",
                chunk.run_id, chunk.step, chunk.execution, chunk.seq)
            assert known is not None  # an aggregate: one row
            if known["stored"]:
                return "again"
            if in_turn and chunk.seq > 1 and not known["previous"]:
                return "early"
            text = _within_log_limit(chunk.text, int(known["used"]), self.live_log_bytes)
            await conn.execute(
                "INSERT INTO step_log_chunks (run_id, step, attempt, execution, seq, text,"
                " final) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                chunk.run_id, chunk.step, chunk.attempt, chunk.execution, chunk.seq, text,
                chunk.final)
        return "stored"

    async def log_executions(self, run_id: uuid.UUID, step: str,
                             through: int) -> list[tuple[int, uuid.UUID, bool]]:
        """The (attempt, execution, whether its final piece is stored) of a step whose
        output began at or before the piece `through`, in the order they began (for a
        follower that reads on from there)."""
        records = await self.pool.fetch(
            "SELECT attempt, execution, bool_or(final) AS final FROM step_log_chunks"
            " WHERE run_id = $1 AND step = $2"
            " GROUP BY attempt, execution HAVING min(id) <= $3 ORDER BY min(id)",
            run_id, step, through)
        return [(r["attempt"], r["execution"], r["final"]) for r in records]

    async def log_chunks(self, run_id: uuid.UUID, step: str, after: int = 0,
                         limit: int = 1000) -> list[LiveChunk]:
        """The pieces of a step's live output stored after `after` (a previous piece's id),
        in the order they arrived."""
        records = await self.pool.fetch(
            "SELECT id, attempt, execution, seq, text, final FROM step_log_chunks"
            " WHERE run_id = $1 AND step = $2 AND id > $3 ORDER BY id LIMIT $4",
            run_id, step, after, limit)
        return [LiveChunk(r["id"], r["attempt"], r["execution"], r["seq"], r["text"],
                          r["final"]) for r in records]

    async def prune_log_chunks(self, older_than_seconds: float = 86400) -> int:
        result: str = await self.pool.execute(
            "DELETE FROM step_log_chunks WHERE recorded_at < now() - make_interval(secs => $1)",
            older_than_seconds)
        return int(result.split()[-1])

    async def list_runs(self, query: RunQuery | None = None, **filters: Any) -> list[RunState]:
        """Runs matching the query (or the filters: RunQuery's fields), newest first
        (reads.list_runs)."""
        return await reads.list_runs(self.pool, query or RunQuery(**filters))

    async def audit(self, query: EventQuery) -> list[Event]:
        """Events matching the query, newest first (keyset pagination on position)."""
        q = query
        by_run = q.repo is not None or q.ref is not None or q.commit is not None
        # Only constant fragments are joined here; every value is a bind parameter.
        records = await self.pool.fetch(
            "SELECT e.* FROM events e"  # noqa: S608
            + (" JOIN runs r ON r.id = e.run_id" if by_run else "")
            + " WHERE ($1::bigint IS NULL OR e.position < $1)"
            " AND ($2::text IS NULL OR e.type = $2)"
            " AND ($3::text IS NULL OR e.data->>'step' = $3)"
            " AND ($4::text IS NULL OR e.meta->>'actor' = $4)"
            " AND ($5::timestamptz IS NULL OR e.recorded_at >= $5)"
            " AND ($6::timestamptz IS NULL OR e.recorded_at < $6)"
            " AND ($7::uuid IS NULL OR e.run_id = $7)"
            + (" AND ($9::text IS NULL OR r.repo = $9) AND ($10::text IS NULL OR r.ref = $10)"
               " AND ($11::text IS NULL OR r.commit LIKE $11 || '%')" if by_run else "")
            + " ORDER BY e.position DESC LIMIT $8",
            q.before, q.type, q.step, q.actor, q.since, q.until, q.run_id, q.limit,
            *((q.repo, q.ref, q.commit) if by_run else ()),
        )
        return [_event(r) for r in records]

    async def state_at(self, run_id: uuid.UUID, seq: int | None = None) -> RunState | None:
        """The run as it stood after event `seq` (None: now), folded from its events."""
        from cistate.domain.run import fold

        records = await self.pool.fetch(
            "SELECT type, data, recorded_at FROM events WHERE run_id = $1"
            " AND ($2::int IS NULL OR seq <= $2) ORDER BY seq",
            run_id, seq,
        )
        if not records:
            return None
        return fold(run_id, ((r["type"], r["data"], r["recorded_at"]) for r in records))

    async def verify_run(self, run_id: uuid.UUID) -> RunCheck | None:
        """The run's events checked against their chain (None: no such run)."""
        records = await self.pool.fetch(_CHAIN_SQL, run_id)
        return _run_check(records) if records else None

    async def verify(self, prefetch: int = 10_000) -> VerifyReport:
        """Every run's events checked against their chain, read in one snapshot through a
        cursor (`prefetch` events at a time)."""
        report = VerifyReport()
        run: list[asyncpg.Record] = []
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            async for record in conn.cursor(_CHAIN_SQL, None, prefetch=prefetch):
                if run and record["run_id"] != run[0]["run_id"]:
                    report.add(_run_check(run))
                    run = []
                run.append(record)
        if run:
            report.add(_run_check(run))
        return report

    async def checked_batches(self, conn: Conn, batch: int = 500,
                              first: uuid.UUID = _FIRST_UUID, last: uuid.UUID = _LAST_UUID,
                              ) -> AsyncGenerator[list[RunEvents], None]:
        """Every run's events as (type, data, recorded_at) triples in seq order, and whether
        they hold their hash chain, `batch` runs at a time in run_id order, read through a
        cursor of `conn` (inside a transaction); only the runs with first <= run_id <= last.

        PostgreSQL aggregates each run's events into one JSON text: one loads() per run
        instead of per-row decoding, which is most of what reading costs in Python. It checks
        the chain in the same pass (the Python side gets a few numbers per run).
        recorded_at travels as ISO 8601 in UTC and parses back to the datetime asyncpg would
        give. The next batch is fetched while the caller works on this one.
        """
        parse = datetime.fromisoformat
        cursor = await conn.cursor(_RUN_EVENTS_SQL, first, last)
        pending = asyncio.ensure_future(cursor.fetch(batch))
        try:
            while records := await pending:
                pending = asyncio.ensure_future(cursor.fetch(batch))
                yield [RunEvents(r["run_id"],
                                 [(t, d, parse(at)) for t, d, at in loads(r["events"])],
                                 _broken_chain(r["mismatched"], r["n"], r["first"], r["last"]))
                       for r in records]
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, asyncpg.PostgresError):
                    await pending

    async def run_batches(self, conn: Conn, batch: int = 500,
                          first: uuid.UUID = _FIRST_UUID, last: uuid.UUID = _LAST_UUID,
                          ) -> AsyncGenerator[list[tuple[uuid.UUID, list[Triple]]], None]:
        """checked_batches as (run_id, triples), without the verdict on the chain."""
        async with contextlib.aclosing(self.checked_batches(conn, batch, first, last)) as runs:
            async for batch_runs in runs:
                yield [(run.run_id, run.triples) for run in batch_runs]

    async def rebuild_projections(self, batch: int = 500, parts: int = 2) -> RebuildReport:
        """Refold every run from its events; rewrite and report the rows that differed.

        The run ids are split into `parts` ranges rebuilt side by side, each on connections
        of its own, so PostgreSQL aggregates and writes on several cores while this process
        folds. In each range, `batch` runs at a time: one cursor fetch reads their events,
        one statement compares their folded rows with the stored ones in PostgreSQL and
        rewrites those that differ (while the next batch is read and folded). A row differs
        when any column differs from what the fold writes. A stored row whose version is
        ahead of the fold (appended since this read began) is newer, not damaged: it is left
        alone. `differed` is in run_id order. A run whose events do not fold (a damaged
        event) is left alone and listed in `unfoldable` with the error; one whose events
        break their hash chain (changed in the database) is not folded, left alone and
        listed in `broken` with what breaks it; the rest goes on. A run's deleted last
        events do not show here (only its row would say so, and that row is what this
        repairs): `verify` compares the two.
        """
        # each range holds a reader connection and borrows one to write: never more ranges
        # than the pool can serve at once
        parts = max(1, min(parts, self.pool.get_max_size() // 2))
        ranges = [asyncio.ensure_future(self._rebuild_range(batch, first, last))
                  for first, last in run_id_ranges(parts)]
        try:
            reports = await asyncio.gather(*ranges)
        except BaseException:
            for task in ranges:  # one failed (or we are cancelled): stop the others too
                task.cancel()
            await asyncio.gather(*ranges, return_exceptions=True)
            raise
        report = RebuildReport()
        for part in reports:
            report.runs += part.runs
            report.events += part.events
            report.differed.extend(part.differed)
            report.unfoldable.extend(part.unfoldable)
            report.broken.extend(part.broken)
        report.resources, report.resources_differed = await self.rebuild_resources()
        return report

    async def rebuild_resources(self) -> tuple[int, list[str]]:
        """Refold every concurrency group and lock from its events into its row; rewrite
        the rows that differ (unless the stored one is ahead: appended since). Returns how
        many were refolded and the names of those rewritten."""
        records = await self.pool.fetch(
            "SELECT resource, type, data FROM resource_events ORDER BY resource, seq")
        streams: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for record in records:
            streams.setdefault(record["resource"], []).append((record["type"], record["data"]))
        stored = {r.name: r for r in await self.resources(list(streams))}
        differed: list[str] = []
        for name, events in streams.items():
            folded = fold_resource(name, events)
            row = stored.get(name)
            if row is not None and (row.version > folded.version
                                    or row.to_json() == folded.to_json()):
                continue
            await self.pool.execute(
                "INSERT INTO resources (name, version, holder, waiting, holder_superseded,"
                " updated_at) VALUES ($1, $2, $3::jsonb, $4::jsonb, $5, now())"
                " ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version,"
                " holder = EXCLUDED.holder, waiting = EXCLUDED.waiting,"
                " holder_superseded = EXCLUDED.holder_superseded, updated_at = now()"
                " WHERE resources.version <= EXCLUDED.version",
                name, folded.version, folded.holder.to_json() if folded.holder else None,
                [c.to_json() for c in folded.waiting], folded.holder_superseded)
            differed.append(name)
        return len(streams), differed

    async def _rebuild_range(self, batch: int, first: uuid.UUID, last: uuid.UUID
                             ) -> RebuildReport:
        from cistate.domain.run import fold

        report = RebuildReport()
        fixing: asyncio.Future[None] | None = None
        async with (self.pool.acquire() as reader, reader.transaction(),
                    contextlib.aclosing(self.checked_batches(reader, batch, first, last))
                    as batches):
            try:
                async for runs in batches:
                    rows = []
                    for run in runs:
                        if run.broken is not None:  # tampered with: do not fold it
                            report.broken.append((run.run_id, run.broken))
                            continue
                        try:
                            rows.append(_run_row(fold(run.run_id, run.triples)))
                        except Exception as exc:  # a damaged event: report it, go on
                            report.unfoldable.append(
                                (run.run_id, f"{type(exc).__name__}: {exc}"))
                    report.events += sum(len(run.triples) for run in runs)
                    if fixing is not None:
                        await fixing  # one at a time: the report keeps run_id order
                    fixing = asyncio.ensure_future(self._compare_and_fix(rows, report))
                if fixing is not None:
                    await fixing
            finally:
                if fixing is not None and not fixing.done():
                    fixing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fixing
        return report

    async def _compare_and_fix(self, rows: list[tuple[Any, ...]], report: RebuildReport
                               ) -> None:
        if not rows:
            return
        report.runs += len(rows)
        fixed = {r["id"] for r in await self.pool.fetch(_FIX_RUNS_SQL, *zip(*rows, strict=True))}
        report.differed.extend(row[0] for row in rows if row[0] in fixed)


Triple = tuple[str, dict[str, Any], datetime]

# Each event's canonical form and stored hash, with its run's version (the runs row), in
# (run_id, seq) order; a runs row without events comes as one row with seq NULL.
_CHAIN_SQL = """
SELECT e.run_id, r.version, e.seq, cistate_event_canonical(
         e.run_id, e.seq, e.type, e.data, e.meta, e.message_id, e.recorded_at) AS canonical,
       e.hash
FROM events e LEFT JOIN runs r ON r.id = e.run_id
WHERE $1::uuid IS NULL OR e.run_id = $1
UNION ALL
SELECT r.id, r.version, NULL, NULL, NULL FROM runs r
WHERE ($1::uuid IS NULL OR r.id = $1) AND NOT EXISTS (SELECT FROM events e WHERE e.run_id = r.id)
ORDER BY run_id, seq
"""


def _run_check(records: Sequence[asyncpg.Record]) -> RunCheck:
    """One run's _CHAIN_SQL rows, checked."""
    events = [Chained(r["seq"], r["canonical"], r["hash"]) for r in records
              if r["seq"] is not None]
    return RunCheck(records[0]["run_id"], len(events),
                    chain_problems(events, records[0]["version"]))


# A link holds when the event's hash is cistate_event_hash of the stored hash before it and
# its canonical form (what cistate.domain.events.chain_problems checks, for `audit verify`).
_RUN_EVENTS_SQL = """
SELECT run_id, json_agg(json_build_array(type, data, to_char(recorded_at AT TIME ZONE 'UTC',
         'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')) ORDER BY seq)::text AS events,
       array_agg(seq ORDER BY seq) FILTER (WHERE NOT linked) AS mismatched,
       count(*)::int AS n, min(seq) AS first, max(seq) AS last
FROM (SELECT run_id, seq, type, data, recorded_at, COALESCE(hash = cistate_event_hash(
               lag(hash) OVER (PARTITION BY run_id ORDER BY seq), cistate_event_canonical(
               run_id, seq, type, data, meta, message_id, recorded_at)), false) AS linked
      FROM events WHERE run_id BETWEEN $1 AND $2) e
GROUP BY run_id ORDER BY run_id
"""


@dataclass(frozen=True)
class RunEvents:
    run_id: uuid.UUID
    triples: list[Triple]
    broken: str | None  # what breaks the run's hash chain; None when it holds


def _broken_chain(mismatched: list[int] | None, n: int, first: int, last: int) -> str | None:
    """What breaks a run's chain, from _RUN_EVENTS_SQL's summary of it; None if nothing."""
    what = []
    if (first, last) != (1, n):
        what.append(f"{n} events numbered {first}-{last}: some are missing or out of place")
    if mismatched:
        what.append(f"hash mismatch at seq {', '.join(map(str, mismatched))}")
    if not what:
        return None
    return ("broken hash chain (its events were edited, deleted, inserted or moved): "
            + "; ".join(what))


# The folded rows of a batch (in _run_row's column order) are compared with the stored ones
# in the database; the missing ones and those that differ (unless the stored row is ahead)
# are written, and RETURNING names them.
_FIX_RUNS_SQL = """
WITH f AS (
  SELECT id, repo, ref, commit, pipeline, state, step, machine_state, steps::jsonb,
         active::jsonb, push::jsonb, version, created_at, updated_at, pipeline_sha256,
         holds::jsonb, notices::jsonb
  FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
              $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::int[],
              $13::timestamptz[], $14::timestamptz[], $15::text[], $16::text[], $17::text[])
    AS f(id, repo, ref, commit, pipeline, state, step, machine_state, steps, active, push,
         version, created_at, updated_at, pipeline_sha256, holds, notices))
INSERT INTO runs (id, repo, ref, commit, pipeline, state, step, machine_state, steps, active,
                  push, version, created_at, updated_at, pipeline_sha256, holds, notices)
SELECT f.* FROM f LEFT JOIN runs r ON r.id = f.id
WHERE r.id IS NULL OR (r.version <= f.version AND
  (r.repo, r.ref, r.commit, r.pipeline, r.state, r.step, r.machine_state, r.steps, r.active,
   r.push, r.version, r.created_at, r.updated_at, r.pipeline_sha256, r.holds, r.notices)
  IS DISTINCT FROM
  (f.repo, f.ref, f.commit, f.pipeline, f.state, f.step, f.machine_state, f.steps, f.active,
   f.push, f.version, f.created_at, f.updated_at, f.pipeline_sha256, f.holds, f.notices))
ON CONFLICT (id) DO UPDATE SET repo = EXCLUDED.repo, ref = EXCLUDED.ref,
  commit = EXCLUDED.commit, pipeline = EXCLUDED.pipeline, state = EXCLUDED.state,
  step = EXCLUDED.step, machine_state = EXCLUDED.machine_state, steps = EXCLUDED.steps,
  active = EXCLUDED.active, push = EXCLUDED.push, version = EXCLUDED.version,
  created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
  pipeline_sha256 = EXCLUDED.pipeline_sha256, holds = EXCLUDED.holds,
  notices = EXCLUDED.notices
WHERE runs.version <= EXCLUDED.version
RETURNING id
"""


def _run_row(s: RunState) -> tuple[Any, ...]:
    """The runs row of a state, as append writes it, in the table's column order (its
    jsonb columns as JSON text)."""
    return (s.id, s.repo, s.ref, s.commit, s.pipeline, s.status, s.step, s.machine_state,
            steps_json(s.steps.values()), dumps(s.active), dumps(s.push),
            s.version, s.created_at, s.updated_at, s.pipeline_sha256, dumps(s.holds),
            dumps(s.notices))


def steps_json(steps: Iterable[StepState]) -> str:
    """[step.to_json() ...] as JSON text, written in one pass: orjson writes a datetime as
    isoformat() does, so the times need no call each (every append writes every step)."""
    steps = list(steps)
    try:
        return orjson.dumps([
            {"name": st.name, "state": st.state, "attempts": st.attempts,
             "outputs": st.outputs, "error": st.error, "started_at": st.started_at,
             "finished_at": st.finished_at, "timing": st.timing} for st in steps]).decode()
    except TypeError:  # what orjson cannot write (an integer beyond 64 bits)
        return dumps([st.to_json() for st in steps])


# Decisions, one statement. Every data-modifying CTE runs whether or not it is read. The
# runs rows' jsonb columns come as JSON text (a list inside an array parameter would be
# taken for another array dimension).
#
# Each event's hash links to the hash of its run's event seq - 1: stored already for the
# first event of a decision (the one its expected version names: committed before this run
# was loaded, so visible to this statement), or an event of this batch for the next ones,
# hence the recursion (one level per event of the longest decision). A concurrent writer of
# the same seq still gets the unique violation on (run_id, seq) and decides again. Should
# event seq - 1 be gone (deleted in the database), the link starts from empty and the
# decision is stored all the same: refusing it would fail its whole batch, and verify names
# the gap.
_APPEND_SQL = """
WITH RECURSIVE new AS (
  SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::jsonb[], $5::jsonb[],
                       $6::uuid[], $7::timestamptz[]) WITH ORDINALITY
    AS n(run_id, seq, type, data, meta, message_id, recorded_at, i)
), chain AS (
  SELECT n.*, cistate_event_hash(p.hash, cistate_event_canonical(
           n.run_id, n.seq, n.type, n.data, n.meta, n.message_id, n.recorded_at)) AS hash
  FROM new n LEFT JOIN events p ON p.run_id = n.run_id AND p.seq = n.seq - 1
  WHERE NOT EXISTS (SELECT FROM new b WHERE b.run_id = n.run_id AND b.seq = n.seq - 1)
  UNION ALL
  SELECT n.*, cistate_event_hash(c.hash, cistate_event_canonical(
           n.run_id, n.seq, n.type, n.data, n.meta, n.message_id, n.recorded_at))
  FROM chain c JOIN new n ON n.run_id = c.run_id AND n.seq = c.seq + 1
), ev AS (
  INSERT INTO events (run_id, seq, type, data, meta, message_id, recorded_at, hash)
  SELECT run_id, seq, type, data, meta, message_id, recorded_at, hash FROM chain ORDER BY i
), run AS (
  INSERT INTO runs (id, repo, ref, commit, pipeline, state, step, machine_state, steps,
                    active, push, version, created_at, updated_at, pipeline_sha256, holds,
                    notices)
  SELECT id, repo, ref, commit, pipeline, state, step, machine_state, steps::jsonb,
         active::jsonb, push::jsonb, version, created_at, updated_at, pipeline_sha256,
         holds::jsonb, notices::jsonb
  FROM unnest($8::uuid[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
              $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::int[],
              $20::timestamptz[], $21::timestamptz[], $22::text[], $23::text[], $24::text[])
    AS f(id, repo, ref, commit, pipeline, state, step, machine_state, steps, active, push,
         version, created_at, updated_at, pipeline_sha256, holds, notices)
  ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, step = EXCLUDED.step,
    machine_state = EXCLUDED.machine_state, steps = EXCLUDED.steps,
    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, holds = EXCLUDED.holds,
    notices = EXCLUDED.notices,
    -- a repository's pipeline, once read, pins the run anew (run.pipeline_pinned)
    pipeline = EXCLUDED.pipeline, pipeline_sha256 = EXCLUDED.pipeline_sha256,
    active = EXCLUDED.active
), lg AS (
  INSERT INTO step_logs (run_id, step, attempt, log)
  SELECT * FROM unnest($25::uuid[], $26::text[], $27::int[], $28::text[])
  ON CONFLICT DO NOTHING
)
INSERT INTO outbox (message_id, routing_key, body, not_before)
SELECT m, k, b::jsonb, t FROM unnest($29::uuid[], $30::text[], $31::text[], $32::timestamptz[])
  AS o(m, k, b, t)
RETURNING id, message_id
"""


_APPEND_RESOURCE_SQL = """
WITH ev AS (
  INSERT INTO resource_events (resource, seq, type, data, meta, message_id, recorded_at)
  SELECT $1, seq, type, data, meta, message_id, $7
  FROM unnest($2::int[], $3::text[], $4::jsonb[], $5::jsonb[], $6::uuid[])
    AS e(seq, type, data, meta, message_id)
), res AS (
  INSERT INTO resources (name, version, holder, waiting, holder_superseded, updated_at)
  VALUES ($1, $8, $9::jsonb, to_jsonb($10::jsonb[]), $11, $7)
  ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, holder = EXCLUDED.holder,
    waiting = EXCLUDED.waiting, holder_superseded = EXCLUDED.holder_superseded,
    updated_at = EXCLUDED.updated_at
)
INSERT INTO outbox (message_id, routing_key, body, not_before)
SELECT m, k, b::jsonb, t FROM unnest($12::uuid[], $13::text[], $14::text[], $15::timestamptz[])
  AS o(m, k, b, t)
RETURNING id, message_id
"""


def _event(r: asyncpg.Record) -> Event:
    return Event(
        position=r["position"], run_id=r["run_id"], seq=r["seq"], type=r["type"],
        data=r["data"], meta=r["meta"], message_id=r["message_id"],
        recorded_at=r["recorded_at"],
    )
