"""A push drives a run through real RabbitMQ and PostgreSQL, served by `cistate serve`."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import aiohttp
import pytest

from cistate.adapters.postgres.store import Store
from cistate.adapters.rabbitmq.bus import REASON_HEADER
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

TWO_SCRIPTS = """
name: two-scripts
steps:
  - name: build
    uses: script
    run: echo "building $CISTATE_REPO at $CISTATE_COMMIT on $CISTATE_REF"
  - name: check
    uses: script
    run: test -n "$CISTATE_RUN_ID" && echo "run $CISTATE_RUN_ID step $CISTATE_STEP"
"""

FAILING = """
name: failing
steps:
  - name: compile
    uses: script
    run: |
      for i in $(seq 1 80); do echo "line $i"; done
      echo "fatal: something broke" >&2
      exit 3
  - name: never
    uses: noop
"""


async def test_push_runs_script_steps_to_succeeded(serve: Serve, producer: Producer,
                                                   store: Store) -> None:
    await serve(TWO_SCRIPTS)
    commit = "a1" * 20
    run_id = await producer.push(repo="https://git.example.com/shop/cart.git", commit=commit)

    run = await wait_for_run(store, run_id)

    assert run.status == "succeeded"
    assert [(s.name, s.state, s.attempts) for s in run.steps.values()] == [
        ("build", "succeeded", 1), ("check", "succeeded", 1)]
    events = await store.events(run_id)
    assert [e.type for e in events] == [
        "run.requested", "step.started", "step.succeeded", "step.started", "step.succeeded",
        "run.succeeded"]
    assert [e.seq for e in events] == list(range(1, 7))
    assert all(e.meta["correlation_id"] == str(run_id) for e in events)
    logs = await store.step_log(run_id, "build")
    assert logs == [(1, logs[0][1])]
    assert f"building https://git.example.com/shop/cart.git at {commit} on refs/heads/main" \
        in logs[0][1]


async def test_failing_step_ends_run_failed_with_exit_code_and_tail(
        serve: Serve, producer: Producer, store: Store) -> None:
    await serve(FAILING)
    run_id = await producer.push()

    run = await wait_for_run(store, run_id)

    assert run.status == "failed"
    assert run.step == "compile"
    error = run.steps["compile"].error
    assert error is not None
    assert error["exit_code"] == 3
    tail = error["output_tail"].splitlines()
    assert len(tail) == 50, "the tail keeps the last 50 lines"
    assert tail[-1] == "fatal: something broke"
    assert "line 80" in tail
    assert "line 10" not in tail
    assert run.steps["never"].state == "skipped"  # it needs compile: it can never start
    types = [e.type for e in await store.events(run_id)]
    assert types[-3:] == ["step.failed", "step.skipped", "run.failed"]


async def test_same_push_delivered_twice_makes_one_run(
        serve: Serve, producer: Producer, store: Store) -> None:
    await serve(TWO_SCRIPTS)
    delivery = str(uuid.uuid4())
    first = await producer.push(delivery_id=delivery, commit="b2" * 20)
    second = await producer.push(delivery_id=delivery, commit="b2" * 20)
    assert first == second

    await wait_for_run(store, first)
    await asyncio.sleep(0.5)  # let the second delivery be handled too

    runs = await store.list_runs()
    assert [r.id for r in runs] == [first]
    assert len(await store.events(first)) == 6


async def test_schema_invalid_push_is_dead_lettered_with_reason_and_no_run(
        serve: Serve, producer: Producer, store: Store, amqp_url: str, bus_prefix: str) -> None:
    await serve(TWO_SCRIPTS)
    await producer.publish("push", {"repo": "https://x/y.git", "ref": "refs/heads/main",
                                    "commit": "not-a-sha; rm -rf /"}, str(uuid.uuid4()))
    await producer.publish("push", b"{not json", str(uuid.uuid4()))

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(f"{bus_prefix}.dead")
        reasons = []
        for _ in range(100):
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            reasons.append(message.headers[REASON_HEADER])
            await message.ack()
            if len(reasons) == 2:
                break
    finally:
        await connection.close()

    assert len(reasons) == 2
    assert any("commit" in r and "schema" in r for r in reasons), reasons
    assert any("not JSON" in r for r in reasons), reasons
    assert await store.list_runs() == []


async def test_tag_push_and_branch_deletion_open_no_run(
        serve: Serve, producer: Producer, store: Store) -> None:
    await serve(TWO_SCRIPTS)
    await producer.push(ref="refs/tags/v1.0.0")
    await producer.push(commit="0" * 40)
    real = await producer.push()
    await wait_for_run(store, real)
    assert [r.id for r in await store.list_runs()] == [real]


async def test_retries_with_backoff_then_success(serve: Serve, producer: Producer,
                                                 store: Store) -> None:
    await serve("""
