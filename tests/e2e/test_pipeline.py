"""End to end: a real `git push` runs a whole pipeline in the real service.

`cistate serve` runs as a subprocess (orchestrator + worker + API, `ServeProcess`) with its
own database and bus prefix, and the handlers' CISTATE_* settings in its environment, the
way an operator would run it. Nothing calls a handler directly: the code repo is a bare repo
on the project's git server (tests/infra/git-server.sh) whose `post-receive` hook reads the
`<old> <new> <ref>` lines git gives it and runs `cistate push` for each (its CISTATE_* bus
settings come from an env file the hook sources). A `git push` from a work clone therefore
opens the run; the test finds it by commit in the store and reads it back with the CLI
(`runs list/show/events/logs --json`).

Everything else is real and started by the project's scripts: docker-registry, buildah,
npm, helm, kube-apiserver + etcd, the git daemon, the chart repository process. The parts
that cannot run here are played by the test, named as such:
- the kubelet and the deployment controller: `KubeletStandIn` (tests/infra/standins.py)
  patches the app's Deployment status to "all replicas updated and available";
- the pod itself: `PodStandIn` (tests/infra/standins.py, shared with the quickstart) reads
  the image from the Deployment's spec, as a kubelet would, and runs that image with
  `buildah from` + `buildah run` (busybox httpd on the host network, on the port the Ingress
  is checked at);
- Artifactory: `ChartRepoStandIn`, a real HTTP chart repository process
  (tests/infra/chart_repo.py);
- Argo CD: not needed: the default pipeline ships qa-sync disabled, so the run records it
  as skipped (`ArgoCDStandIn` in test_deploy_handlers.py covers the qa-sync handler).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import ApiClient, AppsV1Api, CoreV1Api, NetworkingV1Api

from cistate.adapters.postgres.store import RunQuery, Store
from cistate.config import Settings
from cistate.domain.run import RunState
from tests.conftest import free_port, settings_env, wait_until
from tests.e2e.conftest import (
    SAMPLE_APP,
    ChartRepoStandIn,
    Delivery,
    Env,
    GitRepo,
    GitServer,
    git,
)
from tests.infra.standins import KubeletStandIn, PodStandIn
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.e2e

APP = "hello-app"  # setup derives it from the sample app's package.json name "hello_app"
SOURCE_STEPS = ("setup", "test", "build", "tag-release", "img-release")
DEFAULT_STEPS = (
    "setup", "test", "build", "deploy", "health", "tag-release", "img-release",
    "helm-release", "gitops",
)
RUN_TIMEOUT = 150.0

# Issue 3's pipeline: source to released image. The base image's name is the only `with:`.
SOURCE_PIPELINE = """\
name: source-to-image
steps:
  - name: setup
    uses: setup
  - name: test
    uses: test
  - name: build
    uses: build
    with:
      build_args: {{BASE_IMAGE: "{base_image}"}}
  - name: tag-release
    uses: tag-release
  - name: img-release
    uses: img-release
"""


# ------------------------------------------------------------------- the CLI --


def cistate(settings: Settings, *args: str) -> str:
    """Run the `cistate` command with these settings; its stdout. Fails on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, "-m", "cistate", *args],
        env=settings_env(settings), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, f"cistate {' '.join(args)} exited {done.returncode}: " + (
        done.stderr[-2000:])
    return done.stdout


def cistate_json(settings: Settings, *args: str) -> Any:
    return json.loads(cistate(settings, *args, "--json"))


def cistate_executable() -> list[str]:
    """The installed console script next to this interpreter (else `python -m`)."""
    script = Path(sys.executable).parent / "cistate"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cistate"]


# ------------------------------------------------------ the code repo and its hook --


POST_RECEIVE = """\
#!/bin/sh
# post-receive: publish each pushed ref to cistate, as a producer would.
# git gives one "<old> <new> <ref>" line per updated ref on stdin.
. {env_file}
status=0
while read -r old new ref; do
    echo "post-receive: $ref $old -> $new" >>{log}
    {cistate} push --repo {repo} --ref "$ref" --commit "$new" --pusher git-hook \\
        >>{log} 2>&1 || {{ echo "cistate push failed for $ref" | tee -a {log} >&2; status=1; }}
done
exit $status
"""


