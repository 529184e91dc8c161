"""Live step logs on the real service (PostgreSQL, RabbitMQ, a sandboxed script step): the
output is there while the step runs, `cistate runs logs --follow` prints it as it comes and
exits with the step's exit status, the API streams it as server-sent events, secrets are
masked in it, and a piece that arrives twice is stored once."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cistate.adapters.postgres.store import LIVE_LOG_TRUNCATED, Store
from cistate.domain.messages import LOG_CHUNK_CHARS, MAX_TEXT_CHARS, LogChunk
from handlers import process
from handlers.base import StepLog
from tests.conftest import settings_env, wait_until
from tests.integration.conftest import Producer, Serve, wait_for_run
from tests.integration.processes import ServeProcess

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


async def _events(response: aiohttp.ClientResponse,
                  until: int | None = None) -> list[dict[str, Any]]:
    """The server-sent events of a response ({"id", "event", "data"}), all of them or the
    first `until` log events."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if current:
                events.append(current)
                current = {}
                if until is not None and sum(e["event"] == "log" for e in events) >= until:
                    break
            continue
        field, _, value = line.partition(": ")
        current[field] = json.loads(value) if field == "data" else value
    return events


def _log_url(settings: Any, run_id: uuid.UUID, step: str) -> str:
    return f"http://{settings.listen}/api/v1/runs/{run_id}/steps/{step}/log?follow=1"


COUNTING = """
name: counting
steps:
  - name: count
    uses: script
    run: |
      for i in $(seq 1 30); do echo "line $i"; sleep 0.1; done
"""


