"""Operators and auditors: retry, rerun, cancel, timeouts, tokens, watch, audit, time travel,
projection rebuild — against the real service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.conftest import host_pids, settings_env, wait_until
from tests.integration.conftest import Producer, Serve, wait_for_run
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.integration

TOKENS = "alice:alice-token,deploy-bot:bot-token"


def flaky_pipeline(marker: Path) -> str:
    # `prepare` always succeeds; `flaky` fails until the marker file exists.
    return f"""
name: ops
steps:
  - name: prepare
    uses: script
    run: echo prepared
  - name: flaky
    uses: script
    run: test -f {marker} || {{ echo "marker missing" >&2; exit 7; }}
  - name: finish
    uses: noop
"""


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cistate", *args], capture_output=True,
                          text=True, env=settings_env(settings), timeout=60)


async def test_retry_continues_from_the_failed_step_reusing_earlier_outputs(
        serve: Serve, producer: Producer, store: Store, visible_dir: Path) -> None:
    marker = visible_dir / "fixed"
    settings = await serve(flaky_pipeline(marker), api_token=TOKENS)
    run_id = await producer.push()
    failed = await wait_for_run(store, run_id)
    assert failed.status == "failed" and failed.step == "flaky"

    marker.touch()  # the operator fixes the cause
    done = cli(settings, "runs", "retry", str(run_id), "--reason", "flaky runner fixed")
    assert done.returncode == 0, done.stderr
    assert "flaky is running again" in done.stdout

    run = await wait_for_run(store, run_id)
    assert run.status == "succeeded"
    assert run.steps["prepare"].attempts == 1, "prepare was not run again"
    assert run.steps["flaky"].attempts == 2
    retried = [e for e in await store.events(run_id) if e.type == "run.retried"]
    assert len(retried) == 1
    assert retried[0].data == {"from_step": "flaky", "actor": retried[0].meta["actor"],
                               "reason": "flaky runner fixed", "steps": ["flaky", "finish"]}
    assert retried[0].meta["actor"].startswith("cli:")

    # --from a named step reruns it and the steps after it
    marker.unlink()
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer alice-token"}) as http:
        url = f"http://{settings.listen}/api/v1/runs/{run_id}/retry"
        async with http.post(url, json={"from_step": "prepare"}) as resp:
            assert resp.status == 409, "a succeeded run cannot be retried"
            body = await resp.json()
            assert "retry is not allowed while the run is succeeded" in body["error"]


async def test_retry_of_running_run_is_refused_and_from_named_step(
        serve: Serve, producer: Producer, store: Store, visible_dir: Path) -> None:
    marker = visible_dir / "fixed"
    settings = await serve(flaky_pipeline(marker), api_token=TOKENS)
    run_id = await producer.push()
    await wait_for_run(store, run_id)
    marker.touch()
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer bot-token"}) as http:
        base = f"http://{settings.listen}/api/v1/runs/{run_id}"
        async with http.post(f"{base}/retry", json={"from_step": "nope"}) as resp:
            assert resp.status == 409
            assert "no such step" in (await resp.json())["error"]
        async with http.post(f"{base}/retry", json={"from_step": "prepare",
                                                    "reason": "rebuild all"}) as resp:
            assert resp.status == 202, await resp.text()
            assert (await resp.json())["step"] == "prepare"
        async with http.post(f"{base}/retry") as resp:
            # still running (or already done): either way not failed/cancelled
            assert resp.status == 409
    run = await wait_for_run(store, run_id)
    assert run.status == "succeeded"
    assert run.steps["prepare"].attempts == 2
    retried = [e for e in await store.events(run_id) if e.type == "run.retried"]
    assert retried[0].meta["actor"] == "api:deploy-bot"
    assert retried[0].data["reason"] == "rebuild all"


async def test_rerun_starts_a_new_linked_run_for_the_same_push(
        serve: Serve, producer: Producer, store: Store, visible_dir: Path) -> None:
    marker = visible_dir / "fixed"
    marker.touch()
    settings = await serve(flaky_pipeline(marker))
    run_id = await producer.push(commit="ab" * 20)
    await wait_for_run(store, run_id)
    done = cli(settings, "runs", "rerun", str(run_id), "--json")
    assert done.returncode == 0, done.stderr
    new = json.loads(done.stdout)
    assert new["id"] != str(run_id)
    assert new["rerun_of"] == str(run_id)
    assert new["commit"] == "ab" * 20
    rerun = await wait_for_run(store, uuid.UUID(new["id"]))
    assert rerun.status == "succeeded"


async def test_cancel_kills_the_step_process_and_rejects_its_late_result(
        serve: Serve, producer: Producer, store: Store) -> None:
    duration = f"60.{uuid.uuid4().int % 10**6:06d}"  # names this test's sleep among all
    settings = await serve(f"""
