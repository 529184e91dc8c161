"""cistate's quickstart: the default pipeline (nodejs), from `git push` to the QA GitOps
commit, on this machine alone.

    .venv/bin/python scripts/quickstart.py [--dir DIR] [--without-kube]

It starts, each as a local stand-in for the service a real setup uses: an OCI registry (and
the busybox base image the sample app builds FROM), a git server whose repos send their
pushes to cistate, a chart repository (for Artifactory), a GitOps repo with a `qa` branch, a
kube-apiserver (built once, 5-10 minutes, if it is not) with a kubelet stand-in and a pod
stand-in; then `cistate db upgrade` and `cistate serve` (every role, reads open) with every
step setting pointing at them. It makes a work clone of the sample app with a commit ready,
prints the one `git push` that sends it through the pipeline, and follows each run step by
step. Ctrl-C (SIGINT) or SIGTERM stops everything it started, and checks that nothing is left.

CISTATE_DATABASE_URL, CISTATE_RABBITMQ_URL, CISTATE_BUS_PREFIX and CISTATE_LISTEN come from
the environment (cistate's defaults otherwise). State lives in one directory, DIR
($CISTATE_QUICKSTART_DIR, default ~/.cache/cistate-quickstart), which a second start reuses:
registry/ (its data), git/repos/ (hello-app.git, gitops.git), charts/, kube/ (etcd's data),
hello-app/ (the work clone), cistate/ (cistate's workdir), serve.log, settings.env. The
kube-apiserver binary stays in ${CISTATE_CACHE:-/var/cache/cistate}/bin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml
from pydantic import ValidationError

from cistate.adapters.postgres.store import RunQuery, Store, connect
from cistate.config import Settings, redact
from cistate.domain.events import Event

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "tests" / "infra"
SAMPLE_APP = ROOT / "tests" / "fixtures" / "sample-app"
DEFAULT_PIPELINE = ROOT / "cistate" / "pipelines" / "nodejs.yaml"
CACHE = Path(os.environ.get("CISTATE_CACHE", "/var/cache/cistate"))
APISERVER = CACHE / "bin" / "kube-apiserver"
CISTATE = Path(sys.executable).parent / "cistate"
APP = "hello-app"  # setup derives it from the sample app's package.json name "hello_app"
NAMESPACE = "dev"  # deploy's default dev namespace
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "cistate quickstart",
    "GIT_AUTHOR_EMAIL": "quickstart@cistate.invalid",
    "GIT_COMMITTER_NAME": "cistate quickstart",
    "GIT_COMMITTER_EMAIL": "quickstart@cistate.invalid",
}
# The settings a person may give; every other CISTATE_* the quickstart sets itself.
TAKEN = ("CISTATE_DATABASE_URL", "CISTATE_RABBITMQ_URL", "CISTATE_BUS_PREFIX", "CISTATE_LISTEN")
POST_RECEIVE = """\
#!/bin/sh
# post-receive: publish each pushed ref to cistate, as a producer would (the quickstart's
# stand-in for a git host's webhook). git gives one "<old> <new> <ref>" line per ref.
. {env_file}
status=0
while read -r old new ref; do
    echo "post-receive: $ref $old -> $new" >>{log}
    if out=$({cistate} push --repo {repo} --ref "$ref" --commit "$new" --pusher git-hook 2>&1)
    then echo "cistate: $out"
    else echo "cistate push failed for $ref: $out" >&2; status=1
    fi
    echo "$out" >>{log}
