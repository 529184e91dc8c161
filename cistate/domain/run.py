"""The Run aggregate: fold(events) -> RunState; decide(state, message) -> events + outgoing.

Pure: no clock, no I/O. The caller passes `now`, stores the events, applies them to the state
with `apply`, and publishes the outgoing messages through the outbox.

A decision goes in three parts: the message's own events (a result, a timer, an operator's
request), each step change judged by the step machine; then the graph's consequences
(cistate.domain.graph: stop the live steps when fail_fast, skip what can never start, start what is
ready, the finally steps once every other step has ended), until nothing changes; then, once
every step has ended, the run's end, judged by the run machine.
"""

from __future__ import annotations

import hmac
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from cistate.domain import graph as step_graph
from cistate.domain import machine as m
from cistate.domain import notices as nt
from cistate.domain import pipeline as p
from cistate.domain import resource as res
from cistate.domain.events import EventType as E
from cistate.domain.events import NewEvent, derived_id
from cistate.domain.events import run_id_for as run_id_for  # its home is events.py
from cistate.domain.messages import (
    INTERNAL_ACTIONS,
    CancelStep,
    ClaimRequest,
    Control,
    Notice,
    NoticeKind,
    NoticeResult,
    Outgoing,
    Push,
    StepCommand,
    StepResult,
)
from cistate.domain.pipeline import Pipeline

# the state lives apart (cistate.domain.state): reading a run needs none of the deciding
from cistate.domain.state import (
    CANCELLED,
    FAILED,
    HOLD_HELD,
    HOLD_RELEASED,
    HOLD_WAITING,
    LIVE,
    PENDING,
    RETRYING,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    TIMED_OUT,
    WAITING,
)
from cistate.domain.state import RunState as RunState
from cistate.domain.state import StepState as StepState
from cistate.domain.status import TERMINAL

# what a finally step's processes are told about the run so far
OUTCOME_VARIABLE = "CISTATE_RUN_OUTCOME"


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
    s.pipeline_sha256 = d.get("pipeline_sha256")
    s.push = d["push"]
    s.active = list(d["active"])
    s.steps = {name: StepState(name) for name in d["steps"]}
    s.created_at = at
    s.machine_state = m.QUEUED


def _pinned(s: RunState, d: dict[str, Any], at: datetime) -> None:
    # The repository's pipeline replaces the one the run started with; the step that read
    # it keeps its state.
    s.pipeline, s.pipeline_sha256 = d["pipeline"], d["pipeline_sha256"]
    s.steps = {name: s.steps.get(name) or StepState(name) for name in d["steps"]}
    s.active = list(d["active"])


def _waited(step: StepState, at: datetime) -> dict[str, float] | None:
    """How long a waiting step waited, up to `at`."""
    if step.state != WAITING or step.started_at is None:
        return None
    return {"waiting": round(max(0.0, (at - step.started_at).total_seconds()), 3)}


def _ran(step: StepState, d: dict[str, Any]) -> None:
    """The worker's own times of the attempt (a result's `ran`): queued and running."""
    ran = d.get("ran")
    if not ran or step.started_at is None:
        return
    if not ran.get("started_at") or not ran.get("finished_at"):
        return
    began = datetime.fromisoformat(ran["started_at"])
    ended = datetime.fromisoformat(ran["finished_at"])
    # clocks of two machines: a worker whose clock runs behind shows no queueing, not less
    step.timing = {**(step.timing or {}),
                   "queued": round(max(0.0, (began - step.started_at).total_seconds()), 3),
                   "running": round(max(0.0, (ended - began).total_seconds()), 3)}


