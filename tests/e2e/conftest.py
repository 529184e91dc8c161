"""Fixtures for end-to-end tests against real components started by tests/infra/*.sh.

A component that cannot be started fails the tests that need it (pytest.fail), it never skips
them: a green run means the real thing was exercised.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from kubernetes_asyncio.client import (
    ApiClient,
    AuthenticationV1TokenRequest,
    CoreV1Api,
    V1Namespace,
    V1ObjectMeta,
    V1ServiceAccount,
    V1TokenRequestSpec,
)
from kubernetes_asyncio.config import new_client_from_config

from handlers import mirror
from handlers.base import StepLog, StepRequest, identity_env
from handlers.sandbox import Sandbox, SandboxSettings
from tests.infra.standins import KubeletStandIn as KubeletStandIn  # re-exported
from tests.infra.standins import serve_image as serve_image  # re-exported

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "tests" / "infra"
SAMPLE_APP = ROOT / "tests" / "fixtures" / "sample-app"
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "cistate tests",
    "GIT_AUTHOR_EMAIL": "tests@cistate.invalid",
    "GIT_COMMITTER_NAME": "cistate tests",
    "GIT_COMMITTER_EMAIL": "tests@cistate.invalid",
}
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def pytest_configure(config: pytest.Config) -> None:
    # registered here, beside the tests that use it (pyproject's markers are the tiers)
    config.addinivalue_line(
        "markers", "worker_image: builds cistate's own image (Containerfile) with buildah; "
        "minutes the first time on a machine, deselect with -m 'not worker_image'")


def infra(script: str, *args: str, timeout: float = 600) -> str:
    """Run tests/infra/<script>; its last line of stdout. Fails the test loudly on error."""
    argv = ["bash", str(INFRA / script), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} {' '.join(args)} did not finish in {timeout}s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"{script} {' '.join(args)} failed with exit code {done.returncode}:\n"
            f"{done.stderr[-4000:]}",
            pytrace=False,
        )
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ----------------------------------------------------------------- registries --


@dataclass(frozen=True)
class Registry:
    address: str  # 127.0.0.1:PORT
    username: str = ""
    password: str = ""

    def _open(self, method: str, path: str, accept: str = "") -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(f"http://{self.address}{path}", method=method)
        if accept:
            req.add_header("Accept", accept)
        if self.username:
            pair = f"{self.username}:{self.password}".encode()
            req.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def tags(self, repository: str) -> list[str]:
        status, _, body = self._open("GET", f"/v2/{repository}/tags/list")
        if status == 404:
            return []
        assert status == 200, body
        return list(json.loads(body).get("tags") or [])

    def digest(self, repository: str, reference: str) -> str | None:
        status, headers, _ = self._open(
            "HEAD", f"/v2/{repository}/manifests/{reference}", MANIFEST_ACCEPT
        )
        if status == 404:
            return None
        assert status == 200, status
        return headers["Docker-Content-Digest"]

    def manifest(self, repository: str, reference: str) -> dict[str, Any]:
        status, _, body = self._open(
            "GET", f"/v2/{repository}/manifests/{reference}", MANIFEST_ACCEPT
        )
        assert status == 200, body
        parsed: dict[str, Any] = json.loads(body)
        return parsed

    def blob(self, repository: str, digest: str) -> bytes:
        status, _, body = self._open("GET", f"/v2/{repository}/blobs/{digest}")
        assert status == 200, body
        return body


@pytest.fixture(scope="session")
def registry_tools() -> None:
    infra("registry.sh", "install", timeout=900)


@pytest.fixture(scope="session")
def registry(registry_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous registry (docker-registry, distribution 2.8) on 127.0.0.1."""
    directory = tmp_path_factory.mktemp("registry")
    address = infra("registry.sh", "start", str(directory))
    try:
        yield Registry(address)
    finally:
        infra("registry.sh", "stop", str(directory))


@pytest.fixture(scope="session")
def auth_registry(
    registry_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    """A registry that wants basic auth (htpasswd) for everything."""
    directory = tmp_path_factory.mktemp("auth-registry")
    username, password = "alice", uuid.uuid4().hex
    address = infra("registry.sh", "start", str(directory), "--htpasswd", f"{username}:{password}")
    try:
        yield Registry(address, username, password)
    finally:
        infra("registry.sh", "stop", str(directory))


@dataclass(frozen=True)
class TokenRegistry:
    """A registry that uses the bearer-token flow, and the log of its token service."""

    registry: Registry
    directory: Path

    def token_requests(self) -> list[dict[str, Any]]:
        lines = (self.directory / "token.log").read_text().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="session")
