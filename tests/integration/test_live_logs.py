"""Live step logs on the real service (PostgreSQL, RabbitMQ, a sandboxed script step): the
output is there while the step runs, `cistate runs logs --follow` prints it as it comes and
exits with the step's exit status, the API streams it as server-sent events, secrets are
masked in it, and a piece that arrives twice is stored once."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import aiohttp
import pytest

from cistate.adapters.postgres.store import Store
from cistate.domain.messages import LogChunk
from tests.conftest import settings_env, wait_until
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

SECRET = "live-secret-4f2a"
PIPELINE = """
name: live
steps:
  - name: check
    uses: script
    secrets: [LIVE_TOKEN]
    run: |
      echo "first line"
      echo "token $LIVE_TOKEN"
      sleep 2
      echo "second line"
      sleep 1
      exit 3
"""


async def test_a_running_steps_output_can_be_followed_as_it_comes(
        serve: Serve, producer: Producer, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISTATE_SECRET_LIVE_TOKEN", SECRET)
    settings = await serve(PIPELINE)
    run_id = await producer.push()

    async def running() -> bool:
        state = await store.load(run_id)
        return state is not None and state.steps["check"].state == "running"
    await wait_until(running, 30, what="the step to run")
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cistate", "runs", "logs", str(run_id), "check", "--follow",
        env=settings_env(settings), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    async with aiohttp.ClientSession() as http, http.get(
            f"http://{settings.listen}/api/v1/runs/{run_id}/steps/check/log?follow=1"
    ) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert follower.stdout is not None
        first = await asyncio.wait_for(follower.stdout.readline(), 20)
        assert first.decode() == "--- attempt 1 ---\n"
        lines = []  # the command line (as a shell would quote it), then what it printed
        while not lines or lines[-1] != "first line\n":
            lines.append((await asyncio.wait_for(follower.stdout.readline(), 20)).decode())
        seen_at = time.monotonic()
        second = "".join(lines)
        # it came while the step still ran
        assert (await store.load(run_id)).steps["check"].state == "running"  # type: ignore[union-attr]
        events = []
        async for line in response.content:
            text = line.decode().strip()
            if text.startswith("event: "):
                events.append([text.removeprefix("event: ")])
            elif text.startswith("data: "):
                events[-1].append(json.loads(text.removeprefix("data: ")))
    out, err = await asyncio.wait_for(follower.communicate(), 30)
    assert follower.returncode == 3, err.decode()
    shown = second + out.decode()
    assert "token ***" in shown and SECRET not in shown
    assert shown.index("first line") < shown.index("second line")
    assert "--- step check failed (exit status 3) ---" in err.decode()
    assert time.monotonic() - seen_at > 1.5  # the rest came later, as it was printed
    streamed = "".join(data["text"] for kind, data in events if kind == "log")
    assert "first line" in streamed and "second line" in streamed and SECRET not in streamed
    assert events[-1] == ["end", {"state": "failed", "exit_status": 3}]
    # the stored log is what it was: the whole output with the result
    ended = await wait_for_run(store, run_id)
    [(attempt, stored)] = await store.step_log(run_id, "check")
    assert attempt == 1 and "second line" in stored and SECRET not in stored
    assert ended.status == "failed"
    # where its time went: the worker's own run of it (3 s of sleep), and the time its
    # command took to reach the worker
    timing = ended.steps["check"].timing or {}
    assert 3.0 <= timing["running"] < 20 and 0 <= timing["queued"] < 5, timing


async def test_a_piece_delivered_twice_is_stored_once(store: Store) -> None:
    chunk = LogChunk(run_id=uuid.uuid4(), step="check", attempt=1, execution=uuid.uuid4(),
                     seq=1, text="hello\n")
    assert await store.add_log_chunks([chunk]) == 1
    assert await store.add_log_chunks([chunk]) == 0
    [stored] = await store.log_chunks(chunk.run_id, "check")
    assert (stored.seq, stored.text) == (1, "hello\n")


async def test_a_step_that_prints_nothing_sends_no_live_log(
        serve: Serve, producer: Producer, store: Store) -> None:
    # a piece per step, printed or not, halved the throughput of noop pipelines
    await serve("name: quiet\nsteps:\n  - {name: build, uses: noop}\n")
    run_id = await producer.push()
    assert (await wait_for_run(store, run_id)).status == "succeeded"
    await asyncio.sleep(1)  # a piece would be on its way by now
    assert await store.log_chunks(run_id, "build") == []
