"""Three runs contend for one lock (issue 13) on real `cistate serve` processes: two
orchestrators, two workers, a `kill -9` of the worker running the holder's locked step and
then of an orchestrator. The runs hold the lock one at a time, in arrival order (as the
lock's own stream recorded their claims), and nothing is stranded: every run succeeds, the
lock ends free with nobody waiting, and every due outbox row is published.

Besides the event streams, the test watches the host's processes: the locked steps' `sleep`s
carry their run in their environment, so a sample with two runs' locked steps alive at once
would be a broken lock whatever the events say."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from cistate.domain.events import Event
from cistate.domain.resource import ResourceState
from tests.conftest import wait_until
from tests.integration.conftest import Producer, wait_for_run
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.integration

LOCK = "lock:dev"
DEPLOY_SECONDS = 4.0
HEALTH_SECONDS = 1.5
LOCKED = ("deploy", "health")


def pipeline(deploy_sleep: str, health_sleep: str) -> str:
    # `sleep X & wait`: the sleep is a process of its own, found on the host by its argument
    return f"""
name: locked
steps:
  - name: deploy
    uses: script
    lock: dev
    timeout: 20s
    retries: 2
    backoff: {{initial: 0.2}}
    run: |
      sleep {deploy_sleep} &
      wait
  - name: health
    uses: script
    lock: dev
    timeout: 20s
    retries: 2
    backoff: {{initial: 0.2}}
    run: |
      sleep {health_sleep} &
      wait
  - name: report
    uses: script
    run: echo reported
"""


@dataclass
class Seen:
    """A locked step's process as the host showed it."""
    pid: int
    run_id: uuid.UUID
    step: str
    attempt: int
    ancestors: tuple[int, ...]
    first: float  # time.monotonic()
    last: float


class StepProcesses:
    """Samples the host's processes every few milliseconds for the locked steps' sleeps
    (each names its run and step in its environment: CISTATE_RUN_ID, CISTATE_STEP)."""

    def __init__(self, sleeps: dict[str, str]) -> None:
        self.wanted = {f"sleep\0{arg}\0".encode(): step for step, arg in sleeps.items()}
        self.seen: dict[tuple[int, uuid.UUID, str, int], Seen] = {}
        self.overlaps: list[list[Seen]] = []  # samples with two runs' locked steps alive
        self.samples = 0

    def sample(self) -> None:
        now = time.monotonic()
        alive: list[Seen] = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if f.read() not in self.wanted:
                        continue
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    env = dict(item.split("=", 1) for item in
                               f.read().decode(errors="replace").split("\0") if "=" in item)
            except OSError:
                continue  # it ended meanwhile
            pid = int(entry.name)
            key = (pid, uuid.UUID(env["CISTATE_RUN_ID"]), env["CISTATE_STEP"],
                   int(env["CISTATE_ATTEMPT"]))
            seen = self.seen.get(key)
            if seen is None:
                seen = self.seen[key] = Seen(pid, key[1], key[2], key[3], ancestors(pid),
                                             now, now)
            seen.last = now
            alive.append(seen)
        if len({s.run_id for s in alive}) > 1:
            self.overlaps.append(alive)
        self.samples += 1

    async def watch(self, interval: float = 0.02) -> None:
        while True:
            self.sample()
            await asyncio.sleep(interval)

    def of(self, run_id: uuid.UUID, step: str) -> list[Seen]:
        return sorted((s for s in self.seen.values() if s.run_id == run_id and s.step == step),
                      key=lambda s: s.first)


def ancestors(pid: int) -> tuple[int, ...]:
    found: list[int] = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        found.append(pid)
    return tuple(found)


def at(events: list[Event], type_: str, **data: object) -> list[datetime]:
    return [e.recorded_at for e in events
            if e.type == type_ and all(e.data.get(k) == v for k, v in data.items())]


