"""Live logs: how long a line printed in a step takes to reach a client that follows it.

One `cistate serve` (every role) on a database and vhost of its own (throughput.py's
sandbox and serve_command). A pipeline of --steps parallel `script` steps (each `needs` one
`noop` step, so they run at once), each printing a line with the wall-clock time every
--interval seconds for --seconds; one server-sent-events follower per step
(`GET /api/v1/runs/{id}/steps/{step}/log?follow=1`). The latency of a line is its arrival
at the follower minus the time printed in it (one machine, one clock). Prints p50 / p99 /
max over all lines, and checks that every line arrived once and in order. Target: p99 <
500 ms with 20 steps.

    .venv/bin/python bench/livelog.py                  # 20 steps, 10 lines/s each, 10 s
    .venv/bin/python bench/livelog.py --steps 40 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import throughput as tp  # noqa: E402
from throughput import Child, free_port, log, percentile, run_main  # noqa: E402

LINE = re.compile(r"^t=(\d+\.\d+) n=(\d+)$")


def pipeline_yaml(steps: int, lines: int, interval: float) -> str:
    out = ["name: livelog", "steps:", "  - {name: start, uses: noop}"]
    for index in range(steps):
        out += [f"  - name: s{index}", "    uses: script", "    needs: [start]",
                "    run: |",
                f"      for n in $(seq 1 {lines}); do echo \"t=$(date +%s.%N) n=$n\";"
                f" sleep {interval}; done"]
    return "\n".join(out) + "\n"


async def follow(http: aiohttp.ClientSession, url: str) -> list[tuple[float, int]]:
    """(latency in s, line number) of every timed line the follower got, as it got them."""
    got: list[tuple[float, int]] = []
    pending = ""
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=None)) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            arrived = time.time()
            line = raw.decode()
            if line.startswith("event: end"):
                break
            if not line.startswith("data: "):
                continue
            pending += json.loads(line.removeprefix("data: ")).get("text", "")
            *whole, pending = pending.split("\n")
            for text in whole:
                match = LINE.match(text)
                if match:
                    got.append((arrived - float(match[1]), int(match[2])))
    return got


async def main(args: argparse.Namespace) -> int:
    lines = int(args.seconds / args.interval)
    async with tp.sandboxed(args, "livelog") as (sandbox, work):
        pipeline = work / "pipeline.yaml"
        pipeline.write_text(pipeline_yaml(args.steps, lines, args.interval))
        port = free_port()
        prefix = f"cistate{os.getpid()}"
        env, argv = tp.serve_command(sandbox, prefix, pipeline, work / "workdir", port,
                                     max(32, args.steps + 4))
        env["CISTATE_API_READ_AUTH"] = "false"  # a local setup: reads open
        child = Child("cistate serve", work / "cistate-serve.log")
        await child.start(argv, env=env)
        try:
            await tp.wait_healthy(port, child)
            connection = await aio_pika.connect_robust(sandbox.amqp)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(prefix)
                delivery = uuid.uuid4()
                body = {"repo": "https://git.example.com/bench/livelog.git",
                        "ref": "refs/heads/main", "commit": uuid.uuid4().hex + "0" * 8}
                await exchange.publish(aio_pika.Message(json.dumps(body).encode(),
                                                        message_id=str(delivery)), "push")
            from cistate.domain.run import run_id_for
            run_id = run_id_for(delivery)
            base = f"http://127.0.0.1:{port}/api/v1/runs/{run_id}"
            async with aiohttp.ClientSession() as http:
                for _ in range(600):  # the run exists once the push is handled
                    async with http.get(base) as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.05)
                log(f"run {run_id}: {args.steps} followers on {args.steps} steps, "
                    f"{lines} lines each")
                results = await asyncio.wait_for(asyncio.gather(*(
                    follow(http, f"{base}/steps/s{index}/log?follow=1")
                    for index in range(args.steps))), args.seconds + args.timeout)
        finally:
            await child.stop()
    latencies = sorted(latency for got in results for latency, _ in got)
    in_order = sum([n for _, n in got] == list(range(1, lines + 1)) for got in results)
    print(f"steps {args.steps}, lines per step {lines} (every {args.interval:g} s), "
          f"lines received {len(latencies)} of {args.steps * lines}; followers that got "
          f"every line once and in order: {in_order} of {args.steps}")
    if not latencies:
        return 1
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    assert p50 is not None and p99 is not None
    print(f"line printed -> follower: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms (target p99 < 500 ms: "
          f"{'met' if p99 < 0.5 else 'not met'})")
    return 0 if in_order == args.steps else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="parallel printing steps")
    parser.add_argument("--seconds", type=float, default=10, help="how long each prints")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between lines")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds, over --seconds, for the run to end")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the database, vhost and temp dir (logs) afterwards")
    return parser.parse_args()


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    run_main(main, parse_args())
