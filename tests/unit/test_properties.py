"""Property: whatever messages arrive, in whatever order, a run stays consistent.

Random sequences of pushes, results (for random or the running step/attempt), cancels,
retries, timeouts and retry timers go through decide exactly as the orchestrator sends them
(Rejected -> Decider.rejection, ignored -> nothing recorded), and after every message the
run's invariants hold and folding the stored events gives the same state.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cistate import run as r
from cistate.messages import Control, Push, StepCommand, StepError, StepResult
from cistate.pipeline import parse

from ._support import Harness, push

pytestmark = pytest.mark.unit

SMALL = parse(
    """
name: small
steps:
  - name: fetch
    uses: noop
    retries: 1
    timeout: 10s
  - name: check
    uses: script
    run: "npm test"
    retries: 2
    retry_on: [error]
    backoff: {initial: 1s, factor: 3, max: 5s, jitter: 0}
  - name: ship
    uses: noop
    retries: 1
    timeout: 1m
    when: {branches: [main]}
""",
    "small.yaml",
    {"noop", "script"},
)
NAMES = list(SMALL.step_names)
DECIDER = r.Decider(SMALL)
RUN_STATUSES = {"queued", "running", "succeeded", "failed", "cancelled"}
STEP_STATES = {r.PENDING, r.RUNNING, r.SUCCEEDED, r.FAILED, r.RETRYING, r.TIMED_OUT,
               r.SKIPPED, r.CANCELLED}

# A message is drawn as a plan; `None` for step/attempt means "the run's current one" and is
# resolved against the state when it is sent, so that sequences make progress often.
step_choice = st.one_of(st.none(), st.sampled_from([*NAMES, "nope"]))
attempt_choice = st.one_of(st.none(), st.integers(1, 4))
outputs = st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 9), max_size=2)
kinds = st.sampled_from(["error", "timeout", "cancelled"])

plans = st.one_of(
    st.tuples(st.just("push"), st.sampled_from(["main", "feature/x"])),
    st.tuples(st.just("result"), step_choice, attempt_choice,
              st.sampled_from(["succeeded", "failed"]), st.booleans(), outputs, kinds),
    st.tuples(st.just("result"), st.none(), st.none(), st.sampled_from(["succeeded", "failed"]),
              st.booleans(), outputs, kinds),
    st.tuples(st.just("result"), st.none(), st.none(), st.just("succeeded"), st.just(True),
              outputs, st.just("error")),
    st.tuples(st.just("cancel")),
    st.tuples(st.just("retry"), step_choice),
    st.tuples(st.just("timeout"), step_choice, attempt_choice),
    st.tuples(st.just("retry_due"), step_choice, attempt_choice),
)


def _message(h: Harness, plan: tuple[Any, ...]) -> Push | StepResult | Control:
    kind = plan[0]
    current = h.state.step or NAMES[0]
    attempts = h.state.steps[current].attempts if current in h.state.steps else 0
    if kind == "push":
        return push(plan[1])
    if kind == "result":
        _, step, attempt, status, retryable, outs, kind = plan
        error = (StepError(message="failed", exit_code=2, retryable=retryable, kind=kind)
                 if status == "failed" else None)
        return StepResult(run_id=h.run_id, step=step or current,
                          attempt=attempt or max(attempts, 1), status=status,
                          outputs=outs if status == "succeeded" else {}, error=error)
    if kind == "cancel":
        return Control(run_id=h.run_id, action="cancel")
    if kind == "retry":
        return Control(run_id=h.run_id, action="retry", step=plan[1])
    _, step, attempt = plan
    if attempt is None:
        attempt = attempts + 1 if kind == "retry_due" else max(attempts, 1)
    return Control(run_id=h.run_id, action=kind, step=step or current, attempt=attempt)


def _snapshot(state: r.RunState) -> dict[str, Any]:
    return {
        "status": state.status, "machine_state": state.machine_state, "step": state.step,
        "version": state.version, "active": state.active,
        "steps": {n: (s.state, s.attempts, s.outputs, s.error) for n, s in state.steps.items()},
    }


def _check_invariants(h: Harness) -> None:
    s = h.state
    assert s.machine_state in DECIDER.machine.states
    assert s.status in RUN_STATUSES
    assert s.version == len(h.log), "an event was lost or counted twice"
    assert all(step.state in STEP_STATES for step in s.steps.values())

    folded = r.fold(h.run_id, h.log)
    assert _snapshot(folded) == _snapshot(s)
    assert folded.to_json() == s.to_json()

    running = [n for n, step in s.steps.items() if step.state == r.RUNNING]
    assert len(running) <= 1, running
    if running:
        assert s.status == "running"
        assert running == [s.step] == [s.machine_state]
    if s.status == "running":
        assert s.steps[s.machine_state].state in (r.RUNNING, r.RETRYING)
    if s.status in ("succeeded", "failed", "cancelled"):
        assert not any(step.state in (r.RUNNING, r.RETRYING) for step in s.steps.values())
    if s.exists:
        assert s.status != "queued"
        for name in NAMES:
            assert (s.steps[name].state == r.SKIPPED) == (name not in s.active)
        # the steps before the current one all succeeded or were skipped
        if s.status == "running":
            for name in NAMES[: NAMES.index(s.step)]:
                assert s.steps[name].state in (r.SUCCEEDED, r.SKIPPED)
        if s.status == "succeeded":
            assert all(st_.state in (r.SUCCEEDED, r.SKIPPED) for st_ in s.steps.values())


def _check_decision(h: Harness, decision: r.Decision) -> None:
    """Every started attempt is commanded, with the outputs of the steps before it; every
    event is plain JSON (the store writes it with json.dumps)."""
    for ev in decision.events:
        assert json.loads(json.dumps([ev.data, ev.meta])) == [ev.data, ev.meta]
    started = [e.data for e in decision.events if e.type == "step.started"]
    commands = [o.body for o in decision.outgoing if isinstance(o.body, StepCommand)]
    assert [(c.step, c.attempt) for c in commands] == [(d["step"], d["attempt"]) for d in started]
    for command in commands:
        assert command.inputs == h.state.outputs_before(command.step)
        assert set(command.inputs) == {
            n for n in NAMES[: NAMES.index(command.step)] if n in h.state.active}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.sampled_from(["main", "feature/x"]), plans=st.lists(plans, max_size=40))
def test_any_message_sequence_keeps_the_run_consistent(
        first: str, plans: list[tuple[Any, ...]]) -> None:
    h = Harness(DECIDER)
    h.send(push(first))
    _check_invariants(h)
    for plan in plans:
        h.tick(7)
        message = _message(h, plan)
        message_id = uuid.uuid4()
        before = h.state.clone()
        try:
            decision = h.decide(message, message_id, actor="op")
        except r.Rejected as exc:
            assert h.state == before
            kind = "step-result" if isinstance(message, StepResult) else "control"
            decision = DECIDER.rejection(h.state, message_id, kind,
                                         message.model_dump(mode="json"), exc.reason)
            assert [e.type for e in decision.events] == ["message.rejected"]
        assert h.state == before, "decide must not change the state it is given"
        if decision.ignored:
            assert decision.events == [] and decision.outgoing == []
            continue
        assert decision.events, "a decision that is not ignored records something"
        h.commit(decision)
        _check_decision(h, decision)
        _check_invariants(h)
        for e in decision.events:
            event(f"event {e.type}")
    event(f"ended {h.state.status}")
