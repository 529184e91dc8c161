"""Pipelines as code on the real service (PostgreSQL, RabbitMQ, git, the step sandbox): a run
finishes on the pipeline it pinned after the deployment's file is edited and the service
restarted; a repository's own .cistate/pipeline.yaml (read from the pushed commit by the
built-in step) runs its steps in parallel; one with a needs cycle fails its run naming the
cycle; a repository's step gets a secret only through the secret scopes; CISTATE_PIPELINES
chooses a pipeline by repo."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from cistate.domain.pipeline import REPO_PIPELINE_FILE, REPO_PIPELINE_STEP, parse
from tests.conftest import settings_env, wait_until
from tests.integration.conftest import Producer, Serve, wait_for_run
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.integration

V1 = """
name: deploy-line
steps:
  - {name: build, uses: script, run: "sleep 4; echo built v1"}
  - {name: publish, uses: noop}
"""
V2 = """
name: deploy-line
steps:
  - {name: build, uses: script, run: "echo built v2"}
  - {name: announce, uses: noop}
"""

PARALLEL = """
name: from-the-repo
steps:
  - {name: lint, uses: script, run: "sleep 2; echo lint done"}
  - {name: unit, uses: script, run: "sleep 2; echo unit done", needs: []}
"""

CYCLE = """
name: cyclic
steps:
  - {name: a, uses: script, run: "true", needs: [c]}
  - {name: b, uses: script, run: "true", needs: [a]}
  - {name: c, uses: script, run: "true", needs: [b]}
"""

DEPLOYMENT = """
name: deployment
steps:
  - {name: only, uses: script, run: echo the deployment pipeline}
"""


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cistate", *args], capture_output=True,
                          text=True, env=settings_env(settings), timeout=60)


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                          env={"GIT_AUTHOR_NAME": "dev", "GIT_AUTHOR_EMAIL": "dev@example.com",
                               "GIT_COMMITTER_NAME": "dev",
                               "GIT_COMMITTER_EMAIL": "dev@example.com",
                               "PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    return done.stdout.strip()


def repo_with(tmp_path: Path, files: dict[str, str], symlink: tuple[str, str] | None = None
              ) -> tuple[str, str]:
    """A bare repo on disk holding one commit with `files`; its path and the commit."""
    work = tmp_path / f"work-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    if symlink is not None:
        (work / symlink[0]).parent.mkdir(parents=True, exist_ok=True)
        (work / symlink[0]).symlink_to(symlink[1])
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "pipeline")
    bare = tmp_path / f"{work.name}.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    return str(bare), git(work, "rev-parse", "HEAD")


@pytest.fixture
def local_repos(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repos of these tests are paths on this machine (a git host stand-in is not
    needed to read a file at a commit)."""
    monkeypatch.setenv("CISTATE_ALLOW_LOCAL_REPOS", "1")


async def test_a_run_finishes_on_its_pinned_pipeline_after_the_file_is_edited_and_restarted(
        make_settings: Callable[..., Settings], producer: Producer, store: Store,
        processes: list[ServeProcess], tmp_path: Path) -> None:
    settings = make_settings(V1)
    assert settings.pipeline is not None
    first = await ServeProcess(settings, ("orchestrator", "worker"),
                               tmp_path / "first.log").start()
    processes.append(first)
    run_id = await producer.push()

    async def building() -> bool:
        state = await store.load(run_id)
        return state is not None and state.steps["build"].state == "running"

    await wait_until(building, 30, what="build to start")
    first.stop()  # mid-step: the command is redelivered to the next process
    settings.pipeline.write_text(V2)  # the deployment's file changes meanwhile
    processes.append(await ServeProcess(settings, ("orchestrator", "worker"),
                                        tmp_path / "second.log").start())

    run = await wait_for_run(store, run_id, timeout=60)
    pinned = parse(V1, "v1", {"script", "noop"})
    assert run.status == "succeeded", run.to_json()
    assert list(run.steps) == ["build", "publish"]  # V1's steps, not V2's announce
    assert run.pipeline_sha256 == pinned.sha256
    logs = await store.step_log(run_id, "build")
    assert "built v1" in logs[-1][1]

    # a new push runs the edited file
    second = await wait_for_run(store, await producer.push(), timeout=60)
    assert list(second.steps) == ["build", "announce"]
    assert second.pipeline_sha256 == parse(V2, "v2", {"script", "noop"}).sha256

    # time travel and the graph show the pinned pipeline
    requested = next(e.seq for e in await store.events(run_id) if e.type == "run.requested")
    shown = cli(settings, "runs", "show", str(run_id), "--at", str(requested), "--json")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["pipeline_sha256"] == pinned.sha256
    assert [s["name"] for s in body["steps"]] == ["build", "publish"]
    human = cli(settings, "runs", "show", str(run_id))
    assert f"pinned {pinned.sha256[:12]}" in human.stdout
    drawn = cli(settings, "graph", str(run_id))
    assert drawn.returncode == 0, drawn.stderr
    assert "publish" in drawn.stdout and "announce" not in drawn.stdout


