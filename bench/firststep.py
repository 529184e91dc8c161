"""From `git push` to the first step running, by the two ways a push reaches cistate.

    .venv/bin/python bench/firststep.py               # 15 pushes per producer (~1 min)
    .venv/bin/python bench/firststep.py --pushes 30

A bare repository's post-receive hook tells cistate of each push, as a git server would:

- **cli**: the hook runs `cistate push` (a producer on the bus: a new Python process per
  push, as tests/e2e/test_pipeline.py and bench/pipeline.py do);
- **webhook**: the hook posts GitLab's `Push Hook` webhook with curl to the api's
  `/api/v1/webhooks/gitlab`. This is a stand-in for GitLab itself posting the webhook (which
  cannot run here): the payload has the fields GitLab documents and cistate reads, and the
  secret token goes in a header read from a file, never on curl's command line.

The pipeline is one `noop` step, so "first step running" is the worker's own start of that
step (`ran.started_at` of its `step.succeeded`), and the clock starts just before `git push`.
The baseline, in the same invocation, is the same `git push` with the hook doing nothing:
what any CI system waits for before it can know of a push. The pushes alternate between the
producers, so a noisy stretch of the machine weighs on both.

Needs what bench/throughput.py needs (PostgreSQL, RabbitMQ with rabbitmqctl), plus git and
curl. Its database, vhost and folder are its own and removed at the end (--keep keeps them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402

TARGET_MS = 300.0
PRODUCERS = ("cli", "webhook")
REPO_URL = "https://git.example.invalid/bench/app.git"  # never cloned: the step is a noop
SECRET = "firststep-bench-secret"

PIPELINE = """\
name: firststep
steps:
  - name: first
    uses: noop
"""

HOOK = """\
#!/bin/sh
# post-receive: tell cistate of each pushed ref, the way {producer_file} names
# (nobody while {off} exists)
[ -e {off} ] && exit 0
producer=$(cat {producer_file})
while read -r old new ref; do
    if [ "$producer" = webhook ]; then
        # a stand-in for GitLab posting its Push Hook (see bench/firststep.py)
        printf '{{"object_kind":"push","ref":"%s","before":"%s","after":"%s",'\\
'"checkout_sha":"%s","user_username":"git-hook","project":{{"git_http_url":"%s"}}}}' \\
            "$ref" "$old" "$new" "$new" {repo} |
        curl -sS -o /dev/null -w '%{{http_code}}\\n' -H @{headers} \\
            -H "X-Gitlab-Event-UUID: $(cat /proc/sys/kernel/random/uuid)" \\
            --data-binary @- {url} >>{log} 2>&1
    else
        . {env_file}
        {cistate} push --repo {repo} --ref "$ref" --commit "$new" --pusher git-hook \\
            >>{log} 2>&1
    fi
done
"""


@dataclass
class Hook:
    """A bare repository's post-receive hook that tells cistate of pushes."""

    off: Path  # while it exists, the hook tells no one
    producer_file: Path  # holds "cli" or "webhook"
    log: Path

    def use(self, producer: str) -> None:
        self.producer_file.write_text(producer)


def install_hook(bare: Path, folder: Path, *, repo_url: str, api_port: int, amqp: str,
                 prefix: str, producer: str) -> Hook:
    """Write `bare`'s post-receive hook, its settings in `folder`. The serve it tells needs
    CISTATE_WEBHOOK_SECRET=SECRET for the webhook producer."""
    folder.mkdir(parents=True, exist_ok=True)
    hook = Hook(folder / "off", folder / "producer", folder / "post-receive.log")
    hook.use(producer)
    headers = folder / "headers"
    headers.write_text(f"Content-Type: application/json\nX-Gitlab-Event: Push Hook\n"
                       f"X-Gitlab-Token: {SECRET}\n")
    headers.chmod(0o600)
    env_file = folder / "cistate.env"
    env_file.write_text(f"export CISTATE_RABBITMQ_URL={shlex.quote(amqp)}\n"
                        f"export CISTATE_BUS_PREFIX={shlex.quote(prefix)}\n")
    q = shlex.quote
    script = bare / "hooks" / "post-receive"
    script.write_text(HOOK.format(
        off=q(str(hook.off)), producer_file=q(str(hook.producer_file)), repo=q(repo_url),
        headers=q(str(headers)), url=q(f"http://127.0.0.1:{api_port}/api/v1/webhooks/gitlab"),
        log=q(str(hook.log)), env_file=q(str(env_file)),
        cistate=q(str(Path(sys.executable).with_name("cistate")))))
    script.chmod(0o755)
    return hook


@dataclass
class Sample:
    producer: str
    first_step_ms: float
    requested_ms: float  # git push -> run.requested (git, the hook, the producer)


