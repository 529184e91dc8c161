"""Reads need a token by default, tokens have scopes, and bad tokens or webhook payloads get
a 4xx with a reason: the real HTTP API of `cistate serve`, on real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

PIPELINE = """
name: auth
steps:
  - {name: build, uses: script, run: exit 1}
"""
TOKENS = "grafana:read-token-1:read,alice:operate-token-2,root:admin-token-3:admin"
SECRET = "webhook-secret-for-auth-tests"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks"


async def call(settings: Settings, method: str, path: str, token: str | None = None,
               headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any]:
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http, http.request(
            method, f"http://{settings.listen}{path}", headers=headers, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def test_reads_are_closed_unless_a_setup_opens_them() -> None:
    assert Settings().api_read_auth is True
    with pytest.raises(ValueError, match="scope 'god'"):
        Settings(api_token="eve:tok:god")


async def test_reads_need_a_read_token_and_operator_calls_an_operate_token(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve(PIPELINE, api_token=TOKENS, api_read_auth=True)
    run_id = await producer.push()
    await wait_for_run(store, run_id)
    reads = ["/api/v1/runs", f"/api/v1/runs/{run_id}", f"/api/v1/runs/{run_id}/events",
             f"/api/v1/runs/{run_id}/steps/build/log", "/api/v1/events", "/metrics"]
    for path in reads:
        # the test's client is on loopback, like a sandboxed step: no exception for it
        assert (await call(settings, "GET", path))[0] == 401, path
        assert (await call(settings, "GET", path, "wrong-token"))[0] == 401, path
        assert (await call(settings, "GET", path, "read-token-1"))[0] == 200, path
        assert (await call(settings, "GET", path, "operate-token-2"))[0] == 200, path
    assert (await call(settings, "GET", "/health"))[0] == 200

    retry = f"/api/v1/runs/{run_id}/retry"
    status, answer = await call(settings, "POST", retry, "read-token-1", json={})
    assert status == 403 and "scope 'read'" in answer["error"] and "'operate'" in answer["error"]
    assert "run.retried" not in [e.type for e in await store.events(run_id)]
    status, answer = await call(settings, "POST", retry, "operate-token-2", json={})
    assert status == 202, answer
    retried = [e for e in await store.events(run_id) if e.type == "run.retried"]
    assert retried[0].meta["actor"] == "api:alice"
    status, _ = await call(settings, "POST", f"/api/v1/runs/{run_id}/cancel", "admin-token-3",
                           json={})
    assert status in (202, 409), "admin may do what operate may"


async def test_a_token_with_non_ascii_characters_gets_401_not_500(
        serve: Serve, store: Store) -> None:
    settings = await serve(PIPELINE, api_token=TOKENS, api_read_auth=True)
    for token in ("tökén", "read-token-1\u00e9", "\u2603"):
        async with aiohttp.ClientSession() as http, http.get(
                f"http://{settings.listen}/api/v1/runs",
                headers={"Authorization": f"Bearer {token}".encode().decode("latin-1")}
        ) as resp:
            assert resp.status == 401, token


async def test_reads_open_when_the_setup_says_so(serve: Serve) -> None:
    settings = await serve(PIPELINE, api_token=TOKENS, api_read_auth=False)
    assert (await call(settings, "GET", "/api/v1/runs"))[0] == 200
    assert (await call(settings, "POST", f"/api/v1/runs/{uuid.uuid4()}/retry", json={}))[0] \
        == 401, "operator calls still need a token"


def signed(body: bytes) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


async def test_signed_webhooks_with_bad_data_get_422_with_the_reason(
        serve: Serve, store: Store) -> None:
    settings = await serve(PIPELINE, webhook_secret=SECRET)
    payload = json.loads((FIXTURES / "github" / "push.json").read_bytes())
    nul = dict(payload, ref="refs/heads/ma\u0000in")
    local = dict(payload, repository={**payload["repository"],
                                      "clone_url": "file:///srv/git/infra.git"})
    for body, reason in ((json.dumps(nul).encode(), "NUL"),
                         (json.dumps(local).encode(), "a path on the worker's disk")):
        status, answer = await call(settings, "POST", "/api/v1/webhooks/github",
                                    data=body, headers=signed(body))
        assert status == 422 and reason in answer["error"], answer
    assert await store.list_runs() == []
