"""The default pipeline on a real Node app: cistate cold, cistate warm, and the same by hand.

    python bench/pipeline.py [--rounds 3] [--cold-env NAME ...] [--no-cli]

Issue 16's benchmark; prints a table, asserts nothing. The app is tests/fixtures/bench-app:
express, with a jest + supertest suite (395 packages in its package-lock.json, from the npm
registry), a Dockerfile FROM the local busybox base and a chart, as the e2e sample app.

Every part is the e2e harness's, started by the project's own scripts through the
quickstart's code (scripts/quickstart.py: docker-registry with its busybox base image, the
git daemon, the chart repository process, the GitOps repo, kube-apiserver + etcd), and the
stand-ins of tests/infra/standins.py (the kubelet reports each Deployment generation rolled
out, the pod stand-in serves the image with `buildah run`). cistate is a real `cistate serve`
(orchestrator, worker, API) on a database and vhost of its own, with the packaged default
pipeline (nodejs); a `git push` to the app's bare repo runs its post-receive hook, which tells
cistate of the push (bench/firststep.py's hook): by default as GitLab would, posting its push
webhook (a stand-in, with curl), or with `--producer cli` by running `cistate push`, as in
tests/e2e/test_pipeline.py.

Each round, one after the other:
1. cold: a new `cistate serve` with a fresh CISTATE_WORKDIR (and a fresh directory for each
   `--cold-env` variable, for caches kept elsewhere), then a push of a new commit;
2. warm: a second commit pushed to the same `cistate serve`, same worker folders (whatever
   caches the worker keeps are filled by the cold run);
3. by hand: one shell script, no cistate, doing the same work once: one clone, one `npm ci`,
   `npm test`, `npm run build`, buildah bud + push, helm template + `kubectl apply
   --server-side` + `kubectl rollout status`, curl until /health answers 200, git tag + push,
   buildah push of the release tag, helm package + upload + index, the GitOps commit. It
   starts from empty caches as cold does (a fresh npm cache and buildah store).

Per step the table has the median worker-side duration (the `ran` timing of each result's
event: the worker's own start and end of the attempt; for by hand the script's own marks),
the total from `git push` to the run's last event (by hand: the script's wall time after its
push), and the ratios. Orchestration overhead = (run.requested -> the run's end) minus the
time at least one step was running on a worker, per step run. "push -> first step" is the
time from the start of `git push` to the worker's start of setup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "scripts")]

import firststep as fs  # noqa: E402
import quickstart as qs  # noqa: E402
import throughput as tp  # noqa: E402
from throughput import log  # noqa: E402

APP = "bench-app"  # setup's name for package.json's "bench_app"
APP_DIR = ROOT / "tests" / "fixtures" / "bench-app"
NAMESPACE = "bench-dev"
STEPS = ("setup", "test", "build", "deploy", "health", "tag-release", "img-release",
         "helm-release", "gitops")
TARGET_WARM = 0.6  # warm cistate / by hand
TARGET_COLD = 1.1
TARGET_OVERHEAD_MS = 100.0  # per step
TARGET_FIRST_STEP_MS = 300.0
RUN_TIMEOUT = 600.0

# The by-hand script: the default pipeline's work, once, in one shell. `mark STEP` ends the
# previous step and starts STEP (the marks are the per-step durations).
BY_HAND = r"""
set -eu
mark() { echo "MARK $1 $(date +%s.%N)"; }
export HOME="$WORK/home" npm_config_cache="$WORK/npm-cache" CI=true
mkdir -p "$HOME"
B="buildah --root $WORK/buildah/root --runroot $WORK/buildah/run"
# the driver the worker's `auto` picks: overlay where it mounts, else vfs (untimed: a person
# typing these knows their machine)
if $B --storage-driver overlay info >/dev/null 2>&1; then DRIVER=overlay; else DRIVER=vfs; fi
echo "DRIVER $DRIVER"
B="$B --storage-driver $DRIVER"
mark setup
git clone -q "$REPO_URL" "$WORK/src"
cd "$WORK/src"
git checkout -q "$COMMIT"
SHORT=$(git rev-parse --short=7 HEAD)
IMAGE="$REGISTRY/dev/$APP:$SHORT"
mark test
npm ci --no-audit --no-fund --loglevel=error
npm test
mark build
npm run build
$B bud --isolation chroot --tls-verify=false --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -t "$IMAGE" -f Dockerfile . >/dev/null
$B push --tls-verify=false "$IMAGE" "docker://$IMAGE" >/dev/null
mark deploy
helm lint "chart/$APP" >/dev/null
helm template "$APP" "chart/$APP" --namespace "$NAMESPACE" \
    --set image.repository="$REGISTRY/dev/$APP" --set image.tag="$SHORT" \
    --set nameOverride="$APP" --set fullnameOverride="$APP" > "$WORK/rendered.yaml"
