"""Properties: whatever messages arrive, in whatever order, a run stays consistent.

Random sequences of pushes, results (for random or the live steps' attempts), cancels,
retries, timeouts and retry timers go through decide exactly as the orchestrator sends them
(Rejected -> Decider.rejection, ignored -> nothing recorded), and after every message the
run's invariants hold and folding the stored events gives the same state.

And for random pipelines with `needs:` (any DAG), `finally:` and fail_fast on or off: the
results of the live steps, in any order, with retries, timeouts and a cancel now and then,
end every run, each step in a state its machine allows, and its finally steps run exactly
once, told how the run went.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cistate.domain import graph as step_graph
from cistate.domain import machine as m
from cistate.domain import run as r
from cistate.domain.messages import (
    INTERNAL_ACTIONS,
    Control,
    Push,
    StepCommand,
    StepError,
    StepResult,
)
from cistate.domain.pipeline import Pipeline, parse
from cistate.domain.status import TERMINAL

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
# a diamond that does not fail fast, beside a step that starts with the run, and clean-up
DIAMOND = parse(
    """
name: diamond
fail_fast: false
steps:
  - {name: fetch, uses: noop, retries: 1, timeout: 10s}
  - {name: unit, uses: noop, needs: [fetch], retries: 1}
  - {name: lint, uses: noop, needs: [fetch], timeout: 1m}
  - {name: ship, uses: noop, needs: [unit, lint], when: {branches: [main]}}
  - {name: docs, uses: noop, needs: []}
finally:
  - {name: report, uses: noop, timeout: 5s}
  - {name: clean, uses: noop, retries: 1}
