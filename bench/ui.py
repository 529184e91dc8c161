"""The web UI: the run page's time to first render on a store of 100k runs (target < 1 s).

    python bench/ui.py [--runs 100000] [--pages 30] [--keep | --reuse DATABASE]

1. Generates ~100k runs of the default pipeline (bench/eventgen.py, in PostgreSQL, over the
   last 30 days) in a database of its own, and fills the `runs` projection with the real
   `Store.rebuild_projections()`, then ANALYZE.
2. Starts a real `cistate serve --role api --role orchestrator` on it (the api role waits
   for an orchestrator to declare the exchanges; nothing is pending, so it idles), with the
   package's built UI and a read token.
3. In Debian's headless Chromium driven by playwright-core (tests/browser/driver.mjs;
   `bash scripts/browser.sh` installs both), logs in once through the page's form, then
   opens --pages run pages of runs drawn from the whole store, one after the other, each a
   fresh navigation, and reads Chromium's navigation timing (PerformanceNavigationTiming,
   from the navigation's start): the HTML's response end, DOMContentLoaded, load, the first
   contentful paint, and `cistate:first-render`, the mark the page sets once it has drawn
   the run (its API calls answered: the run, its events). The runs page the same way, once.
Prints p50 / p95 / max of each, in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import eventgen  # noqa: E402
from throughput import (  # noqa: E402
    Sandbox,
    free_port,
    log,
    percentile,
    run_main,
    sandboxed,
    serve_command,
    with_path,
)

from cistate.adapters.postgres.store import connect  # noqa: E402
from tests.e2e.browser import Browser, install  # noqa: E402

TARGET_MS = 1000.0
TOKEN = "bench-ui-token"  # the token of this benchmark's own server
TIMING = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const mark = performance.getEntriesByName('cistate:first-render')[0];
  const paint = performance.getEntriesByName('first-contentful-paint')[0];
  return {response_end: nav.responseEnd, dom_content_loaded: nav.domContentLoadedEventEnd,
          load: nav.loadEventEnd, first_contentful_paint: paint ? paint.startTime : null,
          first_render: mark ? mark.startTime : null};
}"""


async def build(args: argparse.Namespace, dsn: str) -> int:
    plan = eventgen.Plan.for_events(round(args.runs * eventgen._mean_events_per_run()))
    log(f"generating {plan.events:,} events in {plan.runs:,} runs")
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        total = await eventgen.generate(conn, plan)
    finally:
        await conn.close()
    store = await connect(dsn)
    try:
        report = await store.rebuild_projections()
        await store.pool.execute("VACUUM ANALYZE events")
        await store.pool.execute("VACUUM ANALYZE runs")
    finally:
        await store.close()
    log(f"{total:,} events, {report.runs:,} runs in {time.perf_counter() - t0:.0f} s")
    return report.runs


async def wait_ready(url: str, proc: subprocess.Popen[bytes], within: float = 60) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"cistate serve exited with {proc.returncode}")
            try:
                async with http.get(url + "/ui/app.js") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("cistate serve did not get ready")