done
exit $status
"""
COLUMN = 19  # where a part's details start


class QuickstartError(Exception):
    """What failed and what to do about it, for the person at the terminal."""


def say(line: str = "") -> None:
    print(line, flush=True)


def part(name: str, where: str, stand_in: str | None, real: str) -> None:
    """One part the pipeline talks to, saying whether it is a local stand-in and what a
    real setup uses instead."""
    say(f"  {name:<{COLUMN - 2}}{where}")
    pad = " " * COLUMN
    if stand_in is not None:
        say(f"{pad}local stand-in: {stand_in}")
    say(f"{pad}{'a real setup uses' if stand_in is not None else 'in a real setup'}: {real}")


def free_port(preferred: int | None = None) -> int:
    """`preferred` when it is free (a second start keeps its URLs), else any free port."""
    for port in (preferred, 0):
        if port is None:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            found: int = sock.getsockname()[1]
            return found
    raise QuickstartError("no free TCP port on 127.0.0.1")


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 1).close()
    except OSError:
        return False
    return True


def tail(text: str | bytes, lines: int = 20) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------------------- processes --


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks after boot): tells a reused pid apart."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass(frozen=True)
class Process:
    name: str
    pid: int
    started: int

    def running(self) -> bool:
        return start_time(self.pid) == self.started


class Processes:
    """Every process the quickstart starts (or its scripts start for it), by pid and start
    time, also in DIR/processes.json: a start after one that could not clean up (killed with
    SIGKILL) stops what that one left, and the end checks that none is left running."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.known: list[Process] = []

    def add(self, name: str, pid: int) -> None:
        started = start_time(pid)
        if started is None or any(p.pid == pid and p.started == started for p in self.known):
            return
        self.known.append(Process(name, pid, started))
        self.path.write_text(json.dumps([vars(p) for p in self.known]))

    def add_pid_file(self, name: str, path: Path) -> None:
        """The pids an infra script wrote (one per line)."""
        for line in path.read_text().split() if path.is_file() else []:
            self.add(name, int(line))

    def add_descendants(self) -> None:
        """The children of the known processes (a step of cistate serve, a connection of
        the git daemon): checked at the end too."""
        for process in list(self.known):
            if process.running():
                for pid in descendants(process.pid):
                    self.add(f"a process of the {process.name}", pid)

    async def stop_leftovers(self) -> None:
        try:
            left = [Process(**p) for p in json.loads(self.path.read_text())]
        except (OSError, ValueError, TypeError):
            return
        for process in left:
            if process.running():
                say(f"  stopping {process.name} (pid {process.pid}), left by an earlier start")
                await terminate(process)

    async def stop_all_left(self) -> list[Process]:
        """Stop the processes still running (none, when every part stopped as it should);
        returns them."""
        left = [p for p in self.known if p.running()]
        for process in left:
            await terminate(process)
        self.path.unlink(missing_ok=True)
        return left