async def test_three_runs_hold_one_lock_in_turn_through_kill_9_of_a_worker_and_an_orchestrator(
        make_settings: Callable[..., Settings], producer: Producer, store: Store,
        processes: list[ServeProcess], tmp_path: Path) -> None:
    tag = uuid.uuid4().int % 10**6
    sleeps = {"deploy": f"{DEPLOY_SECONDS:g}.{tag:06d}1",
              "health": f"{HEALTH_SECONDS:g}{tag:06d}2"}
    settings = make_settings(pipeline(sleeps["deploy"], sleeps["health"]))

    async def start(name: str, role: str) -> ServeProcess:
        proc = ServeProcess(settings, (role,), tmp_path / f"{name}.log")
        processes.append(proc)
        return await proc.start()

    # the first start makes the bus key that the others then read
    orch_a = await start("orch-a", "orchestrator")
    _, *workers = await asyncio.gather(start("orch-b", "orchestrator"),
                                       start("worker-1", "worker"),
                                       start("worker-2", "worker"))
    host = StepProcesses(sleeps)
    watcher = asyncio.create_task(host.watch())
    try:
        await contend(store, producer, host, start, orch_a, workers, processes)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


Start = Callable[[str, str], Awaitable[ServeProcess]]


async def contend(store: Store, producer: Producer, host: StepProcesses, start: Start,
                  orch_a: ServeProcess, workers: list[ServeProcess],
                  processes: list[ServeProcess]) -> None:
    begun = time.monotonic()
    pushed = [await producer.push() for _ in range(3)]

    # -- arrival: one claim granted at once, the two others queued behind it
    async def queued() -> list[ResourceState] | None:
        found = await store.resources([LOCK])
        return found if found and found[0].holder and len(found[0].waiting) == 2 else None

    [lock] = await wait_until(queued, 30, what="one run to hold lock:dev and two to wait")
    assert lock.holder is not None
    arrival = [lock.holder.run_id, *(c.run_id for c in lock.waiting)]
    assert sorted(arrival) == sorted(pushed)
    first = arrival[0]
    for run_id in arrival[1:]:
        state = await store.load(run_id)
        assert state is not None and state.status == "waiting", state
        assert state.steps["deploy"].state == "waiting"
        assert state.steps["health"].state == "pending"
        assert state.holds[LOCK]["state"] == "waiting"

    # -- kill -9 the worker that runs the holder's deploy, while its process runs
    async def deploying() -> Seen | None:
        found = host.of(first, "deploy")
        return found[0] if found else None

    victim_step = await wait_until(deploying, 30, what="the first run's deploy process")
    await asyncio.sleep(1.0)
    [victim] = [w for w in workers if w.proc and w.proc.pid in victim_step.ancestors]
    holding = await store.load(first)
    assert holding is not None and holding.steps["deploy"].state == "running"
    victim.kill()
    killed_at = time.monotonic()
    killed_wall = datetime.now(UTC)
    survivor = next(w for w in workers if w is not victim)
    replacement = await start("worker-3", "worker")

    # the killed worker's step process went with it (bwrap --die-with-parent) ...
    async def gone() -> bool:
        return not Path(f"/proc/{victim_step.pid}/cmdline").exists() or not Path(
            f"/proc/{victim_step.pid}/cmdline").read_bytes()

    await wait_until(gone, 10, what="the killed worker's step process to end")

    # ... and another worker runs the deploy again, still holding the lock
    async def rerun() -> Seen | None:
        found = [s for s in host.of(first, "deploy") if s.first > killed_at]
        return found[0] if found else None

    again = await wait_until(rerun, 30, what="the first run's deploy to run again")
    assert survivor.proc is not None and replacement.proc is not None
    assert {survivor.proc.pid, replacement.proc.pid} & set(again.ancestors)
    [still] = await store.resources([LOCK])
    assert still.holder is not None and still.holder.run_id == first
    assert [c.run_id for c in still.waiting] == arrival[1:]

    # -- kill -9 an orchestrator as the first run's health starts (its release follows)
    async def health() -> bool:
        return bool(host.of(first, "health"))

    await wait_until(health, 40, what="the first run's health process")
    orch_a.kill()
    await start("orch-c", "orchestrator")

    # -- nothing stranded: every run succeeds
    runs = {run_id: await wait_for_run(store, run_id, timeout=120) for run_id in arrival}
    elapsed = time.monotonic() - begun
    assert {run_id: run.status for run_id, run in runs.items()} == dict.fromkeys(
        arrival, "succeeded"), runs
    for run in runs.values():
        assert {name: step.state for name, step in run.steps.items()} == dict.fromkeys(
            ("deploy", "health", "report"), "succeeded")
        assert run.holds[LOCK]["state"] == "released"
    events = {run_id: await store.events(run_id) for run_id in arrival}
    for run_id, stream in events.items():
        assert [e.type for e in stream].count("claim.requested") == 1, run_id
        assert not [e for e in stream if e.type == "message.rejected"], stream

    # -- the lock's own stream: one holder at a time, granted in arrival order
    lock_events = await store.resource_events(LOCK)
    claims = {str(run_id): e.data["claim"] for run_id, stream in events.items()
              for e in stream if e.type == "claim.requested"}
    order = list(dict.fromkeys(data["run_id"] for _, data in lock_events))
    assert order == [str(run_id) for run_id in arrival]
    r1, r2, r3 = (str(run_id) for run_id in arrival)
    assert [(type_, data["run_id"]) for type_, data in lock_events] == [
        ("resource.granted", r1), ("resource.queued", r2), ("resource.queued", r3),
        ("resource.released", r1), ("resource.granted", r2),
        ("resource.released", r2), ("resource.granted", r3),
        ("resource.released", r3)]
    holder: str | None = None
    grants: list[str] = []
    for type_, data in lock_events:
        assert data["claim"] == claims[data["run_id"]]
        if type_ == "resource.granted":
            assert holder is None, f"{data['run_id']} granted while {holder} holds it"
            holder = data["claim"]
            grants.append(data["run_id"])
        elif type_ == "resource.released":
            assert holder == data["claim"], "released by a claim that does not hold it"
            holder = None
    assert holder is None and grants == [r1, r2, r3]

    # -- the runs' own events: lock windows, and locked steps inside them, one after another
    windows = []
    for run_id in arrival:
        stream = events[run_id]
        [granted] = at(stream, "claim.granted")
        [released] = at(stream, "claim.released")
        started = min(at(stream, "step.started", step="deploy"))
        ended = max(at(stream, "step.succeeded", step="health"))
        assert granted <= started <= ended <= released, (run_id, granted, started, ended,
                                                        released)
        windows.append((granted, released))
    for (_, released), (granted, _) in itertools.pairwise(windows):
        assert released < granted, windows

    # -- the host: never two runs' locked steps alive at once; each ran, the holder's twice
    assert host.samples > 100
    assert host.overlaps == [], host.overlaps
    for run_id in arrival:
        for step in LOCKED:
            assert host.of(run_id, step), f"{step} of {run_id} was never seen running"
    assert [s.pid for s in host.of(first, "deploy")][:2] == [victim_step.pid, again.pid]
    deploy = runs[first].steps["deploy"]
    [deploy_done] = at(events[first], "step.succeeded", step="deploy")
    # its result is the second process's: it ended a whole deploy after the kill
    assert deploy_done - killed_wall >= timedelta(seconds=DEPLOY_SECONDS - 0.2)
    print(f"\nlock contention: {elapsed:.1f}s; first run's deploy attempts {deploy.attempts};"
          f" {host.samples} host samples")

    # -- the lock ends free, and every due outbox row has been published
    [free] = await store.resources([LOCK])
    assert free.holder is None and free.waiting == []

    async def published() -> bool:
        overdue = await store.pool.fetch(
            "SELECT id, routing_key, not_before, created_at FROM outbox WHERE sent_at IS NULL"
            " AND COALESCE(not_before, created_at) < now() - interval '3 seconds'")
        return not overdue

    await wait_until(published, 15, what="every due outbox row to be published")
    for proc in processes:
        assert "dead-lettered" not in proc.log(), proc.log_path.name