@dataclass
class Bench:
    args: argparse.Namespace
    sandbox: tp.Sandbox
    work: Path
    samples: list[Sample] = field(default_factory=list)
    baseline_ms: list[float] = field(default_factory=list)

    async def git(self, *argv: str, cwd: Path | None = None) -> str:
        done = await asyncio.to_thread(subprocess.run, ["git", *argv], cwd=cwd, check=True,
                                       capture_output=True, text=True)
        return done.stdout.strip()

    async def setup(self, port: int, prefix: str) -> None:
        self.bare = self.work / "app.git"
        self.clone = self.work / "app"
        await self.git("init", "-q", "--bare", "-b", "main", str(self.bare))
        self.hook = install_hook(self.bare, self.work / "hook", repo_url=REPO_URL,
                                 api_port=port, amqp=self.sandbox.amqp, prefix=prefix,
                                 producer="cli")
        await self.git("init", "-q", "-b", "main", str(self.clone))
        for key, value in (("user.name", "cistate bench"), ("user.email", "bench@invalid")):
            await self.git("config", key, value, cwd=self.clone)
        await self.git("remote", "add", "origin", str(self.bare), cwd=self.clone)

    async def commit(self, n: int) -> str:
        (self.clone / "n.txt").write_text(f"{n}\n")
        await self.git("add", "-A", cwd=self.clone)
        await self.git("commit", "-q", "-m", f"push {n}", cwd=self.clone)
        return await self.git("rev-parse", "HEAD", cwd=self.clone)

    async def push(self) -> float:
        began = time.time()
        await self.git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=self.clone)
        return began

    async def baseline(self, n: int) -> None:
        await self.commit(n)
        self.hook.off.touch()
        try:
            began = await self.push()
            self.baseline_ms.append((time.time() - began) * 1000)
        finally:
            self.hook.off.unlink()

    async def one(self, producer: str, n: int, serve: tp.Child) -> None:
        import asyncpg

        self.hook.use(producer)
        sha = await self.commit(n)
        began = await self.push()
        pg = await asyncpg.connect(self.sandbox.dsn)
        try:
            deadline = time.monotonic() + 60
            while True:
                row = await pg.fetchrow("SELECT id, state FROM runs WHERE commit = $1", sha)
                if row is not None and row["state"] in ("succeeded", "failed", "cancelled"):
                    break
                problem = serve.problem()
                if problem:
                    raise RuntimeError(f"cistate serve: {problem}")
                if time.monotonic() > deadline:
                    log = self.hook.log.read_text()[-2000:]
                    raise RuntimeError(f"no finished run for push {n} ({producer}) within "
                                       f"60 s; the hook's log ends:\n{log}")
                await asyncio.sleep(0.02)
            events = await pg.fetch("SELECT type, data, recorded_at FROM events"
                                    " WHERE run_id = $1 ORDER BY seq", row["id"])
        finally:
            await pg.close()
        if row["state"] != "succeeded":
            raise RuntimeError(f"run {row['id']} ended {row['state']}")
        started = next(json.loads(e["data"])["ran"]["started_at"] for e in events
                       if e["type"] == "step.succeeded")
        first = datetime.fromisoformat(started).timestamp()
        requested = events[0]["recorded_at"].timestamp()
        self.samples.append(Sample(producer, (first - began) * 1000,
                                   (requested - began) * 1000))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> int:
    async with tp.sandboxed(args, "firststep") as (sandbox, work):
        prefix = f"firststep{os.getpid()}"
        pipeline = work / "pipeline.yaml"
        pipeline.write_text(PIPELINE)
        port = tp.free_port()
        env, argv = tp.serve_command(sandbox, prefix, pipeline, work / "workdir", port, 8)
        env |= {"CISTATE_WEBHOOK_SECRET": SECRET}
        bench = Bench(args, sandbox, work)
        await bench.setup(port, prefix)
        serve = tp.Child("cistate serve", work / "serve.log")
        await serve.start(argv, env=env)
        try:
            await tp.wait_healthy(port, serve)
            tp.log(f"cistate serve is healthy on :{port}; {args.pushes} pushes per producer")
            n = 0
            for _ in range(args.warmup):  # the first run of each path warms caches
                for producer in PRODUCERS:
                    n += 1
                    await bench.one(producer, n, serve)
            bench.samples.clear()
            for _ in range(args.pushes):
                for producer in PRODUCERS:
                    n += 1
                    await bench.one(producer, n, serve)
                n += 1
                await bench.baseline(n)
        finally:
            await serve.stop()
    report(bench, args)
    return 0


def report(bench: Bench, args: argparse.Namespace) -> None:
    base = statistics.median(bench.baseline_ms)
    print()
    print(f"git push -> first step running, {args.pushes} pushes per producer, alternating "
          "(ms; the step is a noop)")
    print(f"{'producer':<9} {'p50':>7} {'p90':>7} {'max':>7} | {'to run.requested p50':>21}"
          f" | {'p50 - git push alone':>20}")
    print("-" * 82)
    results: dict[str, dict[str, float]] = {}
    for producer in PRODUCERS:
        firsts = [s.first_step_ms for s in bench.samples if s.producer == producer]
        requested = [s.requested_ms for s in bench.samples if s.producer == producer]
        p50 = statistics.median(firsts)
        results[producer] = {"p50": p50, "p90": quantile(firsts, 0.9), "max": max(firsts),
                             "requested_p50": statistics.median(requested)}
        print(f"{producer:<9} {p50:>7.0f} {quantile(firsts, 0.9):>7.0f} {max(firsts):>7.0f} | "
              f"{statistics.median(requested):>21.0f} | {p50 - base:>20.0f}")
    print(f"baseline: the same git push, hook doing nothing: p50 {base:.0f} ms")
    for producer in PRODUCERS:
        p50 = results[producer]["p50"]
        verdict = "met" if p50 < TARGET_MS else "NOT met"
        print(f"{producer}: p50 {p50:.0f} ms, {p50 / base:.1f}x a bare git push;  target < "
              f"{TARGET_MS:.0f} ms: {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"baseline_p50_ms": base, "producers": results,
                                         "samples": [vars(s) for s in bench.samples]},
                                        indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=15, help="measured pushes per producer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    tp.add_sandbox_args(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    tp.run_main(main, parse_args())
