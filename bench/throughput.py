"""Throughput of cistate against a bare aio-pika + asyncpg loop doing the least work.

    python bench/throughput.py [--runs N] [--steps K] [--repeat R] ...
    python bench/throughput.py --shape fanout [--width W] [--runs N] [--repeat R] ...

1. cistate: a real `cistate serve` subprocess (all roles) runs N runs of a pipeline of K
   `noop` steps (no timeout timers). Prints runs/s, events/s, hops/s (a hop is one
   orchestrator transition: consume -> one transaction -> confirmed publish -> ack; a run
   is K+1 of them: its push and K step results) and the p50/p99 latency from a step's
   result to the next step's command, both as seen on the broker by a tap queue.
2. bare: a subprocess running the same number of chains, K+1 hops each, with the least work
   a hop needs (consume; one transaction inserting an event row and an outbox row;
   confirmed publish; ack). `2hop` adds a "worker" hop per step (consume, confirmed publish
   back, ack: no database), like cistate's worker in the same process; `1hop` has no worker.
3. The ratio of hops/s, cistate / bare 2hop (like for like), and cistate / bare 1hop.

`--shape fanout` (with `--width W`, 8 by default) measures the pipeline 1 -> W parallel
noop steps -> 1 instead: steps s1..s(W+2), s2..s(W+1) each `needs: [s1]`, the last step
needs all W. A run is still K+1 hops with K = W+2 steps (its push and K step results: 11
hops for W=8) and K worker hops, and the same 2K+2 events in cistate. The bare loop does
the like-for-like work for that shape, hop by hop:

- the start: one event row and one outbox row, then one confirmed publish (step 1);
- step 1's result (the fan-out): ONE transaction inserting one event row and W outbox rows
  (one INSERT of W rows), then W confirmed publishes at once, then the ack, as cistate's
  orchestrator stores its W commands in one transaction and publishes them together;
- each of the W middle results: one event row; the W-th of a chain to arrive (an in-memory
  count per chain: one process, as cistate's cache) also inserts the outbox row of the
  last step and publishes it (the fan-in);
- the last step's result: one event row, no outbox row.

The tap's latency for fanout is, for each step with needs, the time from the last of its
needs' results to its command (W+1 gaps per run); for linear it is unchanged.

Everything lives in a database `cistate_bench_<pid>` and a RabbitMQ vhost of the same name,
both removed at the end (also on Ctrl-C or an error, unless --keep). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # a fallback only: an installed (or PYTHONPATH) cistate wins

TARGET_RATIO = 1.0  # issues 11 and 12: signing on, and the linear figures with the graph, >= 1.0
ORCHESTRATOR_PREFETCH = 64  # what cistate.bootstrap.serve() gives the orchestrator's channel
POOL_SIZE = 10  # cistate.adapters.postgres.store.connect() default max_size
CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- small helpers ----------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]  # nearest-rank


# -- CPU accounting: which process group used the cores during the measured window --------

CPU_GROUPS = ("sut", "postgres", "rabbitmq", "bench")
RABBITMQ_PROCESSES = frozenset({"beam.smp", "erl_child_setup", "epmd", "inet_gethost"})


def _proc_ticks(pid: int) -> tuple[str, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1: raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    return comm, int(fields[11]) + int(fields[12])  # utime + stime


def cpu_snapshot(sut_pid: int, pg_pids: frozenset[int]) -> dict[str, float]:
    """CPU seconds so far per group: sut (the process under test), bench (this one),
    postgres (the backends serving the benchmark's database: other databases on the same
    server are not ours), rabbitmq (the whole broker: it is shared), and the whole machine
    (busy time, from /proc/stat)."""
    totals: dict[str, float] = {"sut": 0.0, "bench": time.process_time(), "postgres": 0.0,
                                "rabbitmq": 0.0}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        got = _proc_ticks(pid)
        if got is None:
            continue
        comm, ticks = got
        if pid == sut_pid:
            totals["sut"] += ticks / CLK_TCK
        elif pid in pg_pids:
            totals["postgres"] += ticks / CLK_TCK
        elif comm in RABBITMQ_PROCESSES:
            totals["rabbitmq"] += ticks / CLK_TCK
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    numbers = [int(x) for x in cpu]
    idle = numbers[3] + numbers[4]
    totals["machine"] = (sum(numbers[:8]) - idle) / CLK_TCK
    return totals


def cpu_delta(before: dict[str, float], after: dict[str, float], seconds: float
              ) -> dict[str, float]:
    """Cores busy on average over the window, per group."""
    return {k: round(max(0.0, after[k] - before[k]) / seconds, 3) for k in before}


# -- isolation: a database and a vhost of our own --------------------------------------


@dataclass
class Sandbox:
    admin_dsn: str  # a database we may connect to in order to CREATE/DROP ours
    amqp_base: str
    name: str
    dsn: str = ""
    amqp: str = ""
    db_created: bool = False
    vhost_created: bool = False

    async def create(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{self.name}"')
            self.db_created = True
        finally:
            await admin.close()
        self.dsn = with_path(self.admin_dsn, "/" + self.name)
        from cistate.adapters.postgres.store import (
            connect,  # the real migrations, as `cistate db upgrade`
        )

        store = await connect(self.dsn, min_size=1, max_size=1)
        try:
            await store.migrate()
        finally:
            await store.close()
        user = urlsplit(self.amqp_base).username or "guest"
        await rabbitmqctl("add_vhost", self.name)
        self.vhost_created = True
        await rabbitmqctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")
        self.amqp = with_path(self.amqp_base, "/" + quote(self.name, safe=""))

    async def destroy(self) -> None:
        if self.vhost_created:
            try:
                await rabbitmqctl("delete_vhost", self.name)
                self.vhost_created = False
            except RuntimeError as exc:
                log(f"could not delete vhost {self.name}: {exc}")
        if self.db_created:
            try:
                admin = await asyncpg.connect(self.admin_dsn)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
                    self.db_created = False
                finally:
                    await admin.close()
            except (OSError, asyncpg.PostgresError) as exc:
                log(f"could not drop database {self.name}: {exc}")


@contextlib.asynccontextmanager
async def sandboxed(args: argparse.Namespace, kind: str
                    ) -> AsyncIterator[tuple[Sandbox, Path]]:
    """A database, vhost and temporary folder of this benchmark's own, removed afterwards
    (unless --keep), also on SIGTERM (which cancels the main task) and on errors."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    name = f"cistate_{kind}_{os.getpid()}"
    sandbox = Sandbox(args.database_url, args.rabbitmq_url, name)
    work = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    try:
        log(f"creating database and vhost {name}")
        await sandbox.create()
        yield sandbox, work
    finally:
        if args.keep:
            log(f"kept database and vhost {name}, and {work}")
        else:
            log(f"dropping database and vhost {name}")
            await asyncio.shield(sandbox.destroy())
            await asyncio.to_thread(shutil.rmtree, work, True)


