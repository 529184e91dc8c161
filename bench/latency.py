"""Latency: p50/p99 from a step's result to the next step's command, at light load and at
80% of the maximum throughput measured in the same invocation.

    python bench/latency.py [--steps 5] [--burst 400] [--light 40] [--paced-seconds 20]
                            [--repeat 3]

Uses bench/throughput.py's machinery (sandbox, `cistate serve` child, bare child, tap queue,
publishing): a tap queue bound to the exchange timestamps the first arrival of every step
result (`step.<s>.result`) and command (`step.<s>.run`); a gap is result of step i -> command
of step i+1 of the same run, i.e. one orchestrator hop (consume, transaction, publish) plus
two broker passes.

For each system (a real `cistate serve` with K noop steps, then the bare loop `bare 2hop` of
throughput.py: the least work a hop needs), after --warmup runs:
  max    --burst runs published at once: runs/s from first publish to last terminal event
         (and the gaps at saturation, for reference)
  light  --light runs one at a time (the next is pushed when the previous one ended)
  80%    runs pushed at an even pace of 0.8 x cistate's max runs/s for --paced-seconds;
         the bare loop gets the same offered rate (same load, not 80% of its own max)
Baseline: the bare loop's gaps under the same loads; ratios are cistate / bare.
--repeat rounds (3), each running both systems through every phase (the bare loop paced at
that round's cistate rate); the table shows medians over rounds, the ratios are medians of
the per-round ratios, and a paced phase that fell behind its offered rate is flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractExchange

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import throughput as tp  # noqa: E402
from cpu import CpuMeter  # noqa: E402
from throughput import (  # noqa: E402
    Child,
    Sandbox,
    Start,
    Tap,
    Target,
    log,
    percentile,
    run_main,
    sandboxed,
)

LOAD = 0.8


@dataclass
class Phase:
    name: str
    runs: int
    seconds: float  # first publish -> last terminal event
    gaps: list[float] = field(repr=False)
    offered_per_s: float | None = None
    cpu: str = ""
    other_cores: float = 0.0

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds

    def p(self, q: float) -> float | None:
        return percentile(self.gaps, q)


class Driver:
    """Pushes runs into one system under test in different patterns; the tap times them."""

    def __init__(self, args: argparse.Namespace, sandbox: Sandbox, target: Target, pid: int,
                 alive: Callable[[], str | None]) -> None:
        self.args, self.sandbox, self.target, self.pid = args, sandbox, target, pid
        self.alive = alive
        self.tap = Tap(target.classify)
        self.counter = 0

    async def __aenter__(self) -> Driver:
        self.connection = await aio_pika.connect_robust(self.sandbox.amqp)
        self.pg = await asyncpg.connect(self.sandbox.dsn)
        self.meter_conn = await asyncpg.connect(self.sandbox.dsn)
        channel = await self.connection.channel(publisher_confirms=True)
        self.exchange: AbstractExchange = await channel.declare_exchange(
            self.target.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await self.tap.start(await self.connection.channel(), self.target.exchange,
                             self.target.tap_keys)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.meter_conn.close()
        await self.pg.close()
        await self.connection.close()

    def starts(self, n: int) -> list[Start]:
        made = [self.target.make_start(self.counter + i) for i in range(n)]
        self.counter += n
        return made

    async def _measured(self, name: str, starts: list[Start], push: Any,
                        offered: float | None = None) -> Phase:
        chains = [s.chain for s in starts]
        meter = CpuMeter(self.meter_conn, self.sandbox.name, procs=[self.pid])
        await meter.start()
        t0_wall = time.time()
        await push()
        await self.wait_done(chains)
        await meter.stop()
        last, _ = await self.target.finished(self.pg, chains)
        phase = Phase(name, len(starts), last.timestamp() - t0_wall,
                      self.tap.gaps(chains, self.args.steps), offered, meter.cores(),
                      meter.other_cores)
        log(f"{self.target.name} {name}: {phase.runs_per_s:.1f} runs/s, gaps p50 "
            f"{_ms(phase.p(50))} p99 {_ms(phase.p(99))} ms ({phase.cpu})")
        return phase

    async def wait_done(self, chains: list[str]) -> None:
        """Until every run has finished (as throughput.drive waits, after publishing)."""
        deadline = time.monotonic() + self.args.timeout
        while True:
            progress = await self.target.progress(self.pg, chains)
            if progress.failed:
                raise RuntimeError(f"{self.target.name}: {progress.failed} runs did not "
                                   f"succeed: {progress.detail}")
            if progress.done >= len(chains):
                return
            problem = self.alive()
            if problem:
                raise RuntimeError(f"{self.target.name}: {problem}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.target.name}: {progress.done} of {len(chains)} "
                                   f"runs finished within {self.args.timeout:g} s")
            await asyncio.sleep(0.02)

    async def warmup(self) -> None:
        if self.args.warmup:
            await tp.drive(self.exchange, self.pg, self.target, self.starts(self.args.warmup),
                           0, self.args.timeout, self.alive)
            await asyncio.sleep(0.5)

    async def burst(self, n: int) -> Phase:
        starts = self.starts(n)
        return await self._measured("max", starts, lambda: tp.publish(self.exchange, starts))

    async def light(self, n: int) -> Phase:
        """One run at a time: throughput.drive with at most 1 in flight."""
        starts = self.starts(n)
        return await self._measured("light", starts, lambda: tp.drive(
            self.exchange, self.pg, self.target, starts, 1, self.args.timeout, self.alive))

    async def paced(self, rate: float, seconds: float) -> Phase:
        starts = self.starts(max(1, round(rate * seconds)))

        async def even_pace() -> None:
            t0 = time.monotonic()
            pending = []
            for i, start in enumerate(starts):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(tp.publish(self.exchange, [start])))
            await asyncio.gather(*pending)

        return await self._measured(f"{LOAD:.0%} load", starts, even_pace, offered=rate)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# -- the two systems -----------------------------------------------------------------------


async def start_cistate(args: argparse.Namespace, sandbox: Sandbox, work: Path, round_no: int
                        ) -> tuple[Child, Target]:
    prefix = f"lat{os.getpid()}r{round_no}"
    pipeline = work / "pipeline.yaml"
    pipeline.write_text(tp.pipeline_yaml(args.steps))
    port = tp.free_port()
    env, argv = tp.serve_command(sandbox, prefix, pipeline, work / "workdir", port,
                                 args.concurrency)
    child = Child("cistate serve", work / f"cistate-serve-{round_no}.log")
    await child.start(argv, env=env)
    await tp.wait_healthy(port, child)
    return child, tp.cistate_target(args, prefix)


async def start_bare(args: argparse.Namespace, sandbox: Sandbox, work: Path, round_no: int
                     ) -> tuple[Child, Target]:
    mode = "2hop"
    prefix = f"latbare{os.getpid()}r{round_no}"
    pg = await asyncpg.connect(sandbox.dsn)
    try:
        await pg.execute(tp.BARE_SCHEMA)
    finally:
        await pg.close()
    config = {"dsn": sandbox.dsn, "amqp": sandbox.amqp, "prefix": prefix, "mode": mode,
              "last": args.steps, "prefetch": tp.ORCHESTRATOR_PREFETCH,
              "worker_prefetch": args.concurrency, "pool": tp.POOL_SIZE}
    child = Child(f"bare {mode}", work / f"bare-{round_no}.log")
    proc = await child.start([sys.executable, str(tp.THIS_FILE), "--bare-child",
                              json.dumps(config)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if line.strip() != b"ready":
        await proc.wait()
        raise RuntimeError(f"bare {mode} did not start: {child.problem()}")
    return child, tp.bare_target(args, prefix, mode)


async def measure(args: argparse.Namespace, sandbox: Sandbox, child: Child, target: Target,
                  rate: float | None) -> dict[str, Phase]:
    assert child.proc is not None
    phases: dict[str, Phase] = {}
    async with Driver(args, sandbox, target, child.proc.pid, child.problem) as driver:
        log(f"{target.name}: warm-up {args.warmup} runs")
        await driver.warmup()
        phases["max"] = await driver.burst(args.burst)
        await asyncio.sleep(1)
        phases["light"] = await driver.light(args.light)
        await asyncio.sleep(1)
        pace = rate if rate is not None else LOAD * phases["max"].runs_per_s
        log(f"{target.name}: pacing {pace:.1f} runs/s for {args.paced_seconds:g} s")
        phases["load"] = await driver.paced(pace, args.paced_seconds)
    return phases


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Phase]]]
           ) -> dict[str, Any]:
    """Medians over the rounds; ratios are medians of the per-round ratios."""
    def med(values: list[float | None]) -> float | None:
        found = [v for v in values if v is not None]
        return statistics.median(found) if found else None

    print()
    print(f"latency: result of step i -> command of step i+1, seen by a tap queue; K={args.steps}"
          f" noop steps (gaps per run: {args.steps - 1}); warm-up {args.warmup} runs; "
          f"{args.repeat} round(s), medians")
    header = (f"{'':<9}{'phase':<10}{'runs':>6}{'offered/s':>10}{'runs/s':>8}{'gaps':>6}"
              f"{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}  other cores (worst round)")
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {"steps": args.steps, "load": LOAD, "repeat": args.repeat,
                               "systems": {}, "rounds": {}}
    behind = []
    for system, rounds in results.items():
        out = {}
        for key in rounds[0]:
            phases = [r[key] for r in rounds]
            first = phases[0]
            offered = med([p.offered_per_s for p in phases])
            p50, p99 = med([p.p(50) for p in phases]), med([p.p(99) for p in phases])
            worst = med([max(p.gaps) if p.gaps else None for p in phases])
            rate = med([p.runs_per_s for p in phases])
            other = max(p.other_cores for p in phases)
            runs = round(statistics.median(p.runs for p in phases))
            print(f"{system:<9}{first.name:<10}{runs:>6}"
                  f"{'-' if offered is None else f'{offered:.1f}':>10}{rate or 0:>8.1f}"
                  f"{sum(len(p.gaps) for p in phases):>6}{_ms(p50):>8}{_ms(p99):>8}"
                  f"{_ms(worst):>8}  {other:.2f}")
            out[key] = {"runs_per_s": rate, "offered_per_s": offered, "p50_ms": p50,
                        "p99_ms": p99, "max_ms": worst, "other_cores_worst": other}
            behind += [f"{system} round {i + 1}: {p.runs_per_s:.1f} of {p.offered_per_s:.1f}"
                       for i, p in enumerate(phases)
                       if p.offered_per_s and p.runs_per_s < 0.95 * p.offered_per_s]
        summary["systems"][system] = out
        summary["rounds"][system] = [
            {key: {"runs_per_s": round(p.runs_per_s, 2), "p50_ms": p.p(50), "p99_ms": p.p(99),
                   "other_cores": p.other_cores, "cpu": p.cpu} for key, p in r.items()}
            for r in rounds]
    if "cistate" in results and "bare" in results:
        print()
        pairs = list(zip(results["cistate"], results["bare"], strict=False))
        for key in ("light", "load", "max"):
            r50 = med([_ratio(c[key].p(50), b[key].p(50)) for c, b in pairs])
            r99 = med([_ratio(c[key].p(99), b[key].p(99)) for c, b in pairs])
            if r50 is None or r99 is None:
                continue
            name = results["cistate"][0][key].name
            print(f"ratio cistate/bare at {name:<9}: p50 {r50:.2f}  p99 {r99:.2f}")
            summary[f"ratio_{key}"] = {"p50": round(r50, 2), "p99": round(r99, 2)}
    for line in behind:
        print(f"warning: fell behind the offered rate ({line} runs/s): its gaps are queueing")
    noisy = max(p.other_cores for rounds in results.values() for r in rounds
                for p in r.values())
    if noisy > 0.25:
        print(f"warning: other work kept up to {noisy:.2f} of {os.cpu_count()} cores busy "
              "during a phase: tail latencies include that noise")
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", "-k", type=int, default=5, help="noop steps per run (K)")
    parser.add_argument("--burst", type=int, default=400, help="runs of the max phase")
    parser.add_argument("--light", type=int, default=40, help="runs of the light phase")
    parser.add_argument("--paced-seconds", type=float, default=20.0,
                        help="length of the 80%% phase")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds (each: both systems, all phases); medians are printed")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="CISTATE_WORKER_CONCURRENCY, and the bare worker's prefetch")
    parser.add_argument("--only", choices=["cistate", "bare"])
    parser.add_argument("--timeout", type=float, default=600, help="seconds per phase")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a gap is between two steps)")
    return args


async def main(args: argparse.Namespace) -> int:
    results: dict[str, list[dict[str, Phase]]] = {}
    async with sandboxed(args, "latency") as (sandbox, work):
        for round_no in range(1, args.repeat + 1):
            rate: float | None = None
            for system, starter in (("cistate", start_cistate), ("bare", start_bare)):
                if args.only and args.only != system:
                    continue
                log(f"round {round_no} of {args.repeat}: {system}")
                child, target = await starter(args, sandbox, work, round_no)
                try:
                    phases = await measure(args, sandbox, child, target, rate)
                finally:
                    await child.stop()
                results.setdefault(system, []).append(phases)
                rate = phases["load"].offered_per_s  # the bare loop gets the same load
        summary = report(args, results)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return 0


if __name__ == "__main__":
    run_main(main, parse_args())
