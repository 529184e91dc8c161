"""Commit statuses and notifications on the real service (PostgreSQL, RabbitMQ), delivered to
tests/infra/githost.py: a STAND-IN for the GitHub, GitLab and Gitea status APIs and for the
deployment's webhook receivers (none of the real ones can run here), built from their
documented paths, fields, auth headers, state names and error codes."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cistate.adapters.postgres.store import Store
from cistate.domain.run import RunState
from tests.conftest import settings_env, wait_until
from tests.infra.githost import GitHostStandIn, Received
from tests.integration.conftest import Producer, Serve

pytestmark = pytest.mark.integration

TOKENS = {"github": "ghp-test-token-1", "gitlab": "glpat-test-token-1",
          "gitea": "gitea-test-token-1"}
PUBLIC = "https://ci.example.com"
PIPELINE = """
name: shop
steps:
  - {name: build, uses: noop}
  - name: check
    uses: script
    run: "if [ \\"$CISTATE_REF\\" = refs/heads/broken ]; then echo no >&2; exit 3; fi"
"""
# its step outlasts the retries of the run's first status (0.05 + 0.1 + 0.2 s)
SLOW = """
name: shop
steps:
  - {name: build, uses: script, run: "sleep 1.5"}
"""
REPOS = {"github": "https://github.com/acme/shop.git",
         "gitlab": "https://gitlab.example.com/acme/web/shop.git",
         "gitea": "https://gitea.example.com/acme/shop.git"}


@pytest.fixture
async def hosts(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GitHostStandIn]:
    async with GitHostStandIn(dict(TOKENS)) as standin:
        for name, value in {
            "GITHUB_API_URL": standin.url, "GITHUB_TOKEN": TOKENS["github"],
            "GITLAB_URL": standin.url, "GITLAB_TOKEN": TOKENS["gitlab"],
            "GITEA_URL": standin.url, "GITEA_TOKEN": TOKENS["gitea"],
            "PUBLIC_URL": PUBLIC, "NOTIFY_BACKOFF": "0.05",
        }.items():
            monkeypatch.setenv(f"CISTATE_{name}", value)
        yield standin


def statuses(received: list[Received]) -> list[tuple[str, str, str | None]]:
    return [(r.json["state"], r.json.get("context") or r.json.get("name"),
             r.json.get("target_url")) for r in received]


async def delivered_all(store: Store, run_id: uuid.UUID) -> RunState:
    """The run once it has ended and every notice it sent has a final outcome."""
    async def check() -> RunState | None:
        state = await store.load(run_id)
        if state is None or state.status not in ("succeeded", "failed", "cancelled"):
            return None
        settled = all(n["delivery"] in ("delivered", "failed", "superseded")
                      for n in state.notices.values())
        return state if state.notices and settled else None
    found: RunState = await wait_until(check, 30, what=f"run {run_id}'s notices to settle")
    return found


async def test_each_host_gets_pending_then_the_outcome_with_its_own_names(
        hosts: GitHostStandIn, serve: Serve, producer: Producer, store: Store) -> None:
    await serve(PIPELINE)
    runs = {provider: await producer.push(repo=repo, provider=provider)
            for provider, repo in REPOS.items()}
    broken = await producer.push(repo=REPOS["gitlab"], ref="refs/heads/broken",
                                 provider="gitlab")
    for run_id in [*runs.values(), broken]:
        await delivered_all(store, run_id)

    github = [r for r in hosts.delivered("github")]
    assert statuses(github) == [
        ("pending", "cistate/shop", f"{PUBLIC}/runs/{runs['github']}"),
        ("success", "cistate/shop", f"{PUBLIC}/runs/{runs['github']}")]
    assert github[0].path.startswith("/repos/acme/shop/statuses/")
    assert github[0].headers["Authorization"] == f"Bearer {TOKENS['github']}"
    assert [r.json["description"] for r in github] == ["running", "succeeded"]

    gitea = hosts.delivered("gitea")
    assert [s[:2] for s in statuses(gitea)] == [("pending", "cistate/shop"),
                                                ("success", "cistate/shop")]
    assert gitea[0].path.startswith("/api/v1/repos/acme/shop/statuses/")

    gitlab = hosts.delivered("gitlab")
    by_run = {run_id: [r for r in gitlab if str(run_id) in r.json.get("target_url", "")]
              for run_id in (runs["gitlab"], broken)}
    assert [r.json["state"] for r in by_run[runs["gitlab"]]] == ["running", "success"]
    assert [r.json["state"] for r in by_run[broken]] == ["running", "failed"]
    failed = by_run[broken][-1]
    assert failed.path.startswith("/api/v4/projects/acme%2Fweb%2Fshop/statuses/")
    assert failed.json["name"] == "cistate/shop"
    assert failed.json["description"].startswith("check failed: ")
    assert failed.headers["PRIVATE-TOKEN"] == TOKENS["gitlab"]

    # each delivery is an event of the run, and runs show says the latest status arrived
    state = await store.load(broken)
    assert state is not None and state.status == "failed"
    assert state.notices["cistate/shop"]["delivery"] == "delivered"
    assert state.notices["cistate/shop"]["state"] == "failure"
    types = [e.type for e in await store.events(broken)]
    assert types.count("notice.sent") == 2 and types.count("notice.delivered") == 2
    # no token in any event
    for run_id in [*runs.values(), broken]:
        text = json.dumps([e.to_json() for e in await store.events(run_id)])
        assert not any(token in text for token in TOKENS.values())


async def test_a_host_that_fails_three_times_gets_the_status_once_in_order(
        hosts: GitHostStandIn, serve: Serve, producer: Producer, store: Store) -> None:
    await serve(SLOW)
    hosts.script("/statuses/" + "a" * 40, [502, 502, 502])
    run_id = await producer.push(repo=REPOS["github"], provider="github", commit="a" * 40)
    state = await delivered_all(store, run_id)
    assert [r.status for r in hosts.received] == [502, 502, 502, 201, 201]
    assert [s[0] for s in statuses(hosts.delivered())] == ["pending", "success"]
    failures = [e for e in await store.events(run_id) if e.type == "notice.failed"]
    assert [(e.data["attempt"], e.data["retrying"], e.data["http_status"])
            for e in failures] == [(1, True, 502), (2, True, 502), (3, True, 502)]
    assert state.notices["cistate/shop"]["delivery"] == "delivered"


async def test_a_refused_token_is_a_failed_delivery_and_the_run_goes_on(
        serve: Serve, producer: Producer, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with GitHostStandIn({"github": "the-right-token"}) as standin:
        monkeypatch.setenv("CISTATE_GITHUB_API_URL", standin.url)
        monkeypatch.setenv("CISTATE_GITHUB_TOKEN", "a-wrong-token")
        await serve(PIPELINE)
        run_id = await producer.push(repo=REPOS["github"], provider="github")
        state = await delivered_all(store, run_id)
    assert state.status == "succeeded"
    assert state.notices["cistate/shop"]["delivery"] == "failed"
    assert "HTTP 401" in state.notices["cistate/shop"]["reason"]
    assert "Bad credentials" in state.notices["cistate/shop"]["reason"]
    failed = [e for e in await store.events(run_id) if e.type == "notice.failed"]
    assert len(failed) == 2 and not any(e.data["retrying"] for e in failed)  # 401: no retry
    assert "a-wrong-token" not in json.dumps([e.to_json() for e in
                                              await store.events(run_id)])


async def test_an_older_runs_status_never_lands_after_a_newer_ones(
        hosts: GitHostStandIn, serve: Serve, producer: Producer, store: Store) -> None:
    # runs of one commit share its status context; a slow host lets their notices queue
    await serve(PIPELINE)
    hosts.delay = 0.05
    commit = "b" * 40
    run_ids = [await producer.push(repo=REPOS["gitea"], provider="gitea", commit=commit)
               for _ in range(4)]
    for run_id in run_ids:
        await delivered_all(store, run_id)
    order = {}
    for run_id in run_ids:
        state = await store.load(run_id)
        assert state is not None and state.created_at is not None
        for event in await store.events(run_id):
            if event.type == "notice.sent":
                order[event.data["notice"]] = (state.created_at, event.seq)
    sent: list[tuple[Any, int]] = []
    for received in hosts.delivered("gitea"):
        run_id = received.json["target_url"].rsplit("/", 1)[1]
        events = await store.events(uuid.UUID(run_id))
        notices = [e.data["notice"] for e in events if e.type == "notice.sent"
                   and e.data["state"] == received.json["state"]]
        sent.append(order[notices[0]])
    assert sent == sorted(sent), "an older status was delivered after a newer one"
    last = hosts.delivered("gitea")[-1].json
    assert last["state"] == "success" and str(run_ids[-1]) in last["target_url"]


async def test_receivers_get_a_signed_notification_per_run_end_retried_after_a_503(
        serve: Serve, producer: Producer, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with GitHostStandIn({}) as standin:
        monkeypatch.setenv("CISTATE_NOTIFY_URLS",
                           f"{standin.url}/hooks/chat,{standin.url}/hooks/pager?key=k1")
        monkeypatch.setenv("CISTATE_NOTIFY_SECRET", "notify-secret-1")
        monkeypatch.setenv("CISTATE_NOTIFY_BACKOFF", "0.05")
        standin.script("/hooks/pager", [503])
        await serve(PIPELINE)
        good = await producer.push(repo=REPOS["github"])
        bad = await producer.push(repo=REPOS["github"], ref="refs/heads/broken")
        for run_id in (good, bad):
            await delivered_all(store, run_id)

        async def four() -> list[Received] | None:
            found = standin.delivered("receiver")
            return found if len(found) >= 4 else None
        got = await wait_until(four, 30, what="a notification per receiver and run")
    assert sorted((r.path, r.json["run_id"], r.json["state"]) for r in got) == sorted([
        ("/hooks/chat", str(good), "succeeded"), ("/hooks/pager?key=k1", str(good),
                                                  "succeeded"),
        ("/hooks/chat", str(bad), "failed"), ("/hooks/pager?key=k1", str(bad), "failed")])
    for received in got:
        expected = hmac.new(b"notify-secret-1", received.body, hashlib.sha256).hexdigest()
        assert received.headers["X-Cistate-Signature"] == f"sha256={expected}"
        assert received.json["event"] == "run.ended"
    assert [r.status for r in standin.received
            if r.path.startswith("/hooks/pager")].count(503) == 1
    events = [e for run_id in (good, bad) for e in await store.events(run_id)]
    # the receiver's key (in its URL) is in no event: receivers are named by place and host
    assert not any("k1" in json.dumps(e.data) for e in events if e.type.startswith("notice"))


async def test_per_step_statuses_and_runs_show_says_what_reached_the_host(
        hosts: GitHostStandIn, serve: Serve, producer: Producer, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISTATE_STATUS_PER_STEP", "1")
    settings = await serve(PIPELINE)
    run_id = await producer.push(repo=REPOS["gitea"], provider="gitea",
                                 ref="refs/heads/broken")
    await delivered_all(store, run_id)
    got = {(r.json["context"], r.json["state"]) for r in hosts.delivered("gitea")}
    assert got == {("cistate/shop", "pending"), ("cistate/shop", "failure"),
                   ("cistate/shop/build", "pending"), ("cistate/shop/build", "success"),
                   ("cistate/shop/check", "pending"), ("cistate/shop/check", "failure")}
    shown = subprocess.run([sys.executable, "-m", "cistate", "runs", "show", str(run_id)],
                           capture_output=True, text=True, env=settings_env(settings),
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "status cistate/shop: failure (check failed:" in text
    assert "status cistate/shop/build: success (succeeded), delivered" in text