name: long
steps:
  - name: long
    uses: script
    run: |
      sleep {duration} &
      wait
""", api_token=TOKENS)
    run_id = await producer.push()

    async def child_pid() -> int | None:
        found = host_pids("sleep", duration)
        return found[0] if found else None

    pid = await wait_until(child_pid, 20, what="the step's child process")
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer alice-token"}) as http:
        url = f"http://{settings.listen}/api/v1/runs/{run_id}/cancel"
        async with http.post(url, json={"reason": "wrong branch"}) as resp:
            assert resp.status == 202, await resp.text()
            assert (await resp.json())["state"] == "cancelled"

    async def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie is gone too (its parent, the shell, was killed)
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().split()[2] == "Z"

    await wait_until(gone, 15, what="the step's process group to be killed")

    async def rejected() -> list:  # type: ignore[type-arg]
        return [e for e in await store.events(run_id) if e.type == "message.rejected"]

    late = await wait_until(rejected, 15, what="the late result to be recorded as rejected")
    assert late[0].data["message"]["error"]["kind"] == "cancelled"
    run = await store.load(run_id)
    assert run is not None and run.status == "cancelled"
    assert run.steps["long"].state == "cancelled"
    events = await store.events(run_id)
    assert [e.type for e in events][:5] == ["run.requested", "step.started",
                                            "run.cancel_requested", "step.failed",
                                            "run.cancelled"]
    assert events[3].data["error"]["kind"] == "cancelled"  # the stopped attempt's end
    # cancelling again is refused
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer alice-token"}) as http, \
            http.post(f"http://{settings.listen}/api/v1/runs/{run_id}/cancel") as resp:
        assert resp.status == 409


async def test_step_timeout_survives_a_restart_and_fails_the_step(
        make_settings: Callable[..., Settings], producer: Producer, store: Store,
        tmp_path: Path) -> None:
    settings = make_settings("""
name: hangs
steps:
  - name: hangs
    uses: script
    timeout: 3s
    run: sleep 60
""")
    first = await ServeProcess(settings, ("orchestrator", "worker"), tmp_path / "a.log").start()
    try:
        run_id = await producer.push()
        await wait_for_run(store, run_id, states=("running",))
        first.kill()  # the timer is an outbox row, not a task of this process
    finally:
        first.stop()
    second = await ServeProcess(settings, ("orchestrator", "worker"), tmp_path / "b.log").start()
    try:
        run = await wait_for_run(store, run_id, timeout=30)
    finally:
        second.stop()
    assert run.status == "failed"
    assert run.steps["hangs"].state == "timed_out"
    assert "did not finish within 3s" in run.steps["hangs"].error["message"]  # type: ignore[index]
    types = [e.type for e in await store.events(run_id)]
    assert types.count("step.timed_out") == 1
    # the worker's own answer for the stopped attempt may come after: recorded as rejected
    ended = types.index("run.failed")
    assert set(types[ended + 1:]) <= {"message.rejected"}


async def test_mutating_calls_need_a_named_token(serve: Serve, producer: Producer,
                                                 store: Store, tmp_path: Path) -> None:
    settings = await serve(flaky_pipeline(tmp_path / "x"), api_token=TOKENS)
    run_id = await producer.push()
    await wait_for_run(store, run_id)
    url = f"http://{settings.listen}/api/v1/runs/{run_id}/retry"
    async with aiohttp.ClientSession() as http:
        async with http.post(url) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        async with http.post(url, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.get(f"http://{settings.listen}/api/v1/runs/{run_id}") as resp:
            assert resp.status == 200, "reads are open by default"
    assert [e.type for e in await store.events(run_id)].count("run.retried") == 0


async def test_without_tokens_mutations_are_refused_and_reads_can_be_protected(
        serve: Serve, producer: Producer, store: Store, tmp_path: Path) -> None:
    settings = await serve(flaky_pipeline(tmp_path / "x"), api_read_auth=True)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{settings.listen}/api/v1/runs") as resp:
            assert resp.status == 503
            assert "CISTATE_API_TOKEN" in (await resp.json())["error"]
        async with http.get(f"http://{settings.listen}/health") as resp:
            assert resp.status == 200, "health stays open for probes"


async def test_watch_and_stream_follow_a_run_to_its_end(
        serve: Serve, producer: Producer, store: Store, tmp_path: Path) -> None:
    settings = await serve("""
name: slowish
steps:
  - {name: one, uses: script, run: "sleep 0.5"}
  - {name: two, uses: script, run: "sleep 0.5"}
