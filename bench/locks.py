"""Concurrency groups and one shared lock: runs/s, and the time from a lock's release to the
next holder's step command (issue 13; target p99 < 50 ms).

    python bench/locks.py [--runs 200] [--groups 20] [--repeat 3] [--warmup 20]

Each round starts a real `cistate serve` (all roles: api, orchestrator + relay, a worker
serving the noop steps) per pipeline, on the benchmark's own database and vhost (a bus
prefix per round and pipeline), and pushes --runs runs at once on --groups branches b0..,
interleaved (10 runs per branch by default):

  plain          s1, s2, s3: noop steps, no concurrency, no lock: the baseline
  groups         the same with `concurrency: {group: "g-${branch}"}`: one run per branch at
                 a time, so at most --groups runs are live
  groups + lock  the same, and s2 has `lock: shared`: one run at a time in s2, across every
                 group, so the lock serialises s2 over all the runs and runs/s is bounded by
                 how fast the lock passes from one run to the next

runs/s: first push -> the last event of those runs (recorded_at). The ratio is groups+lock
runs/s / plain runs/s of the same round (median over rounds).

A hand-over is a `resource.released` of `lock:shared` that grants the next waiting claim in
the same decision (`resource.granted`, the next event of the lock's stream). For each:

  holder's s2 result -> lock released   the holder's `claim.released` (in the transaction of
                                        its s2 result) -> `resource.released`: the claim
                                        message's hop through the outbox and the orchestrator
  lock released -> next step.started    -> the next holder's `claim.granted` and s2's
                                        `step.started` (one transaction: the one that writes
                                        the command's outbox row): the granted control's hop
  lock released -> next command         -> s2's command seen on the broker by a tap queue
  s2 result -> next s2 command          the holder's s2 result -> the next holder's s2
                                        command, both seen on the broker: the whole hand-over

recorded_at is the orchestrator's clock when it decides (before the commit), the tap's times
are this process's clock when a message reaches it: the same machine's clock.

Checks, from the events: s2 ran in one run at a time; each group ran one run at a time;
the lock and every group granted their claims in the order they recorded them.
Everything lives in a database and vhost `cistate_locks_<pid>`, removed at the end (also on
Ctrl-C, SIGTERM or an error; --keep keeps them). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import throughput as tp  # noqa: E402
from cpu import CpuMeter  # noqa: E402
from throughput import Child, Sandbox, Start, Target, log, percentile, run_main  # noqa: E402

TARGET_MS = 50.0
LOCK = "shared"
LOCK_RESOURCE = f"lock:{LOCK}"
LOCK_STEP = "s2"
REPO_URL = "https://git.example.invalid/bench/app.git"
VARIANTS = ("plain", "groups", "lock")
LABELS = {"plain": "plain (baseline)", "groups": "groups", "lock": "groups + lock"}


def pipeline_yaml(variant: str) -> str:
    lines = ["name: locks"]
    if variant != "plain":
        lines.append('concurrency: {group: "g-${branch}"}')
    lines.append("steps:")
    for i in (1, 2, 3):
        # timeout 0: no timeout timer rows (as throughput.py); the lock step keeps its
        # default lock_timeout (1 h), whose timer row is part of what a lock wait costs
        lines += [f"  - name: s{i}", "    uses: noop", "    timeout: 0"]
        if variant == "lock" and f"s{i}" == LOCK_STEP:
            lines.append(f"    lock: {LOCK}")
    return "\n".join(lines) + "\n"


# -- the tap: when each command, result, claim and grant reached the broker --------------


class Tap:
    """A private queue bound to the exchange; the wall-clock time (time.time(), comparable
    with recorded_at) of the first arrival of each message."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, ...], float] = {}
        self.repeats = 0

    async def start(self, channel: aio_pika.abc.AbstractChannel, exchange: str) -> None:
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for key in ("step.*.run", "step.*.result", "claim", "control"):
            await queue.bind(exchange, key)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.time()
        key = self.classify(message.routing_key or "", message.body)
        if key is None:
            return
        if key in self.seen:
            self.repeats += 1
        else:
            self.seen[key] = now

    @staticmethod
    def classify(routing_key: str, body: bytes) -> tuple[str, ...] | None:
        data = json.loads(body)
        if routing_key == "claim":
            return ("claim", data["action"], data["claim"])
        if routing_key == "control":
            if data.get("action") != "granted":
                return None
            return ("granted", data["claim"])
        parts = routing_key.split(".")
        if len(parts) == 3 and parts[0] == "step":
            return ("run" if parts[2] == "run" else "result", data["run_id"], parts[1])
        return None


