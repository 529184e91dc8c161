"""Audit: p50/p99 of the README's audit queries on a store of 1M events (target p99 < 20 ms).

    python bench/audit.py [--events 1000000] [--iterations 300] [--without-index NAME ...]

1. Generates ~E events (bench/eventgen.py: whole runs of the default pipeline over the last
   30 days: 60 repos, main and feature refs, distinct commits, producers/handlers/operators
   as actors, failures, retries, operator retries and cancels) in a database of its own, fills
   the `runs` projection with the real `Store.rebuild_projections()`, then ANALYZE.
2. Times each README query through the real Store methods, round-robin (every query sees
   the same machine), --iterations times each after a warm-up, with varying arguments where
   the README's would vary (commit prefixes of 50 different runs):
     runs by commit prefix      list_runs(RunQuery(commit=<7 hex>))   `runs list --commit`
     events by commit           audit(EventQuery(commit=<7 hex>))     `audit --commit`
     run.retried in a week      audit(EventQuery(type, since, until)) `audit --type ... --since`
     runs failed at health      list_runs(RunQuery(state, step))      `runs list --state --step`
     events, first page         audit(EventQuery(limit=100))          `GET /api/v1/events`
     events, next page          audit(EventQuery(before=<cursor>))    `...?cursor=<next_cursor>`
     events by actor            audit(EventQuery(actor="cli:alice"))  `audit --actor`
3. Baselines, same rounds: `SELECT 1` (the round-trip floor through the same pool) and
   `Store.load(id)` (one run by primary key). Ratios are p50 and p99 against the PK lookup.
4. For a query whose p99 is over the target: EXPLAIN (ANALYZE, BUFFERS) of its SQL with
   its arguments (the plan a fresh statement gets), and the plan the prepared statement
   settled on after the warm-up (asyncpg prepares every statement; PostgreSQL may switch
   it to a generic plan after 5 executions).

--without-index drops an index before measuring, to reproduce a figure from before it was
added (e.g. --without-index runs_commit_prefix_idx).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import eventgen  # noqa: E402
from cpu import CpuMeter  # noqa: E402
from throughput import Sandbox, log, percentile, run_main, sandboxed  # noqa: E402

from cistate.adapters.postgres.store import EventQuery, RunQuery, Store, connect  # noqa: E402

TARGET_P99_MS = 20.0
BASELINES = ("SELECT 1", "run by primary key")


@dataclass
class Query:
    name: str
    readme: str  # the command it stands for
    call: Callable[[int], Awaitable[int]]  # iteration -> rows returned
    times: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.times, q) or 0.0


class Recorder:
    """Wraps the store's pool and remembers the last query and arguments it was given."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.last: tuple[str, tuple[Any, ...]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        self.last = (query, args)
        return await self._pool.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        self.last = (query, args)
        return await self._pool.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.last = (query, args)
        return await self._pool.fetchval(query, *args)


def make_queries(store: Store, commits: list[str], run_ids: list[uuid.UUID],
                 week: tuple[datetime, datetime], cursor: int) -> list[Query]:
    async def select1(_: int) -> int:
        await store.pool.fetchval("SELECT 1")
        return 1

    async def by_pk(i: int) -> int:
        return 1 if await store.load(run_ids[i % len(run_ids)]) else 0

    async def runs_commit(i: int) -> int:
        return len(await store.list_runs(RunQuery(commit=commits[i % len(commits)])))

    async def events_commit(i: int) -> int:
        return len(await store.audit(EventQuery(commit=commits[i % len(commits)])))

    async def retried_week(_: int) -> int:
        return len(await store.audit(EventQuery(type="run.retried", since=week[0],
                                                until=week[1])))

    async def failed_health(_: int) -> int:
        return len(await store.list_runs(RunQuery(state="failed", step="health")))

    async def first_page(_: int) -> int:
        return len(await store.audit(EventQuery(limit=100)))

    async def next_page(_: int) -> int:
        return len(await store.audit(EventQuery(before=cursor, limit=100)))

    async def by_actor(_: int) -> int:
        return len(await store.audit(EventQuery(actor="cli:alice")))

    since, until = (d.date().isoformat() for d in week)
    return [
        Query("SELECT 1", "(round-trip floor)", select1),
        Query("run by primary key", "Store.load(id)", by_pk),
        Query("runs by commit prefix", "runs list --commit 3f0c2a1", runs_commit),
        Query("events by commit", "audit --commit 3f0c2a1", events_commit),
        Query("run.retried in a week", f"audit --type run.retried --since {since} "
              f"--until {until}", retried_week),
        Query("runs failed at health", "runs list --state failed --step health",
              failed_health),
        Query("events, first page", "GET /api/v1/events", first_page),
        Query("events, next page", "GET /api/v1/events?cursor=<next_cursor>", next_page),
        Query("events by actor", "audit --actor cli:alice", by_actor),
    ]


