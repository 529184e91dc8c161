"""The Run aggregate: fold(events) -> RunState; decide(state, message) -> events + outgoing.

Pure: no clock, no I/O. The caller passes `now`, stores the events, applies them to the state
with `apply`, and publishes the outgoing messages through the outbox.
"""

from __future__ import annotations

import copy
import hmac
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from cistate import machine as m
from cistate.events import EventType as E
from cistate.events import NewEvent, derived_id
from cistate.messages import CancelStep, Control, Push, StepCommand, StepResult
from cistate.pipeline import Pipeline

# A step's own states (the run's state is the machine's).
PENDING, RUNNING, SUCCEEDED, FAILED = "pending", "running", "succeeded", "failed"
RETRYING, TIMED_OUT, SKIPPED, CANCELLED = "retrying", "timed_out", "skipped", "cancelled"


@dataclass
class StepState:
    name: str
    state: str = PENDING
    attempts: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "attempts": self.attempts,
            "outputs": self.outputs,
            "error": self.error,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }

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
        )


@dataclass
class RunState:
    id: uuid.UUID
    repo: str = ""
    ref: str = ""
    commit: str = ""
    pipeline: str = ""
    machine_state: str = m.QUEUED  # queued | <step name> | succeeded | failed | cancelled
    step: str | None = None  # the step running, or the one the run ended in
    steps: dict[str, StepState] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    push: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def status(self) -> str:
        """queued | running | succeeded | failed | cancelled"""
        if self.machine_state in m.TERMINAL or self.machine_state == m.QUEUED:
            return self.machine_state
        return "running"

    @property
    def exists(self) -> bool:
        return self.version > 0

    def outputs_before(self, step: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for name, state in self.steps.items():
            if name == step:
                break
            if state.state == SUCCEEDED:
                found[name] = state.outputs
        return found

    def to_json(self, with_steps: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": str(self.id),
            "repo": self.repo,
            "ref": self.ref,
            "commit": self.commit,
            "pipeline": self.pipeline,
            "state": self.status,
            "step": self.step,
            "version": self.version,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "rerun_of": self.push.get("rerun_of"),
        }
        if with_steps:
            body["steps"] = [s.to_json() for s in self.steps.values()]
        return body

    def clone(self) -> RunState:
        return copy.deepcopy(self)


# ---------------------------------------------------------------------------------------
# fold / apply


def fold(run_id: uuid.UUID, events: Iterable[tuple[str, dict[str, Any], datetime]]) -> RunState:
    """Replay (type, data, recorded_at) triples, in seq order, into the run's state."""
    state = RunState(id=run_id)
    for type_, data, at in events:
        apply(state, type_, data, at)
    return state


def apply(state: RunState, type_: str, data: dict[str, Any], at: datetime) -> None:
    """Apply one event to the state, in place. Every event bumps the version."""
    state.version += 1
    state.updated_at = at
    handler = _APPLY.get(type_)
    if handler is not None:
        handler(state, data, at)


def _requested(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.repo, s.ref, s.commit, s.pipeline = d["repo"], d["ref"], d["commit"], d["pipeline"]
    s.push = d["push"]
    s.active = list(d["active"])
    s.steps = {name: StepState(name) for name in d["steps"]}
    s.created_at = at
    s.machine_state = m.QUEUED


def _started(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    step.state, step.attempts, step.error = RUNNING, d["attempt"], None
    step.started_at, step.finished_at = at, None
    s.machine_state = s.step = d["step"]


def _succeeded(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    step.state, step.outputs, step.finished_at = SUCCEEDED, d.get("outputs") or {}, at


def _failed(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    step.state, step.error, step.finished_at = FAILED, d.get("error"), at


def _timed_out(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    step.state, step.error, step.finished_at = TIMED_OUT, d.get("error"), at


def _retry_scheduled(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.steps[d["step"]].state = RETRYING


def _skipped(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.steps[d["step"]].state = SKIPPED


def _run_succeeded(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.machine_state, s.step = m.SUCCEEDED, None


def _run_failed(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.machine_state, s.step = m.FAILED, d.get("step")


def _cancelled(s: RunState, d: dict[str, Any], at: datetime) -> None:
    running = s.steps.get(s.step or "")
    if running is not None and running.state in (RUNNING, RETRYING):
        running.state, running.finished_at = CANCELLED, at
    s.machine_state = m.CANCELLED


def _retried(s: RunState, d: dict[str, Any], at: datetime) -> None:
    # Steps from the retried one on start over; those before keep their outputs.
    reached = False
    for name, step in s.steps.items():
        reached = reached or name == d["from_step"]
        if reached and step.state != SKIPPED:
            step.state, step.outputs, step.error = PENDING, {}, None
            step.started_at = step.finished_at = None
    s.machine_state, s.step = m.QUEUED, None


_APPLY: dict[str, Any] = {
    E.RUN_REQUESTED: _requested,
    E.STEP_STARTED: _started,
    E.STEP_SUCCEEDED: _succeeded,
    E.STEP_FAILED: _failed,
    E.STEP_TIMED_OUT: _timed_out,
    E.STEP_RETRY_SCHEDULED: _retry_scheduled,
    E.STEP_SKIPPED: _skipped,
    E.RUN_SUCCEEDED: _run_succeeded,
    E.RUN_FAILED: _run_failed,
    E.RUN_CANCELLED: _cancelled,
    E.RUN_RETRIED: _retried,
}


# ---------------------------------------------------------------------------------------
# decide


@dataclass(frozen=True)
class Outgoing:
    """A message to publish once the events are stored (an outbox row)."""

    routing_key: str
    body: BaseModel
    message_id: uuid.UUID
    not_before: datetime | None = None


@dataclass
class Decision:
    events: list[NewEvent] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)
    ignored: str | None = None  # why nothing was recorded (a duplicate, a stale timer)


class Rejected(Exception):
    """The message asks for something the run's state does not allow."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def run_id_for(message_id: uuid.UUID) -> uuid.UUID:
    """A push's run id follows from its delivery id, so a redelivered push finds its run."""
    return derived_id(message_id, "run")


def ignore_reason(push: Push, pipeline: Pipeline) -> str | None:
    """Why a push opens no run, or None when it opens one."""
    if push.is_deletion:
        return "branch deletion"
    branch = push.branch
    if branch is None:
        return f"{push.ref} is not a branch (tag pushes open no run)"
    if not pipeline.accepts_branch(branch):
        return f"branch {branch!r} is outside the pipeline's branch filter"
    return None


AttemptTokens = Callable[[uuid.UUID, str, int], str]


class Decider:
    """Decisions for the runs of one pipeline.

    `tokens` gives each attempt's token (cistate.signing.Signer.attempt_token: keyed, so
    deterministic yet unguessable): a command carries it, `step.started` records it, and a
    result is accepted only with the token of the attempt it answers. Without `tokens`
    (pure tests of the rules) attempts have none and results are not asked for one.
    """

    def __init__(self, pipeline: Pipeline, tokens: AttemptTokens | None = None) -> None:
        self.pipeline = pipeline
        self.machine = m.RunMachine(pipeline)
        self.tokens = tokens

    def token(self, run_id: uuid.UUID, step: str, attempt: int) -> str:
        return self.tokens(run_id, step, attempt) if self.tokens else ""

    def decide(
        self,
        state: RunState,
        message: Push | StepResult | Control,
        message_id: uuid.UUID,
        now: datetime,
        actor: str = "system",
    ) -> Decision:
        """Events and outgoing messages for `message`; raises Rejected when not allowed."""
        build = _Builder(self, state, message_id, now, actor)
        if isinstance(message, Push):
            build.push(message)
        elif isinstance(message, StepResult):
            build.result(message)
        elif message.action == "cancel":
            build.cancel(message)
        elif message.action == "retry":
            build.retry(message)
        elif message.action == "retry_due":
            build.retry_due(message)
        else:
            build.timeout(message)
        return build.decision

    def rejection(
        self, state: RunState, message_id: uuid.UUID, kind: str, body: dict[str, Any],
        reason: str, actor: str = "system",
    ) -> Decision:
        """A message.rejected event: a message that could not be applied is recorded."""
        event = NewEvent(
            E.MESSAGE_REJECTED,
            {"reason": reason, "message_type": kind, "message": body, "state": state.status},
            _meta(message_id, state.id, actor),
        )
        return Decision(events=[event])


def _meta(message_id: uuid.UUID, run_id: uuid.UUID, actor: str, **extra: Any) -> dict[str, Any]:
    return {"causation_id": str(message_id), "correlation_id": str(run_id), "actor": actor,
            **extra}


class _Builder:
    """Builds one decision; tracks the machine state the new events lead to."""

    def __init__(
        self, decider: Decider, state: RunState, message_id: uuid.UUID, now: datetime, actor: str
    ) -> None:
        self.d = decider
        self.s = state
        self.message_id = message_id
        self.now = now
        self.actor = actor
        self.decision = Decision()
        self.machine_state = state.machine_state
        self.repo, self.ref, self.commit = state.repo, state.ref, state.commit

    # -- helpers

    def event(self, type_: E, data: dict[str, Any], **meta: Any) -> None:
        self.decision.events.append(
            NewEvent(type_, data, _meta(self.message_id, self.s.id, self.actor, **meta))
        )

    def fire(self, trigger: str, situation: m.Situation) -> str:
        try:
            self.machine_state = self.d.machine.next_state(self.machine_state, trigger, situation)
        except m.IllegalTransition as exc:
            raise Rejected(str(exc)) from None
        return self.machine_state

    def situation(self, **kw: Any) -> m.Situation:
        return m.Situation(active=self.s.active, **kw)

    def enter(self, dest: str, outputs: dict[str, dict[str, Any]]) -> None:
        """After a transition: start the step it leads to, or end the run."""
        if dest == m.SUCCEEDED:
            self.event(E.RUN_SUCCEEDED, {})
            return
        self.start_step(dest, self.s.steps[dest].attempts + 1 if self.s.steps else 1, outputs)

    def start_step(self, name: str, attempt: int, outputs: dict[str, dict[str, Any]]) -> None:
        spec = self.d.pipeline.step(name)
        token = self.d.token(self.s.id, name, attempt)
        started: dict[str, Any] = {"step": name, "attempt": attempt}
        if token:
            started["token"] = token
        self.event(E.STEP_STARTED, started, attempt=attempt)
        command = StepCommand(
            run_id=self.s.id, step=name, attempt=attempt, uses=spec.uses, token=token,
            settings=spec.with_, script=spec.run, timeout=spec.timeout,
            repo=self.repo, ref=self.ref, commit=self.commit, inputs=outputs,
            env=spec.env, secrets=spec.secrets, network=spec.network,
        )
        self.out(f"step.{name}.run", command, derived_id(self.s.id, "run", name, attempt))
        if spec.timeout:
            timer = Control(run_id=self.s.id, action="timeout", step=name, attempt=attempt)
            self.out("control", timer, derived_id(self.s.id, "timeout", name, attempt),
                     delay=spec.timeout)

    def out(self, key: str, body: BaseModel, message_id: uuid.UUID, delay: float = 0) -> None:
        not_before = self.now + timedelta(seconds=delay) if delay else None
        self.decision.outgoing.append(Outgoing(key, body, message_id, not_before))

    def running_attempt(self, step: str, attempt: int) -> bool:
        current = self.s.steps.get(step)
        return (
            self.s.machine_state == step
            and current is not None
            and current.state == RUNNING
            and current.attempts == attempt
        )

    # -- messages

    def push(self, push: Push) -> None:
        if self.s.exists:
            self.decision.ignored = "duplicate push: this delivery already opened its run"
            return
        pipeline = self.d.pipeline
        active = [s.name for s in pipeline.steps if s.runs_on(push.branch)]
        self.repo, self.ref, self.commit = push.repo, push.ref, push.commit
        self.event(E.RUN_REQUESTED, {
            "repo": push.repo, "ref": push.ref, "commit": push.commit,
            "pipeline": pipeline.name, "steps": list(pipeline.step_names), "active": active,
            "push": push.model_dump(mode="json", exclude_none=True),
        })
        for step in pipeline.steps:
            if step.name not in active:
                self.event(E.STEP_SKIPPED, {
                    "step": step.name, "attempt": 0, "reason": step.skip_reason(push.branch),
                })
        dest = self.d.machine.next_state(m.QUEUED, m.START, m.Situation(active=active))
        self.machine_state = dest
        if dest == m.SUCCEEDED:
            self.event(E.RUN_SUCCEEDED, {})
        else:
            self.start_step(dest, 1, {})

    def result(self, result: StepResult) -> None:
        if not self.running_attempt(result.step, result.attempt):
            step = self.s.steps.get(result.step)
            have = f"step {step.state}, attempt {step.attempts}" if step else "no such step"
            raise Rejected(
                f"result for step {result.step!r} attempt {result.attempt} does not match the "
                f"run (run {self.s.status}, {have})"
            )
        expected = self.d.token(self.s.id, result.step, result.attempt)
        if expected and not hmac.compare_digest(expected, result.token or ""):
            raise Rejected(
                f"result for step {result.step!r} attempt {result.attempt} does not carry the "
                "token of the command it claims to answer"
            )
        if result.status == "succeeded":
            self.event(E.STEP_SUCCEEDED, {
                "step": result.step, "attempt": result.attempt, "outputs": result.outputs,
            }, attempt=result.attempt)
            dest = self.fire(m.STEP_SUCCEEDED, self.situation())
            outputs = {**self.s.outputs_before(result.step), result.step: result.outputs}
            self.enter(dest, outputs)
            return
        error = (result.error.model_dump() if result.error
                 else {"message": "the handler reported failure without an error"})
        self.event(E.STEP_FAILED, {
            "step": result.step, "attempt": result.attempt, "error": error,
        }, attempt=result.attempt)
        self.after_failure(result.step, result.attempt, error, kind=str(error.get("kind", "error")))

    def timeout(self, timer: Control) -> None:
        if timer.step is None or timer.attempt is None:
            raise Rejected(f"a {timer.action} timer must name its step and attempt")
        if not self.running_attempt(timer.step, timer.attempt):
            self.decision.ignored = "stale timeout: that attempt already ended"
            return
        spec = self.d.pipeline.step(timer.step)
        error = {"message": f"step {timer.step!r} did not finish within {spec.timeout:g}s",
                 "kind": "timeout", "retryable": True}
        self.event(E.STEP_TIMED_OUT, {
            "step": timer.step, "attempt": timer.attempt, "error": error,
        }, attempt=timer.attempt)
        self.cancel_worker(timer.step, timer.attempt)
        self.after_failure(timer.step, timer.attempt, error, kind="timeout")

    def after_failure(self, step: str, attempt: int, error: dict[str, Any], kind: str) -> None:
        spec = self.d.pipeline.step(step)
        retry_left = (
            attempt < spec.max_attempts
            and bool(error.get("retryable", True))
            and kind in spec.retry_on
        )
        dest = self.fire(m.STEP_FAILED, self.situation(retry_left=retry_left))
        if dest == step:
            delay = spec.backoff.delay(attempt)
            due = self.now + timedelta(seconds=delay)
            self.event(E.STEP_RETRY_SCHEDULED, {
                "step": step, "attempt": attempt + 1, "delay": round(delay, 3),
                "due_at": due.isoformat(),
            }, attempt=attempt + 1)
            timer = Control(run_id=self.s.id, action="retry_due", step=step, attempt=attempt + 1)
            self.out("control", timer, derived_id(self.s.id, "retry_due", step, attempt + 1),
                     delay=delay)
            return
        if not error.get("retryable", True):
            why = "not retryable"
        elif kind not in spec.retry_on:
            why = f"retry_on does not include {kind}"
        else:
            why = f"attempt {attempt} of {spec.max_attempts}"
        self.event(E.RUN_FAILED, {
            "step": step, "attempt": attempt, "reason": f"step {step!r} {kind}: "
            f"{error.get('message', '')} ({why})",
        })

    def retry_due(self, timer: Control) -> None:
        if timer.step is None or timer.attempt is None:
            raise Rejected(f"a {timer.action} timer must name its step and attempt")
        step = self.s.steps.get(timer.step)
        if (self.s.machine_state != timer.step or step is None or step.state != RETRYING
                or step.attempts + 1 != timer.attempt):
            self.decision.ignored = "stale retry timer: the run moved on"
            return
        self.start_step(timer.step, timer.attempt, self.s.outputs_before(timer.step))

    def cancel(self, control: Control) -> None:
        running = self.s.machine_state
        self.fire(m.CANCEL, self.situation())
        self.event(E.RUN_CANCEL_REQUESTED, {"reason": control.reason})
        step = self.s.steps.get(running)
        if step is not None and step.state == RUNNING:
            self.cancel_worker(running, step.attempts)
        self.event(E.RUN_CANCELLED, {"step": self.s.step, "reason": control.reason})

    def cancel_worker(self, step: str, attempt: int) -> None:
        body = CancelStep(run_id=self.s.id, step=step, attempt=attempt)
        self.out("cancel", body, derived_id(self.s.id, "cancel", step, attempt, self.message_id))

    def retry(self, control: Control) -> None:
        target = control.step or self.s.step
        if target is None or target not in self.s.steps:
            raise Rejected(f"cannot retry from step {target!r}: the pipeline has no such step")
        if target not in self.s.active:
            raise Rejected(f"cannot retry from step {target!r}: it is skipped for this run")
        self.fire(m.RETRY, self.situation(target=target))
        missing = [
            name for name in self.s.active[: self.s.active.index(target)]
            if self.s.steps[name].state != SUCCEEDED
        ]
        if missing:
            raise Rejected(
                f"cannot retry from step {target!r}: earlier step(s) {', '.join(missing)} did "
                "not succeed; retry from the first of them"
            )
        self.event(E.RUN_RETRIED, {
            "from_step": target, "actor": self.actor, "reason": control.reason,
        })
        self.start_step(target, self.s.steps[target].attempts + 1, self.s.outputs_before(target))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