def token_registry(
    registry_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TokenRegistry]:
    """A registry whose token service grants alice every scope and anonymous callers none."""
    directory = tmp_path_factory.mktemp("token-registry")
    username, password = "alice", uuid.uuid4().hex
    address = infra("registry.sh", "start", str(directory), "--token", f"{username}:{password}")
    try:
        yield TokenRegistry(Registry(address, username, password), directory)
    finally:
        infra("registry.sh", "stop", str(directory))


@pytest.fixture(scope="session")
def base_image(registry: Registry) -> str:
    """A busybox image built FROM scratch, in the anonymous registry."""
    return infra("registry.sh", "base-image", registry.address)


@pytest.fixture(scope="session")
def builder_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """buildah's storage for this session, apart from the machine's default store."""
    return tmp_path_factory.mktemp("buildah")


class FlakyProxy:
    """An HTTP proxy in front of a real registry that answers 503 to the first `fail_first`
    requests (all of them with fail_first=-1), then forwards: a registry having a bad minute."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_first = 0
        self.seen = 0
        self.failed = 0
        self.address = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.address = f"127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen += 1
        if self.fail_first < 0 or self.seen <= self.fail_first:
            self.failed += 1
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "try later"}]}, status=503
            )
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        async with self._session.request(
            request.method,
            f"http://{self.upstream}{request.path_qs}",
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            skip = {"content-length", "transfer-encoding", "content-encoding", "connection"}
            return web.Response(
                status=upstream.status,
                body=body,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in skip},
            )


@pytest.fixture
async def flaky_registry(registry: Registry) -> AsyncIterator[FlakyProxy]:
    proxy = FlakyProxy(registry.address)
    await proxy.start()
    yield proxy
    await proxy.stop()


# ------------------------------------------------------------------------ git --


@dataclass(frozen=True)
class GitServer:
    url: str  # git://127.0.0.1:PORT
    repos: Path


@pytest.fixture(scope="session")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    directory = tmp_path_factory.mktemp("git-server")
    url = infra("git-server.sh", "start", str(directory))
    try:
        yield GitServer(url, directory / "repos")
    finally:
        infra("git-server.sh", "stop", str(directory))


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_IDENTITY, "GIT_TERMINAL_PROMPT": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


@dataclass
class GitRepo:
    """A bare repo on the git server and a work clone to make commits with."""

    name: str
    url: str
    bare: Path
    work: Path
    initial: str = ""  # the sha of the first commit on main

    def commit(
        self,
        changes: Mapping[str, str | None] | None = None,
        message: str = "change",
        branch: str = "main",
        base: str | None = None,
        links: Mapping[str, str] | None = None,
    ) -> str:
        """Commit `changes` (path -> content, None deletes) and `links` (path -> where the
        symbolic link points, as written) on `branch` and push it."""
        if base is not None:
            git(self.work, "checkout", "-q", "--detach", base)
        for path, content in (changes or {}).items():
            target = self.work / path
            if content is None:
                target.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
        for path, points_to in (links or {}).items():
            link = self.work / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            os.symlink(points_to, link)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        sha = git(self.work, "rev-parse", "HEAD")
        git(self.work, "push", "-q", "--force", "origin", f"HEAD:refs/heads/{branch}")
        return sha

    def remote_tags(self) -> dict[str, str]:
        """Tag name -> the commit it points at, as the server has them."""
        out = git(self.work, "ls-remote", "--tags", "origin")
        tags: dict[str, str] = {}
        for line in out.splitlines():
            sha, ref = line.split("\t")
            name = ref.removeprefix("refs/tags/")
            if name.endswith("^{}"):
                tags[name[:-3]] = sha  # the peeled (commit) line wins
            else:
                tags.setdefault(name, sha)
        return tags

    def push_tag(self, name: str, commit: str) -> None:
        git(self.work, "tag", "-a", "-m", f"Release {name}", name, commit)
        git(self.work, "push", "-q", "origin", f"refs/tags/{name}")


@pytest.fixture
def make_repo(git_server: GitServer, tmp_path: Path) -> Callable[..., GitRepo]:
    """make_repo(name=None, app=SAMPLE_APP) -> a repo on the server with the app on main."""

    def make(name: str | None = None, app: Path = SAMPLE_APP) -> GitRepo:
        name = name or f"app-{uuid.uuid4().hex[:8]}"
        bare = git_server.repos / f"{name}.git"
        git(git_server.repos, "init", "-q", "--bare", "-b", "main", str(bare))
        work = tmp_path / f"work-{name}"
        shutil.copytree(app, work)
        git(work, "init", "-q", "-b", "main")
        git(work, "remote", "add", "origin", f"{git_server.url}/{name}.git")
        repo = GitRepo(name, f"{git_server.url}/{name}.git", bare, work)
        repo.initial = repo.commit(message="initial commit")
        return repo

    return make


# --------------------------------------------------------------- step requests --


@dataclass
class Env:
    """The worker environment the handlers see: CISTATE_* set for this test alone."""

    registry: Registry
    namespace: str
    base_image: str
    monkeypatch: pytest.MonkeyPatch

    @property
    def push_registry(self) -> str:
        return f"{self.registry.address}/{self.namespace}"

    @property
    def release_registry(self) -> str:
        return f"{self.registry.address}/{self.namespace}-releases"

    def set(self, **values: str) -> None:
        for key, value in values.items():
            self.monkeypatch.setenv(f"CISTATE_{key.upper()}", value)


@pytest.fixture
def handler_env(
    monkeypatch: pytest.MonkeyPatch, registry: Registry, base_image: str, builder_storage: Path
) -> Env:
    for key in list(os.environ):
        if key.startswith("CISTATE_"):
            monkeypatch.delenv(key)
    namespace = f"t{uuid.uuid4().hex[:8]}"
    found = Env(registry, namespace, base_image, monkeypatch)
    found.set(
        registry=found.push_registry,
        release_registry=found.release_registry,
        registry_insecure="1",
        registry_retries="3",
        registry_backoff="0.05",
        builder_root=str(builder_storage / "root"),
        builder_runroot=str(builder_storage / "run"),
    )
    return found


@dataclass
class Requests:
    """Builds StepRequests: each with its own workdir and log file under the test's tmp_path."""

    tmp_path: Path
    logs: list[StepLog] = field(default_factory=list)
    made: list[StepRequest] = field(default_factory=list)

    def __call__(
        self,
        repo: GitRepo | str,
        commit: str,
        step: str,
        *,
        ref: str = "refs/heads/main",
        settings: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Mapping[str, Any]] | None = None,
        attempt: int = 1,
    ) -> StepRequest:
        n = len(self.logs) + 1
        log = StepLog(self.tmp_path / "logs" / f"{n:02d}-{step}.log")
        self.logs.append(log)
        run_id = str(uuid.uuid4())
        url = repo.url if isinstance(repo, GitRepo) else repo
        # the worker's sandbox, as the worker builds it (steps/ plays the worker's workdir)
        sandbox = Sandbox(
            settings=SandboxSettings(),
            attempt=self.tmp_path / "steps" / f"{n:02d}-{step}",
            identity=identity_env(run_id, url, ref, commit, step, attempt),
            hidden=(self.tmp_path / "steps",),
            read_only_binds=(mirror.objects_of(mirror.path_for(self.mirrors, url)),),
        )
        sandbox.prepare()
        request = StepRequest(
            run_id=run_id,
            repo=url,
            ref=ref,
            commit=commit,
            step=step,
            attempt=attempt,
            settings=dict(settings or {}),
            script=None,
            inputs={k: dict(v) for k, v in (inputs or {}).items()},
            workdir=sandbox.work,
            log=log,
            sandbox=sandbox,
            mirrors=self.mirrors,
        )
        self.made.append(request)
        return request

    @property
    def mirrors(self) -> Path:
        """The worker's repo mirrors (handlers.mirror), shared by the test's steps."""
        return self.tmp_path / "steps" / mirror.MIRRORS_DIR

    @property
    def workdir(self) -> Path:
        """The folder that plays the worker's workdir (its mirrors, its caches)."""
        return self.tmp_path / "steps"

    def close(self) -> None:
        for log in self.logs:
            log.close()
        for request in self.made:
            request.holds.close()  # as the worker does once the workspace is removed


