"""The fault suite: concurrent runs while cistate processes are SIGKILLed and restarted, and
RabbitMQ and PostgreSQL themselves are restarted. Then every run must have succeeded, with a
contiguous seq and exactly one step.succeeded per step, and nothing unexplained dead-lettered.

    python bench/faults.py [--runs 200] [--kills 20] [--orchestrators 2] [--workers 2]

It restarts the machine's RabbitMQ (rabbitmqctl stop_app/start_app) and PostgreSQL
(pg_ctlcluster restart): run it on demand, not beside other tests. Everything else lives in a
database and vhost of its own, removed at the end. `tests/integration/test_faults.py` is the
short version inside the test suite (it cuts connections through a proxy instead).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import asyncpg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from throughput import Sandbox, log  # noqa: E402  (bench/ shares its sandbox)

from cistate.config import Settings  # noqa: E402
from tests.integration.processes import ServeProcess  # noqa: E402

PIPELINE = """
name: faults
steps:
  - {name: fetch, uses: noop, retries: 5, backoff: {initial: 0.5}}
  - {name: work, uses: script, run: "sleep 0.3; echo worked", retries: 5, backoff: {initial: 0.5}}
  - {name: publish, uses: noop, retries: 5, backoff: {initial: 0.5}}
"""
STEPS = ("fetch", "work", "publish")


async def restart_rabbitmq() -> None:
    for args in (["stop_app"], ["start_app"], ["await_startup"]):
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", *args], check=True,
                                capture_output=True, timeout=120)


def _restart_postgres_cluster() -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, capture_output=True, timeout=120)


async def restart_postgres() -> None:
    await asyncio.to_thread(_restart_postgres_cluster)


async def main(args: argparse.Namespace) -> int:
    sandbox = Sandbox("postgresql://postgres@127.0.0.1:5432/postgres",
                      "amqp://guest:guest@127.0.0.1:5672", f"cistate_faults_{uuid.uuid4().hex[:8]}")
    await sandbox.create()
    work = Path(tempfile.mkdtemp(prefix="cistate-faults-"))
    (work / "pipeline.yaml").write_text(PIPELINE)
    settings = Settings(database_url=sandbox.dsn, rabbitmq_url=sandbox.amqp,
                        bus_prefix="faults", pipeline=work / "pipeline.yaml",
                        workdir=work / "work", worker_concurrency=16)
    roles = [("orchestrator",)] * args.orchestrators + [("worker",)] * args.workers
    procs: list[ServeProcess] = []
    try:
        for i, role in enumerate(roles):
            procs.append(await ServeProcess(settings, role, work / f"p{i}.log").start())
        return await chaos(args, settings, sandbox, procs, roles, work)
    finally:
        for proc in procs:
            proc.stop()
        await sandbox.destroy()
        log(f"logs kept in {work}")


async def chaos(args: argparse.Namespace, settings: Settings, sandbox: Sandbox,
                procs: list[ServeProcess], roles: list[tuple[str, ...]], work: Path) -> int:
    rng = random.Random(args.seed)
    connection = await aio_pika.connect_robust(sandbox.amqp)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange("faults")
    run_ids: list[uuid.UUID] = []
    from cistate.domain.run import run_id_for

    async def push_wave(count: int) -> None:
        for _ in range(count):
            delivery = uuid.uuid4()
            body = {"repo": "https://git.example.com/faults.git", "ref": "refs/heads/main",
                    "commit": uuid.uuid4().hex + "0" * 8}
            for attempt in range(60):  # the broker may be restarting
                try:
                    await exchange.publish(aio_pika.Message(
                        json.dumps(body).encode(), message_id=str(delivery),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="push")
                    break
                except Exception:
                    await asyncio.sleep(0.5 if attempt < 59 else 0)
            else:
                raise RuntimeError("could not publish a push for 30 s")
            run_ids.append(run_id_for(delivery))

    async def probe(after: str) -> None:
        """Time from a restart's end until a new run goes through end to end."""
        began = time.monotonic()
        before = len(run_ids)
        await push_wave(1)
        probe_id = run_ids[before]
        pg = await connect_retrying(sandbox.dsn)
        try:
            while True:  # polling the store, as an operator's `runs watch` does
                state = await pg.fetchval("SELECT state FROM runs WHERE id = $1", probe_id)
                if state == "succeeded":
                    break
                await asyncio.sleep(0.05)
        finally:
            await pg.close()
        recovery[after] = time.monotonic() - began

    recovery: dict[str, float] = {}
    kills = restarts = 0
    waves = args.kills
    per_wave = max(1, args.runs // waves)
    started = time.monotonic()
    for n in range(1, waves + 1):
        await push_wave(per_wave if n < waves else max(0, args.runs - len(run_ids)))
        await asyncio.sleep(args.pace)
        victim = rng.randrange(len(procs))
        procs[victim].kill()
        kills += 1
        procs[victim] = await ServeProcess(settings, roles[victim],
                                           work / f"p{victim}-{n}.log").start()
        if n == waves // 3:
            log("restarting RabbitMQ")
            await restart_rabbitmq()
            restarts += 1
            await probe("RabbitMQ restart")
        if n == 2 * waves // 3:
            log("restarting PostgreSQL")
            await restart_postgres()
            restarts += 1
            await probe("PostgreSQL restart")
    last_fault = time.monotonic()
    log(f"{kills} kills and {restarts} restarts done; waiting for {len(run_ids)} runs")

    pg = await connect_retrying(sandbox.dsn)
    try:
        deadline = time.monotonic() + args.recover_timeout
        while True:
            pending = await pg.fetchval(
                "SELECT count(*) FROM unnest($1::uuid[]) AS r(id) LEFT JOIN runs ON runs.id = r.id"
                " WHERE runs.state IS NULL OR runs.state NOT IN ('succeeded','failed','cancelled')",
                run_ids)
            if pending == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        recovered = time.monotonic()
        return await verdict(pg, channel, run_ids, kills, restarts, pending,
                             recovered - last_fault, recovered - started, recovery)
    finally:
        await pg.close()
        await connection.close()


async def connect_retrying(dsn: str) -> asyncpg.Connection:
    for _ in range(60):
        try:
            return await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.5)
    return await asyncpg.connect(dsn)