async def test_a_repos_own_pipeline_runs_its_steps_in_parallel(
        serve: Serve, producer: Producer, store: Store, tmp_path: Path, local_repos: None
) -> None:
    repo, commit = repo_with(tmp_path, {REPO_PIPELINE_FILE: PARALLEL})
    await serve(DEPLOYMENT, repo_pipelines=[f"{tmp_path}/*"], worker_concurrency=4)
    run = await wait_for_run(store, await producer.push(repo=repo, commit=commit), timeout=60)

    assert run.status == "succeeded", run.to_json()
    assert run.pipeline == "from-the-repo"
    assert list(run.steps) == [REPO_PIPELINE_STEP, "lint", "unit"]
    events = await store.events(run_id=run.id)
    types = [e.type for e in events]
    assert types.index("run.pipeline_pinned") < types.index("step.started", 2)
    pinned = next(e.data for e in events if e.type == "run.pipeline_pinned")
    assert pinned["pipeline_source"] == f"{REPO_PIPELINE_FILE} at {commit[:12]}"
    started = {e.data["step"]: e.seq for e in events if e.type == "step.started"}
    ended = {e.data["step"]: e.seq for e in events if e.type == "step.succeeded"}
    assert max(started["lint"], started["unit"]) < min(ended["lint"], ended["unit"]), \
        "both started before either ended"
    lint, unit = run.steps["lint"], run.steps["unit"]
    assert lint.started_at and unit.started_at and lint.finished_at and unit.finished_at
    overlap = min(lint.finished_at, unit.finished_at) - max(lint.started_at, unit.started_at)
    assert overlap.total_seconds() > 1.0


async def test_a_repo_pipeline_with_a_needs_cycle_fails_its_run_naming_the_cycle(
        serve: Serve, producer: Producer, store: Store, tmp_path: Path, local_repos: None
) -> None:
    repo, commit = repo_with(tmp_path, {REPO_PIPELINE_FILE: CYCLE})
    await serve(DEPLOYMENT, repo_pipelines=[f"{tmp_path}/*"])
    run = await wait_for_run(store, await producer.push(repo=repo, commit=commit), timeout=60)

    assert run.status == "failed"
    error = run.steps[REPO_PIPELINE_STEP].error or {}
    assert "needs form a cycle: a -> b -> c -> a" in error["message"]
    assert error["message"].startswith(f"{REPO_PIPELINE_FILE} at {commit[:12]}")
    assert run.steps["only"].state == "skipped"  # the deployment's steps never ran


async def test_a_repo_without_a_file_runs_the_deployments_pipeline_and_a_symlink_is_refused(
        serve: Serve, producer: Producer, store: Store, tmp_path: Path, local_repos: None
) -> None:
    plain, plain_commit = repo_with(tmp_path, {"README": "no pipeline here\n"})
    linked, linked_commit = repo_with(tmp_path, {"README": "x\n"},
                                      symlink=(REPO_PIPELINE_FILE, "/etc/shadow"))
    await serve(DEPLOYMENT, repo_pipelines=[f"{tmp_path}/*"])

    run = await wait_for_run(store, await producer.push(repo=plain, commit=plain_commit),
                             timeout=60)
    assert run.status == "succeeded", run.to_json()
    assert list(run.steps) == [REPO_PIPELINE_STEP, "only"]
    assert "the deployment pipeline" in (await store.step_log(run.id, "only"))[-1][1]

    refused = await wait_for_run(store, await producer.push(repo=linked,
                                                            commit=linked_commit), timeout=60)
    assert refused.status == "failed"
    message = (refused.steps[REPO_PIPELINE_STEP].error or {})["message"]
    assert "is a symlink" in message and "regular file" in message


async def test_a_repo_pipelines_secret_comes_only_through_the_scopes(
        serve: Serve, producer: Producer, store: Store, tmp_path: Path, local_repos: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    wants = ("name: wants-a-secret\nsteps:\n"
             "  - {name: leak, uses: script, run: 'echo $DEPLOY_KEY', secrets: [DEPLOY_KEY]}\n")
    repo, commit = repo_with(tmp_path, {REPO_PIPELINE_FILE: wants})
    monkeypatch.setenv("CISTATE_SECRET_DEPLOY_KEY", "s3cret-deploy-key-value")
    await serve(DEPLOYMENT, repo_pipelines=[f"{tmp_path}/*"])

    run = await wait_for_run(store, await producer.push(repo=repo, commit=commit), timeout=60)
    assert run.status == "failed"
    message = (run.steps["leak"].error or {})["message"]
    assert "only through their scopes" in message and "CISTATE_SECRET_SCOPES" in message
    every = json.dumps([e.data for e in await store.events(run.id)])
    assert "s3cret-deploy-key-value" not in every


async def test_the_pipelines_directory_chooses_a_pipeline_by_repo(
        serve: Serve, producer: Producer, store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "10-web.yaml").write_text(
        "name: web\nrepos: ['https://git.example.com/web/*']\n"
        "steps: [{name: web-build, uses: noop}]\n")
    (folder / "20-rest.yaml").write_text(
        "name: rest\nrepos: ['https://git.example.com/*']\n"
        "steps: [{name: rest-build, uses: noop}]\n")
    await serve(DEPLOYMENT, pipelines=folder)

    web = await wait_for_run(store, await producer.push(
        repo="https://git.example.com/web/shop.git"))
    rest = await wait_for_run(store, await producer.push(
        repo="https://git.example.com/team/api.git"))
    other = await wait_for_run(store, await producer.push(
        repo="https://elsewhere.example.org/x.git"))
    assert (web.pipeline, list(web.steps)) == ("web", ["web-build"])
    assert (rest.pipeline, list(rest.steps)) == ("rest", ["rest-build"])
    assert (other.pipeline, list(other.steps)) == ("deployment", ["only"])
    assert {web.status, rest.status, other.status} == {"succeeded"}