async def terminate(process: Process, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    for _ in range(int(grace * 10)):
        if not process.running():
            return
        await asyncio.sleep(0.1)
    if process.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


async def stop_group(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM,
                     grace: float = 10) -> None:
    """Stop a child started in a session of its own, and its process group."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def run(argv: Sequence[str | Path], *, what: str, env: dict[str, str] | None = None,
              cwd: Path | None = None, within: float = 120,
              on_line: Callable[[str], None] | None = None) -> str:
    """Run a command to its end; its stdout. Stderr lines go to `on_line` as they come (else
    they are kept for the error). Raises QuickstartError saying `what` failed."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # Ctrl-C reaches the quickstart alone; it stops the rest
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors: list[str] = []

    async def read_errors(stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            errors.append(line)
            if on_line is not None:
                on_line(line)

    reader = asyncio.create_task(read_errors(proc.stderr))
    try:
        async with asyncio.timeout(within):
            out = await proc.stdout.read()
            await reader
            await proc.wait()
    except TimeoutError:
        reader.cancel()
        await stop_group(proc)
        raise QuickstartError(f"{what} did not finish within {within:.0f} s") from None
    except asyncio.CancelledError:
        reader.cancel()
        await stop_group(proc)
        raise
    if proc.returncode != 0:
        shown = "" if on_line is not None else ":\n" + tail("\n".join(errors) or out)
        raise QuickstartError(f"{what} failed (exit code {proc.returncode}){shown}")
    return out.decode(errors="replace")


async def infra(script: str, *args: str | Path, env: dict[str, str] | None = None,
                within: float = 120, on_line: Callable[[str], None] | None = None) -> str:
    """tests/infra/<script>: the last line of its stdout, the one result it prints."""
    what = " ".join([f"tests/infra/{script}", *map(str, args[:1])])
    out = await run(["bash", INFRA / script, *args], what=what, env=env, within=within,
                    on_line=on_line)
    lines = out.strip().splitlines()
    return lines[-1] if lines else ""


async def git(*args: str | Path, cwd: Path | None = None) -> str:
    env = {**os.environ, **GIT_IDENTITY, "GIT_TERMINAL_PROMPT": "0"}
    out = await run(["git", *args], what=f"git {' '.join(map(str, args[:2]))}", env=env,
                    cwd=cwd, within=60)
    return out.strip()


# ------------------------------------------------------------------- the quickstart --


class Quickstart:
    def __init__(self, directory: Path, settings: Settings, with_kube: bool,
                 stack: AsyncExitStack) -> None:
        self.dir = directory
        self.settings = settings
        self.with_kube = with_kube
        self.stack = stack
        self.processes = Processes(directory / "processes.json")
        self.ports: dict[str, int] = {}
        self.worker_env: dict[str, str] = {}  # the step settings cistate serve gets
        self.registry = ""
        self.git_url = ""
        self.repo_url = ""
        self.gitops_url = ""
        self.serve: asyncio.subprocess.Process | None = None
        self.pipeline = "nodejs"

    # -- start-up

    async def start(self) -> None:
        say("cistate quickstart: the default pipeline (nodejs) from `git push` to the QA "
            "GitOps commit,")
        say("on this machine alone. Every part the pipeline talks to is a local stand-in, "
            "named as such.")
        say(f"state: {self.dir} (a second start reuses it)")
        say()
        await self.processes.stop_leftovers()
        ports_file = self.dir / "ports.json"
        with contextlib.suppress(OSError, ValueError):
            self.ports = json.loads(ports_file.read_text())
        self.ports = {name: free_port(self.ports.get(name)) for name in ("charts", "pod")}
        ports_file.write_text(json.dumps(self.ports))

        say("tools (installed once; apt-get and PyPI):")
        await infra("registry.sh", "install", within=900, on_line=self._indented)
        helm_bin = Path(await infra("helm.sh", within=300, on_line=self._indented))
        say()
        say("the parts the pipeline talks to:")
        await self.start_registry()
        await self.start_git_server()
        charts_url = await self.start_chart_repo()
        await self.make_gitops_repo()
        if self.with_kube:
            kubeconfig = await self.start_kube()
        else:
            kubeconfig = None
            self._without_kube("--without-kube was given")
        if kubeconfig is not None:
            await self.start_cluster_stand_ins(kubeconfig)
        work, ready = await self.make_app_repo()

        self.worker_env = {
            "CISTATE_REGISTRY": f"{self.registry}/dev",
            "CISTATE_RELEASE_REGISTRY": f"{self.registry}/releases",
            "CISTATE_REGISTRY_INSECURE": "1",
            "CISTATE_BUILD_ARGS": json.dumps({
                "BASE_IMAGE": f"{self.registry}/library/busybox:latest"}),
            "CISTATE_HELM": str(helm_bin / "helm"),
            "CISTATE_CHART_REPO": charts_url,
            "CISTATE_GITOPS_REPO": self.gitops_url,
        }
        if kubeconfig is not None:
            self.worker_env |= {
                "CISTATE_KUBECONFIG": str(kubeconfig),
                "CISTATE_DEV_NAMESPACE": NAMESPACE,
                "CISTATE_ROLLOUT_TIMEOUT": "120",
                # the app's Ingress host is localhost (the sample's chart, as the quickstart
                # commits it); the pod stand-in serves on this port
                "CISTATE_HEALTH_PORT": str(self.ports["pod"]),
                "CISTATE_HEALTH_ATTEMPTS": "60",
                "CISTATE_HEALTH_BACKOFF": "0.1",
                "CISTATE_HEALTH_BACKOFF_MAX": "2",
                "CISTATE_HEALTH_TIMEOUT": "2",
            }
        else:
            self.worker_env["CISTATE_PIPELINE"] = str(self.pipeline_without_kube())
        say()
        await self.start_cistate()
        self.print_push(work, ready)

    def _indented(self, line: str) -> None:
        say(f"    {line}")

    def _env(self, **extra: str) -> dict[str, str]:
        """The environment of a child: this one's, with the bus and store settings taken."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CISTATE_")
               or k in TAKEN or k == "CISTATE_CACHE"}
        return {**env, **extra}

    async def start_registry(self) -> None:
        directory = self.dir / "registry"
        self.stack.push_async_callback(self._stop_script, "image registry", "registry.sh",
                                       directory)
        self.registry = await infra("registry.sh", "start", directory, env=self._env())
        self.processes.add_pid_file("docker-registry", directory / "pid")
        part("image registry", f"{self.registry}  (pid {self._pids(directory / 'pid')})",
             f"docker-registry (distribution 2.8), plain http, data in {directory}/data",
             "your registry (Harbor, Quay, ECR, GHCR, Artifactory): CISTATE_REGISTRY, "
             "CISTATE_REGISTRY_USERNAME/_PASSWORD")
        # the sample app's Dockerfile builds FROM this; no public registry is reachable here
        base = await infra("registry.sh", "base-image", self.registry, within=300,
                           env=self._env(CISTATE_BUILDAH_ROOT=str(self.dir / "buildah-base")))
        part("base image", base, "busybox built FROM scratch with buildah (no public "
             "registry is reachable from here)", "the FROM image of your Dockerfile "
             "(node, distroless, ...) from your registry or a mirror")

    async def start_git_server(self) -> None:
        directory = self.dir / "git"
        self.stack.push_async_callback(self._stop_script, "git server", "git-server.sh",
                                       directory)
        self.git_url = await infra("git-server.sh", "start", directory, env=self._env())
        pid_file = directory / "git-daemon.pid"
        self.processes.add_pid_file("git daemon", pid_file)
        part("git server", f"{self.git_url}  (pid {self._pids(pid_file)})",
             f"git daemon serving {directory}/repos; a post-receive hook runs `cistate push` "
             "for each pushed ref",
             "GitHub, GitLab or Gitea sending push webhooks to cistate's "
             "POST /api/v1/webhooks/{provider}")

    async def start_chart_repo(self) -> str:
        root = self.dir / "charts"
        port = self.ports["charts"]
        log = (self.dir / "chart-repo.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(INFRA / "chart_repo.py"), "--root", str(root), "--port",
            str(port), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=log, start_new_session=True)
        log.close()
        self.processes.add("chart repository", proc.pid)
        self.stack.push_async_callback(self._stop_child, "chart repository", proc)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
        except TimeoutError:
            line = b""
        if not line.startswith(b"ready"):
            raise QuickstartError("the chart repository (tests/infra/chart_repo.py) did not "
                                  f"start:\n{tail((self.dir / 'chart-repo.log').read_bytes())}")
        url = f"http://127.0.0.1:{port}/charts"
        part("chart repository", f"{url}  (pid {proc.pid})",
             f"tests/infra/chart_repo.py, an HTTP Helm repository (files in {root}) for "
             "Artifactory", "Artifactory, ChartMuseum or an OCI registry: CISTATE_CHART_REPO, "
             "CISTATE_CHART_REPO_USERNAME/_PASSWORD")
        return url

    async def make_gitops_repo(self) -> None:
        bare = self.dir / "git" / "repos" / "gitops.git"
        self.gitops_url = f"{self.git_url}/gitops.git"
        if not bare.is_dir():
            seed = self.dir / "gitops-seed"
            shutil.rmtree(seed, ignore_errors=True)
            (seed / "qa").mkdir(parents=True)
            (seed / "README.md").write_text("The quickstart's GitOps repo: qa/<app>/ names the "
                                            "chart version each app has in QA.\n")
            await git("init", "-q", "--bare", "-b", "main", bare)
            await git("init", "-q", "-b", "main", cwd=seed)
            await git("add", "README.md", cwd=seed)
            await git("commit", "-q", "-m", "GitOps repo", cwd=seed)
            (seed / "qa" / "README.md").write_text("The QA environment.\n")
            await git("checkout", "-q", "-b", "qa", cwd=seed)
            await git("add", "qa", cwd=seed)
            await git("commit", "-q", "-m", "QA environment", cwd=seed)
            await git("push", "-q", bare, "main", "qa", cwd=seed)
            shutil.rmtree(seed)
        part("GitOps repo", f"{self.gitops_url}, branch qa",
             f"a bare repo on the git server above ({bare})",
             "your GitOps repo, which Argo CD syncs into QA (the pipeline's qa-sync step waits "
             "for that; it is off by default): CISTATE_GITOPS_REPO")

    async def start_kube(self) -> Path | None:
        """The kube-apiserver's kubeconfig; None (saying why) when there is none to run."""
        if not await self._apiserver_built():
            reason = await self._build_apiserver()
            if reason is not None:
                self._without_kube(f"kube-apiserver is not built and could not be built: "
                                   f"{reason}")
                return None
        directory = self.dir / "kube"
        self.stack.push_async_callback(self._stop_script, "kube-apiserver and etcd",
                                       "kube-apiserver.sh", directory)
        try:
            kubeconfig = Path(await infra(
                "kube-apiserver.sh", "start", directory, within=240,
                env=self._env(CISTATE_KUBE_READY_TIMEOUT=os.environ.get(
                    "CISTATE_KUBE_READY_TIMEOUT", "180"))))
        except QuickstartError as exc:
            self._without_kube(f"the kube-apiserver did not start: {exc}")
            return None
        self.processes.add_pid_file("etcd / kube-apiserver", directory / "pids")
        server = (directory / "server").read_text().strip()
        part("Kubernetes API", f"{server}  (etcd, kube-apiserver: pids "
             f"{self._pids(directory / 'pids')})",
             f"kube-apiserver v1.20.2 + etcd (data in {directory}); no kubelet, scheduler or "
             "controllers run", "your dev cluster: CISTATE_KUBECONFIG (or the in-cluster "
             "config), CISTATE_DEV_NAMESPACE")
        return kubeconfig

    async def _apiserver_built(self) -> bool:
        try:
            await run([APISERVER, "--version"], what="kube-apiserver --version", within=30)
        except (QuickstartError, OSError):
            return False
        return True

    async def _build_apiserver(self) -> str | None:
        """Build the kube-apiserver, showing progress; None when built, else why not."""
        build_log = CACHE / "src" / "build.log"
        part("Kubernetes API", f"not built yet: building kube-apiserver v1.20.2 into "
             f"{APISERVER}", None, "5-10 minutes, once per machine (Debian's kubernetes "
             f"source package; build log {build_log})")
        began = time.monotonic()

        async def progress() -> None:
            while True:
                await asyncio.sleep(30)
                last = ""
                with contextlib.suppress(OSError, IndexError):
                    last = build_log.read_text(errors="replace").strip().splitlines()[-1]
                say(f"    ... still building ({(time.monotonic() - began) / 60:.1f} min)"
                    + (f"; build.log: {last[:100]}" if last else ""))

        ticker = asyncio.create_task(progress())
        try:
            await infra("kube-apiserver.sh", "build", within=3600, on_line=self._indented)
        except QuickstartError as exc:
            return f"{exc} (see the lines above)"
        finally:
            ticker.cancel()
        say(f"    built in {(time.monotonic() - began) / 60:.1f} min")
        return None

    def _without_kube(self, reason: str) -> None:
        self.with_kube = False
        say(f"  {'Kubernetes API':<{COLUMN - 2}}NONE: {reason}")
        say(f"{' ' * COLUMN}=> the pipeline runs WITHOUT its deploy and health steps")

    async def start_cluster_stand_ins(self, kubeconfig: Path) -> None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))  # the stand-ins are shared with the e2e tests
        from kubernetes_asyncio.config import new_client_from_config

        from tests.infra.standins import KubeletStandIn, PodStandIn

        api = await new_client_from_config(config_file=str(kubeconfig))
        self.stack.push_async_callback(api.close)
        self.stack.callback(say, "  stopped the kubelet stand-in")
        await self.stack.enter_async_context(KubeletStandIn(api, NAMESPACE, interval=0.5))
        part("kubelet", f"namespace {NAMESPACE} (in this process)",
             "reports each new Deployment generation as rolled out (patches its status to "
             "all replicas available)", "the cluster's kubelets and deployment controller")

        pod: PodStandIn | None = None

        def report(line: str) -> None:
            say(f"  [pod stand-in] {line}")
            if pod is not None and pod.pid is not None:
                self.processes.add("pod stand-in (buildah run)", pod.pid)

        pod = PodStandIn(api, NAMESPACE, APP, self.ports["pod"], self.dir / "pod",
                         report=report)
        await self.stack.enter_async_context(pod)
        part("pod", f"http://localhost:{self.ports['pod']} (in this process)",
             f"runs the image Deployment {NAMESPACE}/{APP} names with `buildah run` "
             "(busybox httpd on the host network), so that health gets its 200",
             "the Deployment's pods, reached through the app's Ingress")

    async def make_app_repo(self) -> tuple[Path, str]:
        """The sample app's bare repo (with the hook) and the person's work clone, with a
        commit ready to push; returns the clone and what is ready in it."""
        bare = self.dir / "git" / "repos" / f"{APP}.git"
        self.repo_url = f"{self.git_url}/{APP}.git"
        work = self.dir / APP
        if not bare.is_dir():
            await git("init", "-q", "--bare", "-b", "main", bare)
        self.write_hook(bare)
        if not (work / ".git").is_dir():
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(SAMPLE_APP, work,
                            ignore=shutil.ignore_patterns("node_modules", "dist"))
            # health finds the app through its Ingress host: localhost, where the pod
            # stand-in serves it
            values = work / "chart" / APP / "values.yaml"
            text = values.read_text()
            if text.count('  host: ""\n') != 1:
                raise QuickstartError(f"{values} no longer has one `host: \"\"` under "
                                      "ingress: update make_app_repo in scripts/quickstart.py")
            values.write_text(text.replace('  host: ""\n', "  host: localhost\n"))
            await git("init", "-q", "-b", "main", cwd=work)
            for key, value in (("user.name", "cistate quickstart user"),
                               ("user.email", "you@cistate.invalid")):
                await git("config", key, value, cwd=work)
            await git("remote", "add", "origin", self.repo_url, cwd=work)
            await git("add", "-A", cwd=work)
            await git("commit", "-q", "-m", "The sample app, ready for its first release",
                      cwd=work)
        else:
            # the git server's port changes from one start to the next
            await git("remote", "set-url", "origin", self.repo_url, cwd=work)
        pushed = (await git("ls-remote", "origin", "refs/heads/main", cwd=work)).split("\t")[0]
        head = await git("rev-parse", "HEAD", cwd=work)
        clean = not await git("status", "--porcelain", cwd=work)
        if pushed == head and clean:
            changes = work / "CHANGES.md"
            with changes.open("a") as out:
                out.write(f"- a change to push, made by the quickstart at "
                          f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC\n")
            await git("add", "CHANGES.md", cwd=work)
            await git("commit", "-q", "-m", "A change to push", cwd=work)
        ready = await git("log", "--format=%h %s", "-3", "HEAD", "--not", "--remotes",
                          cwd=work)
        if ready:
            return work, "ready to push: " + "; ".join(ready.splitlines())
        return work, "nothing new to push: commit a change first"

    def write_hook(self, bare: Path) -> None:
        """The post-receive hook, rewritten at each start: the URLs change with the ports."""
        hook_dir = self.dir / "hook"
        hook_dir.mkdir(exist_ok=True)
        env_file, log = hook_dir / "cistate.env", hook_dir / "post-receive.log"
        # a producer needs only the broker and the bus prefix
        producer = {"CISTATE_RABBITMQ_URL": self.settings.rabbitmq_url,
                    "CISTATE_BUS_PREFIX": self.settings.bus_prefix}
        env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in
                                    producer.items()))
        env_file.chmod(0o600)
        hook = bare / "hooks" / "post-receive"
        hook.write_text(POST_RECEIVE.format(
            env_file=shlex.quote(str(env_file)), log=shlex.quote(str(log)),
            repo=shlex.quote(self.repo_url), cistate=shlex.quote(str(CISTATE))))
        hook.chmod(0o755)

    def pipeline_without_kube(self) -> Path:
        """The packaged pipeline less its deploy and health steps."""
        spec = yaml.safe_load(DEFAULT_PIPELINE.read_text())
        spec["name"] = "nodejs-without-kube"
        spec["steps"] = [s for s in spec["steps"] if s["name"] not in ("deploy", "health")]
        path = self.dir / "pipeline-without-kube.yaml"
        path.write_text("# The quickstart's pipeline when there is no Kubernetes API: the "
                        "packaged nodejs pipeline\n# without deploy and health.\n"
                        + yaml.safe_dump(spec, sort_keys=False))
        self.pipeline = spec["name"]
        return path

    async def start_cistate(self) -> None:
        s = self.settings
        env = self._env(**self.worker_env, CISTATE_WORKDIR=str(self.dir / "cistate"),
                        CISTATE_API_READ_AUTH="0", CISTATE_LISTEN=s.listen)
        settings_file = self.dir / "settings.env"
        settings_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in
                                         sorted(env.items()) if k.startswith("CISTATE_")))
        settings_file.chmod(0o600)
        say("cistate (real, no stand-in):")
        try:
            await run([CISTATE, "db", "upgrade"], what="cistate db upgrade", env=env,
                      within=120)
        except QuickstartError as exc:
            raise QuickstartError(f"{exc}\nIs PostgreSQL up at {redact(s.database_url)}? "
                                  "`bash scripts/services.sh` starts it.") from None
        part("event store", redact(s.database_url), None,
             "a PostgreSQL of your own: CISTATE_DATABASE_URL (`cistate db upgrade` done)")
        part("message bus", f"{redact(s.rabbitmq_url)}, prefix {s.bus_prefix}", None,
             "a RabbitMQ cluster: CISTATE_RABBITMQ_URL, CISTATE_BUS_PREFIX")
        try:
            checked = await run([CISTATE, "check"], what="cistate check", env=env, within=60)
        except QuickstartError as exc:
            raise QuickstartError(f"the step settings are refused ({settings_file}): {exc}"
                                  ) from None
        say(f"  {'step settings':<{COLUMN - 2}}{checked.strip()} (`cistate check`); the "
            f"worker's environment:")
        for key, value in self.worker_env.items():
            say(f"{' ' * COLUMN}{key}={value}")
        if listening(s.listen_host, s.listen_port):
            raise QuickstartError(
                f"{s.listen} is in use (another `cistate serve`, or scripts/run.sh in another "
                "shell?): stop it, or give the quickstart another CISTATE_LISTEN")
        log = (self.dir / "serve.log").open("ab")
        self.serve = await asyncio.create_subprocess_exec(
            str(CISTATE), "serve", env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log,
            stderr=log, start_new_session=True)
        log.close()
        self.processes.add("cistate serve", self.serve.pid)
        self.stack.push_async_callback(self._stop_serve)
        await self._wait_serving()
        part("cistate serve", f"http://{s.listen}  (pid {self.serve.pid})", None,
             "the chart in chart/cistate or compose.yaml; reads need a token there "
             f"(here CISTATE_API_READ_AUTH=0); log {self.dir / 'serve.log'}")

    async def _wait_serving(self, within: float = 90) -> None:
        assert self.serve is not None
        url = f"http://{self.settings.listen}/health"
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as http:
            while True:
                if self.serve.returncode is not None:
                    raise QuickstartError(
                        f"cistate serve exited with code {self.serve.returncode}:\n"
                        f"{tail((self.dir / 'serve.log').read_bytes())}\nIs RabbitMQ up at "
                        f"{redact(self.settings.rabbitmq_url)}? `bash scripts/services.sh` "
                        "starts it.")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise QuickstartError(f"cistate serve did not answer {url} within "
                                          f"{within:.0f} s; log: {self.dir / 'serve.log'}")
                await asyncio.sleep(0.2)

    def print_push(self, work: Path, ready: str) -> None:
        say()
        say(f"Ready. Send the sample app's commit from push to the QA GitOps commit "
            f"(pipeline {self.pipeline}):")
        say()
        say(f"    {shlex.join(['git', '-C', str(work), 'push', 'origin', 'main'])}")
        say()
        say(f"{work} is a clone of the sample app ({ready}).")
        say("Change it, commit and push the same way for the next run.")

    # -- following runs

    async def follow(self) -> None:
        """Print each run of the sample app as it goes, until stopped."""
        store = await connect(self.settings.database_url, min_size=1, max_size=2)
        self.stack.push_async_callback(store.close)
        since = datetime.now(UTC) - timedelta(seconds=1)
        say(f"Following the runs of {self.repo_url} (Ctrl-C stops everything) ...")
        runs: dict[Any, RunPrinter] = {}
        while True:
            assert self.serve is not None
            if self.serve.returncode is not None:
                raise QuickstartError(
                    f"cistate serve exited with code {self.serve.returncode}:\n"
                    f"{tail((self.dir / 'serve.log').read_bytes())}")
            found = await store.list_runs(RunQuery(repo=self.repo_url, since=since))
            for state in reversed(found):
                if state.id not in runs:
                    runs[state.id] = RunPrinter(self, state.id)
            for printer in runs.values():
                if not printer.done:
                    await printer.show(store)
            await asyncio.sleep(0.5)

    # -- stopping

    async def _stop_script(self, name: str, script: str, directory: Path) -> None:
        try:
            await infra(script, "stop", directory, env=self._env(), within=60)
        except QuickstartError as exc:
            say(f"  could not stop the {name}: {exc}")
        else:
            say(f"  stopped the {name}")

    async def _stop_child(self, name: str, proc: asyncio.subprocess.Process) -> None:
        await stop_group(proc)
        say(f"  stopped the {name} (pid {proc.pid})")

    async def _stop_serve(self) -> None:
        assert self.serve is not None
        # SIGINT: serve closes its broker and database connections and exits
        await stop_group(self.serve, signal.SIGINT, grace=30)
        say(f"  stopped cistate serve (pid {self.serve.pid})")

    def cli(self, *args: str) -> str:
        """A `cistate` command line that reads this setup's runs (the database is named when
        it is not the default one)."""
        default = Settings.model_fields["database_url"].default
        env = ("" if self.settings.database_url == default
               else f"CISTATE_DATABASE_URL={shlex.quote(self.settings.database_url)} ")
        return env + shlex.join([str(CISTATE), *args])

    def _pids(self, pid_file: Path) -> str:
        return ", ".join(pid_file.read_text().split()) if pid_file.is_file() else "?"


