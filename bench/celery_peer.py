"""cistate against what a team would write instead: a home-grown runner on Celery.

    python bench/celery_peer.py [--runs N] [--steps K] [--repeat R] [--pools threads,prefork]

Issue 16's peer. In each round, back to back and on the same database and vhost:

1. cistate: a real `cistate serve` (all roles) runs N runs of K `noop` steps, exactly as
   `bench/throughput.py` does it (its own run_cistate: same N, K, warm-up, worker
   concurrency 32, orchestrator prefetch 64).
2. celery, once per pool (`--pool threads --concurrency 8`, `--pool prefork --concurrency 2`):
   N runs, each a Celery `chain` of K tasks. Each task writes one row to PostgreSQL
   (`celery_steps`: run, step, time; one commit) and returns; Celery then publishes the
   chain's next task and acks. The broker is the same RabbitMQ vhost, with what a careful
   team would turn on: acks_late, publisher confirms (`confirm_publish`), quorum queues
   (`task_default_queue_type`), persistent messages; no result backend (a chain needs none).
   Prefetch is Celery's default (4 per process or thread: 32 for threads 8, as cistate's 32).

runs/s counts from the first publish to the last row (cistate: its last event) of the N
runs, after a warm-up of 20 runs; CPU per run is the process under test's (cistate serve;
the whole Celery worker, its pool processes included) over that window, also PostgreSQL's
backends of the benchmark's database and the whole broker. The ratio is cistate's runs/s
over the best Celery pool's in the same round; the median of the rounds is printed.

Celery does less durable work per run: K messages and K commits against cistate's 2K+1
messages (push, K commands, K results) and K+1 transactions, each event with an outbox row;
and it keeps none of cistate's guarantees past a crash (a task acked late runs again after a
kill -9 of its worker; nothing decides a step once). celery is a benchmark-only dependency:
`pip install -e '.[bench]'`. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import throughput as tp  # noqa: E402
from throughput import Child, Sandbox, log, run_main  # noqa: E402

CONFIG_ENV = "BENCH_CELERY_CONFIG"  # the worker's configuration, as JSON
POOLS = {"threads": 8, "prefork": 2}  # pool -> concurrency
TARGET_RATIO = 1.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS celery_steps (
    run_id uuid NOT NULL,
    step int NOT NULL,
    pid int NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS celery_steps_run ON celery_steps (run_id, step);
"""


# -- the runner on Celery: the app, its one task ------------------------------------------


