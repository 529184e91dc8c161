"""End to end: the source handlers (setup, test, build, tag-release, img-release) against a
real git daemon, npm, buildah and docker-registry, each started by tests/infra/*.sh.

Handlers are called as the worker calls them: `handlers.load(name)(StepRequest)`.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import handlers
from handlers import git as git_client
from handlers.base import StepFailed, StepRequest
from handlers.registry import RegistryClient
from handlers.settings import Credentials
from tests.e2e.conftest import (
    Env,
    FlakyProxy,
    GitRepo,
    Registry,
    Requests,
    TokenRegistry,
    free_port,
    git,
    log_text,
)

pytestmark = pytest.mark.e2e

STEPS = ("setup", "test", "build", "tag-release", "img-release")
APP = "hello-app"  # the sample app's package.json says "hello_app"


async def run_step(
    make_request: Requests, repo: GitRepo | str, sha: str, step: str, **kwargs: Any
) -> tuple[dict[str, Any], StepRequest]:
    request = make_request(repo, sha, step, **kwargs)
    outputs = await handlers.load(step)(request)
    assert json.loads(json.dumps(outputs)) == outputs, "outputs must be JSON-able"
    return outputs, request


async def fail_step(
    make_request: Requests, repo: GitRepo | str, sha: str, step: str, **kwargs: Any
) -> tuple[StepFailed, StepRequest]:
    request = make_request(repo, sha, step, **kwargs)
    with pytest.raises(StepFailed) as info:
        await handlers.load(step)(request)
    return info.value, request


async def pipeline(
    make_request: Requests,
    env: Env,
    repo: GitRepo,
    sha: str,
    *,
    ref: str = "refs/heads/main",
    upto: str = "img-release",
    with_tests: bool = False,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the steps in order, each with the outputs of those before it, as the worker does."""
    outputs: dict[str, dict[str, Any]] = {}
    for step in STEPS[: STEPS.index(upto) + 1]:
        if step == "test" and not with_tests:
            continue
        step_settings: dict[str, Any] = {}
        if step == "build":
            step_settings["build_args"] = {"BASE_IMAGE": env.base_image}
        step_settings.update((settings or {}).get(step, {}))
        outputs[step], _ = await run_step(
            make_request, repo, sha, step, ref=ref, settings=step_settings, inputs=outputs
        )
    return outputs


def revision_label(registry: Registry, repository: str, reference: str) -> str:
    manifest = registry.manifest(repository, reference)
    config = json.loads(registry.blob(repository, manifest["config"]["digest"]))
    return str(config["config"]["Labels"]["org.opencontainers.image.revision"])


# ---------------------------------------------------------------- the good path --