class RunPrinter:
    """Prints a run's events as they are stored, one line each."""

    def __init__(self, quickstart: Quickstart, run_id: Any) -> None:
        self.qs = quickstart
        self.run_id = run_id
        self.seq = 0
        self.done = False
        self.began: dict[str, datetime] = {}

    async def show(self, store: Store) -> None:
        for event in await store.events(self.run_id, after_seq=self.seq):
            self.seq = event.seq
            self.print(event)
            if event.type in ("run.succeeded", "run.failed", "run.cancelled"):
                await self.finish(store, event)

    def print(self, event: Event) -> None:
        d, at = event.data, event.recorded_at
        step = str(d.get("step", ""))
        if event.type == "run.requested":
            say()
            say(f"run {self.run_id}: {d['ref']} at {d['commit'][:7]}, pipeline "
                f"{d['pipeline']} ({len(d['steps'])} steps)")
            self.began["run"] = at
        elif event.type == "step.started":
            self.began[step] = at
            say(f"  {step:<13} started (attempt {d['attempt']})")
        elif event.type == "step.succeeded":
            outputs = ", ".join(f"{k}={_short(v)}" for k, v in (d.get("outputs") or {}).items())
            say(f"  {step:<13} succeeded in {self._since(step, at)}"
                + (f": {outputs}" if outputs else ""))
        elif event.type in ("step.failed", "step.timed_out"):
            error = d.get("error") or {}
            message = str(error.get("message", "")).strip().splitlines() or ["(no message)"]
            say(f"  {step:<13} {event.type.split('.')[1].replace('_', ' ')} after "
                f"{self._since(step, at)}: {message[0][:300]}")
            say(f"  {'':<13} its log: {self.qs.cli('runs', 'logs', str(self.run_id), step)}")
        elif event.type == "step.retry_scheduled":
            say(f"  {step:<13} retries in {d['delay']} s (attempt {d['attempt']})")
        elif event.type == "step.skipped":
            say(f"  {step:<13} skipped: {d.get('reason', '')}")

    async def finish(self, store: Store, event: Event) -> None:
        self.done = True
        state = await store.load(self.run_id)
        took = self._since("run", event.recorded_at)
        outcome = event.type.split(".")[1]
        say(f"run {self.run_id} {outcome} in {took}"
            + (f": {event.data['reason']}" if event.data.get("reason") else ""))
        gitops = state.steps.get("gitops") if state else None
        if outcome == "succeeded" and gitops is not None and gitops.outputs.get("commit"):
            commit = str(gitops.outputs["commit"])
            bare = self.qs.dir / "git" / "repos" / "gitops.git"
            subject = await git("log", "-1", "--format=%s", commit, cwd=bare)
            made = "made by this run" if gitops.outputs.get("changed") else "already there"
            say(f"  GitOps commit {commit[:12]} on branch qa of {self.qs.gitops_url} "
                f"({made}): \"{subject}\"")
            say(f"  what QA now runs: git -C {bare} show qa:qa/{APP}/requirements.yaml")
        if "deploy" not in (state.steps if state else {}):
            say("  (deploy and health did not run: there is no Kubernetes API)")
        say("  look at the run:")
        run = str(self.run_id)
        for args in (("show", run), ("events", run), ("logs", run, "build")):
            say(f"    {self.qs.cli('runs', *args)}")
        say(f"    http://{self.qs.settings.listen}/api/v1/runs/{self.run_id}  (and /events, "
            "/steps/<step>/log)")
        say()
        say("Waiting for the next push (Ctrl-C stops everything) ...")

    def _since(self, key: str, at: datetime) -> str:
        began = self.began.get(key)
        return f"{(at - began).total_seconds():.1f} s" if began else "?"