def make_app(config: dict[str, Any]) -> Any:
    from celery import Celery

    app = Celery("bench", broker=config["broker"], set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # acks_late's other half: a lost task goes back
        task_ignore_result=True,
        broker_transport_options={"confirm_publish": True},
        task_default_queue=config["queue"],
        task_default_queue_type="quorum",
        worker_detect_quorum_queues=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    local = threading.local()  # one connection per thread (threads) or process (prefork)

    @app.task(name="bench.step")
    def step(run_id: str, index: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            import psycopg

            conn = local.conn = psycopg.connect(config["dsn"], autocommit=True)
        conn.execute("INSERT INTO celery_steps (run_id, step, pid) VALUES (%s, %s, %s)",
                     (run_id, index, os.getpid()))

    app.bench_step = step
    return app


def _worker_app() -> Any:
    """The app `celery -A celery_peer worker` loads: configured by the benchmark through the
    environment, nothing when imported otherwise."""
    raw = os.environ.get(CONFIG_ENV)
    return make_app(json.loads(raw)) if raw else None


app = _worker_app()


# -- driving and measuring one pool --------------------------------------------------------


def session_ticks(sid: int) -> int:
    """CPU ticks of every process of session `sid` (the worker and its pool processes)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total


@dataclass
class Round:
    name: str
    runs: int
    steps: int
    seconds: float
    cpu: dict[str, float]  # CPU seconds over the window, per group
    messages: int
    commits: int
    twice: int = 0  # steps that ran more than once

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds

    def ms_per_run(self, group: str) -> float:
        return self.cpu[group] / self.runs * 1000


def publish_chains(celery_app: Any, runs: list[str], steps: int) -> None:
    """Every run's chain, published with confirms from 8 threads (cistate's side publishes
    its pushes 256 at a time)."""
    from celery import chain

    task = celery_app.bench_step

    def one(run_id: str) -> None:
        chain(*(task.si(run_id, i) for i in range(1, steps + 1))).apply_async()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, runs))


async def finished_runs(pg: Any, runs: list[str], steps: int) -> int:
    done: int = await pg.fetchval(
        "SELECT count(DISTINCT run_id) FROM celery_steps WHERE run_id = ANY($1::uuid[])"
        " AND step = $2", runs, steps)
    return done


async def drive(pg: Any, celery_app: Any, runs: list[str], steps: int, limit: float,
                child: Child) -> None:
    await asyncio.to_thread(publish_chains, celery_app, runs, steps)
    deadline = time.monotonic() + limit
    while (done := await finished_runs(pg, runs, steps)) < len(runs):
        problem = child.problem()
        if problem:
            raise RuntimeError(f"{child.name}: {problem}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: {done} of {len(runs)} runs within {limit:g}s")
        await asyncio.sleep(0.02)


async def run_celery(args: argparse.Namespace, sandbox: Sandbox, work: Path, pool: str,
                     round_no: int) -> Round:
    import asyncpg

    queue = f"celery{os.getpid()}{pool}r{round_no}"
    config = {"broker": sandbox.amqp.replace("amqp://", "pyamqp://", 1), "dsn": sandbox.dsn,
              "queue": queue}
    celery_app = make_app(config)
    env = os.environ | {CONFIG_ENV: json.dumps(config), "PYTHONUNBUFFERED": "1",
                        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    argv = [sys.executable, "-m", "celery", "-A", "celery_peer", "worker", "--pool", pool,
            "--concurrency", str(POOLS[pool]), "--loglevel", "WARNING", "--without-mingle",
            "--without-gossip", "--without-heartbeat", "-Q", queue]
    child = Child(f"celery {pool}", work / f"celery-{pool}-{round_no}.log")
    pg = await asyncpg.connect(sandbox.dsn)
    try:
        await pg.execute(SCHEMA)
        proc = await child.start(argv, env=env)
        warm = [str(uuid.uuid4()) for _ in range(args.warmup)]
        await drive(pg, celery_app, warm, args.steps, args.timeout, child)  # and ready
        runs = [str(uuid.uuid4()) for _ in range(args.runs)]
        await asyncio.sleep(0.5)
        pg_pids = frozenset(r["pid"] for r in await pg.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))
        before = tp.cpu_snapshot(-1, pg_pids) | {"sut": session_ticks(proc.pid) / tp.CLK_TCK}
        t0_wall = time.time()
        await drive(pg, celery_app, runs, args.steps, args.timeout, child)
        after = tp.cpu_snapshot(-1, pg_pids) | {"sut": session_ticks(proc.pid) / tp.CLK_TCK}
        last = await pg.fetchval("SELECT max(recorded_at) FROM celery_steps"
                                 " WHERE run_id = ANY($1::uuid[])", runs)
        twice = await pg.fetchval(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM celery_steps"
            " WHERE run_id = ANY($1::uuid[]) GROUP BY run_id, step) AS t", runs)
        return Round(f"celery {pool} {POOLS[pool]}", args.runs, args.steps,
                     last.timestamp() - t0_wall,
                     {k: max(0.0, after[k] - before[k]) for k in before},
                     messages=args.steps, commits=args.steps, twice=int(twice))
    finally:
        await pg.close()
        await child.stop()
        celery_app.close()


async def run_cistate(args: argparse.Namespace, sandbox: Sandbox, work: Path,
                      round_no: int) -> Round:
    result = await tp.run_cistate(args, sandbox, work, round_no)
    return Round("cistate", result.runs, result.steps, result.seconds,
                 {k: v * result.cpu_seconds for k, v in result.cpu.items()},
                 messages=2 * args.steps + 1, commits=args.steps + 1,
                 twice=result.tap_repeats)


# -- report --------------------------------------------------------------------------------


def report(args: argparse.Namespace, rounds: list[dict[str, Round]]) -> dict[str, Any]:
    names = list(rounds[0])

    def median(name: str, value: Any) -> float:
        return statistics.median(value(r[name]) for r in rounds)

    print()
    print(f"cistate against a runner on Celery: N={args.runs} runs x K={args.steps} noop "
          f"steps, all published at once (warm-up {args.warmup}); {args.repeat} round(s), "
          "medians; the same RabbitMQ vhost and PostgreSQL database")
    header = (f"{'':<18}{'wall s':>7}{'runs/s':>8} | CPU ms/run:{'sut':>6}{'pg':>6}{'rmq':>6}"
              f" | per run: {'msgs':>4}{'commits':>8} | ran twice")
    print(header)
    print("-" * len(header))
    for name in names:
        print(f"{name:<18}{median(name, lambda r: r.seconds):>7.2f}"
              f"{median(name, lambda r: r.runs_per_s):>8.1f} |{'':>11}"
              f"{median(name, lambda r: r.ms_per_run('sut')):>6.2f}"
              f"{median(name, lambda r: r.ms_per_run('postgres')):>6.2f}"
              f"{median(name, lambda r: r.ms_per_run('rabbitmq')):>6.2f} |"
              f"{'':>10}{rounds[0][name].messages:>4}{rounds[0][name].commits:>8} | "
              f"{sum(r[name].twice for r in rounds)}")
    peers = [n for n in names if n.startswith("celery")]
    summary: dict[str, Any] = {
        "runs": args.runs, "steps": args.steps, "repeat": args.repeat,
        "rounds": [{n: {"runs_per_s": round(r[n].runs_per_s, 1),
                        "cpu_ms_per_run": round(r[n].ms_per_run("sut"), 2)} for n in r}
                   for r in rounds]}
    if "cistate" in names and peers:
        per_round = [r["cistate"].runs_per_s / max(r[p].runs_per_s for p in peers)
                     for r in rounds]
        ratio = statistics.median(per_round)
        best = max(peers, key=lambda p: median(p, lambda r: r.runs_per_s))
        cpu_ratio = (median(best, lambda r: r.ms_per_run("sut"))
                     / median("cistate", lambda r: r.ms_per_run("sut")))
        summary |= {"ratio": round(ratio, 3), "best_pool": best, "cpu_ratio": round(cpu_ratio, 3)}
        print()
        print(f"ratio cistate / best Celery pool (per round): {ratio:.2f} runs/s "
              f"(per round: {', '.join(f'{x:.2f}' for x in per_round)}); target >= "
              f"{TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'}")
        print(f"CPU per run of the process under test, {best} / cistate: {cpu_ratio:.2f} "
              "(above 1: cistate spends less per run)")
    print("per run, durable work: cistate 2K+1 messages (push, commands, results) and K+1 "
          "transactions (events + outbox); Celery K messages and K commits")
    return summary


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", "-n", type=int, default=200, help="runs per round (N)")
    parser.add_argument("--steps", "-k", type=int, default=5, help="noop steps per run (K)")
    parser.add_argument("--warmup", type=int, default=20, help="runs before measuring")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    parser.add_argument("--pools", default="threads,prefork",
                        help="Celery pools, comma-separated: threads (8), prefork (2)")
    parser.add_argument("--only-celery", action="store_true", help="no cistate rounds")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="CISTATE_WORKER_CONCURRENCY (as throughput.py)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per phase")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--keep", action="store_true", help="keep database, vhost, logs")
    args = parser.parse_args(argv)
    args.pools = [p for p in args.pools.split(",") if p]
    if not set(args.pools) <= set(POOLS):
        parser.error("--pools takes threads and/or prefork")
    # what throughput.run_cistate reads
    args.shape, args.width, args.inflight, args.no_latency = "linear", None, 0, False
    args.workdir = args.cprofile = args.py_spy = None
    return args


async def main(args: argparse.Namespace) -> int:
    rounds: list[dict[str, Round]] = []
    async with tp.sandboxed(args, "celery") as (sandbox, work):
        for round_no in range(1, args.repeat + 1):
            this: dict[str, Round] = {}
            if not args.only_celery:
                log(f"round {round_no}: cistate")
                this["cistate"] = await run_cistate(args, sandbox, work, round_no)
            for pool in args.pools:
                log(f"round {round_no}: celery {pool}")
                found = await run_celery(args, sandbox, work, pool, round_no)
                this[found.name] = found
            log("round {}: {}".format(round_no, ", ".join(
                f"{n} {r.runs_per_s:.1f} runs/s" for n, r in this.items())))
            rounds.append(this)
        summary = report(args, rounds)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main, parse_args())
