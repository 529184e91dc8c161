"""Pull requests and comment commands through the live webhook route (real PostgreSQL and
RabbitMQ), with GitHub's published pull_request example (tests/fixtures/webhooks) and
issue_comment payloads built from GitHub's documented fields, signed as GitHub signs them."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest

from cistate.adapters.postgres.store import Store
from cistate.domain.run import RunState
from tests.conftest import wait_until
from tests.infra.githost import GitHostStandIn
from tests.integration.conftest import Serve, wait_for_run
from tests.integration.test_webhooks_http import FIXTURES, SECRET, github_headers, post

pytestmark = pytest.mark.integration

PIPELINE = """
name: pr
steps:
  - {name: build, uses: noop}
  - name: hold
    uses: approval
    with: {approvers: [nobody]}
  - {name: release, uses: noop, when: {branches: [master]}}
"""
OPENED: dict[str, Any] = json.loads((FIXTURES / "github" / "pull_request-opened.json")
                                    .read_text())
REPO = OPENED["repository"]["clone_url"]


def pull_request(action: str = "opened", sha: str | None = None,
                 head_repo: str | None = None) -> bytes:
    payload = copy.deepcopy(OPENED)
    payload["action"] = action
    if sha:
        payload["pull_request"]["head"]["sha"] = sha
    if head_repo:
        payload["pull_request"]["head"]["repo"]["clone_url"] = head_repo
    return json.dumps(payload).encode()


def comment(body: str, user: str) -> bytes:
    # issue_comment "created" on an issue that is a pull request (issue.pull_request set)
    return json.dumps({
        "action": "created",
        "issue": {"number": 2, "pull_request": {
            "url": "https://api.github.com/repos/Codertocat/Hello-World/pulls/2"}},
        "comment": {"body": body, "user": {"login": user}},
        "repository": {"clone_url": REPO}, "sender": {"login": user}}).encode()


async def send(settings: Any, body: bytes, event: str) -> tuple[int, dict[str, Any]]:
    return await post(settings, "github", body,
                      github_headers(body, str(uuid.uuid4()), event))


async def at_hold(store: Store, run_id: uuid.UUID) -> RunState:
    async def check() -> RunState | None:
        state = await store.load(run_id)
        return state if state and state.steps["hold"].state == "waiting" else None
    found: RunState = await wait_until(check, 30, what=f"run {run_id} to wait at hold")
    return found


async def test_a_pull_request_opens_runs_on_its_head_and_closing_it_cancels_them(
        serve: Serve, store: Store) -> None:
    settings = await serve(PIPELINE, webhook_secret=SECRET)
    status, answer = await send(settings, pull_request(), "pull_request")
    assert status == 202, answer
    first = uuid.UUID(answer["run_id"])
    run = await at_hold(store, first)
    assert (run.ref, run.commit) == ("refs/pull/2/head",
                                     "ec26c3e57ca3a959ca5aad62de7213c562f8c821")
    [requested] = [e for e in await store.events(first) if e.type == "run.requested"]
    assert requested.data["push"]["pr"] == {
        "number": 2, "base": "master", "head_repo": REPO, "author": "Codertocat",
        "fork": False}
    # a step with when: runs for a pull request only when it says pull_request: true
    assert run.steps["release"].state == "skipped"

    status, answer = await send(settings, pull_request("synchronize", "d" * 40),
                                "pull_request")
    assert status == 202, answer
    second = uuid.UUID(answer["run_id"])
    await at_hold(store, second)

    status, answer = await send(settings, pull_request("closed"), "pull_request")
    assert status == 202, answer
    assert sorted(answer["cancelled"]) == sorted([str(first), str(second)])
    for run_id in (first, second):
        ended = await wait_for_run(store, run_id)
        assert ended.status == "cancelled"
        [cancel] = [e for e in await store.events(run_id) if e.type == "run.cancel_requested"]
        assert cancel.data["reason"] == "pull request #2 was closed"


async def test_a_fork_waits_for_ok_to_test_from_a_trusted_user_and_gets_no_secrets(
        serve: Serve, store: Store) -> None:
    settings = await serve(PIPELINE, webhook_secret=SECRET, trusted_users=["octocat"])
    fork = "https://github.com/mallory/Hello-World.git"
    status, answer = await send(settings, pull_request(head_repo=fork), "pull_request")
    assert status == 202, answer
    run_id = uuid.UUID(answer["run_id"])
    waiting = await wait_for_run(store, run_id, ("waiting",))
    assert {s.state for s in waiting.steps.values()} <= {"pending", "skipped"}

    status, answer = await send(settings, comment("/ok-to-test", "mallory"), "issue_comment")
    assert status == 202 and answer["status"] == "ignored"
    assert "mallory may not run /ok-to-test" in answer["reason"]
    assert (await store.load(run_id)).steps["build"].state == "pending"  # type: ignore[union-attr]

    status, answer = await send(settings, comment("/ok-to-test", "octocat"), "issue_comment")
    assert status == 202 and answer["runs"] == [str(run_id)], answer
    await at_hold(store, run_id)
    granted = [e for e in await store.events(run_id) if e.type == "claim.granted"]
    assert granted[0].meta["actor"] == "github:octocat"


async def test_retest_and_cancel_comments_from_trusted_users(serve: Serve,
                                                             store: Store) -> None:
    settings = await serve(PIPELINE, webhook_secret=SECRET, trusted_users=["octocat"])
    status, answer = await send(settings, pull_request(), "pull_request")
    assert status == 202, answer
    run_id = uuid.UUID(answer["run_id"])
    await at_hold(store, run_id)
    status, answer = await send(settings, comment("/retest", "octocat"), "issue_comment")
    assert status == 202 and answer["status"] == "ignored"
    assert "did not fail" in answer["reason"]

    status, answer = await send(settings, comment("/cancel", "octocat"), "issue_comment")
    assert status == 202 and answer == {"status": "accepted", "runs": [str(run_id)]}
    assert (await wait_for_run(store, run_id)).status == "cancelled"
    [cancel] = [e for e in await store.events(run_id) if e.type == "run.cancel_requested"]
    assert cancel.meta["actor"] == "github:octocat"

    status, answer = await send(settings, comment("/retest build", "octocat"),
                                "issue_comment")
    assert status == 202 and answer["runs"] == [str(run_id)], answer
    retried = await at_hold(store, run_id)
    assert retried.steps["build"].attempts == 2
    [again] = [e for e in await store.events(run_id) if e.type == "run.retried"]
    assert (again.data["from_step"], again.data["actor"]) == ("build", "github:octocat")

    status, answer = await send(settings, comment("please /retest", "octocat"),
                                "issue_comment")
    assert status == 202 and answer["status"] == "ignored" and "not a command" in answer["reason"]


async def test_on_github_a_collaborator_with_write_permission_may_say_ok_to_test(
        serve: Serve, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # GitHub's permission API is the stand-in's (tests/infra/githost.py): no GitHub here
    async with GitHostStandIn({"github": "ghp-perm-1"},
                              permissions={"maintainer": "write", "reader": "read"}) as gh:
        monkeypatch.setenv("CISTATE_GITHUB_API_URL", gh.url)
        monkeypatch.setenv("CISTATE_GITHUB_TOKEN", "ghp-perm-1")
        settings = await serve(PIPELINE, webhook_secret=SECRET)
        fork = "https://github.com/mallory/Hello-World.git"
        status, answer = await send(settings, pull_request(head_repo=fork), "pull_request")
        assert status == 202, answer
        run_id = uuid.UUID(answer["run_id"])
        await wait_for_run(store, run_id, ("waiting",))
        for user in ("reader", "stranger"):
            status, answer = await send(settings, comment("/ok-to-test", user),
                                        "issue_comment")
            assert status == 202 and answer["status"] == "ignored", answer
            assert "nor a collaborator with write permission" in answer["reason"]
        status, answer = await send(settings, comment("/ok-to-test", "maintainer"),
                                    "issue_comment")
        assert status == 202 and answer["runs"] == [str(run_id)], answer
        await at_hold(store, run_id)
        asked = [r for r in gh.received if r.path.endswith("/permission")]
    assert [r.path for r in asked] == [
        f"/repos/Codertocat/Hello-World/collaborators/{user}/permission"
        for user in ("reader", "stranger", "maintainer")]
    assert all(r.headers["Authorization"] == "Bearer ghp-perm-1" for r in asked)