def _short(value: object, width: int = 80) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# ------------------------------------------------------------------------- main --


def lock(directory: Path) -> IO[str]:
    """One quickstart per directory: the second would stop the first one's parts."""
    handle = (directory / "quickstart.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise QuickstartError(
            f"another quickstart (pid {holder}) uses {directory}: stop it (Ctrl-C there) or "
            "give this one another directory (--dir or CISTATE_QUICKSTART_DIR)") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


async def quickstart(directory: Path, with_kube: bool) -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        say(f"quickstart: bad configuration: CISTATE_{str(err['loc'][0]).upper()}: "
            f"{err['msg']}")
        return 2
    if not CISTATE.is_file():
        say(f"quickstart: {CISTATE} is missing: run `bash scripts/setup.sh` first")
        return 2
    try:
        held = lock(directory)
    except QuickstartError as exc:
        say(f"quickstart: {exc}")
        return 2

    async with AsyncExitStack() as stack:
        stack.callback(held.close)
        qs = Quickstart(directory, settings, with_kube, stack)
        work = asyncio.create_task(_start_and_follow(qs))
        stopping = False

        def on_signal(name: str) -> None:
            nonlocal stopping
            if stopping:
                say("quickstart: still stopping, please wait")
                return
            stopping = True
            say()
            say(f"{name}: stopping everything the quickstart started ...")
            work.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        await asyncio.wait([work])
        failure = None if work.cancelled() else work.exception()
        if failure is not None:
            say()
            say(f"quickstart: {failure}" if isinstance(failure, QuickstartError)
                else f"quickstart: unexpected error {failure!r} (traceback below)")
            say("quickstart: stopping what it started ...")
        qs.processes.add_descendants()
        await stack.aclose()
        left = await qs.processes.stop_all_left()
        for process in left:
            say(f"  stopped {process.name} (pid {process.pid}), which was still running")
        say(f"quickstart: stopped; none of the {len(qs.processes.known)} processes it started "
            "is running" + (f" ({len(left)} had to be stopped at the end)" if left else ""))
        if failure is not None and not isinstance(failure, QuickstartError):
            raise failure
        return 0 if failure is None else 1


async def _start_and_follow(qs: Quickstart) -> None:
    await qs.start()
    await qs.follow()


def main(argv: Sequence[str] | None = None) -> int:
    default_dir = os.environ.get("CISTATE_QUICKSTART_DIR") or str(
        Path.home() / ".cache" / "cistate-quickstart")
    parser = argparse.ArgumentParser(
        prog="quickstart", description="cistate's default pipeline from `git push` to the QA "
        "GitOps commit, with local stand-ins for every service it talks to.")
    parser.add_argument("--dir", type=Path, default=Path(default_dir),
                        help=f"where its state lives (default: {default_dir}; "
                        "CISTATE_QUICKSTART_DIR)")
    parser.add_argument("--without-kube", action="store_true",
                        help="no kube-apiserver: the pipeline runs without deploy and health")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(quickstart(args.dir.expanduser().resolve(), not args.without_kube))


if __name__ == "__main__":
    sys.exit(main())