@pytest.fixture
def make_request(tmp_path: Path) -> Iterator[Requests]:
    requests = Requests(tmp_path)
    yield requests
    requests.close()


def log_text(request: StepRequest) -> str:
    return request.log.path.read_text(encoding="utf-8")


# ------------------------------------------- delivery: Kubernetes, helm, charts, GitOps --
# Shared by test_deploy_handlers.py (handlers called directly) and test_pipeline.py (the
# service). Two parts cannot run here and are played by stand-ins, named as such:
# `KubeletStandIn` (kubelet + deployment controller) and `ChartRepoStandIn` (Artifactory);
# `serve_image` runs an app's image as its pod would. `KubeletStandIn` and `serve_image` live
# in tests/infra/standins.py, which the quickstart (scripts/quickstart.py) shares.


@dataclass(frozen=True)
class Kube:
    kubeconfig: Path
    directory: Path


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return Path(infra("helm.sh", timeout=300)) / "helm"


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """A real kube-apiserver + etcd (no kubelet), started by the project's script."""
    infra("kube-apiserver.sh", "build", timeout=1800)
    directory = tmp_path_factory.mktemp("kube")
    kubeconfig = Path(infra("kube-apiserver.sh", "start", str(directory), timeout=180))
    try:
        yield Kube(kubeconfig, directory)
    finally:
        infra("kube-apiserver.sh", "stop", str(directory))


