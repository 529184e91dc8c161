"""A run's state and its steps' (what fold and decide work on, what the store keeps in the
runs projection and the command line and the API show), apart from the deciding
(cistate.domain.run) so that reading a run needs neither the pipeline's models nor the
machines."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cistate.domain.status import TERMINAL, RunStatus, StepStatus

# A step's own states, as plain strings (cistate.domain.status names every state).
PENDING, RUNNING = StepStatus.PENDING.value, StepStatus.RUNNING.value
SUCCEEDED, FAILED = StepStatus.SUCCEEDED.value, StepStatus.FAILED.value
RETRYING, TIMED_OUT = StepStatus.RETRYING.value, StepStatus.TIMED_OUT.value
SKIPPED, CANCELLED = StepStatus.SKIPPED.value, StepStatus.CANCELLED.value
WAITING = StepStatus.WAITING.value
LIVE = frozenset({RUNNING, WAITING, RETRYING})

# a run's hold on a concurrency group or a lock (RunState.holds)
HOLD_WAITING, HOLD_HELD, HOLD_RELEASED = "waiting", "held", "released"
QUEUED, RUN_RUNNING = RunStatus.QUEUED.value, RunStatus.RUNNING.value
# the kinds of what a run holds (cistate.domain.resource names them too)
GROUP, TRUST = "group", "trust"


def kind_of(resource: str) -> str:
    """group, lock or trust: the part of `group:<name>` before the colon."""
    return resource.split(":", 1)[0]


@dataclass
class StepState:
    name: str
    state: str = PENDING
    attempts: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # where the latest attempt's time went, in seconds: waiting (for a lock or a person),
    # queued (its command on its way to a worker: the worker's start minus step.started),
    # running (the worker's own start to end)
    timing: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "attempts": self.attempts,
            "outputs": self.outputs,
            "error": self.error,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "timing": self.timing,
        }

    def copy(self) -> StepState:
        """A shallow copy (dataclasses.replace, without its look at the fields each time)."""
        return StepState(self.name, self.state, self.attempts, self.outputs, self.error,
                         self.started_at, self.finished_at, self.timing)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StepState:
        return cls(
            name=raw["name"],
            state=raw["state"],
            attempts=raw["attempts"],
            outputs=raw.get("outputs") or {},
            error=raw.get("error"),
            started_at=_parse(raw.get("started_at")),
            finished_at=_parse(raw.get("finished_at")),
            timing=raw.get("timing"),
        )


@dataclass
class RunState:
    id: uuid.UUID
    repo: str = ""
    ref: str = ""
    commit: str = ""
    pipeline: str = ""
    # the pinned pipeline's hash (its spec is in the event that pinned it); None: a run
    # recorded before runs pinned theirs, decided with the deployment's pipeline
    pipeline_sha256: str | None = None
    # queued | running | succeeded | failed | cancelled (before step graphs: a step's name
    # for running, in rows stored then)
    machine_state: str = QUEUED
    step: str | None = None  # the step that started last, or the one the run ended in
    steps: dict[str, StepState] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    push: dict[str, Any] = field(default_factory=dict)
    # resource (group:<name> | lock:<name>) -> {claim, state: waiting | held | released, n}:
    # the run's latest claim on each concurrency group and lock it asked for
    holds: dict[str, dict[str, Any]] = field(default_factory=dict)
    # what the outside was last told, by commit status context (or notification key):
    # {notice, kind, state, description, level run | step, delivery sent | delivered |
    # failed | retrying | superseded, reason}
    notices: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def status(self) -> str:
        """queued | running | waiting | succeeded | failed | cancelled (waiting: it waits for
        its concurrency group, or nothing but steps waiting for a person or a lock live)"""
        if self.machine_state in TERMINAL:
            return self.machine_state
        if self.waiting_gate() is not None:
            return "waiting"
        if self.machine_state == QUEUED:
            return self.machine_state
        live = [step.state for step in self.steps.values() if step.state in LIVE]
        if live and all(state == WAITING for state in live):
            return "waiting"
        return "running"

    @property
    def machine_status(self) -> str:
        """The run machine's state: queued | running | succeeded | failed | cancelled."""
        if self.machine_state in TERMINAL or self.machine_state == QUEUED:
            return self.machine_state
        return RUN_RUNNING

    @property
    def exists(self) -> bool:
        return self.version > 0

    def waiting_gate(self) -> str | None:
        """The concurrency group the run waits its turn in, or the trust gate of a fork's
        pull request (`trust:ok-to-test`), if it does: no step starts until it opens."""
        for resource, hold in self.holds.items():
            if (kind_of(resource) in (GROUP, TRUST)
                    and hold["state"] == HOLD_WAITING):
                return resource
        return None

    @property
    def from_fork(self) -> bool:
        """A run of a pull request whose head is in another repository."""
        return bool((self.push.get("pr") or {}).get("fork"))

    def hold_state(self, resource: str) -> str | None:
        hold = self.holds.get(resource)
        return hold["state"] if hold else None

    def outputs_of(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The outputs of those of `names` that succeeded: a step's inputs, given the steps
        upstream of it."""
        found: dict[str, dict[str, Any]] = {}
        for name in names:
            step = self.steps.get(name)
            if step is not None and step.state == SUCCEEDED:
                found[name] = step.outputs
        return found

    def to_json(self, with_steps: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": str(self.id),
            "repo": self.repo,
            "ref": self.ref,
            "commit": self.commit,
            "pipeline": self.pipeline,
            "pipeline_sha256": self.pipeline_sha256,
            "state": self.status,
            "step": self.step,
            "version": self.version,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "rerun_of": self.push.get("rerun_of"),
            "holds": {name: hold["state"] for name, hold in self.holds.items()},
            "notices": self.notices,
        }
        if with_steps:
            body["steps"] = [s.to_json() for s in self.steps.values()]
        return body

    def clone(self) -> RunState:
        return copy.deepcopy(self)

    def working_copy(self) -> RunState:
        """A copy that events may be applied to without touching this state: its steps are
        copied, their outputs and errors shared (apply replaces those, never changes them)."""
        return RunState(
            id=self.id, repo=self.repo, ref=self.ref, commit=self.commit,
            pipeline=self.pipeline, pipeline_sha256=self.pipeline_sha256,
            machine_state=self.machine_state, step=self.step,
            steps={name: step.copy() for name, step in self.steps.items()},
            active=list(self.active), push=self.push, holds=dict(self.holds),
            notices=dict(self.notices), version=self.version,
            created_at=self.created_at, updated_at=self.updated_at)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
