"""Webhooks from GitHub, GitLab and Gitea against the live service, with the hosts' published
example payloads (tests/fixtures/webhooks), signed as each host signs them."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from pathlib import Path

import aiohttp
import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.integration.conftest import Serve, wait_for_run

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks"
SECRET = "It's a Secret to Everybody"
PIPELINE = """
name: hooks
steps:
  - {name: build, uses: noop}
"""


def github_headers(body: bytes, delivery: str, event: str = "push") -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


async def post(settings: Settings, provider: str, body: bytes,
               headers: dict[str, str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as http:
        url = f"http://{settings.listen}/api/v1/webhooks/{provider}"
        async with http.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.json()


async def test_github_push_opens_one_run_even_when_redelivered(serve: Serve,
                                                               store: Store) -> None:
    settings = await serve(PIPELINE, webhook_secret=SECRET)
    body = (FIXTURES / "github" / "push.json").read_bytes()
    payload = json.loads(body)
    delivery = str(uuid.uuid4())

    status, answer = await post(settings, "github", body, github_headers(body, delivery))
    assert status == 202 and answer["status"] == "accepted"
    run = await wait_for_run(store, uuid.UUID(answer["run_id"]))
    assert run.status == "succeeded"
    assert run.repo == payload["repository"]["clone_url"]
    assert run.commit == payload["after"]
    assert run.ref == payload["ref"]
    requested = (await store.events(run.id))[0]
    assert requested.meta["actor"] == "webhook:github"

    status, again = await post(settings, "github", body, github_headers(body, delivery))
    assert status == 202 and again["run_id"] == answer["run_id"] and again["duplicate"]
    assert len(await store.list_runs()) == 1


async def test_bad_requests_get_4xx_with_a_reason_and_create_nothing(
        serve: Serve, store: Store) -> None:
    settings = await serve(PIPELINE, webhook_secret=SECRET)
    body = (FIXTURES / "github" / "push.json").read_bytes()
    good = github_headers(body, str(uuid.uuid4()))

    tampered = body.replace(b'"ref"', b'"ref" ', 1)
    status, answer = await post(settings, "github", tampered, good)
    assert status == 401 and "signature" in answer["error"].lower()

    status, answer = await post(settings, "github", body,
                                {**good, "X-Hub-Signature-256": "sha256=" + "0" * 64})
    assert status == 401

    broken = b"{not json"
    status, answer = await post(settings, "github", broken,
                                github_headers(broken, str(uuid.uuid4())))
    assert status == 400 and "JSON" in answer["error"]

    missing = json.dumps({"after": "a" * 40, "repository": {"clone_url": "x"}}).encode()
    status, answer = await post(settings, "github", missing,
                                github_headers(missing, str(uuid.uuid4())))
    assert status == 422 and "ref" in answer["error"]

    status, answer = await post(settings, "github", body,
                                github_headers(body, str(uuid.uuid4()), event="issues"))
    assert status == 400

    huge = b'{"pad": "' + b"x" * (2 << 20) + b'"}'
    status, answer = await post(settings, "github", huge, github_headers(huge, "d-huge"))
    assert status == 413

    status, answer = await post(settings, "bitbucket", body, good)
    assert status == 404

    assert await store.list_runs() == []


async def test_tag_pushes_and_pings_are_acknowledged_and_ignored(serve: Serve,
                                                                 store: Store) -> None:
    settings = await serve(PIPELINE, webhook_secret=SECRET)
    ping = (FIXTURES / "github" / "ping.json").read_bytes()
    status, answer = await post(settings, "github", ping,
                                github_headers(ping, str(uuid.uuid4()), event="ping"))
    assert status == 202 and answer["status"] == "ignored"

    tag = (FIXTURES / "gitlab" / "tag-push.json").read_bytes()
    status, answer = await post(settings, "gitlab", tag, {
        "X-Gitlab-Event": "Tag Push Hook", "X-Gitlab-Token": SECRET,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()), "Content-Type": "application/json"})
    assert status == 202 and answer["status"] == "ignored"
    assert "tag" in answer["reason"].lower()
    assert await store.list_runs() == []


async def test_gitlab_and_gitea_pushes_open_runs(serve: Serve, store: Store) -> None:
    settings = await serve(PIPELINE, webhook_secret=SECRET)
    gitlab = (FIXTURES / "gitlab" / "push.json").read_bytes()
    status, answer = await post(settings, "gitlab", gitlab, {
        "X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET,
        "Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"})
    assert status == 202, answer
    run = await wait_for_run(store, uuid.UUID(answer["run_id"]))
    assert run.commit == json.loads(gitlab)["checkout_sha"]

    status, answer = await post(settings, "gitlab", gitlab, {
        "X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "wrong",
        "Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"})
    assert status == 401

    gitea = (FIXTURES / "gitea" / "push.json").read_bytes()
    signature = hmac.new(SECRET.encode(), gitea, hashlib.sha256).hexdigest()
    status, answer = await post(settings, "gitea", gitea, {
        "X-Gitea-Event": "push", "X-Gitea-Signature": signature,
        "X-Gitea-Delivery": str(uuid.uuid4()), "Content-Type": "application/json"})
    assert status == 202, answer
    run = await wait_for_run(store, uuid.UUID(answer["run_id"]))
    assert run.commit == json.loads(gitea)["after"]
    assert len(await store.list_runs()) == 2


async def test_webhooks_are_refused_when_no_secret_is_configured(serve: Serve,
                                                                 store: Store) -> None:
    settings = await serve(PIPELINE)
    body = (FIXTURES / "github" / "push.json").read_bytes()
    status, answer = await post(settings, "github", body, github_headers(body, "d1"))
    assert status == 503 and "CISTATE_WEBHOOK_SECRET" in answer["error"]
