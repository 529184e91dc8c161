"""Approval steps on the real service (PostgreSQL, RabbitMQ, HTTP API, CLI): a run waits
for a person without a worker, is listed as waiting, is approved through the API by an
approver, refused to a token whose name is not one, rejected through the CLI, and fails when
nobody decides in time."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import uuid
from typing import Any

import aiohttp
import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.conftest import settings_env
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

TOKENS = "alice:tok-alice-1:operate,mallory:tok-mallory-1:operate"
GATED = f"""
name: gated
steps:
  - {{name: build, uses: noop}}
  - name: release-gate
    uses: approval
    with: {{approvers: [alice, {getpass.getuser()}], timeout: 1h}}
  - {{name: release, uses: noop}}
"""
QUICK = """
name: quick-gate
steps:
  - name: release-gate
    uses: approval
    with: {timeout: 2s}
  - {name: release, uses: noop}
"""


async def decide(settings: Settings, run_id: uuid.UUID, decision: str, token: str,
                 reason: str) -> tuple[int, dict[str, Any]]:
    url = f"http://{settings.listen}/api/v1/runs/{run_id}/steps/release-gate/{decision}"
    async with aiohttp.ClientSession() as http, http.post(
            url, json={"reason": reason},
            headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cistate", *args], capture_output=True,
                          text=True, env=settings_env(settings), timeout=60)


async def test_an_approval_is_approved_refused_rejected_and_timed_out(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve(GATED, api_token=TOKENS)
    first, second = await producer.push(), await producer.push()
    for run_id in (first, second):
        waiting = await wait_for_run(store, run_id, ("waiting",))
        assert waiting.steps["release-gate"].state == "waiting"
        assert waiting.steps["release"].state == "pending"
    listed = cli(settings, "runs", "list", "--state", "waiting", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {run["id"] for run in json.loads(listed.stdout)} == {str(first), str(second)}

    # a token whose name is not an approver: refused, and the run still waits
    status, body = await decide(settings, first, "approve", "tok-mallory-1", "let me")
    assert status == 409 and "api:mallory may not approve" in body["error"]
    assert (await store.load(first)).status == "waiting"  # type: ignore[union-attr]

    status, body = await decide(settings, first, "approve", "tok-alice-1", "change 42 ok")
    assert status == 200, body
    done = await wait_for_run(store, first)
    assert done.status == "succeeded"
    approved = [e for e in await store.events(first) if e.type == "step.approved"]
    assert [(e.data["actor"], e.data["reason"]) for e in approved] == \
        [("api:alice", "change 42 ok")]
    assert approved[0].meta["actor"] == "api:alice"

    rejected = cli(settings, "runs", "reject", str(second), "release-gate", "--reason",
                   "not this week")
    assert rejected.returncode == 0, rejected.stderr
    failed = await wait_for_run(store, second)
    assert failed.status == "failed"
    assert (failed.steps["release-gate"].error or {})["message"] == \
        f"rejected by cli:{getpass.getuser()}: not this week"
    audit = cli(settings, "audit", "--type", "step.rejected", "--json")
    assert audit.returncode == 0, audit.stderr
    assert [e["run_id"] for e in json.loads(audit.stdout)] == [str(second)]


async def test_nobody_deciding_in_time_fails_the_run_with_the_reason(
        serve: Serve, producer: Producer, store: Store) -> None:
    await serve(QUICK)
    run = await wait_for_run(store, await producer.push(), timeout=30)
    assert run.status == "failed"
    assert run.steps["release-gate"].state == "timed_out"
    assert "neither approved nor rejected within 2s" in \
        (run.steps["release-gate"].error or {})["message"]
    assert run.steps["release"].state == "skipped"