def add_sandbox_args(parser: argparse.ArgumentParser) -> None:
    """The options of `sandboxed`: where to make the database and vhost, and --keep."""
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a database to connect to for CREATE/DROP DATABASE")
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        help="broker URL; the vhost part is replaced by the benchmark's own")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database, vhost and temp dir (logs) afterwards")


def run_main(main: Callable[[argparse.Namespace], Awaitable[int]],
             args: argparse.Namespace) -> None:
    """Run a benchmark's main and exit with its status: 130 on Ctrl-C, 1 with one line for a
    RuntimeError (a component missing or refusing)."""
    try:
        code = asyncio.run(main(args))
    except KeyboardInterrupt:
        code = 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


async def rabbitmqctl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited {proc.returncode}: "
                           f"{out.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


# This script's own connections carry this name; every other connection in the benchmark's
# vhost belongs to the process under test.
BENCH_CONNECTION = {"connection_name": "bench-driver"}


async def broker_packets(vhost: str) -> tuple[int, int]:
    """Socket reads and writes RabbitMQ made so far on the connections of the process under
    test: how many separate sends reached the broker from it, and the other way. Frames
    sent together (one multiple ack for many deliveries) take fewer of them."""
    rows = json.loads(await rabbitmqctl("list_connections", "-p", vhost, "--formatter", "json",
                                        "client_properties", "recv_cnt", "send_cnt") or "[]")
    reads = writes = 0
    for row in rows:
        props = {p[0]: p[2] for p in row["client_properties"]}
        if props.get("connection_name") != BENCH_CONNECTION["connection_name"]:
            reads += row["recv_cnt"]
            writes += row["send_cnt"]
    return reads, writes


# -- the tap: when did each result and command pass through the exchange ----------------

TapKey = tuple[str, int, str]  # (chain/run id, step index, "in" | "out")
Classifier = Callable[[str, bytes], list[TapKey]]


class Tap:
    """A private queue bound to the exchange; records the first arrival of each message."""

    def __init__(self, classify: Classifier) -> None:
        self.classify = classify
        self.seen: dict[TapKey, float] = {}
        self.repeats = 0  # a key seen twice: a redelivered or republished message

    async def start(self, channel: AbstractChannel, exchange: str, keys: Sequence[str]) -> None:
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for key in keys:
            await queue.bind(exchange, key)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        for key in self.classify(message.routing_key or "", message.body):
            if key in self.seen:
                self.repeats += 1
            else:
                self.seen[key] = now

    def gaps(self, chains: Sequence[str], steps: int,
             needs: dict[int, list[int]] | None = None) -> list[float]:
        """For each chain and step i < K: time from step i's result ("in") to step i+1's
        command ("out"), in ms. With `needs` (step -> the steps it needs, as
        `step_needs` gives): for each step that needs others, the time from the last of
        their results to its command."""
        if needs is None:
            needs = {i + 1: [i] for i in range(1, steps)}
        found = []
        for chain in chains:
            for step, upstream in needs.items():
                t_ins = [self.seen.get((chain, u, "in")) for u in upstream]
                t_out = self.seen.get((chain, step, "out"))
                if t_out is not None and all(t is not None for t in t_ins):
                    found.append((t_out - max(t for t in t_ins if t is not None)) * 1000)
        return found