async def explain(store: Store, recorder: Recorder, query: Query, warm: int) -> str:
    """The plan of a fresh statement (EXPLAIN ANALYZE with the arguments) and the plan the
    prepared statement uses after `warm` executions (generic or custom)."""
    store.pool = recorder  # type: ignore[assignment]
    try:
        await query.call(0)
    finally:
        store.pool = recorder._pool
    assert recorder.last is not None
    sql, args = recorder.last
    lines = [f"-- {query.name}: {query.readme}", sql, f"-- arguments: {args!r}"]
    async with store.pool.acquire() as conn:
        plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
        lines += ["-- EXPLAIN (ANALYZE, BUFFERS), a fresh statement:"]
        lines += [r[0] for r in plan]
        stmt = await conn.prepare(sql)
        for _ in range(warm):
            await stmt.fetch(*args)
        values = f"({', '.join(_literal(a) for a in args)})" if args else ""
        settled = await conn.fetch(f"EXPLAIN (ANALYZE) EXECUTE {stmt.get_name()}{values}")
        generic = any("$" in r[0] for r in settled)
        lines += [f"-- the prepared statement after {warm} executions "
                  f"({'GENERIC plan' if generic else 'custom plan'}):"]
        lines += [r[0] for r in settled]
    return "\n".join(lines)


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    return "'" + str(value).replace("'", "''") + "'"


async def build(args: argparse.Namespace, sandbox: Sandbox) -> tuple[int, float]:
    plan = eventgen.Plan.for_events(args.events)
    log(f"generating {plan.events:,} events in {plan.runs:,} runs")
    t0 = time.perf_counter()
    conn = await asyncpg.connect(sandbox.dsn)
    try:
        total = await eventgen.generate(conn, plan)
    finally:
        await conn.close()
    log(f"{total:,} events in {time.perf_counter() - t0:.1f} s; runs projection by "
        "Store.rebuild_projections()")
    store = await connect(sandbox.dsn)
    try:
        t1 = time.perf_counter()
        report = await store.rebuild_projections()
        log(f"rebuilt {report.runs:,} runs from {report.events:,} events in "
            f"{time.perf_counter() - t1:.1f} s")
        await store.pool.execute("VACUUM ANALYZE events")
        await store.pool.execute("VACUUM ANALYZE runs")
    finally:
        await store.close()
    return total, time.perf_counter() - t0


async def measure(args: argparse.Namespace, sandbox: Sandbox, total: int) -> dict[str, Any]:
    store = await connect(sandbox.dsn)
    meter_conn = await asyncpg.connect(sandbox.dsn)
    try:
        for index in args.without_index:
            log(f"dropping index {index}")
            await store.pool.execute(f'DROP INDEX IF EXISTS "{index}"')
        rng = random.Random(42)
        sample = await store.pool.fetch(
            "SELECT id, commit FROM runs ORDER BY id LIMIT 50 OFFSET $1",
            rng.randrange(0, 1000))
        commits = [r["commit"][:7] for r in sample]
        run_ids = [r["id"] for r in sample]
        bounds = await store.pool.fetchrow("SELECT min(recorded_at) AS lo FROM events")
        assert bounds is not None
        week_start = bounds["lo"].replace(hour=0, minute=0, second=0, microsecond=0) \
            + timedelta(days=14)
        week = (week_start, week_start + timedelta(days=7))
        first = await store.audit(EventQuery(limit=100))
        queries = make_queries(store, commits, run_ids, week, first[-1].position)
        if args.gc_freeze:  # what a server could do once started: see bench/README.md
            gc.collect()
            gc.freeze()
            log(f"gc.freeze(): {gc.get_freeze_count():,} objects out of the collector's way")
        log(f"warm-up: {args.warmup} rounds")
        for i in range(args.warmup):
            for q in queries:
                await q.call(i)
        log(f"measuring: {args.iterations} rounds of {len(queries)} queries")
        meter = CpuMeter(meter_conn, sandbox.name)
        await meter.start()
        for i in range(args.iterations):
            for q in queries:
                t0 = time.perf_counter()
                rows = await q.call(i)
                q.times.append((time.perf_counter() - t0) * 1000)
                q.rows.append(rows)
        await meter.stop()
        summary = report(args, total, queries, meter)
        over = [q for q in queries if q.name not in BASELINES and q.p(99) >= args.target_ms]
        for q in queries if args.explain_all else over:
            print()
            print(await explain(store, Recorder(store.pool), q, args.warmup + 1))
        summary["over_target"] = [q.name for q in over]
        return summary
    finally:
        await meter_conn.close()
        await store.close()