async def test_a_follower_that_reconnects_with_last_event_id_misses_nothing_and_gets_nothing_twice(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve(COUNTING)
    run_id = await producer.push()
    await wait_until(lambda: _running(store, run_id, "count"), 30, what="the step to run")
    async with aiohttp.ClientSession() as http:
        whole = asyncio.create_task(_read_all(http, _log_url(settings, run_id, "count")))
        async with http.get(_log_url(settings, run_id, "count")) as response:
            first = await _events(response, until=3)
        await asyncio.sleep(1)  # away while the step prints on
        async with http.get(_log_url(settings, run_id, "count"),
                            headers={"Last-Event-ID": first[-1]["id"]}) as response:
            rest = await _events(response)
        # and once more after the end, from the last piece: only the end
        last_log = [e for e in rest if e["event"] == "log"][-1]
        async with http.get(_log_url(settings, run_id, "count"),
                            headers={"Last-Event-ID": last_log["id"]}) as response:
            after_end = await _events(response)
        uninterrupted = await whole
    assert [e["event"] for e in after_end] == ["end"]
    pieces = [e for e in first + rest if e["event"] == "log"]
    ids = [int(e["id"]) for e in pieces]
    assert ids == sorted(set(ids))  # in order, none twice
    assert pieces == [e for e in uninterrupted if e["event"] == "log"]  # none missed
    text = "".join(e["data"]["text"] for e in pieces)
    assert re.findall(r"^line (\d+)$", text, re.M) == [str(i) for i in range(1, 31)]
    assert text.startswith("--- attempt 1 ---\n")
    assert {(e["data"]["attempt"], e["data"]["execution"]) for e in pieces} == {
        (1, pieces[0]["data"]["execution"])}
    assert rest[-1] == {"event": "end", "data": {"state": "succeeded", "exit_status": 0}}


async def _running(store: Store, run_id: uuid.UUID, step: str) -> bool:
    state = await store.load(run_id)
    return state is not None and step in state.steps and state.steps[step].state == "running"


async def _read_all(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(url) as response:
        return await _events(response)


async def test_a_secret_printed_across_two_pieces_is_masked_live_and_stored(
        serve: Serve, producer: Producer, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISTATE_SECRET_LIVE_TOKEN", SECRET)
    # the first half, then (after more than a flush interval) the second: two writes that
    # the worker would send in two pieces
    settings = await serve("""
name: split
steps:
  - name: leak
    uses: script
    secrets: [LIVE_TOKEN]
    run: |
      echo "before"
      printf 'key=%s' "$(printf '%s' "$LIVE_TOKEN" | cut -c1-8)"
      sleep 1.5
      printf '%s\\n' "$(printf '%s' "$LIVE_TOKEN" | cut -c9-)"
      sleep 1
      echo "after"
""")
    run_id = await producer.push()
    await wait_until(lambda: _running(store, run_id, "leak"), 30, what="the step to run")
    async with aiohttp.ClientSession() as http:
        events = await _read_all(http, _log_url(settings, run_id, "leak"))
    streamed = "".join(e["data"]["text"] for e in events if e["event"] == "log")
    assert "key=***\n" in streamed and "after" in streamed
    chunks = await store.log_chunks(run_id, "leak")
    assert len([c for c in chunks if c.text]) >= 3  # before / the key / after: pieces
    for fragment in (SECRET, SECRET[:8], SECRET[8:]):
        assert fragment not in streamed
        assert all(fragment not in c.text for c in chunks)
    await wait_for_run(store, run_id)
    [(_, stored)] = await store.step_log(run_id, "leak")
    assert "key=***" in stored and SECRET[:8] not in stored and SECRET[8:] not in stored


async def test_a_megabyte_line_and_binary_output_are_split_and_replaced(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve(r"""
name: noisy
steps:
  - name: noise
    uses: script
    run: |
      sleep 1
      head -c 1048576 /dev/zero | tr '\0' a
      printf '\377\376bin\000ary\n'
      echo done
""")
    run_id = await producer.push()
    await wait_until(lambda: _running(store, run_id, "noise"), 30, what="the step to run")
    async with aiohttp.ClientSession() as http:
        events = await asyncio.wait_for(_read_all(http, _log_url(settings, run_id, "noise")),
                                        60)
    assert events[-1]["data"] == {"state": "succeeded", "exit_status": 0}
    pieces = [e["data"] for e in events if e["event"] == "log"]
    assert [p["seq"] for p in pieces] == list(range(1, len(pieces) + 1))
    text = "".join(p["text"] for p in pieces)
    assert text.count("a") >= 1048576 and "a" * 1048576 in text
    assert "\ufffd\ufffdbin\ufffdary\ndone\n" in text
    chunks = await store.log_chunks(run_id, "noise")
    assert all(len(c.text) <= LOG_CHUNK_CHARS for c in chunks) and len(chunks) > 32
    assert (await wait_for_run(store, run_id)).status == "succeeded"


async def test_pieces_are_stored_in_their_order_and_a_step_keeps_a_bounded_live_log(
        store: Store) -> None:
    run_id, execution = uuid.uuid4(), uuid.uuid4()

    def piece(seq: int, text: str, step: str = "big") -> LogChunk:
        return LogChunk(run_id=run_id, step=step, attempt=1, execution=execution, seq=seq,
                        text=text)

    assert await store.add_log_chunk(piece(2, "second\n")) == "early"
    assert await store.add_log_chunk(piece(1, "first\n")) == "stored"
    assert await store.add_log_chunk(piece(2, "second\n")) == "stored"
    assert await store.add_log_chunk(piece(2, "second\n")) == "again"
    store.live_log_bytes = 100_000
    for seq in range(3, 10):
        assert await store.add_log_chunk(piece(seq, "x" * 30_000)) == "stored"
    chunks = await store.log_chunks(run_id, "big")
    assert [c.seq for c in chunks] == list(range(1, 10))
    text = "".join(c.text for c in chunks)
    assert 100_000 <= len(text.encode()) < 100_000 + 200
    assert text.endswith(LIVE_LOG_TRUNCATED.format(limit=100_000))
    assert [c.text for c in chunks[-3:]] == ["", "", ""]
    # another step has its own room
    assert await store.add_log_chunk(piece(1, "y" * 30_000, step="other")) == "stored"
    assert (await store.log_chunks(run_id, "other"))[0].text == "y" * 30_000


KILLED = """
name: killed
steps:
  - name: count
    uses: script
    retries: 1
    backoff: {initial: 0.1, jitter: 0}
    run: |
      for i in $(seq 1 20); do echo "line $i"; sleep 0.2; done
      test "$CISTATE_ATTEMPT" != 1
"""


async def test_a_worker_killed_mid_step_the_new_execution_and_the_retry_each_log_afresh(
        serve: Serve, producer: Producer, store: Store, processes: list[ServeProcess],
        tmp_path: Path) -> None:
    settings = await serve(KILLED, roles=("orchestrator", "api"))
    worker = await ServeProcess(settings, ("worker",), tmp_path / "worker1.log").start()
    processes.append(worker)
    run_id = await producer.push()
    async with aiohttp.ClientSession() as http:
        await wait_until(lambda: _running(store, run_id, "count"), 30, what="the step to run")
        async with http.get(_log_url(settings, run_id, "count")) as response:
            first = await _events(response, until=3)
            worker.kill()
            processes.append(await ServeProcess(settings, ("worker",),
                                                tmp_path / "worker2.log").start())
            rest = await asyncio.wait_for(_events(response), 90)
    pieces = [e for e in first + rest if e["event"] == "log"]
    ids = [int(e["id"]) for e in pieces]
    assert ids == sorted(set(ids))
    executions: dict[tuple[int, str], str] = {}
    for e in pieces:
        key = (e["data"]["attempt"], e["data"]["execution"])
        executions[key] = executions.get(key, "") + e["data"]["text"]
    keys = list(executions)
    assert [attempt for attempt, _ in keys] == [1, 1, 2], keys
    killed, again, retry = executions.values()
    assert killed.startswith("--- attempt 1 ---\n")
    assert again.startswith("--- attempt 1, run again by another worker ---\n")
    assert retry.startswith("--- attempt 2 ---\n")
    numbers = [re.findall(r"^line (\d+)$", text, re.M) for text in (killed, again, retry)]
    # each execution from its own first line, none lost or doubled
    assert numbers[0] == [str(i) for i in range(1, len(numbers[0]) + 1)]
    assert numbers[1] == numbers[2] == [str(i) for i in range(1, 21)]
    assert rest[-1]["data"] == {"state": "succeeded", "exit_status": 0}


async def test_a_long_line_without_a_newline_leaves_a_bounded_output_tail(
        tmp_path: Path) -> None:
    # the tail was the whole line, copied again with every read of 64 KiB
    log = StepLog()
    done = await process.run(["sh", "-c", "head -c 8388608 /dev/zero | tr '\\0' a; exit 1"],
                             cwd=tmp_path, log=log, check=False)
    assert done.exit_code == 1
    assert 0 < len(done.tail) <= MAX_TEXT_CHARS and done.tail.endswith("a" * 1000)
    assert "a" * 100_000 in log.text()  # the log itself keeps its head and tail, as before