name: flaky
steps:
  - name: flaky
    uses: script
    retries: 3
    backoff: {initial: 0.2, factor: 2, jitter: 0}
    run: |
      echo "attempt $CISTATE_ATTEMPT"
      test "$CISTATE_ATTEMPT" -ge 3
""")
    run_id = await producer.push()
    run = await wait_for_run(store, run_id)
    assert run.status == "succeeded"
    assert run.steps["flaky"].attempts == 3
    events = await store.events(run_id)
    types = [e.type for e in events]
    assert types.count("step.failed") == 2
    assert types.count("step.retry_scheduled") == 2
    scheduled = [e for e in events if e.type == "step.retry_scheduled"]
    assert [e.data["delay"] for e in scheduled] == [0.2, 0.4]
    started = [e for e in events if e.type == "step.started"]
    # the second retry waits twice as long as the first
    gap1 = (started[1].recorded_at - started[0].recorded_at).total_seconds()
    gap2 = (started[2].recorded_at - started[1].recorded_at).total_seconds()
    assert gap1 >= 0.2 and gap2 >= 0.4
    assert len(await store.step_log(run_id, "flaky")) == 3


async def test_result_for_a_finished_step_is_recorded_as_rejected(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve(TWO_SCRIPTS)
    run_id = await producer.push()
    await wait_for_run(store, run_id)
    late = {"run_id": str(run_id), "step": "build", "attempt": 1, "status": "failed",
            "error": {"message": "late"}}
    await producer.publish("step.build.result", late, str(uuid.uuid4()), signed_by=settings)

    async def rejected():  # type: ignore[no-untyped-def]
        return [e for e in await store.events(run_id) if e.type == "message.rejected"]

    from tests.conftest import wait_until
    found = await wait_until(rejected, 10, what="message.rejected")
    assert "does not match the run" in found[0].data["reason"]
    assert (await store.load(run_id)).status == "succeeded"  # type: ignore[union-attr]


async def test_http_api_reads_runs_and_events(serve: Serve, producer: Producer,
                                              store: Store) -> None:
    settings = await serve(TWO_SCRIPTS)
    run_id = await producer.push()
    await wait_for_run(store, run_id)
    base = f"http://{settings.listen}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok", "database": "ok", "broker": "ok"}
        async with http.get(f"{base}/api/v1/runs") as resp:
            runs = (await resp.json())["runs"]
            assert [r["id"] for r in runs] == [str(run_id)]
        async with http.get(f"{base}/api/v1/runs/{run_id}") as resp:
            run = await resp.json()
            assert run["state"] == "succeeded"
            assert {"id", "repo", "ref", "commit", "state", "step", "steps", "version"} <= set(run)
            assert set(run["steps"][0]) == {"name", "state", "attempts", "outputs", "error",
                                            "started_at", "finished_at", "timing"}
        async with http.get(f"{base}/api/v1/runs/{run_id}/events") as resp:
            events = (await resp.json())["events"]
            assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
            assert set(events[0]) == {"position", "run_id", "seq", "type", "data", "meta",
                                      "recorded_at"}
        async with http.get(f"{base}/api/v1/runs/{run_id}/steps/build/log") as resp:
            assert resp.status == 200
            assert "building" in await resp.text()
        async with http.get(f"{base}/api/v1/runs/not-a-uuid") as resp:
            assert resp.status == 400
            assert "not a run id" in (await resp.json())["error"]
        async with http.get(f"{base}/api/v1/runs/{uuid.uuid4()}") as resp:
            assert resp.status == 404


async def test_outbox_rows_written_without_a_publisher_are_relayed(
        serve: Serve, store: Store, make_settings) -> None:  # type: ignore[no-untyped-def]
    """A decision stored by a process with no bus (the CLI, an API node) still reaches the
    workers: the relay publishes its outbox rows."""
    from cistate.bootstrap import load_pipeline, signer_for
    from cistate.domain.messages import Push
    from cistate.domain.run import Decider
    from cistate.service.orchestrator import Orchestrator

    settings = await serve(TWO_SCRIPTS)
    # as the CLI does: the deployment's key gives the attempts their tokens
    decider = Decider(load_pipeline(settings.pipeline), signer_for(settings).attempt_token)
    offline = Orchestrator(store, decider, bus=None)
    push = Push(repo="https://git.example.com/a.git", ref="main", commit="c3" * 20)
    outcome = await offline.submit(push, uuid.uuid4())
    assert outcome.status == "recorded"
    run = await wait_for_run(store, outcome.run_id)
    assert run.status == "succeeded"
