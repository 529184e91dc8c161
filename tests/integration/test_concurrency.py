"""Concurrency groups and locks on the real service (PostgreSQL, RabbitMQ, the API): a
newer push cancels an older run of its group (cancel_in_progress) or waits behind it; the
approval step keeps a run in its group as long as a test needs (it holds no worker)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import aiohttp
import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from cistate.domain.resource import ResourceState as Resource
from cistate.domain.run import RunState
from tests.conftest import settings_env, wait_until
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

TOKENS = "alice:tok-alice-1:operate"


def gated(cancel_in_progress: bool) -> str:
    cancel = str(cancel_in_progress).lower()
    return f"""
name: deploys
concurrency: {{group: "deploy-${{repo}}-${{branch}}", cancel_in_progress: {cancel}}}
steps:
  - {{name: build, uses: noop}}
  - name: gate
    uses: approval
    with: {{approvers: [alice], timeout: 1h}}
  - {{name: deploy, uses: noop}}
"""


async def approve(settings: Settings, run_id: uuid.UUID) -> None:
    url = f"http://{settings.listen}/api/v1/runs/{run_id}/steps/gate/approve"
    async with aiohttp.ClientSession() as http, http.post(
            url, json={"reason": "ok"}, headers={"Authorization": "Bearer tok-alice-1"}
    ) as response:
        assert response.status == 200, await response.text()


async def at_gate(store: Store, run_id: uuid.UUID) -> RunState:
    """The run once it holds its group and waits at its approval step (a run waiting for
    its group shows `waiting` too)."""
    async def check() -> RunState | None:
        state = await store.load(run_id)
        return state if state and state.steps["gate"].state == "waiting" else None
    found: RunState = await wait_until(check, 30, what=f"run {run_id} to wait at its gate")
    return found


async def queued_in_group(store: Store, run_id: uuid.UUID) -> Resource:
    """The group once the run asked for it (claim.requested) and the group recorded the
    claim behind its holder."""
    async def check() -> Resource | None:
        state = await store.load(run_id)
        found = await store.resources(list(state.holds)) if state and state.holds else []
        return found[0] if found and found[0].waiting else None
    group: Resource = await wait_until(check, 30, what=f"run {run_id} to queue in its group")
    return group


async def one_behind_another(serve: Serve, producer: Producer, store: Store
                             ) -> tuple[Settings, uuid.UUID, uuid.UUID, Resource]:
    """A group without cancel_in_progress: the first run holds it at its gate, the second
    waits behind it."""
    settings = await serve(gated(cancel_in_progress=False), api_token=TOKENS)
    first = await producer.push()
    await at_gate(store, first)
    second = await producer.push()
    return settings, first, second, await queued_in_group(store, second)


async def show(settings: Settings, run_id: uuid.UUID) -> dict[str, Any]:
    url = f"http://{settings.listen}/api/v1/runs/{run_id}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def test_a_newer_push_cancels_the_older_run_of_its_group(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve(gated(cancel_in_progress=True), api_token=TOKENS)
    first = await producer.push()
    await at_gate(store, first)  # it holds the group, and waits at its gate
    second = await producer.push()

    cancelled = await wait_for_run(store, first)
    assert cancelled.status == "cancelled"
    events = await store.events(first)
    ended = [e for e in events if e.type == "run.cancelled"]
    assert ended and ended[0].data["reason"] == f"superseded by {second}"
    assert cancelled.steps["gate"].state == "cancelled"
    assert cancelled.steps["deploy"].state == "skipped"

    # the second has the group once the first has ended; it runs to its own gate
    await at_gate(store, second)
    await approve(settings, second)
    assert (await wait_for_run(store, second)).status == "succeeded"


async def test_without_cancel_in_progress_the_newer_run_waits_then_runs(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings, first, second, group = await one_behind_another(serve, producer, store)
    assert group.holder is not None and group.holder.run_id == first
    assert [c.run_id for c in group.waiting] == [second]
    shown = await show(settings, second)
    assert shown["state"] == "waiting"
    assert {step["state"] for step in shown["steps"]} == {"pending"}
    assert shown["waiting_for"] == [{
        "resource": group.name, "kind": "group", "name": group.name.removeprefix("group:"),
        "holder_run_id": str(first), "position": 1}]
    assert group.name == "group:deploy-https://git.example.com/team/app.git-main"
    shown_cli = subprocess.run(
        [sys.executable, "-m", "cistate", "runs", "show", str(second)], capture_output=True,
        text=True, env=settings_env(settings), timeout=60)
    assert shown_cli.returncode == 0, shown_cli.stderr
    assert (f"waits for group 'deploy-https://git.example.com/team/app.git-main': held by "
            f"run {first}, place 1 in its queue") in " ".join(shown_cli.stdout.split())

    await approve(settings, first)
    assert (await wait_for_run(store, first)).status == "succeeded"

    await at_gate(store, second)
    await approve(settings, second)
    assert (await wait_for_run(store, second)).status == "succeeded"

    async def free() -> Resource | None:  # the release reaches the group after the run ends
        [found] = await store.resources([group.name])
        return found if found.holder is None else None
    assert (await wait_until(free, 30, what="the group to be free")).waiting == []


async def test_a_damaged_resource_row_is_refolded_from_its_events(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings, first, second, group = await one_behind_another(serve, producer, store)
    # someone with the database's password frees the group and the second run's hold
    await store.pool.execute("UPDATE resources SET holder = NULL, waiting = '[]'")
    await store.pool.execute("UPDATE runs SET holds = '{}' WHERE id = $1", second)

    report = await store.rebuild_projections()
    assert report.resources_differed == [group.name]
    assert second in report.differed
    [again] = await store.resources([group.name])
    assert again.to_json() == group.to_json()
    assert (await store.load(second)).holds == {  # type: ignore[union-attr]
        group.name: {"claim": str(group.waiting[0].claim), "state": "waiting", "n": 1}}
    await approve(settings, first)
    await wait_for_run(store, first)
    await at_gate(store, second)
