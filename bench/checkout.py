"""A step's checkout: fetched from the repo (as before the worker's mirrors), into an empty
mirror (a worker's first step of a commit), and from a mirror that has the commit (every later
step). The repo is tests/fixtures/sample-app in a bare repo on disk and behind `git daemon`
(git://, on localhost: a network clone without the network's latency).

    .venv/bin/python bench/checkout.py [--rounds 20]

Prints the median and p90 wall time of `handlers.git.checkout` per case; not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CISTATE_ALLOW_LOCAL_REPOS", "1")

from handlers import git  # after the setting it reads
from handlers.base import StepLog, StepRequest
from handlers.sandbox import Sandbox, SandboxSettings

APP = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sample-app"
IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}


def sh(cwd: Path, *argv: str) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **IDENTITY}).stdout.strip()


def make_repo(root: Path) -> tuple[Path, str]:
    work = root / "work"
    shutil.copytree(APP, work)
    sh(work, "git", "init", "-q", "-b", "main")
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-q", "-m", "sample app")
    bare = root / "repos" / "app.git"
    sh(root, "git", "clone", "-q", "--bare", str(work), str(bare))
    return bare, sh(work, "git", "rev-parse", "HEAD")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one(url: str, sha: str, attempt: Path, mirrors: Path | None) -> float:
    sandbox = Sandbox(settings=SandboxSettings(sandbox="none"), attempt=attempt, identity={})
    sandbox.prepare()
    request = StepRequest(run_id="bench", repo=url, ref="refs/heads/main", commit=sha,
                          step="setup", attempt=1, settings={}, script=None, inputs={},
                          workdir=sandbox.work, log=StepLog(), sandbox=sandbox,
                          mirrors=mirrors)
    started = time.perf_counter()
    await git.checkout(request)
    elapsed = time.perf_counter() - started
    shutil.rmtree(attempt)
    return elapsed


async def cases(url: str, sha: str, root: Path, rounds: int) -> dict[str, list[float]]:
    """The three cases alternate round by round, so that the machine's drift touches all."""
    times: dict[str, list[float]] = {"fresh": [], "cold": [], "warm": []}
    warm = root / f"warm-mirrors-{len(url)}"
    await one(url, sha, root / "prime", warm)
    for n in range(rounds):
        for kind, mirrors in (("fresh", None), ("cold", root / f"cold-{len(url)}-{n}"),
                              ("warm", warm)):
            times[kind].append(await one(url, sha, root / f"{kind}-{n}", mirrors))
    return times


def show(label: str, times: list[float]) -> None:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    print(f"| {label} | {statistics.median(times) * 1000:7.1f} | {p90 * 1000:7.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cistate-bench-checkout-") as tmp:
        root = Path(tmp)
        bare, sha = make_repo(root)
        port = free_port()
        daemon = subprocess.Popen(
            ["git", "daemon", "--listen=127.0.0.1", f"--port={port}", "--reuseaddr",
             f"--base-path={root / 'repos'}", "--export-all", str(root / "repos")],
            stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            print(f"sample-app at {sha[:12]}, {args.rounds} rounds, wall ms "
                  f"(load {os.getloadavg()[0]:.1f})")
            print("| checkout | median | p90 |\n|---|---|---|")
            for name, url in (("disk", str(bare)), ("git://", f"git://127.0.0.1:{port}/app.git")):
                results = asyncio.run(cases(url, sha, root, args.rounds))
                show(f"{name}: fetched from the repo (before mirrors)", results["fresh"])
                show(f"{name}: into an empty mirror (first step)", results["cold"])
                show(f"{name}: from the mirror (later steps)", results["warm"])
                ratio = statistics.median(results["warm"]) / statistics.median(results["fresh"])
                print(f"| {name}: later / before | {ratio:.2f} | |")
        finally:
            daemon.terminate()
            daemon.wait()


if __name__ == "__main__":
    main()