# -- one pipeline, one round -------------------------------------------------------------


@dataclass
class Measured:
    variant: str
    runs: int
    seconds: float
    events: int
    other_cores: float
    cores: str
    tap_repeats: int
    handover: dict[str, list[float]] = field(default_factory=dict, repr=False)
    grants: int = 0
    cycle_ms: list[float] = field(default_factory=list, repr=False)  # grant -> next grant
    s2_ms: list[float] = field(default_factory=list, repr=False)  # s2 started -> succeeded
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds


HANDOVER_ROWS = {
    "result_to_release": "holder's s2 result -> lock released",
    "release_to_started": "lock released -> next step.started",
    "release_to_command": "lock released -> next s2 command",
    "result_to_command": "s2 result -> next s2 command",
}
TARGET_ROWS = ("release_to_started", "release_to_command")


def make_starter(groups: int) -> Any:
    counter = 0

    def starts(n: int) -> list[Start]:
        nonlocal counter
        from cistate.domain.run import run_id_for

        made = []
        for i in range(counter, counter + n):
            message_id = uuid.uuid4()
            body = {"repo": REPO_URL, "ref": f"refs/heads/b{i % groups}",
                    "commit": uuid.uuid4().hex + uuid.uuid4().hex[:8]}
            made.append(Start("push", json.dumps(body).encode(), str(message_id),
                              str(run_id_for(message_id))))
        counter += n
        return made

    return starts


async def run_variant(args: argparse.Namespace, sandbox: Sandbox, work: Path, variant: str,
                      round_no: int) -> Measured:
    prefix = f"locks{os.getpid()}{variant}r{round_no}"
    pipeline = work / f"pipeline-{variant}.yaml"
    pipeline.write_text(pipeline_yaml(variant))
    port = tp.free_port()
    env, argv = tp.serve_command(sandbox, prefix, pipeline, work / "workdir", port,
                                 args.concurrency)
    child = Child("cistate serve", work / f"cistate-serve-{variant}-{round_no}.log")
    proc = await child.start(argv, env=env)
    try:
        await tp.wait_healthy(port, child)
        log(f"{LABELS[variant]}: cistate serve (pid {proc.pid}) healthy on :{port}; "
            f"log {child.log_path}")
        target = tp.cistate_target(args, prefix)  # its progress and finished queries
        return await measure(args, sandbox, target, variant, proc.pid, child)
    finally:
        await child.stop()