""")
    run_id = await producer.push()
    await wait_until(lambda: store.load(run_id), 10, what="run")
    async with aiohttp.ClientSession() as http:
        url = f"http://{settings.listen}/api/v1/runs/{run_id}/stream"
        async with http.get(url) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = (await resp.read()).decode()
    names = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event:")]
    assert names[0] == "run.requested"
    assert names[-2:] == ["run.succeeded", "end"]
    assert names.count("step.succeeded") == 2

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cistate", "runs", "watch", str(run_id),
        env=settings_env(settings), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert "succeeded" in stdout.decode()


async def test_audit_filters_and_paginates_newest_first(
        serve: Serve, producer: Producer, store: Store, visible_dir: Path) -> None:
    marker = visible_dir / "fixed"
    settings = await serve(flaky_pipeline(marker))
    start = datetime.now(UTC) - timedelta(seconds=1)
    failed = await producer.push(repo="https://git.example.com/a.git", commit="aa" * 20)
    other = await producer.push(repo="https://git.example.com/b.git", commit="bb" * 20)
    await wait_for_run(store, failed)
    await wait_for_run(store, other)
    marker.touch()
    assert cli(settings, "runs", "retry", str(failed), "--reason", "audit me").returncode == 0
    await wait_for_run(store, failed)
    base = f"http://{settings.listen}/api/v1"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/runs", params={"commit": "aaaa"}) as resp:
            assert [r["id"] for r in (await resp.json())["runs"]] == [str(failed)]
        async with http.get(f"{base}/runs", params={"state": "failed", "step": "flaky"}
                            ) as resp:
            assert [r["id"] for r in (await resp.json())["runs"]] == [str(other)]
        async with http.get(f"{base}/events", params={"type": "run.retried"}) as resp:
            retried = (await resp.json())["events"]
            assert [e["run_id"] for e in retried] == [str(failed)]
            assert retried[0]["meta"]["actor"].startswith("cli:")
        async with http.get(f"{base}/events", params={
                "repo": "https://git.example.com/b.git", "step": "flaky"}) as resp:
            types = [e["type"] for e in (await resp.json())["events"]]
            assert types == ["run.failed", "step.failed", "step.started"], "newest first"
        since = start.isoformat()
        async with http.get(f"{base}/events", params={"since": since, "limit": "3"}) as resp:
            page1 = await resp.json()
        async with http.get(f"{base}/events", params={
                "since": since, "limit": "3", "cursor": page1["next_cursor"]}) as resp:
            page2 = await resp.json()
        positions = [e["position"] for e in page1["events"] + page2["events"]]
        assert positions == sorted(positions, reverse=True)
        assert len(set(positions)) == 6
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        async with http.get(f"{base}/events", params={"since": future}) as resp:
            assert (await resp.json())["events"] == []
        async with http.get(f"{base}/events", params={"since": "yesterday"}) as resp:
            assert resp.status == 400
        async with http.get(f"{base}/runs", params={"cursor": "garbage!"}) as resp:
            assert resp.status == 400

    done = cli(settings, "audit", "--type", "run.retried", "--json")
    assert [e["run_id"] for e in json.loads(done.stdout)] == [str(failed)]
    table = cli(settings, "audit", "--commit", "bbbb")
    assert "step.failed" in table.stdout


async def test_show_at_seq_and_rebuild_projections(
        serve: Serve, producer: Producer, store: Store, visible_dir: Path) -> None:
    marker = visible_dir / "fixed"
    marker.touch()
    settings = await serve(flaky_pipeline(marker))
    run_id = await producer.push()
    await wait_for_run(store, run_id)

    at2 = json.loads(cli(settings, "runs", "show", str(run_id), "--at", "2", "--json").stdout)
    assert at2["state"] == "running" and at2["step"] == "prepare" and at2["version"] == 2
    async with aiohttp.ClientSession() as http:
        url = f"http://{settings.listen}/api/v1/runs/{run_id}"
        async with http.get(url, params={"at": "4"}) as resp:
            at4 = await resp.json()
    assert at4["step"] == "flaky" and at4["version"] == 4

    # damage the projection; rebuild finds and repairs exactly that row
    await store.pool.execute("UPDATE runs SET state = 'running', steps = '[]' WHERE id = $1",
                             run_id)
    report = json.loads(cli(settings, "projections", "rebuild", "--json").stdout)
    assert report["differed"] == [str(run_id)]
    assert report["runs"] == 1 and report["events"] == 8
    repaired = await store.load(run_id)
    assert repaired is not None and repaired.status == "succeeded"
    again = json.loads(cli(settings, "projections", "rebuild", "--json").stdout)
    assert again["differed"] == []

    # an event changed in the database: the run is named with what broke, its row left
    # alone, and the command exits 1
    await store.pool.execute("UPDATE events SET data = '{}' WHERE run_id = $1 AND seq = 1",
                             run_id)
    damaged = cli(settings, "projections", "rebuild")
    assert damaged.returncode == 1
    assert f"did not fold run {run_id} (its row was left as it is): broken hash chain" \
        in damaged.stderr
    assert "hash mismatch at seq 1;" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    assert (await store.load(run_id)) == repaired
