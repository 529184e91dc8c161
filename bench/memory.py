"""Memory: resident size of `cistate serve` with 10k runs in flight (target < 300 MB).

    python bench/memory.py [--runs 10000] [--mode sleep|queue] [--warm 100]

Starts a real `cistate serve` (its own database and vhost) and pushes --runs runs, then
waits until that many runs are `running` in the projection, and reads the process's
VmRSS / VmHWM (peak) / RssAnon from /proc/PID/status.

  --mode sleep (default): every role (api, orchestrator, relay, worker), pipeline `hold`
     (uses: script, run: sleep 3600) then `done` (noop). The worker runs
     CISTATE_WORKER_CONCURRENCY (4) holds at a time; the other commands wait in RabbitMQ.
  --mode queue: api + orchestrator (+ relay) only, pipeline of two noop steps; no worker role,
     so every step command waits in RabbitMQ.

Baseline, same invocation: the RSS of the same process idle after start-up, before any push.
A second reference after --warm runs (every code path used once) separates the one-time cost
of first use from the cost per run in flight: delta per run = (RSS at N - RSS warm) / (N - warm).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from throughput import (  # noqa: E402
    Child,
    Sandbox,
    cistate_target,
    free_port,
    log,
    publish,
    run_main,
    sandboxed,
    wait_healthy,
)

TARGET_MB = 300.0

PIPELINES = {
    "sleep": """name: memory
steps:
  - {name: hold, uses: script, run: "sleep 3600", timeout: 2h}
  - {name: done, uses: noop, timeout: 0}
""",
    "queue": """name: memory
steps:
  - {name: hold, uses: noop, timeout: 0}
  - {name: done, uses: noop, timeout: 0}