""",
    "diamond.yaml",
    {"noop"},
)
DECIDERS = {"line": r.Decider(SMALL), "diamond": r.Decider(DIAMOND)}
RUN_STATUSES = {"queued", "running", "succeeded", "failed", "cancelled"}
STEP_STATES = set(m.STEP_STATES)

# A message is drawn as a plan; `None` for step/attempt means "one of the run's live steps"
# (picked by the plan's last number) and is resolved against the state when it is sent, so
# that sequences make progress often.
attempt_choice = st.one_of(st.none(), st.integers(1, 4))
outputs = st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 9), max_size=2)
kinds = st.sampled_from(["error", "timeout", "cancelled"])
picks = st.integers(0, 7)


def plans(names: list[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    step_choice = st.one_of(st.none(), st.sampled_from([*names, "nope"]))
    return st.one_of(
        st.tuples(st.just("push"), st.sampled_from(["main", "feature/x"])),
        st.tuples(st.just("result"), step_choice, attempt_choice,
                  st.sampled_from(["succeeded", "failed"]), st.booleans(), outputs, kinds, picks),
        st.tuples(st.just("result"), st.none(), st.none(),
                  st.sampled_from(["succeeded", "failed"]), st.booleans(), outputs, kinds, picks),
        st.tuples(st.just("result"), st.none(), st.none(), st.just("succeeded"), st.just(True),
                  outputs, st.just("error"), picks),
        st.tuples(st.just("cancel")),
        st.tuples(st.just("retry"), step_choice),
        st.tuples(st.just("timeout"), step_choice, attempt_choice, picks),
        st.tuples(st.just("retry_due"), step_choice, attempt_choice, picks),
    )


def _live(h: Harness) -> list[str]:
    return [n for n, step in h.state.steps.items() if step.state in r.LIVE]


def _message(h: Harness, plan: tuple[Any, ...]) -> Push | StepResult | Control:
    kind = plan[0]
    if kind == "push":
        return push(plan[1])
    if kind == "cancel":
        return Control(run_id=h.run_id, action="cancel")
    if kind == "retry":
        return Control(run_id=h.run_id, action="retry", step=plan[1])
    live = _live(h)
    current = live[plan[-1] % len(live)] if live else (h.state.step or "nope")
    attempts = h.state.steps[current].attempts if current in h.state.steps else 0
    if kind == "result":
        _, step, attempt, status, retryable, outs, kind, _ = plan
        error = (StepError(message="failed", exit_code=2, retryable=retryable, kind=kind)
                 if status == "failed" else None)
        return StepResult(run_id=h.run_id, step=step or current,
                          attempt=attempt or max(attempts, 1), status=status,
                          outputs=outs if status == "succeeded" else {}, error=error)
    _, step, attempt, _ = plan
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
    pipeline = h.decider.pipeline
    graph = pipeline.graph
    assert s.machine_state in h.decider.machine.states
    assert s.status in RUN_STATUSES
    assert s.version == len(h.log), "an event was lost or counted twice"
    assert all(step.state in STEP_STATES for step in s.steps.values())

    folded = r.fold(h.run_id, h.log)
    assert _snapshot(folded) == _snapshot(s)
    assert folded.to_json() == s.to_json()

    live = _live(h)
    if s.status == "running":
        assert live, "a running run has a step that runs or waits for its retry"
    if s.status in TERMINAL:
        assert not live
        assert not any(step.state == r.PENDING for step in s.steps.values())
    if not s.exists:
        return
    assert s.status != "queued"
    for name in pipeline.step_names:
        if name not in s.active:
            assert s.steps[name].state == r.SKIPPED
    for name in live:
        if name in graph.finally_steps:  # after every main step, however it ended
            assert all(s.steps[n].state in step_graph.ENDED
                       for n in step_graph.upstream(graph, name))
        else:  # once every step it needs succeeded (or was skipped)
            assert all(s.steps[n].state in (r.SUCCEEDED, r.SKIPPED)
                       for n in step_graph.upstream(graph, name)), name
    failures = [n for n in graph.steps if s.steps[n].state in (r.FAILED, r.TIMED_OUT)]
    if pipeline.fail_fast and failures:
        assert not set(live) & set(graph.steps), "fail_fast leaves no main step live"
    if s.status == "succeeded":
        assert all(st_.state in (r.SUCCEEDED, r.SKIPPED) for st_ in s.steps.values())
    if s.status == "failed":
        assert any(st_.state in (r.FAILED, r.TIMED_OUT) for st_ in s.steps.values())


def _check_decision(h: Harness, decision: r.Decision) -> None:
    """Every started attempt is commanded, with the outputs of the steps upstream of it (and
    a finally step with the run's outcome so far); every event is plain JSON (the store
    writes it with json.dumps) and every step.* event names its step and attempt."""
    for ev in decision.events:
        assert json.loads(json.dumps([ev.data, ev.meta])) == [ev.data, ev.meta]
        if ev.type.startswith("step."):
            assert {"step", "attempt"} <= set(ev.data), ev
    started = [e.data for e in decision.events if e.type == "step.started"]
    commands = [o.body for o in decision.outgoing if isinstance(o.body, StepCommand)]
    assert [(c.step, c.attempt) for c in commands] == [(d["step"], d["attempt"]) for d in started]
    graph = h.decider.pipeline.graph
    for command in commands:
        ups = step_graph.upstream(graph, command.step)
        assert command.inputs == {n: h.state.steps[n].outputs for n in ups
                                  if h.state.steps[n].state == r.SUCCEEDED}
        if command.step in graph.finally_steps:
            assert command.env[r.OUTCOME_VARIABLE] in ("succeeded", "failed", "cancelled")
        else:
            assert r.OUTCOME_VARIABLE not in command.env


def _send_checked(h: Harness, message: Push | StepResult | Control) -> r.Decision:
    """Decide as the orchestrator does (a rejection is recorded), check, and commit."""
    message_id = uuid.uuid4()
    before = h.state.clone()
    # timers come from cistate's own outbox; an operator's requests carry their name
    internal = isinstance(message, Control) and message.action in INTERNAL_ACTIONS
    try:
        decision = h.decide(message, message_id, actor="system" if internal else "op")
    except r.Rejected as exc:
        assert h.state == before
        kind = "step-result" if isinstance(message, StepResult) else "control"
        decision = h.decider.rejection(h.state, message_id, kind,
                                       message.model_dump(mode="json"), exc.reason)
        assert [e.type for e in decision.events] == ["message.rejected"]
    assert h.state == before, "decide must not change the state it is given"
    if decision.ignored:
        assert decision.events == [] and decision.outgoing == []
        return decision
    assert decision.events, "a decision that is not ignored records something"
    h.commit(decision)
    _check_decision(h, decision)
    _check_invariants(h)
    return decision


@pytest.mark.parametrize("pipeline", list(DECIDERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.sampled_from(["main", "feature/x"]), data=st.data())
def test_any_message_sequence_keeps_the_run_consistent(
        pipeline: str, first: str, data: st.DataObject) -> None:
    decider = DECIDERS[pipeline]
    h = Harness(decider)
    h.send(push(first))
    _check_invariants(h)
    for plan in data.draw(st.lists(plans(list(decider.pipeline.step_names)), max_size=40)):
        h.tick(7)
        decision = _send_checked(h, _message(h, plan))
        for e in decision.events:
            event(f"event {e.type}")
    event(f"ended {h.state.status}")


# ---------------------------------------------------------------------------------------
# random pipelines, driven to their end


@st.composite
def dag_pipelines(draw: st.DrawFn) -> Pipeline:
    """A pipeline file with random `needs:` (pointing anywhere that keeps it a DAG; left out
    only where the line rule keeps it one), random `when:` skips, retries and timeouts,
    `finally:` steps with needs of their own, and fail_fast on or off."""
    count = draw(st.integers(1, 7))
    names = [f"s{n}" for n in range(count)]
    rank = draw(st.permutations(range(count)))

    def policy() -> dict[str, Any]:
        fields: dict[str, Any] = {"uses": "noop"}
        if draw(st.booleans()):
            fields["retries"] = draw(st.integers(1, 2))
            fields["backoff"] = {"initial": "1s", "jitter": 0}
        if draw(st.integers(0, 5)) == 0:
            fields["when"] = {"branches": ["release/*"]}
        return fields

    steps: list[dict[str, Any]] = []
    for index, name in enumerate(names):
        earlier = [other for other in names if rank[names.index(other)] < rank[index]]
        step = {"name": name, **policy()}
        if not (index == 0 or rank[index - 1] < rank[index]) or draw(st.booleans()):
            step["needs"] = (draw(st.lists(st.sampled_from(earlier), unique=True))
                             if earlier else [])
        steps.append(step)
    final: list[dict[str, Any]] = []
    for index in range(draw(st.integers(0, 3))):
        step = {"name": f"f{index}", **policy()}
        before = [other["name"] for other in final]
        if draw(st.booleans()):
            step["needs"] = (draw(st.lists(st.sampled_from(before), unique=True))
                             if before else [])
        final.append(step)
    spec: dict[str, Any] = {"name": "random", "fail_fast": draw(st.booleans()), "steps": steps}
    if final:
        spec["finally"] = final
    return parse(yaml.safe_dump(spec, sort_keys=False), "random.yaml", {"noop"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipeline=dag_pipelines(), data=st.data())
def test_any_order_of_results_ends_every_run_of_any_graph(
        pipeline: Pipeline, data: st.DataObject) -> None:
    graph = pipeline.graph
    h = Harness(r.Decider(pipeline))
    opened = _send_checked(h, push(data.draw(st.sampled_from(["main", "release/1"]))))
    commands = [o.body for o in opened.outgoing if isinstance(o.body, StepCommand)]
    cancelled_while_cleaning_up = False
    for _ in range(300):
        live = _live(h)
        if not live:
            break
        if data.draw(st.integers(0, 19)) == 0:  # an operator cancels, now and then
            cleaning_up = all(h.state.steps[n].state in step_graph.ENDED for n in graph.steps)
            cancelled_while_cleaning_up |= cleaning_up
            _send_checked(h, Control(run_id=h.run_id, action="cancel"))
            continue
        name = data.draw(st.sampled_from(live))
        step = h.state.steps[name]
        h.tick(data.draw(st.sampled_from([0.5, 30])))
        if step.state == r.RETRYING:  # its retry timer is due
            message: StepResult | Control = Control(
                run_id=h.run_id, action="retry_due", step=name, attempt=step.attempts + 1)
        else:
            how = data.draw(st.sampled_from(["succeeded", "failed", "stuck", "timeout"]))
            if how == "timeout":
                message = Control(run_id=h.run_id, action="timeout", step=name,
                                  attempt=step.attempts)
            else:
                message = StepResult(
                    run_id=h.run_id, step=name, attempt=step.attempts,
                    status="succeeded" if how == "succeeded" else "failed",
                    outputs={"by": name} if how == "succeeded" else {},
                    error=None if how == "succeeded" else StepError(
                        message="no", retryable=how == "failed"))
        decision = _send_checked(h, message)
        assert not any(e.type == "message.rejected" for e in decision.events), decision
        commands += [o.body for o in decision.outgoing if isinstance(o.body, StepCommand)]
    else:
        pytest.fail(f"the run did not end: {h.state.to_json()}")

    s = h.state
    assert s.status in TERMINAL, s.to_json()
    assert all(step.state in step_graph.ENDED for step in s.steps.values())
    assert [e for e, _, _ in h.log].count(f"run.{s.status}") == 1
    starts = [d for e, d, _ in h.log if e == "step.started"]
    for name in graph.finally_steps:
        attempts = [d["attempt"] for d in starts if d["step"] == name]
        assert attempts == list(range(1, s.steps[name].attempts + 1)), (name, attempts)
        if name not in s.active:
            assert attempts == []
        elif not cancelled_while_cleaning_up:
            assert attempts, f"finally step {name} did not run"
    # finally steps are told the outcome: the run's, unless one of them changes it
    told = {c.env[r.OUTCOME_VARIABLE] for c in commands if c.step in graph.finally_steps}
    if not cancelled_while_cleaning_up and all(
            s.steps[n].state in (r.SUCCEEDED, r.SKIPPED) for n in graph.finally_steps):
        assert told <= {s.status}, (told, s.status)
    # the outcome follows the steps' ends, as cistate.domain.graph.outcome says
    assert s.status == step_graph.outcome(graph, {n: st_.state for n, st_ in s.steps.items()})
    event(f"ended {s.status}")