kubectl apply --server-side --force-conflicts -n "$NAMESPACE" -f "$WORK/rendered.yaml" >/dev/null
kubectl rollout status -n "$NAMESPACE" "deployment/$APP" --timeout=120s >/dev/null
mark health
until curl -fsS -o /dev/null "http://localhost:$HEALTH_PORT/health"; do sleep 0.1; done
mark tag-release
git tag -a -m "Release $VERSION" "$VERSION"
git push -q origin "refs/tags/$VERSION"
mark img-release
$B push --tls-verify=false "$IMAGE" "docker://$REGISTRY/releases/$APP:$VERSION" >/dev/null
mark helm-release
sed -i "s/^version: .*/version: $VERSION/" "chart/$APP/Chart.yaml"
helm package "chart/$APP" -d "$WORK/charts" >/dev/null
curl -fsS -o "$WORK/charts/index-old.yaml" "$CHART_REPO/index.yaml" \
    || rm -f "$WORK/charts/index-old.yaml"
if [ -e "$WORK/charts/index-old.yaml" ]; then
    helm repo index "$WORK/charts" --url "$CHART_REPO" --merge "$WORK/charts/index-old.yaml"
else
    helm repo index "$WORK/charts" --url "$CHART_REPO"
fi
curl -fsS -T "$WORK/charts/$APP-$VERSION.tgz" "$CHART_REPO/$APP-$VERSION.tgz" >/dev/null
curl -fsS -T "$WORK/charts/index.yaml" "$CHART_REPO/index.yaml" >/dev/null
mark gitops
git clone -q -b qa "$GITOPS_REPO" "$WORK/gitops"
mkdir -p "$WORK/gitops/qa/$APP"
printf 'dependencies:\n- name: %s\n  version: %s\n  repository: %s\n' "$APP" "$VERSION" \
    "$CHART_REPO" > "$WORK/gitops/qa/$APP/requirements.yaml"
git -C "$WORK/gitops" add -A
git -C "$WORK/gitops" commit -q -m "Updates $APP to $VERSION"
git -C "$WORK/gitops" push -q origin qa
mark end
"""


@dataclass
class Outcome:
    """One pipeline execution: per-step worker-side seconds, the total, and for cistate the
    overhead per step and push -> first step."""

    kind: str
    steps: dict[str, float]
    total: float
    overhead_per_step: float | None = None
    first_step: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """How long at least one of the intervals was open (their union)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