async def test_pipeline_outputs_registry_and_tags_and_a_second_run_changes_nothing(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    sha = repo.initial
    registry = handler_env.registry
    dev_repo = f"{handler_env.namespace}/{APP}"
    release_repo = f"{handler_env.namespace}-releases/{APP}"

    first = await pipeline(make_request, handler_env, repo, sha, with_tests=True)

    assert first["setup"] == {
        "sha": sha,
        "short_sha": sha[:7],
        "app_name": APP,
        "image_url": f"{handler_env.push_registry}/{APP}:{sha[:7]}",
        "release_image_repo": f"{handler_env.release_registry}/{APP}",
        "branch": "main",
    }
    assert first["test"] == {"install": "npm ci"}
    digest = first["build"]["image_digest"]
    assert first["build"] == {"image_url": first["setup"]["image_url"], "image_digest": digest}
    assert registry.digest(dev_repo, sha[:7]) == digest
    assert revision_label(registry, dev_repo, digest) == sha
    assert first["tag-release"] == {"tag": "0.0.1"}
    assert repo.remote_tags() == {"0.0.1": sha}
    git(repo.work, "fetch", "-q", "--force", "origin", "+refs/tags/*:refs/tags/*")
    assert git(repo.work, "cat-file", "-t", "refs/tags/0.0.1") == "tag", "an annotated tag"
    assert first["img-release"] == {
        "release_image_url": f"{handler_env.release_registry}/{APP}:0.0.1",
        "release_image_digest": digest,
    }
    assert registry.tags(release_repo) == ["0.0.1"]
    assert registry.digest(release_repo, "0.0.1") == digest

    second = await pipeline(make_request, handler_env, repo, sha, with_tests=True)

    assert second == first
    assert registry.tags(dev_repo) == [sha[:7]]
    assert registry.digest(dev_repo, sha[:7]) == digest
    assert registry.tags(release_repo) == ["0.0.1"]
    assert repo.remote_tags() == {"0.0.1": sha}
    logs = {p.name: p.read_text() for p in make_request.tmp_path.joinpath("logs").iterdir()}
    first_release, second_release = sorted(n for n in logs if n.endswith("img-release.log"))
    assert "mounted from" in logs[first_release] and "0 copied" in logs[first_release]
    assert "already released" in logs[second_release]
    second_build = sorted(n for n in logs if n.endswith("build.log"))[1]
    assert "reused" in logs[second_build]


def git_processes_in(folder: Path) -> list[str]:
    """The git processes (GitPython's `git cat-file`, ...) working in `folder`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"git") and cwd.is_relative_to(folder):
            found.append(" ".join(part.decode() for part in cmdline))
    return found


async def test_no_git_process_outlives_its_step(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    await pipeline(make_request, handler_env, repo, repo.initial, upto="tag-release")
    assert git_processes_in(make_request.tmp_path) == []


async def test_setup_derives_a_valid_app_name(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    package = json.loads((repo.work / "package.json").read_text())
    package["name"] = "@Acme/My_Cool.App"
    scoped = repo.commit({"package.json": json.dumps(package)}, "scoped name")
    outputs, _ = await run_step(make_request, repo, scoped, "setup")
    assert outputs["app_name"] == "my-cool-app"
    assert outputs["image_url"] == f"{handler_env.push_registry}/my-cool-app:{scoped[:7]}"

    bare = make_repo(name=f"Other_Repo_{uuid.uuid4().hex[:4].upper()}")
    no_package = bare.commit({"package.json": None, "package-lock.json": None}, "no npm")
    outputs, _ = await run_step(make_request, bare, no_package, "setup")
    assert outputs["app_name"] == bare.name.lower().replace("_", "-")

    outputs, _ = await run_step(
        make_request, repo, scoped, "setup", settings={"app_name": "9_Lives!"}
    )
    assert outputs["app_name"] == "app-9-lives"


async def test_local_paths_and_file_urls_are_refused_unless_the_deployment_allows_them(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    for url in (str(repo.bare), f"file://{repo.bare}"):
        failed, request = await fail_step(make_request, url, repo.initial, "setup")
        assert "a path on the worker's disk" in failed.message and not failed.retryable
        assert not (request.workdir / "source").exists(), "nothing was cloned"


async def test_setup_checks_out_from_a_local_path_and_a_file_url(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    handler_env.set(allow_local_repos="1")
    repo = make_repo()
    for url in (str(repo.bare), f"file://{repo.bare}"):
        outputs, request = await run_step(make_request, url, repo.initial, "setup")
        assert outputs["sha"] == repo.initial
        assert (request.workdir / "source" / "package.json").is_file()


async def test_test_step_runs_npm_install_without_a_lock_file(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    sha = repo.commit({"package-lock.json": None}, "no lock file")
    outputs, request = await run_step(make_request, repo, sha, "test")
    assert outputs == {"install": "npm install"}
    assert "$ npm test" in log_text(request)


async def test_containerfile_is_used_when_there_is_no_dockerfile(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    dockerfile = (repo.work / "Dockerfile").read_text()
    sha = repo.commit({"Dockerfile": None, "Containerfile": dockerfile}, "Containerfile")
    outputs = await pipeline(make_request, handler_env, repo, sha, upto="build")
    assert (
        handler_env.registry.digest(f"{handler_env.namespace}/{APP}", sha[:7])
        == outputs["build"]["image_digest"]
    )


# ------------------------------------------------------------------ bad input --


async def test_unreachable_repo_url_fails_clearly(
    make_repo: Any, make_request: Requests, git_server: Any, handler_env: Env
) -> None:
    sha = "1" * 40
    closed = f"git://127.0.0.1:{free_port()}/app.git"
    failed, request = await fail_step(make_request, closed, sha, "setup")
    assert failed.retryable, "a server that does not answer may answer later"
    assert closed in failed.message and "cannot fetch" in failed.message
    assert not (request.workdir / "source").exists(), "no half-made checkout is left"

    missing = f"{git_server.url}/no-such-repo.git"
    failed, request = await fail_step(make_request, missing, sha, "setup")
    assert not failed.retryable
    assert missing in failed.message and "check the URL" in failed.message
    assert "no such repository" in failed.output_tail
    assert not (request.workdir / "source").exists()


async def test_unknown_commit_fails_without_retry(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    unknown = uuid.uuid4().hex + "0" * 8
    for step in ("setup", "test", "build", "tag-release"):
        inputs = {"setup": {"image_url": f"{handler_env.push_registry}/{APP}:{unknown[:7]}"}}
        failed, request = await fail_step(make_request, repo, unknown, step, inputs=inputs)
        assert not failed.retryable
        assert f"commit {unknown} is not in repo {repo.url}" in failed.message
        assert not (request.workdir / "source").exists()


async def test_no_package_json_fails_the_test_step(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    sha = repo.commit({"package.json": None, "package-lock.json": None}, "no package.json")
    failed, request = await fail_step(make_request, repo, sha, "test")
    assert not failed.retryable
    assert "no package.json" in failed.message
    assert "$ npm" not in log_text(request), "npm never ran"


async def test_failing_tests_fail_without_retry(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    broken = (repo.work / "test" / "health.test.js").read_text().replace("200);", "201);")
    sha = repo.commit({"test/health.test.js": broken}, "break the test")
    failed, _ = await fail_step(make_request, repo, sha, "test")
    assert not failed.retryable
    assert failed.message.startswith(f"the tests of commit {sha[:12]} failed")
    assert failed.exit_code not in (None, 0)
    assert "201" in failed.output_tail and "# fail 1" in failed.output_tail


async def test_failing_build_script_pushes_nothing(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    sha = repo.commit(
        {"build.js": "console.error('boom: assets missing'); process.exit(3);\n"}, "break build"
    )
    setup, _ = await run_step(make_request, repo, sha, "setup")
    failed, _ = await fail_step(
        make_request,
        repo,
        sha,
        "build",
        inputs={"setup": setup},
        settings={"build_args": {"BASE_IMAGE": handler_env.base_image}},
    )
    assert not failed.retryable
    assert "build script" in failed.message and sha[:12] in failed.message
    assert "boom: assets missing" in failed.output_tail
    assert handler_env.registry.digest(f"{handler_env.namespace}/{APP}", sha[:7]) is None


async def test_missing_dockerfile_pushes_nothing(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    sha = repo.commit({"Dockerfile": None}, "no Dockerfile")
    setup, _ = await run_step(make_request, repo, sha, "setup")
    failed, request = await fail_step(make_request, repo, sha, "build", inputs={"setup": setup})
    assert not failed.retryable
    assert "no Dockerfile or Containerfile" in failed.message
    assert "buildah" not in log_text(request)
    assert handler_env.registry.digest(f"{handler_env.namespace}/{APP}", sha[:7]) is None


async def test_registry_down_is_retried_with_backoff_then_fails(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    down = f"127.0.0.1:{free_port()}"
    inputs = {"setup": {"image_url": f"{down}/dev/{APP}:{repo.initial[:7]}"}}
    failed, request = await fail_step(make_request, repo, repo.initial, "build", inputs=inputs)
    assert failed.retryable
    assert f"registry {down} is not answering" in failed.message
    assert "after 3 attempts" in failed.message
    text = log_text(request)
    assert "attempt 2 of 3 in 0.05s" in text and "attempt 3 of 3 in 0.10s" in text
    assert not (request.workdir / "source").exists(), "nothing was built"

    outputs = await pipeline(make_request, handler_env, repo, repo.initial, upto="build")
    outputs["setup"]["release_image_repo"] = f"{down}/releases/{APP}"
    outputs["tag-release"] = {"tag": "0.0.1"}
    failed, _ = await fail_step(make_request, repo, repo.initial, "img-release", inputs=outputs)
    assert failed.retryable and f"registry {down} is not answering" in failed.message


async def test_registry_having_a_bad_minute_is_retried_and_the_release_succeeds(
    make_repo: Any, make_request: Requests, handler_env: Env, flaky_registry: FlakyProxy
) -> None:
    """img-release to a registry that answers 503 twice: backoff, then a full copy."""
    repo = make_repo()
    outputs = await pipeline(make_request, handler_env, repo, repo.initial, upto="build")
    outputs["tag-release"] = {"tag": "0.0.1"}
    release_repo = f"{handler_env.namespace}-via-proxy/{APP}"
    outputs["setup"]["release_image_repo"] = f"{flaky_registry.address}/{release_repo}"

    flaky_registry.fail_first = 2
    released, request = await run_step(
        make_request, repo, repo.initial, "img-release", inputs=outputs
    )
    assert flaky_registry.failed == 2
    assert released["release_image_digest"] == outputs["build"]["image_digest"]
    assert handler_env.registry.digest(release_repo, "0.0.1") == released["release_image_digest"]
    text = log_text(request)
    assert "HTTP 503 UNAVAILABLE: try later" in text and "attempt 3 of 3" in text
    assert "copied from" in text, "another host: blobs are copied, not mounted"

    flaky_registry.fail_first = -1
    outputs["tag-release"] = {"tag": "0.0.2"}
    failed, _ = await fail_step(make_request, repo, repo.initial, "img-release", inputs=outputs)
    assert failed.retryable
    assert f"registry {flaky_registry.address} is not answering (HTTP 503" in failed.message
    assert handler_env.registry.tags(release_repo) == ["0.0.1"]


async def test_registry_refusing_auth_fails_without_retry_or_leak(
    make_repo: Any, make_request: Requests, handler_env: Env, auth_registry: Registry
) -> None:
    repo = make_repo()
    image = f"{auth_registry.address}/dev/{APP}:{repo.initial[:7]}"
    inputs = {"setup": {"image_url": image}}

    failed, _ = await fail_step(make_request, repo, repo.initial, "build", inputs=inputs)
    assert not failed.retryable
    assert "wants credentials" in failed.message and "CISTATE_REGISTRY_USERNAME" in failed.message

    wrong = f"wrong-{uuid.uuid4().hex}"
    handler_env.set(registry_username=auth_registry.username, registry_password=wrong)
    failed, request = await fail_step(make_request, repo, repo.initial, "build", inputs=inputs)
    assert not failed.retryable
    assert f"refused the credentials of user '{auth_registry.username}'" in failed.message
    assert wrong not in failed.message + failed.output_tail + log_text(request)
    assert "attempt" not in log_text(request), "a refusal is not retried"

    # the release side: the built image is fine, the release registry refuses
    outputs = await pipeline(make_request, handler_env, repo, repo.initial, upto="build")
    outputs["setup"]["release_image_repo"] = f"{auth_registry.address}/releases/{APP}"
    outputs["tag-release"] = {"tag": "0.0.1"}
    failed, request = await fail_step(
        make_request, repo, repo.initial, "img-release", inputs=outputs
    )
    assert not failed.retryable and "refused the credentials" in failed.message
    assert wrong not in log_text(request)


async def test_basic_auth_build_and_release_across_registries(
    make_repo: Any,
    make_request: Requests,
    handler_env: Env,
    auth_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Build into a registry that wants basic auth, release into another registry (a copy,
    not a mount); credentials from env, then from a docker config.json."""
    repo = make_repo()
    handler_env.set(
        registry=f"{auth_registry.address}/dev-{handler_env.namespace}",
        release_registry=handler_env.release_registry,
        registry_username=auth_registry.username,
        registry_password=auth_registry.password,
    )
    # the handler's temporary auth file goes under a folder of this test's own, so other
    # processes on the machine cannot disturb the "nothing left behind" check
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    outputs = await pipeline(make_request, handler_env, repo, repo.initial)
    digest = outputs["build"]["image_digest"]
    assert auth_registry.digest(f"dev-{handler_env.namespace}/{APP}", repo.initial[:7]) == digest
    assert outputs["img-release"]["release_image_digest"] == digest
    release_repo = f"{handler_env.namespace}-releases/{APP}"
    assert handler_env.registry.digest(release_repo, "0.0.1") == digest
    logs = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert "copied from" in logs and "mounted from" not in logs
    assert auth_registry.password not in logs
    assert "--authfile" in logs, "buildah got the credentials in a file"
    assert list(private_tmp.iterdir()) == [], "auth file removed"

    # the same credentials from a mounted docker config.json instead of the env
    auth_file = tmp_path / "config.json"
    auth_file.write_text(
        json.dumps(
            {
                "auths": {
                    auth_registry.address: {
                        "username": auth_registry.username,
                        "password": auth_registry.password,
                    }
                }
            }
        )
    )
    handler_env.monkeypatch.delenv("CISTATE_REGISTRY_USERNAME")
    handler_env.monkeypatch.delenv("CISTATE_REGISTRY_PASSWORD")
    handler_env.set(registry_auth_file=str(auth_file))
    inputs = {**outputs, "tag-release": {"tag": "0.0.2"}}
    released, request = await run_step(
        make_request, repo, repo.initial, "img-release", inputs=inputs
    )
    assert released["release_image_digest"] == digest
    assert sorted(handler_env.registry.tags(release_repo)) == ["0.0.1", "0.0.2"]
    assert "copied from" not in log_text(request), "the blobs of 0.0.1 are not sent again"
    assert "already in" in log_text(request)


async def test_bearer_token_registry_build_and_release_with_a_mount(
    make_repo: Any, make_request: Requests, handler_env: Env, token_registry: TokenRegistry
) -> None:
    """The token flow: 401 + `WWW-Authenticate: Bearer realm=...` -> token -> retry."""
    registry = token_registry.registry
    repo = make_repo()
    dev, rel = f"dev-{handler_env.namespace}", f"rel-{handler_env.namespace}"
    handler_env.set(
        registry=f"{registry.address}/{dev}", release_registry=f"{registry.address}/{rel}"
    )
    image = f"{registry.address}/{dev}/{APP}:{repo.initial[:7]}"

    failed, _ = await fail_step(
        make_request, repo, repo.initial, "build", inputs={"setup": {"image_url": image}}
    )
    assert not failed.retryable and "wants credentials" in failed.message

    handler_env.set(registry_username=registry.username, registry_password="wrong")
    failed, request = await fail_step(
        make_request, repo, repo.initial, "build", inputs={"setup": {"image_url": image}}
    )
    assert not failed.retryable
    assert f"refused the credentials of user '{registry.username}'" in failed.message

    handler_env.set(registry_password=registry.password)
    outputs = await pipeline(make_request, handler_env, repo, repo.initial)
    digest = outputs["build"]["image_digest"]
    assert outputs["img-release"] == {
        "release_image_url": f"{registry.address}/{rel}/{APP}:0.0.1",
        "release_image_digest": digest,
    }
    credentials = Credentials(registry.username, registry.password)
    async with RegistryClient(
        registry.address, log=request.log, insecure=True, credentials=credentials
    ) as client:
        assert await client.manifest_digest(f"{rel}/{APP}", "0.0.1") == digest
        assert await client.tags(f"{rel}/{APP}") == ["0.0.1"]
    logs = "".join(p.read_text() for p in (make_request.tmp_path / "logs").iterdir())
    assert "mounted from" in logs and registry.password not in logs
    granted = [r["scopes"] for r in token_registry.token_requests() if r["user"] == "alice"]
    mount_scopes = [f"repository:{rel}/{APP}:pull,push", f"repository:{dev}/{APP}:pull"]
    assert mount_scopes in granted, "the mount asked for push on the release repo and pull "
    "on the build repo in one token"


async def test_img_release_never_overwrites_a_release_tag(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    outputs = await pipeline(make_request, handler_env, repo, repo.initial, upto="build")
    outputs["tag-release"] = {"tag": "1.0.0"}
    registry = handler_env.registry
    busybox = {
        "image_url": handler_env.base_image,
        "image_digest": registry.digest("library/busybox", "latest"),
    }
    other, request = await run_step(
        make_request, repo, repo.initial, "img-release", inputs={**outputs, "build": busybox}
    )
    assert other["release_image_digest"] == busybox["image_digest"]
    assert "mounted from library/busybox" in log_text(request)

    failed, _ = await fail_step(make_request, repo, repo.initial, "img-release", inputs=outputs)
    assert not failed.retryable and "never overwritten" in failed.message
    release_repo = f"{handler_env.namespace}-releases/{APP}"
    assert registry.digest(release_repo, "1.0.0") == busybox["image_digest"]


async def test_shell_injection_in_branch_and_commit_message_runs_nothing(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    sentinel = Path(f"/tmp/cistate-pwned-{uuid.uuid4().hex}")
    touch = f"touch${{IFS}}{sentinel}"
    branch = f"feature/$({touch})`{touch}`;{touch}&&x|y>z"
    message = f"$(touch {sentinel})\n\n`touch {sentinel}`; touch {sentinel} && echo '\"\n"
    repo = make_repo()
    sha = repo.commit({"README.md": message}, message, branch=branch)
    ref = f"refs/heads/{branch}"

    outputs = await pipeline(
        make_request,
        handler_env,
        repo,
        sha,
        ref=ref,
        with_tests=True,
        settings={"tag-release": {"release_branches": [branch]}},
    )
    assert outputs["setup"]["branch"] == branch
    assert outputs["tag-release"] == {"tag": "0.0.1"}
    assert outputs["img-release"]["release_image_digest"] == outputs["build"]["image_digest"]
    assert not sentinel.exists()

    # not valid ref names or shas, or a transport that runs commands: refused before anything
    for bad_ref, bad_sha, bad_url in (
        (f"refs/heads/main; touch {sentinel}", sha, repo.url),
        ("refs/heads/main", f"{sha[:8]}; touch {sentinel}", repo.url),
        ("refs/heads/main", f"$(touch {sentinel})", repo.url),
        ("refs/heads/main", sha, f"ext::sh -c touch% {sentinel}"),
        ("refs/heads/main", sha, f"--upload-pack=touch {sentinel}"),
    ):
        for step in STEPS:
            inputs = outputs
            failed, request = await fail_step(
                make_request, bad_url, bad_sha, step, ref=bad_ref, inputs=inputs
            )
            assert not failed.retryable, failed.message
            assert "$ " not in log_text(request), f"{step} ran a command: {log_text(request)}"
    assert not sentinel.exists()


# ---------------------------------------------------------------- tag-release --


async def test_tag_release_reuses_the_commits_tag_and_bumps_the_highest(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    first = repo.initial
    for name in ("0.9.0", "0.10.0", "v9.9.9", "1.0.0-rc.1", "release"):
        repo.push_tag(name, first)
    second = repo.commit(message="second")

    outputs, _ = await run_step(make_request, repo, first, "tag-release")
    assert outputs == {"tag": "0.10.0"}, "the highest X.Y.Z the commit already carries"
    outputs, _ = await run_step(make_request, repo, second, "tag-release")
    assert outputs == {"tag": "0.10.1"}, "numeric, not lexical, and only X.Y.Z tags count"
    again, _ = await run_step(make_request, repo, second, "tag-release")
    assert again == outputs
    tags = repo.remote_tags()
    assert tags["0.10.1"] == second
    assert sorted(tags) == ["0.10.0", "0.10.1", "0.9.0", "1.0.0-rc.1", "release", "v9.9.9"]


async def test_a_version_tag_on_a_tree_takes_its_name_and_the_next_one_is_used(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    # a release name the remote has, though not on a commit (`git tag 0.3.0 HEAD^{tree}`):
    # pushing that name again is refused, so it counts when choosing the next version
    repo = make_repo()
    tree = git(repo.work, "rev-parse", f"{repo.initial}^{{tree}}").strip()
    repo.push_tag("0.3.0", tree)
    outputs, _ = await run_step(make_request, repo, repo.initial, "tag-release")
    assert outputs == {"tag": "0.3.1"}
    assert repo.remote_tags()["0.3.1"] == repo.initial


async def test_tag_release_skips_other_branches_and_so_does_img_release(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    sha = repo.commit(message="feature work", branch="feature/x")
    outputs, _ = await run_step(make_request, repo, sha, "tag-release", ref="refs/heads/feature/x")
    assert outputs["tag"] is None
    assert "'feature/x' is not a release branch (main, master)" in outputs["skipped_reason"]
    assert repo.remote_tags() == {}

    released, _ = await run_step(
        make_request, repo, sha, "img-release", inputs={"tag-release": outputs}
    )
    assert released == {
        "release_image_url": None,
        "release_image_digest": None,
        "skipped_reason": outputs["skipped_reason"],
    }

    handler_env.set(release_branches="main,release/*")
    sha = repo.commit(message="release work", branch="release/1.x")
    outputs, _ = await run_step(
        make_request, repo, sha, "tag-release", ref="refs/heads/release/1.x"
    )
    assert outputs == {"tag": "0.0.1"}


async def test_two_runs_racing_on_two_commits_end_with_distinct_tags(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    second = repo.commit(message="second")
    third = repo.commit(message="third")
    results = await asyncio.gather(
        *(run_step(make_request, repo, sha, "tag-release") for sha in (second, third))
    )
    tags = [outputs["tag"] for outputs, _ in results]
    assert sorted(tags) == ["0.0.1", "0.0.2"]
    assert repo.remote_tags() == {tags[0]: second, tags[1]: third}


async def test_a_run_that_loses_the_tag_push_fetches_again_and_bumps(
    make_repo: Any, make_request: Requests, handler_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo()
    rival = repo.commit(message="rival", branch="main")
    ours = repo.commit(message="ours", branch="main")
    real_push = git_client.push_tag
    raced: list[str] = []

    async def rival_pushes_first(request: StepRequest, path: Path, name: str) -> git_client.Push:
        if not raced:  # another run pushes the same name between our fetch and our push
            raced.append(name)
            repo.push_tag(name, rival)
        return await real_push(request, path, name)

    monkeypatch.setattr(git_client, "push_tag", rival_pushes_first)
    outputs, request = await run_step(make_request, repo, ours, "tag-release")
    assert raced == ["0.0.1"]
    assert outputs == {"tag": "0.0.2"}
    assert repo.remote_tags() == {"0.0.1": rival, "0.0.2": ours}
    assert "tag 0.0.1 was pushed by another run first" in log_text(request)


async def test_the_same_commit_released_twice_at_once_gets_one_tag(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    sha = repo.commit(message="release me")
    results = await asyncio.gather(
        *(run_step(make_request, repo, sha, "tag-release") for _ in range(3))
    )
    assert [outputs for outputs, _ in results] == [{"tag": "0.0.1"}] * 3
    assert repo.remote_tags() == {"0.0.1": sha}