async def measure(args: argparse.Namespace, sandbox: Sandbox, target: Target, variant: str,
                  pid: int, child: Child) -> Measured:
    connection = await aio_pika.connect_robust(  # named: not the process under test
        sandbox.amqp, client_properties={"connection_name": "bench-driver"})
    pg = await asyncpg.connect(sandbox.dsn)
    meter_conn = await asyncpg.connect(sandbox.dsn)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(target.exchange, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        tap = Tap()
        await tap.start(await connection.channel(), target.exchange)
        starts_of = make_starter(args.groups)
        if args.warmup:
            log(f"{LABELS[variant]}: warm-up {args.warmup} runs")
            await tp.drive(exchange, pg, target, starts_of(args.warmup), 0, args.timeout,
                           child.problem)
            await asyncio.sleep(0.5)
        starts = starts_of(args.runs)
        chains = [s.chain for s in starts]
        meter = CpuMeter(meter_conn, sandbox.name, procs=[pid])
        await meter.start()
        t0 = time.time()
        await tp.drive(exchange, pg, target, starts, 0, args.timeout, child.problem)
        await meter.stop()
        await asyncio.sleep(0.3)  # the tap's tail
        last, events = await target.finished(pg, chains)
        result = Measured(variant, len(chains), last.timestamp() - t0, events,
                          meter.other_cores, meter.cores(), tap.repeats)
        log(f"{LABELS[variant]}: {result.runs_per_s:.1f} runs/s ({meter.cores()})")
        await analyse(pg, chains, tap, result)
        return result
    finally:
        await meter_conn.close()
        await pg.close()
        await connection.close()


# -- what the events say ------------------------------------------------------------------


def _ms(a: datetime | float, b: datetime | float) -> float:
    """b - a in ms; datetimes and time.time() floats alike."""
    ta = a.timestamp() if isinstance(a, datetime) else a
    tb = b.timestamp() if isinstance(b, datetime) else b
    return (tb - ta) * 1000


async def analyse(pg: asyncpg.Connection, chains: list[str], tap: Tap,
                  result: Measured) -> None:
    rows = await pg.fetch(
        "SELECT run_id::text AS run_id, type, data, recorded_at FROM events"
        " WHERE run_id = ANY($1::uuid[]) AND type = ANY($2::text[]) ORDER BY position",
        chains, ["step.started", "step.succeeded", "claim.granted", "claim.released",
                 "run.succeeded"])
    started: dict[tuple[str, str], datetime] = {}
    succeeded: dict[tuple[str, str], datetime] = {}
    granted: dict[tuple[str, str], datetime] = {}
    released: dict[tuple[str, str], datetime] = {}
    ended: dict[str, datetime] = {}
    for r in rows:
        data = json.loads(r["data"]) if isinstance(r["data"], str) else r["data"]
        key_step = (r["run_id"], data.get("step", ""))
        if r["type"] == "step.started":
            started.setdefault(key_step, r["recorded_at"])
        elif r["type"] == "step.succeeded":
            succeeded[key_step] = r["recorded_at"]
        elif r["type"] == "claim.granted":
            granted.setdefault((r["run_id"], data["resource"]), r["recorded_at"])
        elif r["type"] == "claim.released":
            released.setdefault((r["run_id"], data["resource"]), r["recorded_at"])
        else:
            ended[r["run_id"]] = r["recorded_at"]

    stream = await pg.fetch(
        "SELECT resource, seq, type, data, meta, recorded_at FROM resource_events"
        " WHERE data->>'run_id' = ANY($1::text[]) ORDER BY resource, seq", chains)
    by_resource: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in stream:
        item = dict(r)
        for k in ("data", "meta"):
            if isinstance(item[k], str):
                item[k] = json.loads(item[k])
        by_resource[r["resource"]].append(item)

    # grants in arrival order: a claim arrives when the stream queues it, or grants it at
    # once (a grant not made by the release before it in the same decision)
    out_of_order = []
    for name, events in by_resource.items():
        arrivals, grants = [], []
        for i, ev in enumerate(events):
            claim = ev["data"]["claim"]
            if ev["type"] == "resource.queued":
                arrivals.append(claim)
            elif ev["type"] == "resource.granted":
                grants.append(claim)
                prev = events[i - 1] if i else None
                if not (prev is not None and prev["type"] == "resource.released"
                        and prev["meta"].get("causation_id") == ev["meta"].get("causation_id")):
                    arrivals.append(claim)
        if arrivals != grants:
            out_of_order.append(name)
    groups = [n for n in by_resource if n.startswith("group:")]
    result.checks["resources"] = len(by_resource)
    result.checks["groups"] = len(groups)
    result.checks["grant_order_ok"] = not out_of_order
    if out_of_order:
        result.checks["out_of_order"] = out_of_order[:5]

    # each group: one run at a time (a run's first step.started after the previous run's end)
    if groups:
        by_group: dict[str, list[str]] = defaultdict(list)
        for name in groups:
            for ev in by_resource[name]:
                if ev["type"] == "resource.granted":
                    by_group[name].append(ev["data"]["run_id"])
        overlaps = 0
        for runs in by_group.values():
            for before, after in itertools.pairwise(runs):
                if started[(after, "s1")] < ended[before]:
                    overlaps += 1
        result.checks["group_overlaps"] = overlaps

    lock_events = by_resource.get(LOCK_RESOURCE, [])
    if not lock_events:
        return
    # s2 in one run at a time
    spans = sorted((started[(c, LOCK_STEP)], succeeded[(c, LOCK_STEP)]) for c in chains)
    result.checks["lock_overlaps"] = sum(
        1 for (_, end), (start, _) in itertools.pairwise(spans) if start < end)

    result.s2_ms = [_ms(start, end) for start, end in spans]

    handover: dict[str, list[float]] = {k: [] for k in HANDOVER_ROWS}
    missing = 0
    for i, ev in enumerate(lock_events):
        if ev["type"] != "resource.released":
            continue
        nxt = lock_events[i + 1] if i + 1 < len(lock_events) else None
        if (nxt is None or nxt["type"] != "resource.granted"
                or nxt["meta"].get("causation_id") != ev["meta"].get("causation_id")):
            continue  # nobody was waiting
        holder, following = ev["data"]["run_id"], nxt["data"]["run_id"]
        t_release = ev["recorded_at"]
        handover["result_to_release"].append(
            _ms(released[(holder, LOCK_RESOURCE)], t_release))
        handover["release_to_started"].append(_ms(t_release, started[(following, LOCK_STEP)]))
        if granted.get((following, LOCK_RESOURCE)) != started[(following, LOCK_STEP)]:
            result.checks["granted_apart_from_started"] = (
                result.checks.get("granted_apart_from_started", 0) + 1)
        command = tap.seen.get(("run", following, LOCK_STEP))
        holder_result = tap.seen.get(("result", holder, LOCK_STEP))
        if command is None or holder_result is None:
            missing += 1
            continue
        handover["release_to_command"].append(_ms(t_release, command))
        handover["result_to_command"].append(_ms(holder_result, command))
    result.handover = handover
    grants_at = sorted(ev["recorded_at"] for ev in lock_events
                       if ev["type"] == "resource.granted")
    result.grants = len(grants_at)
    result.cycle_ms = [_ms(a, b) for a, b in itertools.pairwise(grants_at)]
    if missing:
        result.checks["tap_missing"] = missing


# -- report --------------------------------------------------------------------------------


def _med(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(args: argparse.Namespace, results: dict[str, list[Measured]]) -> dict[str, Any]:
    print()
    per_group = args.runs / args.groups
    print(f"locks: N={args.runs} runs on {args.groups} branches ({per_group:g} each), 3 noop "
          f"steps s1 s2 s3, all pushed at once; groups: concurrency g-${{branch}}; lock: "
          f"s2 has lock: {LOCK}; warm-up {args.warmup}; worker concurrency {args.concurrency};"
          f" {args.repeat} round(s), medians")
    header = f"{'':<18}{'wall s':>7}{'runs/s':>8}{'events/s':>9}  other cores (worst round)"
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {"runs": args.runs, "groups": args.groups,
                               "repeat": args.repeat, "warmup": args.warmup, "variants": {}}
    for variant, rounds in results.items():
        rate = _med([m.runs_per_s for m in rounds])
        worst = max(m.other_cores for m in rounds)
        print(f"{LABELS[variant]:<18}{_f(_med([m.seconds for m in rounds]), 2):>7}"
              f"{_f(rate):>8}{_f(_med([m.events / m.seconds for m in rounds])):>9}"
              f"  {worst:.2f}")
        summary["variants"][variant] = {
            "runs_per_s": rate, "rounds_runs_per_s": [round(m.runs_per_s, 2) for m in rounds],
            "other_cores": [round(m.other_cores, 2) for m in rounds],
            "checks": [m.checks for m in rounds]}
    plain = results.get("plain", [])
    for variant in ("lock", "groups"):
        pairs = list(zip(results.get(variant, []), plain, strict=False))
        if pairs:
            ratio = statistics.median(m.runs_per_s / b.runs_per_s for m, b in pairs)
            summary[f"ratio_{variant}"] = round(ratio, 3)
            each = ", ".join(f"{m.runs_per_s / b.runs_per_s:.2f}" for m, b in pairs)
            print(f"ratio {LABELS[variant]} / plain: {ratio:.2f} runs/s (per round: {each})")
    locked = results.get("lock", [])
    if locked:
        handovers = [len(m.handover.get("release_to_started", [])) for m in locked]
        cycle = _med([_med(m.cycle_ms) for m in locked])
        s2 = _med([_med(m.s2_ms) for m in locked])
        legs = {k: _med([percentile(m.handover[k], 50) for m in locked])
                for k in ("release_to_started", "result_to_release")}
        print(f"the lock serialises s2 over all {args.runs} runs, so runs/s is bounded by the "
              f"hand-over: a grant -> the next p50 {_f(cycle)} ms = released -> next "
              f"step.started {_f(legs['release_to_started'])} + s2 started -> succeeded "
              f"{_f(s2)} + -> released {_f(legs['result_to_release'])} (p50s): at most "
              f"{_f(1000 / cycle if cycle else None)} runs/s")
        summary["lock_cycle_p50_ms"] = cycle
        summary["s2_p50_ms"] = s2
        print(f"lock hand-overs: {', '.join(map(str, handovers))} (of "
              f"{', '.join(str(m.grants) for m in locked)} grants) per round")
        head = f"{'':<40}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}  p99 per round"
        print(head)
        print("-" * len(head))
        summary["handover"] = {}
        for key, label in HANDOVER_ROWS.items():
            p50 = _med([percentile(m.handover[key], 50) for m in locked])
            p99s = [percentile(m.handover[key], 99) for m in locked]
            p99 = _med(p99s)
            top = max((max(m.handover[key]) for m in locked if m.handover[key]), default=None)
            line = (f"{label:<40}{_f(p50):>8}{_f(p99):>8}{_f(top):>8}  "
                    f"{', '.join(_f(v) for v in p99s)}")
            if key in TARGET_ROWS and p99 is not None:
                line += f"  target p99 < {TARGET_MS:g}: {'met' if p99 < TARGET_MS else 'NOT met'}"
            print(line)
            summary["handover"][key] = {"p50_ms": p50, "p99_ms": p99, "max_ms": top,
                                        "p99_per_round": p99s}
    checks = [(v, m.checks) for v, rounds in results.items() for m in rounds]
    lock_overlaps = sum(c.get("lock_overlaps", 0) for _, c in checks)
    group_overlaps = sum(c.get("group_overlaps", 0) for _, c in checks)
    order_ok = all(c.get("grant_order_ok", True) for _, c in checks)
    print(f"checks: s2 in one run at a time: {lock_overlaps} overlaps; one run per group at a "
          f"time: {group_overlaps} overlaps; grants in arrival order (lock and "
          f"{max((c.get('groups', 0) for _, c in checks), default=0)} groups): "
          f"{'yes' if order_ok else 'NO'}")
    if locked and not any("granted_apart_from_started" in m.checks for m in locked):
        print("claim.granted and the lock step's step.started share one transaction (same "
              "recorded_at) in every hand-over: released -> claim.granted is the same figure")
    odd = {k: c[k] for _, c in checks for k in ("out_of_order", "tap_missing",
                                                  "granted_apart_from_started") if k in c}
    if odd:
        print(f"note: {odd}")
    repeats = sum(m.tap_repeats for rounds in results.values() for m in rounds)
    if repeats:
        print(f"note: the tap saw {repeats} message(s) twice (redelivered or republished)")
    noisy = max(m.other_cores for rounds in results.values() for m in rounds)
    if noisy > 0.25:
        print(f"warning: other work kept up to {noisy:.2f} of {os.cpu_count()} cores busy "
              "during a measurement: runs/s and tail latencies include that noise")
    return summary


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", "-n", type=int, default=200, help="runs per pipeline")
    parser.add_argument("--groups", "-g", type=int, default=20,
                        help="branches, so concurrency groups (runs are spread evenly)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds (each: every pipeline once); medians are printed")
    parser.add_argument("--warmup", type=int, default=20, help="runs before measuring")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="CISTATE_WORKER_CONCURRENCY")
    parser.add_argument("--only", choices=VARIANTS, action="append",
                        help="run only these pipelines (repeatable; the ratio needs plain)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per phase")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the database, vhost and temp dir (logs) afterwards")
    args = parser.parse_args()
    if args.runs < 1 or args.groups < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error("--runs, --groups and --repeat must be >= 1, --warmup >= 0")
    args.steps = 3  # for throughput.cistate_target
    args.variants = [v for v in VARIANTS if not args.only or v in args.only]
    return args


async def main(args: argparse.Namespace) -> int:
    results: dict[str, list[Measured]] = {}
    async with tp.sandboxed(args, "locks") as (sandbox, work):
        for round_no in range(1, args.repeat + 1):
            for variant in args.variants:
                log(f"round {round_no} of {args.repeat}: {LABELS[variant]}")
                result = await run_variant(args, sandbox, work, variant, round_no)
                results.setdefault(variant, []).append(result)
        summary = report(args, results)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background by a non-interactive shell: take SIGINT back, for us
        # and for the children (an ignored signal stays ignored across exec)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_main(main, parse_args())
    except asyncio.CancelledError:  # SIGTERM (sandboxed() cancels main), cleaned up by now
        print("terminated", file=sys.stderr)
        sys.exit(143)