def classify_cistate(routing_key: str, body: bytes) -> list[TapKey]:
    # step.s<i>.run (a command: "out") / step.s<i>.result (a result: "in")
    parts = routing_key.split(".")
    if len(parts) != 3 or parts[0] != "step" or not parts[1].startswith("s"):
        return []
    run_id = json.loads(body)["run_id"]
    return [(run_id, int(parts[1][1:]), "out" if parts[2] == "run" else "in")]


def classify_bare(routing_key: str, body: bytes) -> list[TapKey]:
    data = json.loads(body)
    chain, hop = data["chain"], data["hop"]
    if routing_key == "work":  # the "command" of step `hop`
        return [(chain, hop, "out")]
    if data.get("mode") == "1hop":  # orch -> orch: each message is both a result and a command
        return [(chain, hop, "in"), (chain, hop, "out")]
    return [(chain, hop, "in")]


# -- measuring one system under test ---------------------------------------------------


@dataclass
class Start:
    routing_key: str
    body: bytes
    message_id: str
    chain: str  # the run id (cistate) or chain id (bare) it starts


@dataclass
class Progress:
    done: int
    failed: int
    detail: str = ""


@dataclass
class Result:
    name: str
    runs: int
    steps: int
    seconds: float
    hops: int
    events: int
    messages: int  # messages through the broker: starts, commands, results (and bare hops)
    latencies: list[float] = field(repr=False)
    cpu: dict[str, float]  # cores busy on average over cpu_seconds, per group
    cpu_seconds: float
    tap_repeats: int
    broker_reads: int = 0  # RabbitMQ's socket reads from the process under test
    broker_writes: int = 0  # ... and writes to it

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds

    @property
    def hops_per_s(self) -> float:
        return self.hops / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def p50(self) -> float | None:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float | None:
        return percentile(self.latencies, 99)

    def summary(self) -> dict[str, Any]:
        body = asdict(self)
        del body["latencies"]
        body |= {"runs_per_s": round(self.runs_per_s, 1), "hops_per_s": round(self.hops_per_s, 1),
                 "events_per_s": round(self.events_per_s, 1),
                 "p50_ms": _round(self.p50), "p99_ms": _round(self.p99),
                 "latency_samples": len(self.latencies)}
        return body


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


@dataclass
class Target:
    """How to drive and observe one system under test."""

    name: str
    exchange: str
    tap_keys: list[str]
    classify: Classifier
    make_start: Callable[[int], Start]
    progress: Callable[[asyncpg.Connection, list[str]], Awaitable[Progress]]
    finished: Callable[[asyncpg.Connection, list[str]], Awaitable[tuple[datetime, int]]]
    messages_per_run: int


async def publish(exchange: AbstractExchange, starts: Sequence[Start]) -> None:
    """Publish with confirms, a bounded number in flight."""
    sem = asyncio.Semaphore(256)

    async def one(start: Start) -> None:
        async with sem:
            await exchange.publish(
                aio_pika.Message(start.body, message_id=start.message_id,
                                 content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=start.routing_key)

    await asyncio.gather(*(one(s) for s in starts))


async def drive(exchange: AbstractExchange, pg: asyncpg.Connection, target: Target,
                starts: Sequence[Start], inflight: int, limit: float,
                alive: Callable[[], str | None]) -> None:
    """Publish the starts (all at once, or keeping at most `inflight` unfinished) and wait
    until every one has finished."""
    chains = [s.chain for s in starts]
    window = inflight or len(starts)
    sent = 0
    deadline = time.monotonic() + limit
    last_log = time.monotonic()
    while True:
        progress = (await target.progress(pg, chains[:sent])) if sent else Progress(0, 0)
        if progress.failed:
            raise RuntimeError(f"{target.name}: {progress.failed} of {len(chains)} runs did not "
                               f"succeed: {progress.detail}")
        if progress.done >= len(chains):
            return
        room = min(len(starts) - sent, window - (sent - progress.done))
        if room > 0:
            await publish(exchange, starts[sent:sent + room])
            sent += room
            continue
        problem = alive()
        if problem:
            raise RuntimeError(f"{target.name}: {problem}")
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"{target.name}: only {progress.done} of {len(chains)} runs "
                               f"finished within {limit:g}s")
        if now - last_log > 10:
            log(f"{target.name}: {progress.done}/{len(chains)} done")
            last_log = now
        await asyncio.sleep(0.01 if inflight else 0.05)