class Harness:
    def __init__(self, args: argparse.Namespace, directory: Path, stack: AsyncExitStack,
                 sandbox: tp.Sandbox) -> None:
        self.args = args
        self.dir = directory
        self.stack = stack
        self.sandbox = sandbox
        self.prefix = f"benchpipe{os.getpid()}"
        self.port = tp.free_port()
        settings = qs.Settings(database_url=sandbox.dsn, rabbitmq_url=sandbox.amqp,
                               bus_prefix=self.prefix, listen=f"127.0.0.1:{self.port}")
        self.qs = qs.Quickstart(directory, settings, True, stack)
        self.qs.ports = {"charts": tp.free_port(), "pod": tp.free_port()}
        self.worker_env: dict[str, str] = {}
        self.work = directory / "app"
        self.bare = Path()
        self.serve: tp.Child | None = None
        self.tools = Path()
        self.base_image = ""
        self.charts_url = ""

    async def start(self) -> None:
        await qs.infra("registry.sh", "install", within=900)
        self.tools = Path(await qs.infra("helm.sh", within=300))
        await self.qs.start_registry()
        self.base_image = f"{self.qs.registry}/library/busybox:latest"
        await self.qs.start_git_server()
        self.charts_url = await self.qs.start_chart_repo()
        await self.qs.make_gitops_repo()
        kubeconfig = await self.qs.start_kube()
        if kubeconfig is None:
            raise RuntimeError("the kube-apiserver did not start (see above)")
        from kubernetes_asyncio.config import new_client_from_config

        from tests.infra.standins import KubeletStandIn, PodStandIn

        api = await new_client_from_config(config_file=str(kubeconfig))
        self.stack.push_async_callback(api.close)
        await self.stack.enter_async_context(KubeletStandIn(api, NAMESPACE, interval=0.1))
        self.pod = await self.stack.enter_async_context(PodStandIn(
            api, NAMESPACE, APP, self.qs.ports["pod"], self.dir / "pod", interval=0.1,
            report=lambda line: log(f"[pod stand-in] {line}")))
        self.worker_env = {
            "CISTATE_REGISTRY": f"{self.qs.registry}/dev",
            "CISTATE_RELEASE_REGISTRY": f"{self.qs.registry}/releases",
            "CISTATE_REGISTRY_INSECURE": "1",
            "CISTATE_BUILD_ARGS": json.dumps({"BASE_IMAGE": self.base_image}),
            "CISTATE_HELM": str(self.tools / "helm"),
            "CISTATE_CHART_REPO": self.charts_url,
            "CISTATE_GITOPS_REPO": self.qs.gitops_url,
            "CISTATE_KUBECONFIG": str(kubeconfig),
            "CISTATE_DEV_NAMESPACE": NAMESPACE,
            "CISTATE_ROLLOUT_TIMEOUT": "120",
            "CISTATE_HEALTH_PORT": str(self.qs.ports["pod"]),
            "CISTATE_HEALTH_ATTEMPTS": "60",
            "CISTATE_HEALTH_BACKOFF_MAX": "1",
            "CISTATE_HEALTH_TIMEOUT": "2",
        }
        self.kubeconfig = kubeconfig
        await self.make_app_repo()

    async def make_app_repo(self) -> None:
        self.bare = self.dir / "git" / "repos" / f"{APP}.git"
        self.repo_url = f"{self.qs.git_url}/{APP}.git"
        await qs.git("init", "-q", "--bare", "-b", "main", self.bare)
        self.hook = fs.install_hook(self.bare, self.dir / "hook", repo_url=self.repo_url,
                                    api_port=self.port, amqp=self.sandbox.amqp,
                                    prefix=self.prefix, producer=self.args.producer)
        shutil.copytree(APP_DIR, self.work,
                        ignore=shutil.ignore_patterns("node_modules", "dist"))
        await qs.git("init", "-q", "-b", "main", cwd=self.work)
        for key, value in (("user.name", "cistate bench"), ("user.email", "bench@invalid")):
            await qs.git("config", key, value, cwd=self.work)
        await qs.git("remote", "add", "origin", self.repo_url, cwd=self.work)

    async def commit(self, message: str) -> str:
        with (self.work / "CHANGES.md").open("a") as changes:
            changes.write(f"- {message}\n")
        await qs.git("add", "-A", cwd=self.work)
        await qs.git("commit", "-q", "-m", message, cwd=self.work)
        return await qs.git("rev-parse", "HEAD", cwd=self.work)

    async def push(self) -> float:
        """`git push` of main; the wall time it started at."""
        began = time.time()
        await qs.git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=self.work)
        return began

    # -- cistate

    async def start_serve(self, round_no: int) -> None:
        fresh = self.dir / f"worker-{round_no}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CISTATE_")}
        env |= self.worker_env | {
            "CISTATE_DATABASE_URL": self.sandbox.dsn,
            "CISTATE_RABBITMQ_URL": self.sandbox.amqp,
            "CISTATE_BUS_PREFIX": self.prefix,
            "CISTATE_LISTEN": f"127.0.0.1:{self.port}",
            "CISTATE_API_READ_AUTH": "0",
            "CISTATE_WEBHOOK_SECRET": fs.SECRET,
            "CISTATE_WORKDIR": str(fresh / "workdir"),
            "PATH": f"{self.tools}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        for name in self.args.cold_env:
            env[name] = str(fresh / name.lower())
        self.serve = tp.Child("cistate serve", self.dir / f"serve-{round_no}.log")
        await self.serve.start([str(qs.CISTATE), "serve"], env=env)
        await tp.wait_healthy(self.port, self.serve, limit=90)

    async def stop_serve(self) -> None:
        if self.serve is not None:
            await self.serve.stop()
            self.serve = None

    async def cistate_run(self, kind: str, message: str) -> Outcome:
        import asyncpg

        sha = await self.commit(message)
        pushed = await self.push()
        pg = await asyncpg.connect(self.sandbox.dsn)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while True:
                row = await pg.fetchrow("SELECT id, state FROM runs WHERE commit = $1", sha)
                if row is not None and row["state"] in ("succeeded", "failed", "cancelled"):
                    break
                assert self.serve is not None
                problem = self.serve.problem()
                if problem:
                    raise RuntimeError(f"cistate serve: {problem}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the run of {sha[:12]} did not end within "
                                       f"{RUN_TIMEOUT:g}s")
                await asyncio.sleep(0.1)
            events = await pg.fetch("SELECT type, data, recorded_at FROM events"
                                    " WHERE run_id = $1 ORDER BY seq", row["id"])
        finally:
            await pg.close()
        if row["state"] != "succeeded":
            failed = [json.loads(e["data"]) for e in events if e["type"] == "step.failed"]
            raise RuntimeError(f"{kind} run {row['id']} ended {row['state']}: {failed[:2]}")
        ran: dict[str, tuple[float, float]] = {}
        for event in events:
            data = json.loads(event["data"])
            if event["type"] == "step.succeeded" and data.get("ran"):
                ran[data["step"]] = (_at(data["ran"]["started_at"]),
                                     _at(data["ran"]["finished_at"]))
        requested = events[0]["recorded_at"].timestamp()
        ended = events[-1]["recorded_at"].timestamp()
        busy = busy_seconds(list(ran.values()))
        return Outcome(kind, {s: b - a for s, (a, b) in ran.items()}, ended - pushed,
                       overhead_per_step=((ended - requested) - busy) / max(1, len(ran)),
                       first_step=ran["setup"][0] - pushed,
                       extra={"run": str(row["id"]), "requested": requested - pushed})

    # -- by hand

    async def next_version(self) -> str:
        out = await qs.git("ls-remote", "--tags", "origin", cwd=self.work)
        versions = []
        for line in out.splitlines():
            name = line.split("refs/tags/")[-1].removesuffix("^{}")
            parts = name.split(".")
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                versions.append(tuple(int(p) for p in parts))
        major, minor, patch = max(versions, default=(0, 0, 0))
        return f"{major}.{minor}.{patch + 1}"

    async def by_hand(self, round_no: int) -> Outcome:
        sha = await self.commit(f"by hand, round {round_no}")
        self.hook.off.touch()  # this push opens no run; the script's tag push runs the hook
        try:
            await self.push()
        finally:
            self.hook.off.unlink(missing_ok=True)
        work = self.dir / f"hand-{round_no}"
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CISTATE_")} | {
            "WORK": str(work), "REPO_URL": self.repo_url, "COMMIT": sha, "APP": APP,
            "REGISTRY": self.qs.registry, "BASE_IMAGE": self.base_image,
            "NAMESPACE": NAMESPACE, "HEALTH_PORT": str(self.qs.ports["pod"]),
            "VERSION": await self.next_version(), "CHART_REPO": self.charts_url,
            "GITOPS_REPO": self.qs.gitops_url, "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.tools}{os.pathsep}{os.environ.get('PATH', '')}",
            **qs.GIT_IDENTITY,
        }
        script = work / "by-hand.sh"
        script.write_text(BY_HAND)
        began = time.time()
        proc = await asyncio.create_subprocess_exec(
            "bash", str(script), env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        total = time.time() - began
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"the by-hand script exited {proc.returncode}:\n{text[-3000:]}")
        marks = [(line.split()[1], float(line.split()[2])) for line in text.splitlines()
                 if line.startswith("MARK ")]
        if round_no == 1:
            log("by hand: buildah storage driver "
                + " ".join(line.split()[1] for line in text.splitlines()
                           if line.startswith("DRIVER ")))
        steps = {name: marks[i + 1][1] - at for i, (name, at) in enumerate(marks[:-1])}
        return Outcome("by hand", steps, total)