@pytest.fixture
async def kube_api(kube: Kube) -> AsyncIterator[ApiClient]:
    api = await new_client_from_config(config_file=str(kube.kubeconfig))
    async with api:
        yield api


async def service_account_kubeconfig(
    kube: Kube, api: ApiClient, namespace: str, name: str, path: Path
) -> Path:
    """A kubeconfig at `path` holding a real token of ServiceAccount `namespace/name` (made
    here, through the TokenRequest API): an identity with only the rights RBAC gives it."""
    core = CoreV1Api(api)
    await core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=namespace)))
    await core.create_namespaced_service_account(
        namespace, V1ServiceAccount(metadata=V1ObjectMeta(name=name)))
    issued = await core.create_namespaced_service_account_token(
        name, namespace, AuthenticationV1TokenRequest(
            spec=V1TokenRequestSpec(audiences=[], expiration_seconds=3600)))
    server = (kube.directory / "server").read_text().strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cistate",
                      "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": name, "user": {"token": issued.status.token}}],
        "contexts": [{"name": name, "context": {"cluster": "cistate", "user": name}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class Delivery:
    """The worker environment of the delivery handlers, for one test."""

    env: Env
    namespace: str  # a fresh Kubernetes namespace: the apiserver cannot delete one

    def set(self, **values: str) -> None:
        self.env.set(**values)


@pytest.fixture
def delivery(handler_env: Env, kube: Kube, helm_bin: Path) -> Delivery:
    namespace = f"dev-{uuid.uuid4().hex[:8]}"
    handler_env.set(
        kubeconfig=str(kube.kubeconfig),
        helm=str(helm_bin),
        dev_namespace=namespace,
        rollout_timeout="30",
        rollout_interval="0.1",
        health_backoff="0.1",
        health_backoff_max="0.5",
        health_timeout="2",
    )
    return Delivery(handler_env, namespace)


@pytest.fixture
def gitops_repo(make_repo: Any, tmp_path: Path, delivery: Delivery) -> GitRepo:
    """A GitOps repo on the git server with a `qa` branch; CISTATE_GITOPS_REPO names it."""
    seed = tmp_path / "gitops-seed"
    seed.mkdir()
    (seed / "README.md").write_text("GitOps repo of the tests\n")
    repo: GitRepo = make_repo(name=f"gitops-{uuid.uuid4().hex[:8]}", app=seed)
    repo.commit({"qa/README.md": "QA environment\n"}, "qa environment", branch="qa")
    delivery.set(gitops_repo=repo.url)
    return repo


@dataclass(frozen=True)
class ChartRepoStandIn:
    """tests/infra/chart_repo.py: a real HTTP chart repository process, standing in for
    Artifactory (none can run here)."""

    url: str
    root: Path

    def index(self) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load((self.root / "index.yaml").read_text())
        return loaded


@pytest.fixture
def chart_repo(tmp_path: Path, delivery: Delivery) -> Iterator[ChartRepoStandIn]:
    root = tmp_path / "chart-repo"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(INFRA / "chart_repo.py"), "--root", str(root), "--port", str(port),
         "--index-delay", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("ready"):
        server.kill()
        pytest.fail(f"the chart repository stand-in did not start: {server.stderr.read()}")
    url = f"http://127.0.0.1:{port}/charts"
    delivery.set(chart_repo=url)
    try:
        yield ChartRepoStandIn(url, root / "charts")
    finally:
        server.terminate()
        server.wait(timeout=10)