async def measure(args: argparse.Namespace, sandbox: Sandbox, target: Target, sut_pid: int,
                  alive: Callable[[], str | None]) -> Result:
    connection = await aio_pika.connect_robust(sandbox.amqp, client_properties=BENCH_CONNECTION)
    pg = await asyncpg.connect(sandbox.dsn)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(target.exchange, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        tap = Tap(target.classify)
        if not args.no_latency:
            await tap.start(await connection.channel(), target.exchange, target.tap_keys)
        if args.warmup:
            warm = [target.make_start(i) for i in range(args.warmup)]
            await drive(exchange, pg, target, warm, args.inflight, args.timeout, alive)
        starts = [target.make_start(i) for i in range(args.runs)]
        chains = [s.chain for s in starts]
        await asyncio.sleep(0.5)  # let the warm-up's tail (outbox marking) settle
        pg_pids = frozenset(r["pid"] for r in await pg.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))
        packets_before = await broker_packets(sandbox.name)
        cpu_before = cpu_snapshot(sut_pid, pg_pids)
        t0_wall, t0 = time.time(), time.perf_counter()
        await drive(exchange, pg, target, starts, args.inflight, args.timeout, alive)
        cpu_after = cpu_snapshot(sut_pid, pg_pids)
        cpu_seconds = time.perf_counter() - t0
        await asyncio.sleep(0.3)  # the last acks
        packets_after = await broker_packets(sandbox.name)
        last_event, events = await target.finished(pg, chains)
        seconds = last_event.timestamp() - t0_wall  # first publish -> last terminal event
        return Result(
            name=target.name, runs=args.runs, steps=args.steps, seconds=seconds,
            hops=args.runs * (args.steps + 1), events=events,
            messages=args.runs * target.messages_per_run,
            latencies=tap.gaps(chains, args.steps, step_needs(args)),
            cpu=cpu_delta(cpu_before, cpu_after, cpu_seconds), cpu_seconds=cpu_seconds,
            tap_repeats=tap.repeats,
            broker_reads=packets_after[0] - packets_before[0],
            broker_writes=packets_after[1] - packets_before[1])
    finally:
        await pg.close()
        await connection.close()


