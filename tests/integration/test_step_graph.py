"""Pipelines with `needs:`, `finally:` and fail_fast, run by the real service on real RabbitMQ
and PostgreSQL: parallel steps run at once, finally steps are told the outcome in their
environment, fail_fast kills a running sibling, and two orchestrator processes decide a wide
fan-out without a duplicate or missing step."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.conftest import host_pids, settings_env, wait_until
from tests.integration.conftest import Producer, Serve, wait_for_run
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cistate", *args], capture_output=True,
                          text=True, env=settings_env(settings), timeout=60)


async def test_steps_that_need_the_same_step_run_at_the_same_time(
        serve: Serve, producer: Producer, store: Store) -> None:
    await serve("""
name: parallel
steps:
  - name: setup
    uses: noop
  - name: unit
    uses: script
    needs: [setup]
    run: sleep 2; echo unit done
  - name: lint
    uses: script
    needs: [setup]
    run: sleep 2; echo lint done
  - name: ship
    uses: noop
    needs: [unit, lint]
""", worker_concurrency=4)
    run_id = await producer.push()
    run = await wait_for_run(store, run_id, timeout=60)

    assert run.status == "succeeded"
    assert [s.name for s in run.steps.values()] == ["setup", "unit", "lint", "ship"]
    events = await store.events(run_id)
    started = {e.data["step"]: e.seq for e in events if e.type == "step.started"}
    ended = {e.data["step"]: e.seq for e in events if e.type == "step.succeeded"}
    assert max(started["unit"], started["lint"]) < min(ended["unit"], ended["lint"]), \
        "both started before either ended"
    assert started["unit"] == started["lint"] - 1, "started by the same decision"
    assert started["ship"] > max(ended["unit"], ended["lint"])
    unit, lint = run.steps["unit"], run.steps["lint"]
    assert unit.started_at and lint.started_at and unit.finished_at and lint.finished_at
    overlap = min(unit.finished_at, lint.finished_at) - max(unit.started_at, lint.started_at)
    assert overlap.total_seconds() > 1.0, (unit, lint)


async def test_a_finally_step_after_a_failure_is_told_the_run_failed(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve("""
name: with-finally
steps:
  - name: build
    uses: script
    run: echo "no Dockerfile" >&2; exit 4
  - name: deploy
    uses: noop
finally:
  - name: report
    uses: script
    run: echo "outcome=$CISTATE_RUN_OUTCOME step=$CISTATE_STEP"
""")
    run_id = await producer.push()
    run = await wait_for_run(store, run_id)

    assert run.status == "failed" and run.step == "build"
    assert [(s.name, s.state) for s in run.steps.values()] == [
        ("build", "failed"), ("deploy", "skipped"), ("report", "succeeded")]
    [(attempt, log)] = await store.step_log(run_id, "report")
    assert attempt == 1 and "outcome=failed step=report" in log
    types = [e.type for e in await store.events(run_id)]
    assert types == ["run.requested", "step.started", "step.failed", "step.skipped",
                     "step.started", "step.succeeded", "run.failed"]

    drawn = cli(settings, "graph", str(run_id))
    assert drawn.returncode == 0, drawn.stderr
    assert '    s_build["build<br/>failed"]' in drawn.stdout.splitlines()
    assert "    s_deploy -.-> s_report" in drawn.stdout.splitlines()
    assert "    class s_report succeeded" in drawn.stdout.splitlines()


async def test_fail_fast_kills_a_running_sibling_which_ends_cancelled(
        serve: Serve, producer: Producer, store: Store) -> None:
    duration = f"60.{uuid.uuid4().int % 10**6:06d}"  # names this test's sleep among all
    await serve(f"""
name: fails-fast
steps:
  - name: slow
    uses: script
    needs: []
    run: |
      sleep {duration} &
      wait
  - name: quick
    uses: script
    needs: []
    run: sleep 3; echo "3 tests failed" >&2; exit 1
  - name: after
    uses: noop
    needs: [slow, quick]
""")

    async def sleeping() -> int | None:
        found = host_pids("sleep", duration)
        return found[0] if found else None

    run_id = await producer.push()
    pid = await wait_until(sleeping, 20, what="the slow step's child process")
    run = await wait_for_run(store, run_id, timeout=30)

    assert run.status == "failed" and run.step == "quick"
    assert run.steps["slow"].state == "cancelled"
    assert run.steps["quick"].state == "failed"
    assert run.steps["after"].state == "skipped"
    error = run.steps["slow"].error or {}
    assert error["kind"] == "cancelled" and "'quick' failed" in error["message"]

    async def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")  # a zombie is gone too (its shell was killed)
        return stat.exists() and stat.read_text().split()[2] == "Z"

    await wait_until(gone, 15, what="the slow step's process to be killed")

    async def rejected() -> list:  # type: ignore[type-arg]
        return [e for e in await store.events(run_id) if e.type == "message.rejected"]

    late = await wait_until(rejected, 15, what="the killed step's late result to be refused")
    assert late[0].data["message"]["step"] == "slow"
    assert late[0].data["message"]["error"]["kind"] == "cancelled"


WIDE = "\n".join([
    "name: wide",
    "steps:",
    "  - {name: split, uses: script, run: echo split}",
    *(f"  - {{name: t{n}, uses: noop, needs: [split]}}" for n in range(8)),
    f"  - {{name: join, uses: noop, needs: [{', '.join(f't{n}' for n in range(8))}]}}",
    "finally:",
    "  - {name: report, uses: noop}",
    "",
])
WIDE_STEPS = ["split", *(f"t{n}" for n in range(8)), "join", "report"]


async def test_two_orchestrator_processes_decide_a_wide_fan_out_without_duplicates(
        make_settings: Callable[..., Settings], producer: Producer, store: Store,
        processes: list[ServeProcess], tmp_path: Path) -> None:
    settings = make_settings(WIDE, worker_concurrency=32, log_level="debug")
    for name in ("orch-a", "orch-b"):
        processes.append(await ServeProcess(settings, ("orchestrator",),
                                            tmp_path / f"{name}.log").start())
    processes.append(await ServeProcess(settings, ("worker",), tmp_path / "worker.log").start())

    run_ids = await asyncio.gather(*(producer.push() for _ in range(12)))
    for run_id in run_ids:
        run = await wait_for_run(store, run_id, timeout=90)
        assert run.status == "succeeded", run.to_json()
        events = await store.events(run_id)
        seqs = [e.seq for e in events]
        assert seqs == list(range(1, len(events) + 1)), f"seq not contiguous: {seqs}"
        for kind in ("step.started", "step.succeeded"):
            counted = collections.Counter(e.data["step"] for e in events if e.type == kind)
            assert counted == dict.fromkeys(WIDE_STEPS, 1), (kind, counted)
        at = {(e.type, e.data.get("step")): e.seq for e in events}
        assert at[("step.started", "join")] > max(
            at[("step.succeeded", f"t{n}")] for n in range(8))
        assert at[("step.started", "report")] > at[("step.succeeded", "join")]
        assert [e.type for e in events].count("run.succeeded") == 1
        assert not any(e.type == "message.rejected" for e in events)
    for proc in processes[:2]:
        assert proc.log().count("recorded") > 0, f"{proc.log_path.name} handled nothing"