async def verdict(pg: asyncpg.Connection, channel: aio_pika.abc.AbstractChannel,
                  run_ids: list[uuid.UUID], kills: int, restarts: int, pending: int,
                  recover_s: float, total_s: float, recovery: dict[str, float]) -> int:
    states = collections.Counter(dict(await pg.fetch(
        "SELECT state, count(*) FROM runs WHERE id = ANY($1) GROUP BY state", run_ids)))
    events = await pg.fetch(
        "SELECT run_id, seq, type, data->>'step' AS step FROM events WHERE run_id = ANY($1)"
        " ORDER BY run_id, seq", run_ids)
    by_run: dict[uuid.UUID, list[asyncpg.Record]] = collections.defaultdict(list)
    for e in events:
        by_run[e["run_id"]].append(e)
    gaps = duplicates = missing = 0
    for run_id in run_ids:
        history = by_run.get(run_id, [])
        if [e["seq"] for e in history] != list(range(1, len(history) + 1)):
            gaps += 1
        succeeded = collections.Counter(e["step"] for e in history if e["type"] == "step.succeeded")
        duplicates += sum(max(0, succeeded[s] - 1) for s in STEPS)
        missing += sum(1 for s in STEPS if succeeded[s] == 0)
    rejected = sum(1 for e in events if e["type"] == "message.rejected")
    dead = await channel.declare_queue("faults.dead", passive=True)
    dead_count = dead.declaration_result.message_count or 0
    ok = (states.get("succeeded", 0) == len(run_ids) and gaps == 0 and duplicates == 0
          and missing == 0 and dead_count == 0 and pending == 0)
    print(f"""
cistate fault suite
  processes killed (SIGKILL) : {kills}
  broker/database restarts   : {restarts} (RabbitMQ 1, PostgreSQL 1)
  runs                       : {len(run_ids)}  {dict(states)}
  events                     : {len(events)}  (message.rejected: {rejected})
  runs with seq gaps         : {gaps}
  duplicate step.succeeded   : {duplicates}
  steps never succeeded      : {missing}
  dead-lettered messages     : {dead_count}
  time to recover            : {recover_s:.1f} s after the last fault ({total_s:.1f} s in all)
  a new run end to end after : {"; ".join(f"{k} {v:.1f} s" for k, v in recovery.items())}
  verdict                    : {"PASS" if ok else "FAIL"}
""")
    return 0 if ok else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=21)
    parser.add_argument("--orchestrators", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pace", type=float, default=0.3, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--recover-timeout", type=float, default=300)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
