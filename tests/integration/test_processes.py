"""Several cistate processes, and cistate processes killed with SIGKILL."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.integration.conftest import Producer, wait_for_run
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.integration

THREE_STEPS = """
name: three
steps:
  - name: one
    uses: script
    run: echo one
  - name: two
    uses: noop
  - name: three
    uses: script
    run: echo three
"""


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        proc.stop()


async def _migrated(settings: Settings) -> None:
    from cistate.adapters.postgres.store import connect

    store = await connect(settings.database_url, min_size=1, max_size=1)
    await store.migrate()
    await store.close()


def assert_clean_history(events: list, step_names: list[str]) -> None:  # type: ignore[type-arg]
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(events) + 1)), f"seq not contiguous: {seqs}"
    positions = [e.position for e in events]
    assert positions == sorted(positions), "seq order differs from append order"
    succeeded = collections.Counter(e.data["step"] for e in events
                                    if e.type == "step.succeeded")
    assert succeeded == {name: 1 for name in step_names}, succeeded
    assert [e.type for e in events].count("run.succeeded") == 1


async def test_two_orchestrator_processes_share_the_queue_without_duplicate_seq(
        make_settings: Callable[..., Settings], producer: Producer, store: Store,
        processes: list[ServeProcess], tmp_path: Path) -> None:
    settings = make_settings(THREE_STEPS, worker_concurrency=16, log_level="debug")
    for name in ("orch-a", "orch-b"):
        processes.append(await ServeProcess(settings, ("orchestrator",),
                                            tmp_path / f"{name}.log").start())
    processes.append(await ServeProcess(settings, ("worker",), tmp_path / "worker.log").start())

    run_ids = await asyncio.gather(*(producer.push() for _ in range(40)))
    for run_id in run_ids:
        run = await wait_for_run(store, run_id, timeout=60)
        assert run.status == "succeeded"
        assert_clean_history(await store.events(run_id), ["one", "two", "three"])
    # both orchestrators did part of the work
    for proc in processes[:2]:
        assert proc.log().count("recorded") > 0, f"{proc.log_path.name} handled nothing"


async def test_kill_9_serve_while_a_step_runs_then_restart_completes_the_run(
        make_settings: Callable[..., Settings], producer: Producer, store: Store,
        processes: list[ServeProcess], tmp_path: Path) -> None:
    settings = make_settings("""
name: slow
steps:
  - name: first
    uses: script
    run: echo first
  - name: slow
    uses: script
    run: sleep 2; echo slow done
  - name: last
    uses: noop
""")
    serve = await ServeProcess(settings, ("orchestrator", "worker"),
                               tmp_path / "serve.log").start()
    processes.append(serve)
    run_id = await producer.push()
    await wait_for_run(store, run_id, states=("running",))

    async def slow_started() -> bool:
        run = await store.load(run_id)
        return run is not None and run.step == "slow"

    from tests.conftest import wait_until
    await wait_until(slow_started, 20, what="step slow to start")
    await asyncio.sleep(0.5)
    serve.kill()

    restarted = await ServeProcess(settings, ("orchestrator", "worker"),
                                   tmp_path / "serve2.log").start()
    processes.append(restarted)
    run = await wait_for_run(store, run_id, timeout=60)

    assert run.status == "succeeded"
    events = await store.events(run_id)
    assert_clean_history(events, ["first", "slow", "last"])
    slow_starts = [e for e in events if e.type == "step.started" and e.data["step"] == "slow"]
    assert len(slow_starts) == 1, "the redelivered command reran the same attempt"