# -- report ------------------------------------------------------------------------------


def report(rounds: list[dict[str, Outcome]], cli_text: str, producer: str) -> dict[str, Any]:
    kinds = ("cold", "warm", "by hand")

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def step_median(kind: str, step: str) -> float:
        return med([r[kind].steps[step] for r in rounds if step in r[kind].steps])

    print()
    print(f"default pipeline (nodejs) on tests/fixtures/bench-app (express + jest, 395 "
          f"packages), {len(rounds)} round(s), medians in seconds; cold = fresh worker "
          "folders, warm = second commit on the same worker, by hand = one shell script")
    header = f"{'step':<14}" + "".join(f"{k:>10}" for k in kinds) + f"{'cold/hand':>11}" \
        f"{'warm/hand':>11}"
    print(header)
    print("-" * len(header))
    for step in STEPS:
        values = [step_median(k, step) for k in kinds]
        hand = values[2]
        print(f"{step:<14}" + "".join(f"{v:>10.2f}" for v in values)
              + f"{values[0] / hand:>11.2f}{values[1] / hand:>11.2f}")
    print("-" * len(header))
    totals = {k: med([r[k].total for r in rounds]) for k in kinds}
    print(f"{'total':<14}" + "".join(f"{totals[k]:>10.2f}" for k in kinds)
          + f"{totals['cold'] / totals['by hand']:>11.2f}"
          f"{totals['warm'] / totals['by hand']:>11.2f}")
    summed = {k: med([sum(r[k].steps.values()) for r in rounds]) for k in kinds}
    print(f"{'sum of steps':<14}" + "".join(f"{summed[k]:>10.2f}" for k in kinds))
    print()
    # ratios paired per round: a noisy stretch weighs on both sides
    warm = med([r["warm"].total / r["by hand"].total for r in rounds])
    cold = med([r["cold"].total / r["by hand"].total for r in rounds])
    overhead = {k: med([r[k].overhead_per_step or 0.0 for r in rounds]) * 1000
                for k in ("cold", "warm")}
    first = {k: med([r[k].first_step or 0.0 for r in rounds]) * 1000 for k in ("cold", "warm")}
    requested = {k: med([r[k].extra["requested"] for r in rounds]) * 1000
                 for k in ("cold", "warm")}

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def per_round(kind: str) -> str:
        return ", ".join(f"{r[kind].total / r['by hand'].total:.2f}" for r in rounds)

    print(f"warm cistate / by hand : {warm:.2f} (per round {per_round('warm')})"
          f"  target <= {TARGET_WARM}: {verdict(warm <= TARGET_WARM)}")
    print(f"cold cistate / by hand : {cold:.2f} (per round {per_round('cold')})"
          f"  target <= {TARGET_COLD}: {verdict(cold <= TARGET_COLD)}")
    for k in ("cold", "warm"):
        print(f"orchestration overhead ({k}): {overhead[k]:.0f} ms per step (run.requested "
              f"-> end, minus the time a step ran on the worker)  target < "
              f"{TARGET_OVERHEAD_MS:.0f}: {verdict(overhead[k] < TARGET_OVERHEAD_MS)}")
    for k in ("cold", "warm"):
        print(f"git push -> first step running ({k}): {first[k]:.0f} ms (of it push -> "
              f"run.requested {requested[k]:.0f} ms: git and the hook, producer "
              f"{producer})  "
              f"target < {TARGET_FIRST_STEP_MS:.0f}: {verdict(first[k] < TARGET_FIRST_STEP_MS)}")
    if cli_text:
        print()
        print("CLI start-up (bench/cli.py):")
        print(cli_text.rstrip())
    return {
        "rounds": [{k: {"steps": o.steps, "total": o.total,
                        "overhead_per_step": o.overhead_per_step,
                        "first_step": o.first_step} for k, o in r.items()} for r in rounds],
        "warm_ratio": warm, "cold_ratio": cold, "overhead_ms": overhead,
        "first_step_ms": first,
    }


