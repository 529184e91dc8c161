"""What the step sandbox costs per step: a `script` step running `true`, sandbox on
(bubblewrap, the default) and off (CISTATE_SANDBOX=none), in the same invocation.

Each attempt goes through the worker's own `Worker.execute` (secrets resolved, attempt
folders made, the launcher, the handler, masking, the folders removed), as a command from
the bus would; no broker or database is involved, so the figure is the worker's cost alone.
Rounds alternate the two modes so that the machine's drift touches both alike.

    .venv/bin/python bench/sandbox.py [--steps 50] [--rounds 5] [--secrets 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import handlers
from cistate.domain.messages import SecretRef, StepCommand
from cistate.service.worker import Worker
from handlers.sandbox import SandboxSettings


def command(secrets: int) -> StepCommand:
    return StepCommand(
        run_id=uuid.uuid4(), step="noop-script", attempt=1, uses="script", run="true",
        repo="https://git.example.com/bench/app.git", ref="refs/heads/main",
        commit="a" * 40, secrets=[SecretRef(name=f"BENCH_SECRET_{i}") for i in range(secrets)])


async def one_round(mode: str, steps: int, secrets: int, workdir: Path) -> list[float]:
    worker = Worker(cast(Any, None), workdir, handlers.load,
                    sandbox=SandboxSettings(sandbox=mode))  # type: ignore[arg-type]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        result = await worker.execute(command(secrets))
        times.append((time.perf_counter() - started) * 1000)
        if result.status != "succeeded":
            raise SystemExit(f"the step failed with CISTATE_SANDBOX={mode}: {result.error}")
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="steps per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--secrets", type=int, default=2, help="secrets each step declares")
    args = parser.parse_args()
    for i in range(args.secrets):
        os.environ[f"CISTATE_SECRET_BENCH_SECRET_{i}"] = f"bench-secret-value-{i}-{uuid.uuid4()}"
    results: dict[str, list[float]] = {"bwrap": [], "none": []}
    with tempfile.TemporaryDirectory(prefix="cistate-bench-sandbox-") as tmp:
        await one_round("bwrap", 3, args.secrets, Path(tmp))  # warm the page cache
        for _ in range(args.rounds):
            for mode in ("bwrap", "none"):
                results[mode] += await one_round(mode, args.steps, args.secrets, Path(tmp))
    print(f"script step `true`, {args.steps} steps x {args.rounds} rounds per mode, "
          f"{args.secrets} declared secrets, {os.cpu_count()} cores")
    print(f"{'mode':<22}{'median ms':>10}{'p90 ms':>10}{'mean ms':>10}")
    for mode, label in (("bwrap", "sandbox on (bwrap)"), ("none", "CISTATE_SANDBOX=none")):
        values = sorted(results[mode])
        p90 = values[int(len(values) * 0.9) - 1]
        print(f"{label:<22}{statistics.median(values):>10.2f}{p90:>10.2f}"
              f"{statistics.fmean(values):>10.2f}")
    cost = statistics.median(results["bwrap"]) - statistics.median(results["none"])
    verdict = "met" if cost < 30 else "NOT met"
    print(f"sandbox cost per step (median difference): {cost:.2f} ms "
          f"(target < 30 ms: {verdict})")


if __name__ == "__main__":
    asyncio.run(main())