class Child:
    """A subprocess under test: started in its own session, stopped with SIGINT."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, argv: list[str], env: dict[str, str] | None = None,
                    stdout: int | None = None) -> asyncio.subprocess.Process:
        with self.log_path.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=stdout if stdout is not None else log_file,
                stderr=log_file, start_new_session=True)
        return self.proc

    def problem(self) -> str | None:
        if self.proc is not None and self.proc.returncode is not None:
            return f"process exited with {self.proc.returncode}; log:\n{self.tail()}"
        return None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            log(f"{self.name} did not stop on SIGINT; killing it")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


# -- cistate -------------------------------------------------------------------------------


async def last_event(pg: asyncpg.Connection, table: str, chains: list[str]
                     ) -> tuple[datetime, int]:
    """When the last event of these runs was recorded, and how many events they have."""
    row = await pg.fetchrow(f"SELECT max(recorded_at) AS last, count(*) AS n FROM {table}"
                            " WHERE run_id = ANY($1::uuid[])", chains)
    assert row is not None
    return row["last"], row["n"]


def step_needs(args: argparse.Namespace) -> dict[int, list[int]]:
    """Step index -> the step indexes it needs (steps are s1..sK). linear: each step the one
    before it; fanout: s2..s(W+1) need s1, s(W+2) needs all of them."""
    if getattr(args, "shape", "linear") != "fanout":
        return {i + 1: [i] for i in range(1, args.steps)}
    middle = list(range(2, args.width + 2))
    return {**{i: [1] for i in middle}, args.width + 2: middle}


def pipeline_yaml(steps: int, needs: dict[int, list[int]] | None = None) -> str:
    """K noop steps s1..sK; with `needs`, each step named there gets `needs:` (without it,
    a step needs the one before it)."""
    lines = ["name: bench", "steps:"]
    for i in range(1, steps + 1):
        # timeout 0 (falsy): no timeout timer row is written and the worker does not wait_for
        lines += [f"  - name: s{i}", "    uses: noop", "    timeout: 0"]
        if needs is not None and i in needs:
            lines.append(f"    needs: [{', '.join(f's{n}' for n in needs[i])}]")
    return "\n".join(lines) + "\n"


def shape_text(args: argparse.Namespace) -> str:
    """The pipeline, for the report: `K=5 noop steps` or `1 -> 8 -> 1 = 10 noop steps`."""
    if getattr(args, "shape", "linear") == "fanout":
        return f"fan-out 1 -> {args.width} -> 1 = {args.steps} noop steps"
    return f"K={args.steps} noop steps"


def cistate_target(args: argparse.Namespace, prefix: str) -> Target:
    from cistate.domain.run import run_id_for

    async def progress(pg: asyncpg.Connection, chains: list[str]) -> Progress:
        row = await pg.fetchrow(
            "SELECT count(*) FILTER (WHERE state = 'succeeded') AS ok,"
            " count(*) FILTER (WHERE state IN ('failed', 'cancelled')) AS bad,"
            " min(steps::text) FILTER (WHERE state IN ('failed', 'cancelled')) AS detail"
            " FROM runs WHERE id = ANY($1::uuid[])", chains)
        assert row is not None
        return Progress(row["ok"], row["bad"], (row["detail"] or "")[:2000])

    async def finished(pg: asyncpg.Connection, chains: list[str]) -> tuple[datetime, int]:
        return await last_event(pg, "events", chains)

    def make_start(_: int) -> Start:
        message_id = uuid.uuid4()
        body = {"repo": "https://git.example.invalid/bench/app.git", "ref": "refs/heads/main",
                "commit": uuid.uuid4().hex + uuid.uuid4().hex[:8]}
        return Start("push", json.dumps(body).encode(), str(message_id),
                     str(run_id_for(message_id)))

    return Target(
        name="cistate", exchange=prefix, tap_keys=["step.*.run", "step.*.result"],
        classify=classify_cistate, make_start=make_start, progress=progress,
        finished=finished, messages_per_run=1 + 2 * args.steps)


def serve_command(sandbox: Sandbox, prefix: str, pipeline: Path, workdir: Path, port: int,
                  concurrency: int) -> tuple[dict[str, str], list[str]]:
    """The environment and argv of a `cistate serve` (every role) on the sandbox's database
    and vhost, under its own bus prefix, listening on `port`."""
    env = os.environ | {
        "CISTATE_DATABASE_URL": sandbox.dsn,
        "CISTATE_RABBITMQ_URL": sandbox.amqp,
        "CISTATE_BUS_PREFIX": prefix,
        "CISTATE_PIPELINE": str(pipeline),
        "CISTATE_WORKDIR": str(workdir),
        "CISTATE_LISTEN": f"127.0.0.1:{port}",
        "CISTATE_WORKER_CONCURRENCY": str(concurrency),
        "PYTHONUNBUFFERED": "1",
    }
    exe = Path(sys.executable).with_name("cistate")
    argv = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "cistate",
                                                       "serve"]
    return env, argv


async def run_cistate(args: argparse.Namespace, sandbox: Sandbox, work: Path,
                      round_no: int) -> Result:
    prefix = f"cistate{os.getpid()}r{round_no}"
    pipeline = work / "pipeline.yaml"
    fanout = getattr(args, "shape", "linear") == "fanout"
    pipeline.write_text(pipeline_yaml(args.steps, step_needs(args) if fanout else None))
    port = free_port()
    env, argv = serve_command(sandbox, prefix, pipeline, args.workdir or work / "workdir",
                              port, args.concurrency)
    if args.cprofile:
        argv = [sys.executable, "-m", "cProfile", "-o", str(args.cprofile), "-m",
                "cistate", "serve"]
    child = Child("cistate serve", work / f"cistate-serve-{round_no}.log")
    proc = await child.start(argv, env=env)
    spy: asyncio.subprocess.Process | None = None
    try:
        await wait_healthy(port, child)
        log(f"cistate serve (pid {proc.pid}) is healthy on :{port}; log {child.log_path}")
        target = cistate_target(args, prefix)
        if args.py_spy:
            spy = await start_py_spy(args.py_spy, proc.pid)
        return await measure(args, sandbox, target, proc.pid, child.problem)
    finally:
        if spy is not None and spy.returncode is None:
            spy.send_signal(signal.SIGINT)
            await spy.wait()
        await child.stop()


async def start_py_spy(output: Path, pid: int) -> asyncio.subprocess.Process:
    exe = Path(sys.executable).with_name("py-spy")
    formats = {".json": "speedscope", ".txt": "raw"}
    return await asyncio.create_subprocess_exec(
        str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid), "--rate", "250",
        "--output", str(output), "--format", formats.get(output.suffix, "flamegraph"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_healthy(port: int, child: Child, limit: float = 60) -> None:
    import aiohttp

    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as session:
        while True:
            problem = child.problem()
            if problem:
                raise RuntimeError(f"cistate serve: {problem}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"http://127.0.0.1:{port}/health") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cistate serve: /health not 200 within {limit:g}s; "
                                   f"log:\n{child.tail()}")
            await asyncio.sleep(0.1)


# -- bare loop -----------------------------------------------------------------------------

BARE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bare_events (LIKE events INCLUDING ALL);
CREATE TABLE IF NOT EXISTS bare_outbox (LIKE outbox INCLUDING ALL);
"""


def bare_target(args: argparse.Namespace, prefix: str, mode: str) -> Target:
    final_seq = args.steps + 1  # hops 0..K: the start and K results, seq = hop + 1

    async def progress(pg: asyncpg.Connection, chains: list[str]) -> Progress:
        done = await pg.fetchval(
            "SELECT count(*) FROM bare_events WHERE run_id = ANY($1::uuid[]) AND seq = $2",
            chains, final_seq)
        return Progress(done, 0)

    async def finished(pg: asyncpg.Connection, chains: list[str]) -> tuple[datetime, int]:
        return await last_event(pg, "bare_events", chains)

    def make_start(_: int) -> Start:
        chain = str(uuid.uuid4())
        body = {"chain": chain, "hop": 0, "mode": mode}
        return Start("orch", json.dumps(body).encode(), str(uuid.uuid4()), chain)

    per_run = (1 + 2 * args.steps) if mode == "2hop" else (1 + args.steps)
    return Target(
        name=f"bare {mode}", exchange=prefix, tap_keys=["orch", "work"],
        classify=classify_bare, make_start=make_start, progress=progress,
        finished=finished, messages_per_run=per_run)