def _started(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    step.timing = _waited(step, at)  # a step that waited for its lock; else a new attempt
    step.state, step.attempts, step.error = RUNNING, d["attempt"], None
    step.started_at, step.finished_at = at, None
    s.machine_state, s.step = m.RUNNING, d["step"]


def _waiting(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    step.state, step.attempts, step.error = WAITING, d["attempt"], None
    step.started_at, step.finished_at = at, None
    s.machine_state, s.step = m.RUNNING, d["step"]


def _approved(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    step.timing = _waited(step, at)
    step.state, step.finished_at = SUCCEEDED, at
    step.outputs = {"approved_by": d["actor"], "reason": d.get("reason")}


def _rejected(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    reason = f": {d['reason']}" if d.get("reason") else ""
    step.timing = _waited(step, at)
    step.state, step.finished_at = FAILED, at
    step.error = {"message": f"rejected by {d['actor']}{reason}", "kind": "rejected",
                  "retryable": False, "actor": d["actor"]}


def _succeeded(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    _ran(step, d)
    step.state, step.outputs, step.finished_at = SUCCEEDED, d.get("outputs") or {}, at


def _failed(s: RunState, d: dict[str, Any], at: datetime) -> None:
    # A stopped attempt (fail_fast, an operator's cancel) is recorded as the worker reports
    # one: a failure of kind `cancelled`; the step is then cancelled, not failed.
    step = s.steps[d["step"]]
    error = d.get("error")
    stopped = isinstance(error, dict) and error.get("kind") == "cancelled"
    _ran(step, d)
    step.state, step.error, step.finished_at = CANCELLED if stopped else FAILED, error, at


def _timed_out(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    step.state, step.error, step.finished_at = TIMED_OUT, d.get("error"), at


def _retry_scheduled(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.steps[d["step"]].state = RETRYING


def _skipped(s: RunState, d: dict[str, Any], at: datetime) -> None:
    step = s.steps[d["step"]]
    _ran(step, d)
    step.state = SKIPPED
    if step.started_at is not None and step.finished_at is None:  # its handler skipped it
        step.finished_at = at
        step.outputs = {**(d.get("outputs") or {}), "skipped_reason": d.get("reason")}


def _run_succeeded(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.machine_state, s.step = m.SUCCEEDED, None


def _run_failed(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.machine_state, s.step = m.FAILED, d.get("step")


def _cancelled(s: RunState, d: dict[str, Any], at: datetime) -> None:
    # Runs recorded before step graphs stopped their running step with this event alone.
    for step in s.steps.values():
        if step.state in LIVE:
            step.state, step.finished_at = CANCELLED, at
    s.machine_state, s.step = m.CANCELLED, d.get("step") or s.step


def _retried(s: RunState, d: dict[str, Any], at: datetime) -> None:
    # The steps it names start over; the others keep their states and outputs. (Before step
    # graphs, it named none: the steps from the retried one on, but for skipped ones.)
    names = d.get("steps")
    if names is None:
        listed = list(s.steps)
        start = listed.index(d["from_step"]) if d["from_step"] in listed else len(listed)
        names = [name for name in listed[start:] if s.steps[name].state != SKIPPED]
    for name in names:
        step = s.steps[name]
        step.state, step.outputs, step.error = PENDING, {}, None
        step.started_at = step.finished_at = None
    s.machine_state, s.step = m.RUNNING, None


def _claim_requested(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.holds[d["resource"]] = {"claim": d["claim"], "state": HOLD_WAITING, "n": d["n"]}


def _claim_changed(state: str) -> Callable[[RunState, dict[str, Any], datetime], None]:
    def change(s: RunState, d: dict[str, Any], at: datetime) -> None:
        hold = s.holds.get(d["resource"])
        if hold is not None and hold["claim"] == d["claim"]:
            s.holds[d["resource"]] = {**hold, "state": state}  # a new dict: copies share them
    return change


def _notice_sent(s: RunState, d: dict[str, Any], at: datetime) -> None:
    s.notices[d["key"]] = {"notice": d["notice"], "kind": d["kind"], "state": d.get("state"),
                           "description": d.get("description"), "level": d["level"],
                           "delivery": "sent", "reason": None}


def _notice_result(delivery: str) -> Callable[[RunState, dict[str, Any], datetime], None]:
    def change(s: RunState, d: dict[str, Any], at: datetime) -> None:
        known = s.notices.get(d.get("key") or "")
        if known is not None and known["notice"] == d["notice"]:
            now = "retrying" if delivery == "failed" and d.get("retrying") else delivery
            s.notices[d["key"]] = {**known, "delivery": now, "reason": d.get("reason")}
    return change


_APPLY: dict[str, Any] = {
    E.NOTICE_SENT: _notice_sent,
    E.NOTICE_DELIVERED: _notice_result("delivered"),
    E.NOTICE_FAILED: _notice_result("failed"),
    E.NOTICE_SUPERSEDED: _notice_result("superseded"),
    E.CLAIM_REQUESTED: _claim_requested,
    E.CLAIM_GRANTED: _claim_changed(HOLD_HELD),
    E.CLAIM_RELEASED: _claim_changed(HOLD_RELEASED),
    E.RUN_REQUESTED: _requested,
    E.RUN_PIPELINE_PINNED: _pinned,
    E.STEP_STARTED: _started,
    E.STEP_WAITING: _waiting,
    E.STEP_APPROVED: _approved,
    E.STEP_REJECTED: _rejected,
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


@dataclass
class Decision:
    events: list[NewEvent] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)
    ignored: str | None = None  # why nothing was recorded (a duplicate, a stale timer)
    pinned: Decider | None = None  # the decider of the pipeline this decision pinned


class Rejected(Exception):
    """The message asks for something the run's state does not allow."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def ignore_reason(push: Push, pipeline: Pipeline) -> str | None:
    """Why a push opens no run, or None when it opens one."""
    if push.is_deletion:
        return "branch deletion"
    branch = push.target_branch
    if branch is None:
        return f"{push.ref} is not a branch (tag pushes open no run)"
    if not pipeline.accepts_branch(branch):
        what = "pull request's base branch" if push.pr is not None else "branch"
        return f"{what} {branch!r} is outside the pipeline's branch filter"
    return None


AttemptTokens = Callable[[uuid.UUID, str, int], str]
HANDLER_QUEUE_MARK = "@"  # step.@script: any step that uses script (never a step's name)


class Decider:
    """Decisions for the runs of one pipeline.

    `tokens` gives each attempt's token (adapters.rabbitmq.signing.Signer.attempt_token: keyed, so
    deterministic yet unguessable): a command carries it, `step.started` records it, and a
    result is accepted only with the token of the attempt it answers. Without `tokens`
    (pure tests of the rules) attempts have none and results are not asked for one.

    The machines and each step's upstream steps are worked out here, once per pipeline.
    `known_handlers` are those a repository's own pipeline may use, with what each reads
    (its file is parsed here, when the step that read it succeeds).
    """

    def __init__(self, pipeline: Pipeline, tokens: AttemptTokens | None = None,
                 known_handlers: Iterable[str] | p.HandlerInputs = (),
                 served: frozenset[tuple[str, str]] | None = None,
                 notices: nt.NoticePolicy = nt.QUIET) -> None:
        self.pipeline = pipeline
        self.notices = notices  # what the deployment tells git hosts and receivers
        self.graph = pipeline.graph
        self.machine = m.RunMachine(pipeline)
        self.step_machine = m.StepMachine(pipeline)
        self.tokens = tokens
        self.known_handlers = p.declared_inputs(known_handlers)
        # (step, uses) pairs the deployment's workers serve by step name; None: all
        self.served = served
        self.upstream = {name: tuple(step_graph.upstream(self.graph, name))
                         for name in self.graph.names}

    def token(self, run_id: uuid.UUID, step: str, attempt: int) -> str:
        return self.tokens(run_id, step, attempt) if self.tokens else ""

    def command_key(self, step: p.Step) -> str:
        """Where a step's command goes: a step of the deployment's pipelines to the queue of
        its name (workers serve those, and may serve some alone: `--step`); any other (a
        repository's own, or one that only an older pinned pipeline has) to the queue of
        its handler, `step.@<uses>`, which every worker of that handler serves."""
        by_handler = (self.pipeline.origin == "repo" or step.uses == p.REPO_PIPELINE_HANDLER
                      or (self.served is not None
                          and (step.name, step.uses) not in self.served))
        if by_handler:
            return f"step.{HANDLER_QUEUE_MARK}{step.uses}.run"
        return f"step.{step.name}.run"

    def decide(
        self,
        state: RunState,
        message: Push | StepResult | Control | NoticeResult,
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
        elif isinstance(message, NoticeResult):
            if actor != "system":
                raise Rejected(f"notice results are the notifier's; {actor} may not send one")
            build.notice_result(message)
        elif message.action in INTERNAL_ACTIONS and actor != "system":
            raise Rejected(f"{message.action!r} is cistate's own message (a timer or a "
                           f"resource's answer); {actor} may not send it")
        else:
            _ON_CONTROL[message.action](build, message)
        if not build.decision.ignored:
            build.let_go()
            build.notify()
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
    """Builds one decision. Each event is applied at once to a working copy of the run
    (`run`), so that the graph's questions see what the decision has done so far; the state
    the decision was asked about is left as it was."""

    def __init__(
        self, decider: Decider, state: RunState, message_id: uuid.UUID, now: datetime, actor: str
    ) -> None:
        self.decider = decider
        self.pipeline = decider.pipeline
        self.graph = decider.graph
        self.given = state
        self.run = state.working_copy()
        self.message_id = message_id
        self.now = now
        self.actor = actor
        self.decision = Decision()
        self.run_state = state.machine_status  # the run machine's, as this decision leads it
        self.cancel_reason: str | None = None
        self.meta = _meta(message_id, state.id, actor)  # every event's, before its own

    # -- helpers

    def event(self, type_: E, data: dict[str, Any], **meta: Any) -> None:
        self.decision.events.append(NewEvent(type_, data, {**self.meta, **meta}))
        apply(self.run, type_, data, self.now)

    def fire(self, trigger: str, situation: m.Situation | None = None) -> str:
        """The run machine's answer to `trigger`; Rejected when it may not fire."""
        try:
            self.run_state = self.decider.machine.next_state(self.run_state, trigger, situation)
        except m.IllegalTransition as exc:
            raise Rejected(str(exc)) from None
        return self.run_state

    def step_to(self, name: str, trigger: str, situation: m.Situation | None = None) -> str:
        """The step machine's answer to `trigger` for step `name`; Rejected when it may not."""
        try:
            return self.decider.step_machine.next_state(
                self.run.steps[name].state, trigger, situation, what=f"step {name!r}")
        except m.IllegalTransition as exc:
            raise Rejected(str(exc)) from None

    def states(self) -> dict[str, str]:
        """Every step of the graph's state; a step the run does not list (the pipeline
        changed since it started) stands for its own needs, as a skipped one does."""
        return {name: self.run.steps[name].state if name in self.run.steps else SKIPPED
                for name in self.graph.names}

    def out(self, key: str, body: BaseModel, message_id: uuid.UUID, delay: float = 0) -> None:
        not_before = self.now + timedelta(seconds=delay) if delay else None
        self.decision.outgoing.append(Outgoing(key, body, message_id, not_before))

    def running_attempt(self, step: str, attempt: int) -> bool:
        current = self.run.steps.get(step)
        return (self.run_state == m.RUNNING and current is not None
                and current.state == RUNNING and current.attempts == attempt)

    # -- what a step does

    def start(self, name: str, attempt: int) -> None:
        """Start an attempt: step.started, its command, and its timeout timer."""
        spec = self.pipeline.step(name)
        if spec.is_approval:
            self.wait_for_approval(name, attempt)
            return
        if spec.lock is not None and self.run.hold_state(res.lock_resource(spec.lock)) != HOLD_HELD:
            self.wait_for_lock(name, attempt)
            return
        self.step_to(name, m.START)
        token = self.decider.token(self.run.id, name, attempt)
        started: dict[str, Any] = {"step": name, "attempt": attempt}
        if token:
            started["token"] = token
        env = dict(spec.env)
        if self.pipeline.is_finally(name):
            env[OUTCOME_VARIABLE] = self.outcome_so_far()
        self.event(E.STEP_STARTED, started, attempt=attempt)
        # Built from what was validated already (the pinned pipeline, the stored run and
        # outputs), so not validated again here: the worker validates it at its door.
        command = StepCommand.model_construct(
            run_id=self.run.id, step=name, attempt=attempt, uses=spec.uses, token=token,
            settings=spec.with_, script=spec.run, timeout=spec.timeout,
            deadline=self.now + timedelta(seconds=spec.timeout) if spec.timeout else None,
            repo=self.run.repo, ref=self.run.ref, commit=self.run.commit,
            inputs=self.run.outputs_of(self.decider.upstream.get(name, ())),
            sources=dict(spec.inputs) if spec.inputs is not None else None,
            # a fork's pull request runs code nobody trusted with the deployment's secrets
            env=env, secrets=[] if self.run.from_fork else spec.secrets,
            network=spec.network,
            origin=self.pipeline.origin,
            untrusted=self.run.from_fork,
        )
        self.out(self.decider.command_key(spec), command,
                 derived_id(self.run.id, "run", name, attempt))
        if spec.timeout:
            timer = Control(run_id=self.run.id, action="timeout", step=name, attempt=attempt)
            self.out("control", timer, derived_id(self.run.id, "timeout", name, attempt),
                     delay=spec.timeout)

    def wait_for_approval(self, name: str, attempt: int) -> None:
        """An approval step holds the run for a person: an event and a timer, no command;
        the run costs a row while it waits, not a worker or a task."""
        spec = self.pipeline.step(name)
        self.step_to(name, m.WAIT)
        seconds = spec.wait_seconds
        self.event(E.STEP_WAITING, {"step": name, "attempt": attempt,
                                    "approvers": list(spec.approvers),
                                    "timeout": seconds}, attempt=attempt)
        if seconds:
            timer = Control(run_id=self.run.id, action="timeout", step=name, attempt=attempt)
            self.out("control", timer, derived_id(self.run.id, "timeout", name, attempt),
                     delay=seconds)

    def wait_for_lock(self, name: str, attempt: int) -> None:
        """A step whose lock another run holds waits for it: the run asks the lock (once for
        all its steps that name it), and a timer fails the step if it waits too long."""
        spec = self.pipeline.step(name)
        assert spec.lock is not None
        resource = res.lock_resource(spec.lock)
        self.step_to(name, m.WAIT)
        if self.run.hold_state(resource) != HOLD_WAITING:
            self.claim(resource, name)
        self.event(E.STEP_WAITING, {"step": name, "attempt": attempt, "lock": spec.lock,
                                    "timeout": spec.lock_timeout}, attempt=attempt)
        if spec.lock_timeout:
            timer = Control(run_id=self.run.id, action="lock_timeout", step=name,
                            attempt=attempt)
            self.out("control", timer, derived_id(self.run.id, "lock_timeout", name, attempt),
                     delay=spec.lock_timeout)

    def stop(self, name: str, message: str, reason: str | None = None) -> None:
        """Stop a live step: the worker running it is told, and its end is recorded as the
        worker would report it (a failure of kind `cancelled`), now, without waiting."""
        step = self.run.steps[name]
        was = step.state
        self.step_to(name, m.CANCEL)
        if was == RUNNING:  # a step waiting for its retry has no worker to tell
            self.cancel_worker(name, step.attempts)
        error: dict[str, Any] = {"message": message, "kind": "cancelled", "retryable": False}
        if reason:
            error["reason"] = reason
        self.event(E.STEP_FAILED, {"step": name, "attempt": step.attempts, "error": error},
                   attempt=step.attempts)

    def skip(self, name: str, reason: str) -> None:
        self.step_to(name, m.SKIP)
        self.event(E.STEP_SKIPPED, {"step": name, "attempt": self.run.steps[name].attempts,
                                    "reason": reason})

    def cancel_worker(self, step: str, attempt: int) -> None:
        body = CancelStep(run_id=self.run.id, step=step, attempt=attempt)
        self.out("cancel", body, derived_id(self.run.id, "cancel", step, attempt,
                                            self.message_id))

    def outcome_so_far(self) -> str:
        """How the run goes, from the steps that have ended (a finally step's view)."""
        ended = [state for state in self.states().values() if state in step_graph.ENDED]
        if any(state in step_graph.FAILURES for state in ended):
            return m.FAILED
        return m.CANCELLED if CANCELLED in ended else m.SUCCEEDED

    # -- concurrency groups and locks: claims on resources (cistate.domain.resource)

    def claim(self, resource: str, step: str | None, supersede: bool = False) -> None:
        """Ask `resource` for a turn: claim.requested, and the request to the resource."""
        hold = self.run.holds.get(resource)
        n = hold["n"] + 1 if hold else 1
        claim = derived_id(self.run.id, "claim", resource, n)
        data: dict[str, Any] = {"resource": resource, "claim": str(claim), "n": n}
        if step is not None:
            data["step"] = step
        if supersede:
            data["supersede"] = True
        self.event(E.CLAIM_REQUESTED, data)
        request = ClaimRequest(resource=resource, action="acquire", run_id=self.run.id,
                               claim=claim, step=step, supersede=supersede,
                               requested_at=self.run.created_at)
        self.out("claim", request, derived_id(claim, "acquire"))

    def lock_of(self, name: str) -> str | None:
        if name not in self.graph.needs:
            return None
        lock = self.pipeline.step(name).lock
        return res.lock_resource(lock) if lock is not None else None

    def let_go(self) -> None:
        """Hand back what the run no longer needs, whatever ended its need (a result, a
        cancel, a timeout, a lock wait timing out, the run ending): a lock once no step
        naming it is live, a concurrency group once the run has ended. A claim still
        waiting is withdrawn the same way. Each claim is let go once (claim.released)."""
        ended = self.run.machine_state in TERMINAL
        for resource, hold in list(self.run.holds.items()):
            if hold["state"] == HOLD_RELEASED or res.kind_of(resource) == res.TRUST:
                continue  # (the trust gate is the run's own: nobody to hand it back to)
            if not ended and (res.kind_of(resource) == res.GROUP
                              or self.lock_needed(resource)):
                continue
            claim = uuid.UUID(hold["claim"])
            self.event(E.CLAIM_RELEASED, {"resource": resource, "claim": hold["claim"],
                                          "was": hold["state"]})
            request = ClaimRequest(resource=resource, action="release", run_id=self.run.id,
                                   claim=claim)
            self.out("claim", request, derived_id(claim, "release"))

    def lock_needed(self, resource: str) -> bool:
        return any(step.state in LIVE and self.lock_of(name) == resource
                   for name, step in self.run.steps.items())

    def granted(self, control: Control) -> None:
        """The group or lock the run waited for is its turn now: its steps go on."""
        resource, claim = control.resource, control.claim
        hold = self.run.holds.get(resource) if resource else None
        if (resource is not None and claim is not None and hold is not None
                and self.let_go_before(resource, claim, hold)):
            # its release reached the resource before its request did (two relays or
            # orchestrators) and changed nothing there: hand it back again, or nobody else
            # ever gets a turn
            self.event(E.CLAIM_RELEASED, {"resource": resource, "claim": str(claim),
                                          "was": "granted late"})
            request = ClaimRequest(resource=resource, action="release", run_id=self.run.id,
                                   claim=claim)
            self.out("claim", request, derived_id(claim, "release", self.message_id))
            return
        if (resource is None or claim is None or hold is None
                or hold["claim"] != str(claim) or hold["state"] != HOLD_WAITING):
            self.decision.ignored = ("stale grant: the run no longer waits for that claim "
                                     "(it let go of it, or was granted it before)")
            return
        self.event(E.CLAIM_GRANTED, {"resource": resource, "claim": str(claim)})
        if self.run.machine_state in TERMINAL:
            return  # let_go hands it straight back
        if res.kind_of(resource) == res.GROUP:
            if self.run_state == m.QUEUED:
                self.fire(m.START)
            self.advance()
            return
        for name in self.graph.names:
            step = self.run.steps.get(name)
            if step is not None and step.state == WAITING and self.lock_of(name) == resource:
                self.start(name, step.attempts)
        self.advance()

    def let_go_before(self, resource: str, claim: uuid.UUID, hold: dict[str, Any]) -> bool:
        """`claim` is one of the run's claims on `resource` that it has let go: its latest
        one, released, or an older one (a claim is replaced only once released)."""
        if hold["claim"] == str(claim):
            return bool(hold["state"] == HOLD_RELEASED)
        return any(claim == derived_id(self.run.id, "claim", resource, n)
                   for n in range(1, hold["n"]))

    def superseded(self, control: Control) -> None:
        """A newer run of the group (cancel_in_progress) takes this one's place."""
        hold = self.run.holds.get(control.resource) if control.resource else None
        if hold is None or control.claim is None or hold["claim"] != str(control.claim):
            self.decision.ignored = "stale supersede: it names an older claim of the run"
            return
        if self.run.machine_state in TERMINAL:
            self.decision.ignored = "superseded after the run had ended"
            return
        self.cancel(Control(run_id=self.run.id, action="cancel",
                            reason=control.reason or "superseded"))

    def ok_to_test(self, control: Control) -> None:
        """A trusted person lets a fork's pull request run (`/ok-to-test`; the webhook
        checked who they are, and they are the actor)."""
        hold = self.run.holds.get(res.TRUST_GATE)
        if hold is None or hold["state"] != HOLD_WAITING:
            raise Rejected("the run does not wait for /ok-to-test (only a fork's pull request "
                           "does, until it is let run)")
        self.event(E.CLAIM_GRANTED, {"resource": res.TRUST_GATE, "claim": hold["claim"],
                                     "actor": self.actor})
        if self.run_state == m.QUEUED:
            self.fire(m.START)
        self.advance()

    def lock_timeout(self, timer: Control) -> None:
        if timer.step is None or timer.attempt is None:
            raise Rejected(f"a {timer.action} timer must name its step and attempt")
        step = self.run.steps.get(timer.step)
        lock = self.lock_of(timer.step)
        if (step is None or lock is None or step.state != WAITING
                or step.attempts != timer.attempt or self.run_state != m.RUNNING):
            self.decision.ignored = "stale lock timer: the step got its lock, or ended"
            return
        spec = self.pipeline.step(timer.step)
        error = {"message": f"step {timer.step!r} waited {spec.lock_timeout:g}s for lock "
                            f"{spec.lock!r} (lock_timeout) and another run still holds it",
                 "kind": "lock_timeout", "retryable": False}
        self.after_failure(timer.step, timer.attempt, E.STEP_TIMED_OUT, error, "lock_timeout")

    # -- what the outside is told (cistate.domain.notices)

    def notify(self) -> None:
        """Commit statuses and notifications for what this decision changed: the run's
        status when it starts, ends or starts again (and each step's, per_step), a
        notification when the run ends or an approval starts waiting."""
        policy = self.decider.notices
        if not policy.any or not self.decision.events or not self.run.exists:
            return
        if policy.statuses:
            self.status_notices(policy.per_step)
        if policy.webhooks:
            self.receiver_notices()

    def run_context(self) -> str:
        """The run's status context: `cistate/<pipeline>`, named by the pipeline the run
        started with (a repository's own pipeline, pinned later, keeps it)."""
        for key, known in self.run.notices.items():
            if known["kind"] == "status" and known["level"] == "run":
                return key
        return f"cistate/{self.run.pipeline}"

    def status_notices(self, per_step: bool) -> None:
        run = self.run
        context = self.run_context()
        state = nt.run_status(run.machine_state)
        known = run.notices.get(context)
        if known is None or known["state"] != state:
            failed = run.step if state in ("failure", "error") else None
            error = (run.steps[failed].error or {}) if failed in run.steps else {}
            group = run.waiting_gate()
            description = nt.describe(state, failed, error.get("message"),
                                      group.partition(":")[2] if group else None)
            self.send_notice("status", context, "run", state=state, description=description)
        if not per_step:
            return
        for name, step in run.steps.items():
            step_state = nt.step_status(step.state)
            key = f"{context}/{name}"
            known = run.notices.get(key)
            if step_state is None or (known is not None and known["state"] == step_state):
                continue
            if known is None and step.state == SKIPPED and step.started_at is None:
                continue  # a step the run never started gets no status of its own
            message = (step.error or {}).get("message") if step.error else None
            self.send_notice("status", key, "step", state=step_state, step=name,
                             description=nt.describe(step_state, name, message))

    def receiver_notices(self) -> None:
        run, given = self.run, self.given
        if run.machine_state in TERMINAL and given.machine_state != run.machine_state:
            self.send_notice("run.ended", "run.ended", "run", run_state=run.machine_state,
                             description=f"run {run.machine_state}"
                                         + (f" at {run.step}" if run.step else ""))
        for name, step in run.steps.items():
            before = given.steps.get(name)
            if (step.state == WAITING and (before is None or before.state != WAITING)
                    and name in self.graph.needs and self.pipeline.step(name).is_approval):
                spec = self.pipeline.step(name)
                self.send_notice("approval.requested", f"approval:{name}", "step", step=name,
                                 approvers=list(spec.approvers),
                                 description=f"step {name!r} waits for approval")

    def send_notice(self, kind: NoticeKind, key: str, level: str, *,
                    state: nt.StatusState | None = None,
                    step: str | None = None, description: str = "",
                    run_state: str | None = None, approvers: list[str] | None = None) -> None:
        run = self.run
        seq = run.version + 1  # the seq notice.sent gets: the run's order of its notices
        notice_id = derived_id(run.id, "notice", key, seq)
        self.event(E.NOTICE_SENT, {"key": key, "kind": kind, "level": level, "state": state,
                                   "description": description, "notice": str(notice_id)})
        assert run.created_at is not None
        body = Notice(run_id=run.id, kind=kind, repo=run.repo,
                      commit=run.commit, provider=run.push.get("provider"),
                      pipeline=run.pipeline, order_at=run.created_at, seq=seq,
                      context=key if kind == "status" else None,
                      state=state,
                      description=description, step=step,
                      run_state=run_state or run.status, approvers=approvers or [])
        self.out("notice", body, notice_id)

    def notice_result(self, result: NoticeResult) -> None:
        """The notifier's report on a notice: an event each (every delivery and failure
        is part of the run's history)."""
        key = next((key for key, known in self.run.notices.items()
                    if known["notice"] == str(result.notice)), None)
        type_ = {"delivered": E.NOTICE_DELIVERED, "failed": E.NOTICE_FAILED,
                 "superseded": E.NOTICE_SUPERSEDED}[result.outcome]
        self.event(type_, {"notice": str(result.notice), "key": key, "kind": result.kind,
                           "target": result.target, "attempt": result.attempt,
                           "retrying": result.retrying, "http_status": result.http_status,
                           "reason": result.reason, "state": result.state})

    # -- what follows from the graph

    def advance(self) -> None:
        """Stop, skip and start what the graph says, until it says nothing more; then end
        the run if every step has ended. Nothing starts while the run waits its turn in its
        concurrency group."""
        if self.run.waiting_gate() is not None:
            return
        graph, fail_fast = self.graph, self.pipeline.fail_fast
        while True:
            states = self.states()
            moves = step_graph.moves(graph, states, fail_fast)
            if moves.stopping:
                failed = moves.first_failure
                for name in moves.stopping:
                    self.stop(name, f"cancelled: step {failed!r} failed and the pipeline "
                                    "fails fast (fail_fast: true)")
                continue
            if moves.blocked:
                for name, cause in moves.blocked:
                    self.skip(name, self.blocked_reason(name, cause, states[cause]))
                continue
            if not moves.starting:
                break
            for name in moves.starting:
                self.start(name, self.run.steps[name].attempts + 1)
        if moves.outcome is not None:  # of the states nothing more was done to
            self.finish(moves.outcome)

    def blocked_reason(self, name: str, cause: str, state: str) -> str:
        how = {FAILED: "failed", TIMED_OUT: "timed out", CANCELLED: "was cancelled"}.get(
            state, state)
        if cause in self.decider.upstream.get(name, ()):
            return f"it needs {cause!r}, which {how}"
        return f"step {cause!r} {how} and the pipeline fails fast (fail_fast: true)"

    def finish(self, outcome: step_graph.Outcome) -> None:
        self.fire(m.FINISH, m.Situation(outcome=outcome.value))
        if outcome is step_graph.Outcome.SUCCEEDED:
            self.event(E.RUN_SUCCEEDED, {})
        elif outcome is step_graph.Outcome.FAILED:
            name = self.first_ended(step_graph.FAILURES)
            step = self.run.steps[name]
            self.event(E.RUN_FAILED, {"step": name, "attempt": step.attempts,
                                      "reason": self.failure_reason(name)})
        else:
            name = self.first_ended(frozenset({step_graph.StepStatus.CANCELLED}))
            error = self.run.steps[name].error or {}
            reason = self.cancel_reason or error.get("reason")
            self.event(E.RUN_CANCELLED, {"step": name, "reason": reason})

    def first_ended(self, states: frozenset[step_graph.StepStatus]) -> str:
        """The step the run ended in: of the main steps (else the finally steps) in one of
        `states`, the one that ended first (file order between equal times)."""
        for names in (self.graph.steps, self.graph.finally_steps):
            found = [(index, self.run.steps[name]) for index, name in enumerate(names)
                     if name in self.run.steps and self.run.steps[name].state in states]
            if found:
                earliest = min(found, key=lambda item: (
                    item[1].finished_at or self.now, item[0]))
                return earliest[1].name
        raise AssertionError(f"no step is {sorted(states)}")  # outcome() said one is

    def failure_reason(self, name: str) -> str:
        spec = self.pipeline.step(name)
        step = self.run.steps[name]
        error = step.error or {}
        kind = str(error.get("kind", "error"))
        if not error.get("retryable", True):
            why = "not retryable"
        elif kind not in spec.retry_on:
            why = f"retry_on does not include {kind}"
        else:
            why = f"attempt {step.attempts} of {spec.max_attempts}"
        return f"step {name!r} {kind}: {error.get('message', '')} ({why})"

    # -- messages

    def push(self, push: Push) -> None:
        if self.given.exists:
            self.decision.ignored = "duplicate push: this delivery already opened its run"
            return
        pipeline = self.pipeline
        branch, is_pr = push.target_branch, push.pr is not None
        active = [s.name for s in pipeline.steps if s.runs_on(branch, is_pr)]
        self.event(E.RUN_REQUESTED, {
            "repo": push.repo, "ref": push.ref, "commit": push.commit,
            **pipeline.pinned(), "steps": list(pipeline.step_names), "active": active,
            "push": push.model_dump(mode="json", exclude_none=True),
        })
        if push.pr is not None and push.pr.fork:
            # code from another repository: it waits until a trusted person says /ok-to-test
            self.event(E.CLAIM_REQUESTED, {"resource": res.TRUST_GATE, "n": 1,
                                           "claim": str(derived_id(self.run.id, "trust"))})
        concurrency = pipeline.concurrency
        if concurrency is not None:  # it starts when the group grants it its turn
            group = concurrency.group_for(
                push.repo, f"pull/{push.pr.number}" if push.pr else push.branch, pipeline.name)
            self.claim(res.group_resource(group), None, concurrency.cancel_in_progress)
        elif not self.run.holds:
            self.fire(m.START)
        for step in pipeline.steps:
            if step.name not in active:
                self.skip(step.name, step.skip_reason(branch, is_pr))
        self.advance()

    def result(self, result: StepResult) -> None:
        if not self.running_attempt(result.step, result.attempt):
            step = self.run.steps.get(result.step)
            have = f"step {step.state}, attempt {step.attempts}" if step else "no such step"
            raise Rejected(
                f"result for step {result.step!r} attempt {result.attempt} does not match the "
                f"run (run {self.given.status}, {have})"
            )
        expected = self.decider.token(self.run.id, result.step, result.attempt)
        if expected and not hmac.compare_digest(expected, result.token or ""):
            raise Rejected(
                f"result for step {result.step!r} attempt {result.attempt} does not carry the "
                "token of the command it claims to answer"
            )
        if result.status == "succeeded" and self.reads_repo_file(result.step):
            self.repo_pipeline(result)
            return
        ran = _ran_data(result)
        if result.status == "skipped":
            self.step_to(result.step, m.SKIP)
            self.event(E.STEP_SKIPPED, {
                "step": result.step, "attempt": result.attempt, "outputs": result.outputs,
                "reason": result.reason or "its handler found nothing to do", **ran,
            }, attempt=result.attempt)
            self.advance()
            return
        if result.status == "succeeded":
            self.step_to(result.step, m.SUCCEED)
            self.event(E.STEP_SUCCEEDED, {
                "step": result.step, "attempt": result.attempt, "outputs": result.outputs,
                **ran,
            }, attempt=result.attempt)
            self.advance()
            return
        error = (result.error.model_dump() if result.error
                 else {"message": "the handler reported failure without an error"})
        self.after_failure(result.step, result.attempt, E.STEP_FAILED, error,
                           kind=str(error.get("kind", "error")), extra=ran)

    def reads_repo_file(self, name: str) -> bool:
        return (name == p.REPO_PIPELINE_STEP and name in self.graph.needs
                and self.pipeline.step(name).uses == p.REPO_PIPELINE_HANDLER)

    def repo_pipeline(self, result: StepResult) -> None:
        """The built-in step read the repository's pipeline file: parse it (pure), pin it,
        and go on with its steps; a file that does not parse fails the step with its
        error (file, step, field). No file: the deployment's pipeline goes on."""
        name, attempt, outputs = result.step, result.attempt, result.outputs
        if not outputs.get("found"):
            self.step_to(name, m.SUCCEED)
            self.event(E.STEP_SUCCEEDED, {"step": name, "attempt": attempt,
                                          "outputs": outputs}, attempt=attempt)
            self.advance()
            return
        path = str(outputs.get("path") or p.REPO_PIPELINE_FILE)
        source = f"{path} at {self.run.commit[:12]}"
        try:
            pipeline = p.parse_repo_file(str(outputs.get("text", "")), source,
                                         self.decider.known_handlers)
        except p.PipelineError as exc:
            error = {"message": str(exc), "kind": "pipeline", "retryable": False}
            self.after_failure(name, attempt, E.STEP_FAILED, error, kind="pipeline")
            return
        self.step_to(name, m.SUCCEED)
        kept = {key: value for key, value in outputs.items() if key != "text"}
        self.event(E.STEP_SUCCEEDED, {"step": name, "attempt": attempt, "outputs": {
            **kept, "pipeline_sha256": pipeline.sha256}}, attempt=attempt)
        pushed = Push.model_validate(self.run.push)
        branch, is_pr = pushed.target_branch, pushed.pr is not None
        active = ([s.name for s in pipeline.steps if s.runs_on(branch, is_pr)]
                  if branch is not None and pipeline.accepts_branch(branch) else [name])
        self.event(E.RUN_PIPELINE_PINNED, {**pipeline.pinned(),
                                           "steps": list(pipeline.step_names),
                                           "active": active})
        decider = Decider(pipeline, self.decider.tokens, self.decider.known_handlers,
                          self.decider.served, self.decider.notices)
        self.decider, self.pipeline, self.graph = decider, pipeline, pipeline.graph
        self.decision.pinned = decider
        for step in pipeline.steps:
            if step.name not in active:
                reason = (step.skip_reason(branch, is_pr) if branch is not None
                          and pipeline.accepts_branch(branch)
                          else f"branch {branch!r} is outside {path}'s branch filter")
                self.skip(step.name, reason)
        self.advance()

    def decide_approval(self, control: Control) -> None:
        """A person approves or rejects an approval step that waits for them; who they are
        is the message's signed sender (`api:<token name>`, `cli:<user>`)."""
        name = control.step
        step = self.run.steps.get(name) if name else None
        if name is None or step is None or name not in self.graph.needs:
            raise Rejected(f"cannot {control.action} step {name!r}: the run has no such step")
        spec = self.pipeline.step(name)
        if not spec.is_approval:
            raise Rejected(f"cannot {control.action} step {name!r}: it is not an approval "
                           f"step (uses: {spec.uses})")
        if step.state != WAITING or self.run_state != m.RUNNING:
            raise Rejected(f"cannot {control.action} step {name!r}: it is {step.state}, not "
                           "waiting for approval")
        who = self.actor.split(":", 1)[-1]
        if spec.approvers and who not in spec.approvers:
            raise Rejected(f"{self.actor} may not {control.action} step {name!r}: its "
                           f"approvers are {', '.join(spec.approvers)}")
        data = {"step": name, "attempt": step.attempts, "actor": self.actor,
                "reason": control.reason}
        if control.action == "approve":
            self.step_to(name, m.APPROVE)
            self.event(E.STEP_APPROVED, data, attempt=step.attempts)
        else:
            self.step_to(name, m.REJECT)
            self.event(E.STEP_REJECTED, data, attempt=step.attempts)
        self.advance()

    def timeout(self, timer: Control) -> None:
        if timer.step is None or timer.attempt is None:
            raise Rejected(f"a {timer.action} timer must name its step and attempt")
        waiting = self.run.steps.get(timer.step)
        if (waiting is not None and waiting.state == WAITING
                and waiting.attempts == timer.attempt and self.run_state == m.RUNNING
                and timer.step in self.graph.needs
                and self.pipeline.step(timer.step).is_approval):
            spec = self.pipeline.step(timer.step)
            error = {"message": f"step {timer.step!r} was neither approved nor rejected "
                                f"within {spec.wait_seconds:g}s", "kind": "timeout",
                     "retryable": False}
            self.after_failure(timer.step, timer.attempt, E.STEP_TIMED_OUT, error, "timeout")
            return
        if not self.running_attempt(timer.step, timer.attempt):
            self.decision.ignored = "stale timeout: that attempt already ended"
            return
        spec = self.pipeline.step(timer.step)
        error = {"message": f"step {timer.step!r} did not finish within {spec.timeout:g}s",
                 "kind": "timeout", "retryable": True}
        self.cancel_worker(timer.step, timer.attempt)
        self.after_failure(timer.step, timer.attempt, E.STEP_TIMED_OUT, error, "timeout")

    def after_failure(self, step: str, attempt: int, type_: E, error: dict[str, Any],
                      kind: str, extra: dict[str, Any] | None = None) -> None:
        """Record a failed attempt; schedule the next one if the step's policy allows."""
        spec = self.pipeline.step(step)
        retry_left = (
            attempt < spec.max_attempts
            and bool(error.get("retryable", True))
            and kind in spec.retry_on
        )
        if type_ is E.STEP_TIMED_OUT:
            trigger = m.TIME_OUT
        elif kind == "cancelled":  # the worker stopped it without being asked here
            trigger = m.CANCEL
        else:
            trigger = m.FAIL
        dest = self.step_to(step, trigger, m.Situation(retry_left=retry_left))
        self.event(type_, {"step": step, "attempt": attempt, "error": error, **(extra or {})},
                   attempt=attempt)
        if dest == RETRYING:
            # jitter seeded from the attempt: the same decision every time it is made
            seed = str(derived_id(self.run.id, "backoff", step, attempt))
            delay = spec.backoff.delay(attempt, random.Random(seed))  # noqa: S311 (jitter)
            due = self.now + timedelta(seconds=delay)
            self.event(E.STEP_RETRY_SCHEDULED, {
                "step": step, "attempt": attempt + 1, "delay": round(delay, 3),
                "due_at": due.isoformat(),
            }, attempt=attempt + 1)
            timer = Control(run_id=self.run.id, action="retry_due", step=step,
                            attempt=attempt + 1)
            self.out("control", timer, derived_id(self.run.id, "retry_due", step, attempt + 1),
                     delay=delay)
        self.advance()

    def retry_due(self, timer: Control) -> None:
        if timer.step is None or timer.attempt is None:
            raise Rejected(f"a {timer.action} timer must name its step and attempt")
        step = self.run.steps.get(timer.step)
        if (self.run_state != m.RUNNING or step is None or step.state != RETRYING
                or step.attempts + 1 != timer.attempt):
            self.decision.ignored = "stale retry timer: the run moved on"
            return
        self.start(timer.step, timer.attempt)

    def cancel(self, control: Control) -> None:
        """Stop every live step; skip the main steps that have not started (and, when the
        finally steps are already running, those of them that have not); the finally steps
        then run, and the run ends when they have."""
        self.fire(m.CANCEL)
        self.event(E.RUN_CANCEL_REQUESTED, {"reason": control.reason})
        self.cancel_reason = control.reason
        group = self.run.waiting_gate()
        if group is not None:
            # nothing of it has started (its finally steps neither): it ends now
            for name, state in self.states().items():
                if state == PENDING and name in self.run.steps:
                    self.skip(name, f"the run was cancelled while it waited for {group}")
            self.fire(m.FINISH, m.Situation(outcome=m.CANCELLED))
            self.event(E.RUN_CANCELLED, {"step": None, "reason": control.reason})
            return
        states = self.states()
        cleaning_up = all(states[name] in step_graph.ENDED for name in self.graph.steps)
        message = f"cancelled by {self.actor}" + (f": {control.reason}" if control.reason
                                                    else "")
        for name in self.graph.names:
            if states[name] in LIVE:
                self.stop(name, message, control.reason)
        for name in self.graph.names:
            if states[name] == PENDING and name in self.graph.steps:
                self.skip(name, "the run was cancelled")
            elif states[name] == PENDING and cleaning_up:
                self.skip(name, "the run was cancelled while its finally steps ran")
        self.advance()

    def retry(self, control: Control) -> None:
        target = control.step
        if target is not None and (target not in self.run.steps
                                   or target not in self.graph.needs):
            raise Rejected(f"cannot retry from step {target!r}: the pipeline has no such step")
        if target is not None and target not in self.run.active:
            raise Rejected(f"cannot retry from step {target!r}: it is skipped for this run")
        self.fire(m.RETRY)
        targets = [target] if target is not None else self.retry_targets()
        rerun = [name for name in step_graph.downstream(self.graph, *targets)
                 if name in self.run.active and name in self.run.steps]
        states = self.states()
        for target in targets:
            missing = [
                name for name in self.decider.upstream[target]
                if name not in rerun and not (
                    states[name] == SUCCEEDED
                    or (states[name] == SKIPPED and name not in self.run.active))
            ]
            if missing:
                raise Rejected(
                    f"cannot retry from step {target!r}: step(s) it needs, "
                    f"{', '.join(missing)}, did not succeed; retry from the first of them")
        if self.pipeline.fail_fast:
            left = [name for name in self.graph.steps
                    if states[name] in step_graph.FAILURES and name not in rerun]
            if left:
                raise Rejected(
                    f"cannot retry from step {targets[0]!r}: step(s) {', '.join(left)} failed "
                    "and do not follow from it, and the pipeline fails fast, so nothing would "
                    "start; retry without --from to run every failed step again")
        for name in rerun:
            self.step_to(name, m.RESET)
        self.event(E.RUN_RETRIED, {
            "from_step": targets[0], "actor": self.actor, "reason": control.reason,
            "steps": rerun,
        })
        # it waits its turn in its group again; a retry never cancels a newer run
        for resource, hold in list(self.run.holds.items()):
            if res.kind_of(resource) == res.GROUP and hold["state"] == HOLD_RELEASED:
                self.claim(resource, None)
        self.advance()

    def retry_targets(self) -> list[str]:
        """What a retry without --from runs again: the main steps that failed, timed out or
        were cancelled, else such finally steps, else the step the run ended in."""
        states = self.states()
        for names in (self.graph.steps, self.graph.finally_steps):
            found = [name for name in names if states[name] in step_graph.BLOCKING]
            if found:
                return found
        if self.run.step is None or self.run.step not in self.graph.needs:
            raise Rejected("nothing to retry: no step failed or was cancelled; name one")
        return [self.run.step]


# what each control action does to a run (operators' requests, timers, resources' answers)
_ON_CONTROL: dict[str, Callable[[_Builder, Control], None]] = {
    "cancel": _Builder.cancel,
    "retry": _Builder.retry,
    "retry_due": _Builder.retry_due,
    "approve": _Builder.decide_approval,
    "reject": _Builder.decide_approval,
    "timeout": _Builder.timeout,
    "lock_timeout": _Builder.lock_timeout,
    "granted": _Builder.granted,
    "superseded": _Builder.superseded,
    "ok_to_test": _Builder.ok_to_test,
}


def _ran_data(result: StepResult) -> dict[str, Any]:
    """A result's event data on when the worker ran the attempt (its own clock)."""
    if result.started_at is None or result.finished_at is None:
        return {}
    return {"ran": {"started_at": result.started_at.isoformat(),
                    "finished_at": result.finished_at.isoformat(), "worker": result.worker}}

