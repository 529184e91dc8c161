"""Replay: events folded per second when rebuilding every run from PostgreSQL, and the time
to show a 10k-event run as it stood at seq 9000.

    python bench/replay.py [--events 400000] [--long 10000] [--at 9000] [--repeat 2]

1. Generates ~E events of the default `nodejs` pipeline in SQL (bench/eventgen.py: whole
   runs of realistic kinds, ~18 events each) plus one run of --long events (health retried
   thousands of times), in a database of its own.
2. `Store.rebuild_projections()`, twice over: "write" (the runs table emptied first: every
   row differs and is written) and "verify" (the table is up to date: every row compared,
   none written; what an operator's `cistate projections rebuild` normally does). Events/s.
3. Baseline, same invocation: "bare stream" reads the same events the way the rebuild does
   (Store.run_batches over the same run id ranges side by side: same SQL, cursors, batches,
   transactions, json decoding) but does not fold or compare. "stream + fold" folds each
   run but does not compare. The ratios rebuild / bare say what folding and comparing
   cost on top of reading. "per-row stream" is the read path the rebuild had before (one
   row per event, jsonb decoded by the pool's codec, grouped in Python, one range), for
   reference.
4. `Store.state_at(long run, --at)`: p50/p99 of --calls calls; baseline: the same SELECT of
   the same rows without the fold. Then the CLI, `cistate runs show RUN --at N --json`, wall
   time (median of --cli-calls); baseline: `cistate runs show RUN --json` (the projection
   row, no fold): the difference is what time travel adds to the command.
5. If "verify" is under the target (100k events/s), a cProfile of one more verify pass:
   where the time goes (--profile always / never to force it).

CPU columns: CPU microseconds per event of this Python process (py) and of our PostgreSQL
backends (pg), steadier than wall time on a shared machine; "other cores" is the rest of the
machine's busy time during the phase (other work: noise). See bench/cpu.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import inspect
import io
import json
import os
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import eventgen  # noqa: E402
from cpu import CpuMeter  # noqa: E402
from throughput import log, percentile, run_main, sandboxed  # noqa: E402

from cistate.adapters.postgres.store import Store, connect, run_id_ranges  # noqa: E402
from cistate.domain.run import fold  # noqa: E402

TARGET_EVENTS_PER_S = 100_000
ROWS_SQL = "SELECT run_id, type, data, recorded_at FROM events ORDER BY run_id, seq"
BATCH = inspect.signature(Store.rebuild_projections).parameters["batch"].default
PARTS = inspect.signature(Store.rebuild_projections).parameters["parts"].default


class Phase:
    """Wall time and CPU of one measured phase."""

    def __init__(self, meter_conn: asyncpg.Connection, database: str) -> None:
        self.meter = CpuMeter(meter_conn, database)

    async def time(self, work: Awaitable[Any]) -> Any:
        await self.meter.start()
        result = await work
        await self.meter.stop()
        return result

    @property
    def seconds(self) -> float:
        return self.meter.seconds


# -- the baselines: the same stream, less work ---------------------------------------------


async def stream(store: Store, with_fold: bool) -> int:
    """rebuild_projections' read loop: Store.run_batches over the same run id ranges side by
    side (same SQL, cursors, batches, read-ahead, transactions and decoding); folds each run
    if `with_fold`; never compares or writes."""

    async def one_range(first: uuid.UUID, last: uuid.UUID) -> int:
        events = 0
        async with (store.pool.acquire() as reader, reader.transaction(),
                    contextlib.aclosing(store.run_batches(reader, BATCH, first, last))
                    as batches):
            async for runs in batches:
                for run_id, triples in runs:
                    events += len(triples)
                    if with_fold:
                        fold(run_id, triples)
        return events

    return sum(await asyncio.gather(*(one_range(*r) for r in run_id_ranges(PARTS))))


async def stream_rows(store: Store) -> int:
    """The read path rebuild_projections had before it aggregated per run: one row per
    event through a cursor (prefetch 5000), jsonb decoded by the pool's codec, grouped by
    run in Python. No fold. For reference."""
    events = 0
    async with store.pool.acquire() as reader, reader.transaction():
        current: uuid.UUID | None = None
        triples: list[tuple[str, dict[str, Any], Any]] = []
        async for r in reader.cursor(ROWS_SQL, prefetch=5000):
            if r["run_id"] != current:
                current, triples = r["run_id"], []
            triples.append((r["type"], r["data"], r["recorded_at"]))
            events += 1
    return events


# -- measuring ---------------------------------------------------------------------------


async def measure_rebuilds(args: argparse.Namespace, store: Store, total: int,
                           meter_conn: asyncpg.Connection, database: str,
                           ) -> dict[str, list[tuple[float, Phase]]]:
    """name -> [(events/s, phase)] per round."""
    out: dict[str, list[tuple[float, Phase]]] = {}

    async def one(name: str, work: Callable[[], Awaitable[int]]) -> None:
        phase = Phase(meter_conn, database)
        events = await phase.time(work())
        if events != total:
            raise RuntimeError(f"{name}: read {events} events, expected {total}")
        rate = events / phase.seconds
        out.setdefault(name, []).append((rate, phase))
        log(f"{name}: {events} events in {phase.seconds:.2f} s = {rate:,.0f} events/s "
            f"({phase.meter.cores()})")

    async def rebuild(expect_differed: int | None) -> int:
        report = await store.rebuild_projections()
        if expect_differed is not None and len(report.differed) != expect_differed:
            raise RuntimeError(f"rebuild: {len(report.differed)} rows differed, expected "
                               f"{expect_differed}")
        return report.events

    runs = await store.pool.fetchval("SELECT count(DISTINCT run_id) FROM events")
    for round_no in range(1, args.repeat + 1):
        log(f"round {round_no} of {args.repeat}")
        await one("per-row stream", lambda: stream_rows(store))
        await one("bare stream", lambda: stream(store, with_fold=False))
        await one("stream + fold", lambda: stream(store, with_fold=True))
        await store.pool.execute("TRUNCATE runs")
        await store.pool.execute("VACUUM ANALYZE runs")
        await one("rebuild: write", lambda: rebuild(runs))
        await store.pool.execute("VACUUM ANALYZE runs")
        await one("rebuild: verify", lambda: rebuild(0))
    return out


async def measure_state_at(args: argparse.Namespace, store: Store, run_id: uuid.UUID
                           ) -> dict[str, list[float]]:
    async def bare() -> None:  # state_at's query, no fold
        await store.pool.fetch(
            "SELECT type, data, recorded_at FROM events WHERE run_id = $1"
            " AND ($2::int IS NULL OR seq <= $2) ORDER BY seq", run_id, args.at)

    async def travel() -> None:
        state = await store.state_at(run_id, args.at)
        if state is None or state.version != args.at:
            raise RuntimeError(f"state_at({run_id}, {args.at}) gave "
                               f"{state and state.version}")

    times: dict[str, list[float]] = {"state_at": [], "bare": []}
    for call in (bare, travel):
        await call()  # warm: prepared statement, pages in cache
    for _ in range(args.calls):  # interleaved: both see the same machine
        for name, call in (("bare", bare), ("state_at", travel)):
            t0 = time.perf_counter()
            await call()
            times[name].append((time.perf_counter() - t0) * 1000)
    return times


async def measure_cli(args: argparse.Namespace, dsn: str, run_id: uuid.UUID
                      ) -> dict[str, list[float]]:
    exe = Path(sys.executable).with_name("cistate")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "cistate"]
    env = os.environ | {"CISTATE_DATABASE_URL": dsn}
    commands = {"show --at": [*base, "runs", "show", str(run_id), "--at", str(args.at),
                              "--json"],
                "show": [*base, "runs", "show", str(run_id), "--json"]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(args.cli_calls + 1):  # the first round warms the page cache: not counted
        for name, argv in commands.items():
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            elapsed = (time.perf_counter() - t0) * 1000
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode()}")
            version = json.loads(out)["version"]
            expected = args.at if name == "show --at" else args.long
            if version != expected:
                raise RuntimeError(f"{name}: version {version}, expected {expected}")
            if i:
                times[name].append(elapsed)
    return times


async def profile_rebuild(store: Store, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        await store.rebuild_projections()
    finally:
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# -- report -------------------------------------------------------------------------------


def report(args: argparse.Namespace, total: int, runs: int, gen_seconds: float,
           rebuilds: dict[str, list[tuple[float, Phase]]], state_at: dict[str, list[float]],
           cli: dict[str, list[float]]) -> dict[str, Any]:
    def med(name: str) -> float:
        return statistics.median(rate for rate, _ in rebuilds[name])

    print()
    print(f"replay: {total:,} events in {runs:,} runs (incl. one run of {args.long:,} events); "
          f"generated in {gen_seconds:.1f} s; {args.repeat} round(s), medians")
    def cpu_us(rounds: list[tuple[float, Phase]], group: str) -> float:
        """CPU microseconds per event spent by this process (py) or our PostgreSQL backends
        (pg): steadier than wall time when other work shares the machine."""
        return statistics.median(float(getattr(p.meter, group)) / total * 1e6 for _, p in rounds)

    def other(rounds: list[tuple[float, Phase]]) -> float:
        return statistics.median(p.meter.other_cores for _, p in rounds)

    print(f"{'':<18}{'events/s':>10}{'wall s':>8}{'vs bare':>9} | CPU us/event:"
          f"{'py':>6}{'pg':>6}  vs bare (py) | other cores")
    bare = med("bare stream")
    bare_py = cpu_us(rebuilds["bare stream"], "py")
    for name, rounds in rebuilds.items():
        rate = med(name)
        seconds = statistics.median(p.seconds for _, p in rounds)
        py = cpu_us(rounds, "py")
        print(f"{name:<18}{rate:>10,.0f}{seconds:>8.2f}{rate / bare:>9.2f} |{'':>13}"
              f"{py:>6.1f}{cpu_us(rounds, 'pg'):>6.1f}{bare_py / py:>14.2f} | "
              f"{other(rounds):.2f}")
    verify = med("rebuild: verify")
    write = med("rebuild: write")
    print(f"target >= {TARGET_EVENTS_PER_S:,} events/s: verify "
          f"{'met' if verify >= TARGET_EVENTS_PER_S else 'NOT met'}, write "
          f"{'met' if write >= TARGET_EVENTS_PER_S else 'NOT met'}")
    folded = med("stream + fold")
    print(f"wall per event: bare {1e6 / bare:.1f} us; fold adds {1e6 / folded - 1e6 / bare:.1f}"
          f" us, compare adds {1e6 / verify - 1e6 / folded:.1f} us, "
          f"writing every row adds {1e6 / write - 1e6 / verify:.1f} us")

    p50 = {k: percentile(v, 50) or 0.0 for k, v in state_at.items()}
    p99 = {k: percentile(v, 99) or 0.0 for k, v in state_at.items()}
    print()
    print(f"time travel on the {args.long:,}-event run, --at {args.at} ({args.calls} calls):")
    print(f"  Store.state_at        p50 {p50['state_at']:7.1f} ms   p99 {p99['state_at']:7.1f} ms")
    print(f"  bare SELECT (no fold) p50 {p50['bare']:7.1f} ms   p99 {p99['bare']:7.1f} ms"
          f"   -> state_at / bare = {p50['state_at'] / p50['bare']:.2f}")
    cli_at = statistics.median(cli["show --at"])
    cli_now = statistics.median(cli["show"])
    print(f"  cistate runs show RUN --at {args.at} --json   {cli_at:7.0f} ms "
          f"(median of {args.cli_calls}, wall, incl. start-up)")
    print(f"  cistate runs show RUN --json (projection)  {cli_now:7.0f} ms"
          f"   -> ratio {cli_at / cli_now:.2f}, +{cli_at - cli_now:.0f} ms")
    return {
        "events": total, "runs": runs, "long_run_events": args.long, "at": args.at,
        "repeat": args.repeat, "generate_seconds": round(gen_seconds, 2),
        "events_per_s": {name: round(med(name)) for name in rebuilds},
        "ratio_to_bare": {name: round(med(name) / bare, 3) for name in rebuilds},
        "py_cpu_us_per_event": {name: round(cpu_us(r, "py"), 2)
                                for name, r in rebuilds.items()},
        "pg_cpu_us_per_event": {name: round(cpu_us(r, "pg"), 2)
                                for name, r in rebuilds.items()},
        "state_at_ms": {"p50": round(p50["state_at"], 2), "p99": round(p99["state_at"], 2)},
        "bare_select_ms": {"p50": round(p50["bare"], 2), "p99": round(p99["bare"], 2)},
        "cli_show_at_ms": round(cli_at), "cli_show_ms": round(cli_now),
    }


# -- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=400_000,
                        help="events in ordinary runs (whole runs, ~18 events each)")
    parser.add_argument("--long", type=int, default=10_000, help="events of the long run")
    parser.add_argument("--at", type=int, default=9000, help="seq for state_at / --at")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the rebuild phases")
    parser.add_argument("--calls", type=int, default=30, help="state_at calls")
    parser.add_argument("--cli-calls", type=int, default=7, help="CLI calls per command")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="cProfile a verify pass (auto: when under the target)")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a database to connect to for CREATE/DROP DATABASE")
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    if not 1 <= args.at <= args.long:
        parser.error("--at must be within 1..--long")
    return args


async def main(args: argparse.Namespace) -> int:
    async with sandboxed(args, "replay") as (sandbox, _work):
        name = sandbox.name
        plan = eventgen.Plan.for_events(args.events)
        log(f"generating {plan.events:,} events in {plan.runs:,} runs + one of {args.long:,}")
        conn = await asyncpg.connect(sandbox.dsn)
        try:
            t0 = time.perf_counter()
            total = await eventgen.generate(conn, plan, long_run=args.long)
            await conn.execute("VACUUM ANALYZE events")
            gen_seconds = time.perf_counter() - t0
        finally:
            await conn.close()
        log(f"{total:,} events in {gen_seconds:.1f} s")
        store = await connect(sandbox.dsn)
        try:
            meter_conn = await asyncpg.connect(sandbox.dsn)
            try:
                rebuilds = await measure_rebuilds(args, store, total, meter_conn, name)
            finally:
                await meter_conn.close()
            long_id = eventgen.long_run_id()
            log(f"state_at on run {long_id}")
            state_at = await measure_state_at(args, store, long_id)
            log("CLI runs show")
            cli = await measure_cli(args, sandbox.dsn, long_id)
            summary = report(args, total, plan.runs + 1, gen_seconds, rebuilds, state_at,
                             cli)
            verify = summary["events_per_s"]["rebuild: verify"]
            if args.profile == "always" or (args.profile == "auto"
                                            and verify < TARGET_EVENTS_PER_S):
                print("\ncProfile of one rebuild (verify) pass (under the profiler, slower):")
                print(await profile_rebuild(store, args.profile_top))
        finally:
            await store.close()
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return 0


if __name__ == "__main__":
    run_main(main, parse_args())