async def run_bare(args: argparse.Namespace, sandbox: Sandbox, work: Path, mode: str,
                   round_no: int) -> Result:
    prefix = f"bare{os.getpid()}{mode}r{round_no}"
    pg = await asyncpg.connect(sandbox.dsn)
    try:
        await pg.execute(BARE_SCHEMA)
    finally:
        await pg.close()
    config = {"dsn": sandbox.dsn, "amqp": sandbox.amqp, "prefix": prefix, "mode": mode,
              "last": args.steps, "prefetch": ORCHESTRATOR_PREFETCH,
              "worker_prefetch": args.concurrency, "pool": POOL_SIZE}
    if args.shape == "fanout":
        config["width"] = args.width
    child = Child(f"bare {mode}", work / f"bare-{mode}-{round_no}.log")
    proc = await child.start([sys.executable, str(THIS_FILE), "--bare-child",
                              json.dumps(config)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            await proc.wait()
            raise RuntimeError(f"bare {mode} did not start: {child.problem()}")
        return await measure(args, sandbox, bare_target(args, prefix, mode), proc.pid,
                             child.problem)
    finally:
        await child.stop()


async def bare_child(config: dict[str, Any]) -> None:
    """The least work a transition needs, in one process. Runs until SIGINT."""
    prefix, mode, last = config["prefix"], config["mode"], config["last"]
    pool = await asyncpg.create_pool(config["dsn"], min_size=2, max_size=config["pool"])
    connection = await aio_pika.connect_robust(config["amqp"])
    publisher = await connection.channel(publisher_confirms=True)
    exchange = await publisher.declare_exchange(prefix, aio_pika.ExchangeType.TOPIC,
                                                durable=True)
    dead = await publisher.declare_exchange(f"{prefix}.dead", aio_pika.ExchangeType.FANOUT,
                                            durable=True)
    quorum = {"x-queue-type": "quorum", "x-dead-letter-exchange": dead.name,
              "x-delivery-limit": 20}  # the arguments cistate's queues have

    async def consumer_queue(name: str, key: str, prefetch: int) -> aio_pika.abc.AbstractQueue:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(f"{prefix}.{name}", durable=True, arguments=quorum)
        await queue.bind(prefix, key)
        return queue

    next_key = "work" if mode == "2hop" else "orch"

    async def send(key: str, body: dict[str, Any]) -> None:
        await exchange.publish(
            aio_pika.Message(json.dumps(body).encode(), message_id=str(uuid.uuid4()),
                             content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=key)

    async def on_orch(message: AbstractIncomingMessage) -> None:
        data = json.loads(message.body)
        hop = data["hop"]
        nxt = {"chain": data["chain"], "hop": hop + 1, "mode": mode}
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO bare_events (run_id, seq, type, data, meta, message_id,"
                " recorded_at) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7)",
                uuid.UUID(data["chain"]), hop + 1, "hop.recorded", message.body.decode(),
                '{"actor": "bare"}', uuid.UUID(message.message_id), datetime.now(UTC))
            if hop < last:
                await conn.execute(
                    "INSERT INTO bare_outbox (message_id, routing_key, body)"
                    " VALUES ($1, $2, $3::jsonb)", uuid.uuid4(), next_key, json.dumps(nxt))
        if hop < last:
            await send(next_key, nxt)
        await message.ack()

    width: int = config.get("width", 0)  # fanout: steps 1, 2..width+1 (parallel), width+2
    joined: dict[str, int] = {}  # fanout: middle results seen so far, per chain

    async def on_orch_fanout(message: AbstractIncomingMessage) -> None:
        data = json.loads(message.body)
        chain, step = data["chain"], data["hop"]  # hop = the step whose result this is
        if step == 0:  # the start: command step 1
            seq, nexts = 1, [1]
        elif step == 1:  # the fan-out: command the width middle steps at once
            seq, nexts = 2, list(range(2, width + 2))
        elif step <= width + 1:  # a middle result; the width-th one commands the last step
            n = joined.pop(chain, 0) + 1
            if n < width:
                joined[chain] = n
            seq, nexts = 2 + n, ([width + 2] if n == width else [])
        else:  # the last step's result: the chain is finished
            seq, nexts = width + 3, []
        bodies = [{"chain": chain, "hop": j, "mode": mode} for j in nexts]
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO bare_events (run_id, seq, type, data, meta, message_id,"
                " recorded_at) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7)",
                uuid.UUID(chain), seq, "hop.recorded", message.body.decode(),
                '{"actor": "bare"}', uuid.UUID(message.message_id), datetime.now(UTC))
            if len(bodies) == 1:
                await conn.execute(
                    "INSERT INTO bare_outbox (message_id, routing_key, body)"
                    " VALUES ($1, $2, $3::jsonb)", uuid.uuid4(), next_key, json.dumps(bodies[0]))
            elif bodies:  # all the commands of the fan-out in one statement
                await conn.execute(
                    "INSERT INTO bare_outbox (message_id, routing_key, body)"
                    " SELECT m, $2, b::jsonb FROM unnest($1::uuid[], $3::text[]) AS t(m, b)",
                    [uuid.uuid4() for _ in bodies], next_key, [json.dumps(b) for b in bodies])
        if len(bodies) == 1:
            await send(next_key, bodies[0])
        elif bodies:
            await asyncio.gather(*(send(next_key, b) for b in bodies))
        await message.ack()

    async def on_work(message: AbstractIncomingMessage) -> None:
        data = json.loads(message.body)  # a noop step: answer at once
        await send("orch", data)
        await message.ack()

    orch = await consumer_queue("orch", "orch", config["prefetch"])
    await orch.consume(on_orch_fanout if width else on_orch, no_ack=False)
    if mode == "2hop":
        work = await consumer_queue("work", "work", config["worker_prefetch"])
        await work.consume(on_work, no_ack=False)
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await connection.close()
        await pool.close()


# -- report --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    """A number for the table, or '-' when there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def report(args: argparse.Namespace, results: dict[str, list[Result]]) -> dict[str, Any]:
    def median(name: str, attr: str) -> float | None:
        values = [getattr(r, attr) for r in results.get(name, [])]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def cpu_ms_per_hop(name: str, group: str) -> float:  # CPU ms a group spent per hop
        return statistics.median(r.cpu[group] * r.cpu_seconds / r.hops * 1000
                                 for r in results[name])

    def reads_per_hop(name: str) -> float:  # separate sends from the process under test
        return statistics.median(r.broker_reads / r.hops for r in results[name])

    def other_cores(name: str) -> float:  # cores busy with anything else: noise
        return statistics.median(
            max(0.0, r.cpu["machine"] - sum(r.cpu[g] for g in CPU_GROUPS)) for r in results[name])

    print()
    feed = f"at most {args.inflight} in flight" if args.inflight else "all published at once"
    print(f"cistate throughput: N={args.runs} runs x {shape_text(args)}, {feed} "
          f"(warm-up {args.warmup} runs; worker concurrency {args.concurrency}, "
          f"orchestrator prefetch {ORCHESTRATOR_PREFETCH}, pool {POOL_SIZE}; "
          f"{args.repeat} round(s), medians)")
    if args.shape == "fanout":
        print("hop = one orchestrator transition (consume -> transaction -> confirmed "
              f"publish(es) -> ack); a run is 1 push + {args.steps} step results = "
              f"{args.steps + 1} hops; step 1's result commands {args.width} steps in one "
              "transaction")
    else:
        print("hop = one orchestrator transition (consume -> transaction -> confirmed "
              f"publish -> ack); a run is K+1 = {args.steps + 1} hops")
    header = (f"{'':<10}{'wall s':>7}{'runs/s':>8}{'hops/s':>8}{'events/s':>9}"
              f"{'p50 ms':>8}{'p99 ms':>8} | CPU ms/hop:{'sut':>5}{'pg':>5}{'rmq':>5}"
              f"{'bench':>6} | rmq reads/hop | other cores")
    print(header)
    print("-" * len(header))
    noisiest = 0.0
    for name in results:
        other = other_cores(name)
        noisiest = max(noisiest, other)
        per_hop = "".join(f"{cpu_ms_per_hop(name, g):>{w}.2f}"
                          for g, w in zip(CPU_GROUPS, (5, 5, 5, 6), strict=True))
        print(f"{name:<10}{_fmt(median(name, 'seconds'), 2):>7}"
              f"{_fmt(median(name, 'runs_per_s')):>8}{_fmt(median(name, 'hops_per_s')):>8}"
              f"{_fmt(median(name, 'events_per_s')):>9}"
              f"{_fmt(median(name, 'p50'), 0):>8}{_fmt(median(name, 'p99'), 0):>8} |"
              f"{'':>11}{per_hop} | {reads_per_hop(name):>13.2f} | {other:>5.2f}")
    summary: dict[str, Any] = {
        "runs": args.runs, "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat,
        "shape": args.shape, "width": args.width if args.shape == "fanout" else None,
        "inflight": args.inflight,
        "concurrency": args.concurrency,
        "results": {name: [r.summary() for r in rounds] for name, rounds in results.items()},
    }
    print()
    for mode in ("2hop", "1hop"):
        pairs = list(zip(results.get("cistate", []), results.get(f"bare {mode}", []),
                         strict=False))
        if not pairs:
            continue
        # each round's cistate and bare ran back to back: pair them, so that a noisy
        # stretch of time weighs on both sides of a ratio
        ratio = statistics.median(c.hops_per_s / b.hops_per_s for c, b in pairs)
        cpu_ratio = (cpu_ms_per_hop(f"bare {mode}", "sut")
                     / cpu_ms_per_hop("cistate", "sut"))
        summary[f"ratio_{mode}"] = round(ratio, 3)
        summary[f"cpu_ratio_{mode}"] = round(cpu_ratio, 3)
        line = f"ratio cistate/bare {mode}: {ratio:.2f} hops/s"
        if mode == "2hop":
            line += (f"  (like for like: both have a worker hop; target >= {TARGET_RATIO}: "
                     f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")
        print(line)
        print(f"{'':<26}{cpu_ratio:.2f} by CPU per hop of the process under test "
              f"(bare ms/hop / cistate ms/hop)")
    if noisiest > 0.25:
        print(f"warning: other processes kept up to {noisiest:.2f} of the machine's "
              f"{os.cpu_count()} cores busy: hops/s are noisy; CPU ms/hop is the steadier figure")
    repeats = sum(r.tap_repeats for rounds in results.values() for r in rounds)
    if repeats:
        print(f"note: the tap saw {repeats} message(s) twice (redelivered or republished)")
    return summary


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="cistate throughput against a bare aio-pika + asyncpg loop.")
    parser.add_argument("--runs", "-n", type=int, default=200, help="runs per round (N)")
    parser.add_argument("--steps", "-k", type=int,
                        help="noop steps per run (K, linear only; default 5)")
    parser.add_argument("--shape", choices=["linear", "fanout"], default="linear",
                        help="linear: s1 -> ... -> sK; fanout: 1 -> W parallel steps -> 1")
    parser.add_argument("--width", "-w", type=int,
                        help="fanout only: parallel steps in the middle (W, default 8)")
    parser.add_argument("--warmup", type=int, default=20, help="runs before measuring")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds; each system runs once per round, medians are printed")
    parser.add_argument("--inflight", type=int, default=0,
                        help="keep at most this many runs unfinished (0: publish all N at "
                             "once); small values measure latency without queueing")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="CISTATE_WORKER_CONCURRENCY, and the bare worker's prefetch")
    parser.add_argument("--only", choices=["cistate", "bare"], help="run one side only")
    parser.add_argument("--bare-modes", default="2hop,1hop",
                        help="comma-separated: 2hop (with a worker hop), 1hop")
    parser.add_argument("--workdir", type=Path,
                        help="CISTATE_WORKDIR (default: in the benchmark's temp dir, on "
                             "$TMPDIR); e.g. /dev/shm/x to take the disk out of the worker")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per phase")
    parser.add_argument("--no-latency", action="store_true", help="no tap queue")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--min-ratio", type=float,
                        help="exit 1 if cistate/bare 2hop is below this")
    add_sandbox_args(parser)
    parser.add_argument("--cprofile", type=Path,
                        help="run cistate serve under cProfile, writing stats here")
    parser.add_argument("--py-spy", type=Path,
                        help="record cistate serve with py-spy (.svg flamegraph, .json "
                             "speedscope)")
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shape == "fanout":
        if args.steps is not None:
            parser.error("--steps is for --shape linear; a fanout run has --width + 2 steps")
        args.width = 8 if args.width is None else args.width
        if args.width < 1:
            parser.error("--width must be >= 1")
        args.steps = args.width + 2  # s1, s2..s(W+1) in parallel, s(W+2)
    else:
        if args.width is not None:
            parser.error("--width is for --shape fanout")
        args.steps = 5 if args.steps is None else args.steps
    if args.runs < 1 or args.steps < 1 or args.repeat < 1 or args.warmup < 0 or args.inflight < 0:
        parser.error("--runs, --steps and --repeat must be >= 1, --warmup and --inflight >= 0")
    modes = [m for m in args.bare_modes.split(",") if m]
    if not set(modes) <= {"1hop", "2hop"}:
        parser.error("--bare-modes takes 2hop and/or 1hop")
    args.modes = modes
    return args


async def main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    name = f"cistate_bench_{os.getpid()}"
    sandbox = Sandbox(args.database_url, args.rabbitmq_url, name)
    work = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    own_workdir = args.workdir is not None and not args.workdir.exists()
    results: dict[str, list[Result]] = {}
    try:
        log(f"creating database and vhost {name}")
        await sandbox.create()
        for round_no in range(1, args.repeat + 1):
            if args.only != "bare":
                log(f"round {round_no}: cistate, {args.runs} runs x {shape_text(args)}")
                result = await run_cistate(args, sandbox, work, round_no)
                results.setdefault("cistate", []).append(result)
                log(f"cistate: {result.hops_per_s:.1f} hops/s")
            if args.only != "cistate":
                for mode in args.modes:
                    log(f"round {round_no}: bare {mode}")
                    result = await run_bare(args, sandbox, work, mode, round_no)
                    results.setdefault(f"bare {mode}", []).append(result)
                    log(f"bare {mode}: {result.hops_per_s:.1f} hops/s")
        summary = report(args, results)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        ratio = summary.get("ratio_2hop")
        if args.min_ratio is not None and (ratio is None or ratio < args.min_ratio):
            return 1
        return 0
    finally:
        if args.keep:
            log(f"kept database {name}, vhost {name} and {work}")
        else:
            log(f"dropping database and vhost {name}")
            await asyncio.shield(sandbox.destroy())
            await asyncio.to_thread(shutil.rmtree, work, True)
            if own_workdir:  # made by cistate serve for this benchmark
                await asyncio.to_thread(shutil.rmtree, args.workdir, True)


def entry() -> None:
    args = parse_args()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background by a non-interactive shell: take SIGINT back, for us
        # and for the children (an ignored signal stays ignored across exec)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.bare_child:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(bare_child(json.loads(args.bare_child)))
        return
    try:
        code = asyncio.run(main(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except asyncio.CancelledError:
        print("terminated", file=sys.stderr)
        code = 143
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    entry()