async def measure(args: argparse.Namespace, base: str, run_ids: list[str],
                  work: Path) -> dict[str, Any]:
    browser = await Browser(install(), work / "chromium-profile").start()
    try:
        await browser.login(base, TOKEN, "/")
        await browser.wait_for("() => document.querySelector('#runs')", timeout=60)
        samples: dict[str, list[dict[str, Any]]] = {"run page": [], "runs page": []}
        for i, run_id in enumerate(run_ids):
            await browser.goto(f"{base}/runs/{run_id}")
            await browser.wait_for(
                "() => performance.getEntriesByName('cistate:first-render').length", timeout=30)
            timing = await browser.eval(TIMING)
            if i >= args.warmup:
                samples["run page"].append(timing)
        await browser.screenshot("bench-run-page")
        for _ in range(max(1, args.pages // 5)):
            await browser.goto(f"{base}/")
            await browser.wait_for(
                "() => performance.getEntriesByName('cistate:first-render').length", timeout=30)
            samples["runs page"].append(await browser.eval(TIMING))
        await browser.screenshot("bench-runs-page")
    finally:
        await browser.close()
    summary: dict[str, Any] = {}
    for page, timings in samples.items():
        summary[page] = {}
        for name in ("response_end", "dom_content_loaded", "load", "first_contentful_paint",
                     "first_render"):
            values = [t[name] for t in timings if t[name] is not None]
            summary[page][name] = {"p50": percentile(values, 50), "p95": percentile(values, 95),
                                   "max": max(values) if values else None, "n": len(values)}
    return summary


def report(summary: dict[str, Any], runs: int) -> bool:
    print(f"\nweb UI on a store of {runs:,} runs (Chromium navigation timing, ms from the "
          "navigation's start)")
    print(f"{'page':<10} {'figure':<24} {'p50':>8} {'p95':>8} {'max':>8}")
    for page, figures in summary.items():
        for name, values in figures.items():
            cells = [f"{values[k]:8.0f}" if values[k] is not None else "       -"
                     for k in ("p50", "p95", "max")]
            print(f"{page:<10} {name:<24} {' '.join(cells)}")
    worst = summary["run page"]["first_render"]["max"]
    ok = worst is not None and worst < TARGET_MS
    print(f"run page first render: max {worst:.0f} ms, target < {TARGET_MS:.0f} ms: "
          f"{'met' if ok else 'MISSED'}")
    return ok


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--pages", type=int, default=30, help="run pages opened (timed)")
    parser.add_argument("--warmup", type=int, default=3, help="run pages opened first, untimed")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the database and vhost afterwards")
    parser.add_argument("--reuse", metavar="DATABASE",
                        help="measure a store left by --keep (its vhost too): no generation")
    return parser.parse_args()


async def serve_and_measure(args: argparse.Namespace, sandbox: Sandbox, work: Path
                            ) -> tuple[int, dict[str, Any]]:
    conn = await asyncpg.connect(sandbox.dsn)
    try:
        ids = [str(r["id"]) for r in await conn.fetch("SELECT id FROM runs")]
    finally:
        await conn.close()
    chosen = random.Random(15).sample(ids, min(len(ids), args.pages + args.warmup))
    port = free_port()
    env, argv = serve_command(sandbox, f"cistateui{os.getpid()}", work / "none.yaml",
                              work / "work", port, 1)
    env = {k: v for k, v in env.items() if k != "CISTATE_PIPELINE"}
    env |= {"CISTATE_API_TOKEN": f"bench:{TOKEN}:read", "CISTATE_API_READ_AUTH": "1",
            "PYTHONPATH": str(ROOT)}
    # the api role waits for an orchestrator to declare the exchanges; it has nothing to do
    log_path = work / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([*argv, "--role", "api", "--role", "orchestrator"],  # noqa: ASYNC220
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            try:
                await wait_ready(base, proc)
            except RuntimeError:
                log(log_path.read_text(errors="replace")[-3000:])
                raise
            log(f"cistate serve --role api on {base}; opening {len(chosen)} run pages")
            return len(ids), await measure(args, base, chosen, work)
        finally:
            proc.terminate()
            proc.wait(10)


async def main(args: argparse.Namespace) -> int:
    if args.reuse:  # a store left by --keep: no generation
        sandbox = Sandbox(args.database_url, args.rabbitmq_url, args.reuse)
        sandbox.dsn = with_path(args.database_url, "/" + args.reuse)
        sandbox.amqp = with_path(args.rabbitmq_url, "/" + quote(args.reuse, safe=""))
        work = Path(tempfile.mkdtemp(prefix="cistate_ui_"))
        try:
            runs, summary = await serve_and_measure(args, sandbox, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        async with sandboxed(args, "ui") as (sandbox, work):
            await build(args, sandbox.dsn)
            runs, summary = await serve_and_measure(args, sandbox, work)
            if args.keep:
                log(f"measure this store again with --reuse {sandbox.name}")
    ok = report(summary, runs)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, **summary}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main, parse_args())