""",
}


def status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, VmSize of a process, in MB."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize"):
            found[key] = int(value.split()[0]) / 1024  # kB -> MB
    return found


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (the worker's script steps and their children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


async def count_running(pg: asyncpg.Connection, ids: list[str]) -> tuple[int, int]:
    row = await pg.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'running') AS running,"
        " count(*) FILTER (WHERE state NOT IN ('running', 'queued')) AS ended"
        " FROM runs WHERE id = ANY($1::uuid[])", ids)
    assert row is not None
    return row["running"], row["ended"]


async def push_and_wait(args: argparse.Namespace, exchange: aio_pika.abc.AbstractExchange,
                        pg: asyncpg.Connection, make_start: Any, how_many: int, offset: int,
                        pid: int, child: Child, samples: list[tuple[float, float]],
                        t_start: float) -> float:
    """Push `how_many` runs; wait until they are all running; returns seconds taken."""
    starts = [make_start(offset + i) for i in range(how_many)]
    ids = [s.chain for s in starts]
    t0 = time.monotonic()
    publishing = asyncio.create_task(publish(exchange, starts))
    deadline = t0 + args.timeout
    last_log = t0
    while True:
        samples.append((time.monotonic() - t_start, status(pid)["VmRSS"]))
        if publishing.done():
            publishing.result()
        running, ended = await count_running(pg, ids)
        if ended:
            raise RuntimeError(f"{ended} runs ended instead of staying in flight:\n"
                               f"{child.tail()}")
        if running >= how_many and publishing.done():
            return time.monotonic() - t0
        problem = child.problem()
        if problem:
            raise RuntimeError(f"cistate serve: {problem}")
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"only {running} of {how_many} runs running after "
                               f"{args.timeout:g} s")
        if now - last_log > 10:
            log(f"{running}/{how_many} running; VmRSS {samples[-1][1]:.0f} MB")
            last_log = now
        await asyncio.sleep(0.5)


async def settle(pid: int, seconds: float) -> dict[str, float]:
    """Wait, then read the status (the relay and outbox flushing have caught up)."""
    await asyncio.sleep(seconds)
    return status(pid)


async def run(args: argparse.Namespace, sandbox: Sandbox, work: Path) -> dict[str, Any]:
    prefix = f"mem{os.getpid()}"
    pipeline = work / "pipeline.yaml"
    pipeline.write_text(PIPELINES[args.mode])
    port = free_port()
    env = os.environ | {
        "CISTATE_DATABASE_URL": sandbox.dsn, "CISTATE_RABBITMQ_URL": sandbox.amqp,
        "CISTATE_BUS_PREFIX": prefix, "CISTATE_PIPELINE": str(pipeline),
        "CISTATE_WORKDIR": str(work / "workdir"), "CISTATE_LISTEN": f"127.0.0.1:{port}",
        "CISTATE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
    }
    exe = Path(sys.executable).with_name("cistate")
    argv = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "cistate",
                                                       "serve"]
    if args.mode == "queue":
        argv += ["--role", "orchestrator", "--role", "api"]
    child = Child("cistate serve", work / "serve.log")
    proc = await child.start(argv, env=env)
    leftovers: list[int] = []
    connection = await aio_pika.connect_robust(sandbox.amqp)
    pg = await asyncpg.connect(sandbox.dsn)
    try:
        await wait_healthy(port, child)
        log(f"cistate serve (pid {proc.pid}, {args.mode} mode) healthy; settling "
            f"{args.settle:g} s")
        idle = await settle(proc.pid, args.settle)
        log(f"idle: VmRSS {idle['VmRSS']:.1f} MB")
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(prefix, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        make_start = cistate_target(argparse.Namespace(steps=2), prefix).make_start
        samples: list[tuple[float, float]] = []
        t_start = time.monotonic()
        warm: dict[str, float] | None = None
        if args.warm:
            await push_and_wait(args, exchange, pg, make_start, args.warm, 0, proc.pid, child,
                                samples, t_start)
            warm = await settle(proc.pid, args.settle)
            log(f"after {args.warm} runs: VmRSS {warm['VmRSS']:.1f} MB")
        rest = args.runs - args.warm
        log(f"pushing {rest} more runs")
        seconds = await push_and_wait(args, exchange, pg, make_start, rest, args.warm,
                                      proc.pid, child, samples, t_start)
        log(f"{args.runs} runs in flight ({rest} pushed in {seconds:.1f} s); settling")
        loaded = await settle(proc.pid, args.settle)
        running = await pg.fetchval("SELECT count(*) FROM runs WHERE state = 'running'")
        unsent = await pg.fetchrow(
            "SELECT count(*) FILTER (WHERE not_before IS NULL OR not_before <= now()) AS due,"
            " count(*) FILTER (WHERE not_before > now()) AS later"
            " FROM outbox WHERE sent_at IS NULL")
        assert unsent is not None
        leftovers = descendants(proc.pid)
        return {"mode": args.mode, "runs": args.runs, "running": running, "warm_runs": args.warm,
                "idle": idle, "warm": warm, "loaded": loaded, "push_seconds": seconds,
                "unsent_due": unsent["due"], "unsent_later": unsent["later"],
                "children": len(leftovers),
                "peak_sampled_rss_mb": max(rss for _, rss in samples)}
    finally:
        await pg.close()
        await connection.close()
        await child.stop()
        for pid in leftovers:  # script steps the worker left behind, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def report(r: dict[str, Any]) -> None:
    idle, loaded, warm = r["idle"], r["loaded"], r["warm"]
    n = r["runs"]
    print()
    print(f"memory: cistate serve ({r['mode']} mode) with {r['running']:,} runs running "
          f"(pushed {n:,}; the last {n - r['warm_runs']:,} in {r['push_seconds']:.0f} s)")
    print(f"{'':<28}{'VmRSS MB':>10}{'RssAnon MB':>12}{'VmHWM MB':>10}")
    rows = [("idle, before any push", idle)]
    if warm:
        rows.append((f"after {r['warm_runs']} runs (warm)", warm))
    rows.append((f"{r['running']:,} runs in flight", loaded))
    for name, s in rows:
        print(f"{name:<28}{s['VmRSS']:>10.1f}{s['RssAnon']:>12.1f}{s['VmHWM']:>10.1f}")
    delta = loaded["VmRSS"] - idle["VmRSS"]
    print(f"in flight / idle: {loaded['VmRSS'] / idle['VmRSS']:.2f}x; +{delta:.1f} MB = "
          f"{delta * 1024 / n:.2f} KB per run over idle")
    if warm:
        per = (loaded["VmRSS"] - warm["VmRSS"]) * 1024 / max(1, n - r["warm_runs"])
        print(f"per run in flight, from warm: {per:.2f} KB")
    verdict = "met" if loaded["VmHWM"] < TARGET_MB else "NOT met"
    print(f"target < {TARGET_MB:g} MB: {verdict} (peak VmHWM {loaded['VmHWM']:.1f} MB; "
          f"now {loaded['VmRSS']:.1f} MB)")
    print(f"outbox at the end: {r['unsent_due']} due rows unsent (relay lag), "
          f"{r['unsent_later']} delayed rows (step timeout timers, due later); processes "
          f"under serve: {r['children']} (script steps running)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="runs in flight")
    parser.add_argument("--mode", choices=sorted(PIPELINES), default="sleep")
    parser.add_argument("--warm", type=int, default=100,
                        help="runs pushed first, for the warm reference (0: none)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to wait before each reading")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per push phase")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the database, vhost and log directory")
    args = parser.parse_args()
    if not 0 <= args.warm < args.runs:
        parser.error("--warm must be in 0..--runs-1")
    return args


async def main(args: argparse.Namespace) -> int:
    async with sandboxed(args, "memory") as (sandbox, work):
        result = await run(args, sandbox, work)
        report(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0


if __name__ == "__main__":
    run_main(main, parse_args())