def hooked_repo(
    git_server: GitServer, tmp_path: Path, settings: Settings,
    files: Mapping[str, str] | None = None,
) -> tuple[GitRepo, Path]:
    """A bare repo on the git server with a post-receive hook that runs `cistate push`, and
    a work clone of the sample app (plus `files`) whose first commit is pushed to it.
    Returns the repo and the hook's log."""
    name = f"app-{uuid.uuid4().hex[:8]}"
    url = f"{git_server.url}/{name}.git"
    bare = git_server.repos / f"{name}.git"
    git(git_server.repos, "init", "-q", "--bare", "-b", "main", str(bare))

    hook_dir = tmp_path / f"hook-{name}"
    hook_dir.mkdir()
    env_file, log = hook_dir / "cistate.env", hook_dir / "post-receive.log"
    bus_env = {k: v for k, v in settings_env(settings).items() if k.startswith("CISTATE_")}
    env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in bus_env.items()))
    hook = bare / "hooks" / "post-receive"
    hook.write_text(POST_RECEIVE.format(
        env_file=shlex.quote(str(env_file)), log=shlex.quote(str(log)), repo=shlex.quote(url),
        cistate=" ".join(shlex.quote(part) for part in cistate_executable()),
    ))
    hook.chmod(0o755)

    work = tmp_path / f"work-{name}"
    shutil.copytree(SAMPLE_APP, work, ignore=shutil.ignore_patterns("node_modules", "dist"))
    git(work, "init", "-q", "-b", "main")
    git(work, "remote", "add", "origin", url)
    repo = GitRepo(name, url, bare, work)
    repo.initial = repo.commit(files, message="initial commit")
    return repo, log


def hook_log(log: Path) -> str:
    return log.read_text() if log.exists() else "(the post-receive hook never ran)"


# ------------------------------------------------------------------ the service --


Serve = Callable[[Settings, Mapping[str, str]], Awaitable[ServeProcess]]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Serve]:
    """`cistate serve` (orchestrator, worker, API) as a subprocess with extra environment."""
    started: list[ServeProcess] = []

    async def start(settings: Settings, handler_env: Mapping[str, str]) -> ServeProcess:
        process = ServeProcess(settings, ("orchestrator", "worker"), tmp_path / "serve.log",
                               extra_env=handler_env)
        started.append(process)
        return await process.start()

    yield start
    for process in started:
        process.stop()


def handler_environment() -> dict[str, str]:
    """The CISTATE_* handler settings the fixtures (handler_env, delivery, chart_repo,
    gitops_repo) put in this process's environment: the worker gets the same."""
    return {k: v for k, v in os.environ.items() if k.startswith("CISTATE_")}


async def run_of(store: Store, repo: GitRepo, commit: str, log: Path,
                 server: ServeProcess) -> RunState:
    """The run the push of `commit` opened, once it has ended."""

    async def ended() -> RunState | None:
        # fail fast when the producer or the service is gone, rather than at the timeout
        assert "cistate push failed" not in hook_log(log), hook_log(log)
        assert server.proc is not None and server.proc.poll() is None, "cistate serve exited"
        runs = await store.list_runs(RunQuery(repo=repo.url, commit=commit))
        if len(runs) == 1 and runs[0].status in ("succeeded", "failed", "cancelled"):
            return runs[0]
        assert len(runs) <= 1, f"one push opened {len(runs)} runs"
        return None

    try:
        found: RunState = await wait_until(ended, RUN_TIMEOUT, 0.25,
                                           f"the run of {commit[:12]} to end")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n--- post-receive hook log:\n{hook_log(log)}\n"
            f"--- cistate serve log (tail):\n{server.log()[-4000:]}") from None
    return found