def report(args: argparse.Namespace, total: int, queries: list[Query], meter: CpuMeter
           ) -> dict[str, Any]:
    pk = next(q for q in queries if q.name == "run by primary key")
    print()
    print(f"audit: {total:,} events; {args.iterations} timed calls per query (after "
          f"{args.warmup} warm-up rounds), through cistate's Store; target p99 < "
          f"{args.target_ms:g} ms")
    if args.without_index:
        print(f"dropped before measuring: {', '.join(args.without_index)}")
    if args.gc_freeze:
        print("this process called gc.freeze() before measuring")
    header = (f"{'query':<24}{'rows':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
              f"{'p50/pk':>8}{'p99/pk':>8}  target  README")
    print(header)
    print("-" * len(header))
    out: dict[str, Any] = {}
    for q in queries:
        baseline = q.name in BASELINES
        verdict = "" if baseline else ("met" if q.p(99) < args.target_ms else "NOT met")
        rows = sorted(q.rows)[len(q.rows) // 2]
        print(f"{q.name:<24}{rows:>6}{q.p(50):>9.2f}{q.p(99):>9.2f}{max(q.times):>9.2f}"
              f"{q.p(50) / pk.p(50):>8.1f}{q.p(99) / pk.p(99):>8.1f}  {verdict:<7} {q.readme}")
        out[q.name] = {"p50_ms": round(q.p(50), 3), "p99_ms": round(q.p(99), 3),
                       "max_ms": round(max(q.times), 3), "rows_median": rows,
                       "p50_vs_pk": round(q.p(50) / pk.p(50), 2),
                       "p99_vs_pk": round(q.p(99) / pk.p(99), 2)}
    print(f"during the timed rounds: {meter.cores()} (this process, our PostgreSQL backends, "
          "everything else on the machine)")
    return {"events": total, "iterations": args.iterations, "target_p99_ms": args.target_ms,
            "without_index": args.without_index, "gc_freeze": args.gc_freeze, "queries": out,
            "other_cores": round(meter.other_cores, 2)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--iterations", type=int, default=300, help="timed calls per query")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument("--target-ms", type=float, default=TARGET_P99_MS)
    parser.add_argument("--without-index", action="append", default=[], metavar="NAME",
                        help="drop this index before measuring (repeatable)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() this process before measuring (full collections "
                             "then skip every object that existed at start-up)")
    parser.add_argument("--explain-all", action="store_true",
                        help="print the plans of every query, not only those over target")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--reuse", metavar="DATABASE",
                        help="measure an existing database left by --keep (no generation)")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if args.reuse:
        sandbox = Sandbox(args.database_url, args.rabbitmq_url, args.reuse)
        sandbox.dsn = args.database_url.rsplit("/", 1)[0] + "/" + args.reuse
        store = await connect(sandbox.dsn)
        try:
            await store.migrate()  # a migration added since --keep
            total = await store.pool.fetchval("SELECT count(*) FROM events")
            await store.pool.execute("ANALYZE")
        finally:
            await store.close()
        summary = await measure(args, sandbox, total)
    else:
        async with sandboxed(args, "audit") as (sandbox, _work):
            total, seconds = await build(args, sandbox)
            log(f"store ready in {seconds:.0f} s")
            summary = await measure(args, sandbox, total)
            if args.keep:
                log(f"measure this store again with --reuse {sandbox.name}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main, parse_args())