async def cli_figures(args: argparse.Namespace) -> str:
    if args.no_cli:
        return ""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "cli.py"), "--calls", str(args.cli_calls),
        "--database-url", args.database_url, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return out.decode(errors="replace") if proc.returncode == 0 else (
        f"bench/cli.py exited {proc.returncode}")


async def main(args: argparse.Namespace) -> int:
    qs.say = lambda line="": log(line) if line.strip() else None  # the harness' narration
    rounds: list[dict[str, Outcome]] = []
    async with tp.sandboxed(args, "pipeline") as (sandbox, _tmp):
        directory = Path(tempfile.mkdtemp(prefix="cistate_pipeline_"))
        try:
            async with AsyncExitStack() as stack:
                harness = Harness(args, directory, stack, sandbox)
                log("starting the e2e harness (registry, git, chart repo, kube-apiserver)")
                await harness.start()
                stack.push_async_callback(harness.stop_serve)
                for round_no in range(1, args.rounds + 1):
                    this: dict[str, Outcome] = {}
                    await harness.start_serve(round_no)
                    log(f"round {round_no}: cold")
                    this["cold"] = await harness.cistate_run("cold", f"cold, round {round_no}")
                    log(f"round {round_no}: cold {this['cold'].total:.2f} s; warm")
                    this["warm"] = await harness.cistate_run("warm", f"warm, round {round_no}")
                    await harness.stop_serve()
                    log(f"round {round_no}: warm {this['warm'].total:.2f} s; by hand")
                    this["by hand"] = await harness.by_hand(round_no)
                    log(f"round {round_no}: by hand {this['by hand'].total:.2f} s")
                    rounds.append(this)
        finally:
            if args.keep:
                log(f"kept {directory}")
            else:
                await asyncio.to_thread(shutil.rmtree, directory, True)
        cli_text = await cli_figures(args)
    summary = report(rounds, cli_text, args.producer)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold-env", action="append", default=[], metavar="NAME",
                        help="a CISTATE_* variable naming a cache folder of the worker: "
                             "fresh for each cold run (CISTATE_WORKDIR always is)")
    parser.add_argument("--producer", choices=fs.PRODUCERS, default="webhook",
                        help="how the repo's post-receive hook tells cistate of a push: a "
                             "GitLab-webhook stand-in posted with curl (default), or "
                             "`cistate push` (see bench/firststep.py)")
    parser.add_argument("--no-cli", action="store_true", help="skip bench/cli.py")
    parser.add_argument("--cli-calls", type=int, default=7, help="bench/cli.py --calls")
    parser.add_argument("--json", type=Path)
    tp.add_sandbox_args(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    tp.run_main(main, parse_args())