def check_run(settings: Settings, run_id: str, commit: str, succeeded: tuple[str, ...],
              skipped: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The run as the CLI shows it: succeeded, every step of `succeeded` succeeded exactly
    once (one attempt) and the rest skipped, its events' seq 1..n; returns step outputs."""
    [listed] = cistate_json(settings, "runs", "list", "--commit", commit)
    assert listed["id"] == run_id and listed["ref"] == "refs/heads/main"
    shown = cistate_json(settings, "runs", "show", run_id)
    steps = {step["name"]: step for step in shown["steps"]}
    failures = {name: step["error"] for name, step in steps.items() if step["error"]}
    assert shown["state"] == "succeeded", f"run ended {shown['state']}: {failures}"
    assert list(steps) == [*succeeded, *skipped], "the pipeline's steps, in order"
    for name in succeeded:
        assert steps[name]["state"] == "succeeded" and steps[name]["attempts"] == 1, steps[name]
    for name in skipped:
        assert steps[name]["state"] == "skipped", steps[name]

    events = cistate_json(settings, "runs", "events", run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "seq is contiguous"
    assert {e["run_id"] for e in events} == {run_id}
    types = [e["type"] for e in events]
    assert types[0] == "run.requested" and types[-1] == "run.succeeded"
    assert types.count("run.succeeded") == 1
    done = [e["data"]["step"] for e in events if e["type"] == "step.succeeded"]
    assert sorted(done) == sorted(succeeded), "each step succeeded exactly once"
    assert [e["data"]["step"] for e in events if e["type"] == "step.skipped"] == list(skipped)
    unexpected = {"step.failed", "step.retry_scheduled", "step.timed_out", "message.rejected"}
    assert not unexpected & set(types), types
    return {e["data"]["step"]: e["data"]["outputs"] for e in events
            if e["type"] == "step.succeeded"}


def check_build_log(settings: Settings, run_id: str, image_url: str, digest: str) -> None:
    text = cistate(settings, "runs", "logs", run_id, "build")
    assert text.startswith("--- attempt 1 ---"), text[:200]
    assert "built dist/" in text, "the output of `npm run build`"
    assert "buildah" in text and f"pushed {image_url} ({digest})" in text, text[-2000:]


# ---------------------------------------------------------------- issue 3: A --


async def test_git_push_runs_source_to_image_and_the_next_commit_is_released_as_0_0_2(
    git_server: GitServer, handler_env: Env, make_settings: Callable[..., Settings],
    store: Store, service: Serve, tmp_path: Path,
) -> None:
    """setup -> test -> build -> tag-release -> img-release in the service, from a push.

    The pipeline has exactly those five steps; its only `with:` is the build's
    `build_args: {BASE_IMAGE: <the busybox image the session built and pushed first>}`."""
    settings = make_settings(SOURCE_PIPELINE.format(base_image=handler_env.base_image))
    server = await service(settings, handler_environment())
    registry = handler_env.registry
    dev_repo = f"{handler_env.namespace}/{APP}"
    release_repo = f"{handler_env.namespace}-releases/{APP}"

    repo, log = hooked_repo(git_server, tmp_path, settings)  # the push opens the run
    sha = repo.initial
    run = await run_of(store, repo, sha, log, server)
    outputs = check_run(settings, str(run.id), sha, SOURCE_STEPS)

    image = f"{handler_env.push_registry}/{APP}:{sha[:7]}"
    digest = outputs["build"]["image_digest"]
    assert outputs["setup"]["image_url"] == image and outputs["setup"]["sha"] == sha
    assert outputs["build"]["image_url"] == image
    assert outputs["tag-release"] == {"tag": "0.0.1"}
    assert outputs["img-release"] == {
        "release_image_url": f"{handler_env.release_registry}/{APP}:0.0.1",
        "release_image_digest": digest,
    }
    assert registry.tags(dev_repo) == [sha[:7]]
    assert registry.tags(release_repo) == ["0.0.1"]
    assert registry.digest(dev_repo, sha[:7]) == digest == registry.digest(release_repo, "0.0.1")
    assert repo.remote_tags() == {"0.0.1": sha}
    check_build_log(settings, str(run.id), image, digest)

    # a second commit: the next patch version
    second = repo.commit({"README.md": "A second change.\n"}, "second change")
    run2 = await run_of(store, repo, second, log, server)
    outputs2 = check_run(settings, str(run2.id), second, SOURCE_STEPS)
    digest2 = outputs2["build"]["image_digest"]
    assert outputs2["tag-release"] == {"tag": "0.0.2"}
    assert outputs2["img-release"]["release_image_digest"] == digest2
    assert repo.remote_tags() == {"0.0.1": sha, "0.0.2": second}
    assert sorted(registry.tags(dev_repo)) == sorted([sha[:7], second[:7]])
    assert sorted(registry.tags(release_repo)) == ["0.0.1", "0.0.2"]
    assert registry.digest(dev_repo, second[:7]) == digest2 == registry.digest(release_repo,
                                                                               "0.0.2")
    assert registry.digest(release_repo, "0.0.1") == digest, "0.0.1 is left as it was"

    # the hook also published tag-release's tag pushes: they opened no run
    hook = hook_log(log)
    assert "refs/tags/0.0.1" in hook and "refs/tags/0.0.2" in hook
    runs = cistate_json(settings, "runs", "list", "--repo", repo.url)
    assert sorted(r["commit"] for r in runs) == sorted([sha, second])


# ---------------------------------------------------------------- issue 4: B --


async def test_git_push_runs_the_default_pipeline_from_source_to_the_qa_gitops_commit(
    git_server: GitServer, delivery: Delivery, kube_api: ApiClient,
    chart_repo: ChartRepoStandIn, gitops_repo: GitRepo, builder_storage: Path,
    make_settings: Callable[..., Settings], store: Store, service: Serve, tmp_path: Path,
) -> None:
    """The packaged default pipeline (CISTATE_PIPELINE unset: nodejs.yaml, qa-sync disabled)
    from a push to the GitOps commit. Every setting comes from the worker's environment, as
    each handler setting has a CISTATE_* form: the base image is CISTATE_BUILD_ARGS (JSON),
    the dev namespace CISTATE_DEV_NAMESPACE, the health port CISTATE_HEALTH_PORT, the chart
    repository CISTATE_CHART_REPO, the GitOps repo CISTATE_GITOPS_REPO.

    The sample app's chart gets `ingress.host: localhost` in its first commit, so that health
    finds the app through its Ingress at http://localhost:<port>/health, where `PodStandIn`
    serves the image the Deployment names."""
    env = delivery.env
    port = free_port()
    delivery.set(
        build_args=json.dumps({"BASE_IMAGE": env.base_image}),
        health_port=str(port),
        health_attempts="60",
    )
    settings = make_settings(None)  # the packaged pipeline
    assert settings.pipeline is None
    server = await service(settings, handler_environment())

    values = yaml.safe_load((SAMPLE_APP / "chart" / APP / "values.yaml").read_text())
    values["ingress"]["host"] = "localhost"
    async with (
        KubeletStandIn(kube_api, delivery.namespace) as kubelet,
        PodStandIn(kube_api, delivery.namespace, APP, port, builder_storage) as pod,
    ):
        repo, log = hooked_repo(git_server, tmp_path, settings,
                                {f"chart/{APP}/values.yaml": yaml.safe_dump(values)})
        sha = repo.initial
        run = await run_of(store, repo, sha, log, server)
    assert not pod.failures, "the pod stand-in could not run the image: " + "; ".join(
        pod.failures)
    outputs = check_run(settings, str(run.id), sha, DEFAULT_STEPS, skipped=("qa-sync",))
    assert shown_pipeline(settings, str(run.id)) == "nodejs"

    # build: the image, in the dev registry
    image = f"{env.push_registry}/{APP}:{sha[:7]}"
    digest = outputs["build"]["image_digest"]
    assert outputs["build"]["image_url"] == image
    assert env.registry.digest(f"{env.namespace}/{APP}", sha[:7]) == digest
    check_build_log(settings, str(run.id), image, digest)

    # deploy: the objects in the dev namespace, with the built image
    assert outputs["deploy"] == {
        "namespace": delivery.namespace,
        "objects": [f"Service/{APP}", f"Deployment/{APP}", f"Ingress/{APP}"],
        "service_port": 8080,
    }
    deployment = await AppsV1Api(kube_api).read_namespaced_deployment(APP, delivery.namespace)
    assert deployment.spec.template.spec.containers[0].image == image
    assert (APP, 1) in kubelet.patched and pod.served == [image]
    service_obj = await CoreV1Api(kube_api).read_namespaced_service(APP, delivery.namespace)
    assert service_obj.spec.ports[0].port == 8080
    ingress = await NetworkingV1Api(kube_api).read_namespaced_ingress(APP, delivery.namespace)
    assert ingress.spec.rules[0].host == "localhost"

    # health: the served image answered 200
    assert outputs["health"]["url"] == f"http://localhost:{port}/health"
    assert outputs["health"]["status"] == 200

    # tag-release and img-release
    assert outputs["tag-release"] == {"tag": "0.0.1"}
    assert repo.remote_tags() == {"0.0.1": sha}
    release = f"{env.release_registry}/{APP}:0.0.1"
    assert outputs["img-release"] == {"release_image_url": release,
                                      "release_image_digest": digest}
    assert env.registry.digest(f"{env.namespace}-releases/{APP}", "0.0.1") == digest

    # helm-release: the chart at that version in the chart repository's index
    assert outputs["helm-release"] == {
        "chart_name": APP,
        "chart_version": "0.0.1",
        "chart_url": f"{chart_repo.url}/{APP}-0.0.1.tgz",
        "chart_repo": chart_repo.url,
    }
    [entry] = chart_repo.index()["entries"][APP]
    assert entry["version"] == "0.0.1" and entry["urls"] == [outputs["helm-release"]["chart_url"]]
    with tarfile.open(chart_repo.root / f"{APP}-0.0.1.tgz") as archive:
        member = archive.extractfile(f"{APP}/values.yaml")
        assert member is not None
        packaged = yaml.safe_load(member.read())
    assert packaged["image"]["repository"] == f"{env.release_registry}/{APP}"
    assert packaged["image"]["tag"] == "0.0.1"

    # gitops: qa/<app> names the chart version, in a commit by cistate
    bare = gitops_repo.bare
    assert outputs["gitops"] == {"commit": git(bare, "rev-parse", "qa"), "changed": True}
    subject, author = git(bare, "log", "-1", "--format=%s%n%an", "qa").splitlines()
    assert subject == f"Updates {APP} to 0.0.1" and author == "cistate"
    requirements = yaml.safe_load(git(bare, "show", f"qa:qa/{APP}/requirements.yaml"))
    assert requirements["dependencies"] == [
        {"name": APP, "version": "0.0.1", "repository": chart_repo.url}
    ]


def shown_pipeline(settings: Settings, run_id: str) -> str:
    return str(cistate_json(settings, "runs", "show", run_id)["pipeline"])
