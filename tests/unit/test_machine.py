"""The run's and the steps' state machines: legal moves, illegal ones, and their diagrams."""

from __future__ import annotations

import pytest

from cistate.domain import machine as m
from cistate.domain.status import TERMINAL

from ._support import default_pipeline

pytestmark = pytest.mark.unit

PIPELINE = default_pipeline()
STEP_STATES = ["pending", "running", "waiting", "retrying", "succeeded", "failed", "timed_out",
               "skipped", "cancelled"]
RETRY_LEFT = m.Situation(retry_left=True)


@pytest.fixture(scope="module")
def run() -> m.RunMachine:
    return m.RunMachine(PIPELINE)


@pytest.fixture(scope="module")
def step() -> m.StepMachine:
    return m.StepMachine(PIPELINE)


def test_a_run_is_queued_running_or_ended_whatever_its_steps(run: m.RunMachine) -> None:
    assert run.states == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert {"succeeded", "failed", "cancelled"} == TERMINAL
    assert not set(PIPELINE.step_names) & set(run.states)


def test_a_run_starts_and_finishes_with_the_outcome_it_is_given(run: m.RunMachine) -> None:
    assert run.next_state("queued", m.START) == "running"
    for outcome in ("succeeded", "failed", "cancelled"):
        assert run.next_state("running", m.FINISH, m.Situation(outcome=outcome)) == outcome


def test_a_cancel_keeps_the_run_running_until_its_finally_steps_have_run(
        run: m.RunMachine) -> None:
    assert run.next_state("running", m.CANCEL) == "running"
    assert run.next_state("queued", m.CANCEL) == "running"


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_a_retry_runs_a_failed_or_cancelled_run_again(run: m.RunMachine, state: str) -> None:
    assert run.next_state(state, m.RETRY) == "running"


@pytest.mark.parametrize(
    ("state", "trigger", "situation"),
    [
        ("running", m.FINISH, m.Situation()),  # no outcome yet
        ("queued", m.FINISH, m.Situation(outcome="succeeded")),
        ("succeeded", m.FINISH, m.Situation(outcome="failed")),
        ("running", m.START, m.Situation()),
        ("failed", m.START, m.Situation()),
        ("succeeded", m.CANCEL, m.Situation()),
        ("failed", m.CANCEL, m.Situation()),
        ("cancelled", m.CANCEL, m.Situation()),
        ("running", m.RETRY, m.Situation()),
        ("queued", m.RETRY, m.Situation()),
        ("succeeded", m.RETRY, m.Situation()),
        ("failed", "explode", m.Situation()),  # no such trigger
        ("nowhere", m.START, m.Situation()),  # no such state
    ],
)
def test_illegal_run_transitions_raise(run: m.RunMachine, state: str, trigger: str,
                                       situation: m.Situation) -> None:
    with pytest.raises(m.IllegalTransition) as info:
        run.next_state(state, trigger, situation)
    assert info.value.state == state
    assert info.value.trigger == trigger
    assert str(info.value) == f"{trigger} is not allowed while the run is {state}"


def test_a_step_has_the_states_of_the_graph(step: m.StepMachine) -> None:
    assert step.states == STEP_STATES


def test_a_step_runs_and_succeeds(step: m.StepMachine) -> None:
    assert step.next_state("pending", m.START) == "running"
    assert step.next_state("running", m.SUCCEED) == "succeeded"


@pytest.mark.parametrize(("trigger", "ended"), [(m.FAIL, "failed"), (m.TIME_OUT, "timed_out")])
def test_a_failed_attempt_retries_while_its_policy_allows(
        step: m.StepMachine, trigger: str, ended: str) -> None:
    assert step.next_state("running", trigger, RETRY_LEFT) == "retrying"
    assert step.next_state("retrying", m.START) == "running"
    assert step.next_state("running", trigger) == ended


def test_an_approval_step_waits_then_is_approved_rejected_or_timed_out(
        step: m.StepMachine) -> None:
    assert step.next_state("pending", m.WAIT) == "waiting"
    assert step.next_state("waiting", m.APPROVE) == "succeeded"
    assert step.next_state("waiting", m.REJECT) == "failed"
    assert step.next_state("waiting", m.TIME_OUT) == "timed_out"
    for state in set(STEP_STATES) - {"waiting"}:
        for trigger in (m.APPROVE, m.REJECT):
            with pytest.raises(m.IllegalTransition):
                step.next_state(state, trigger)


@pytest.mark.parametrize("state", ["running", "waiting", "retrying"])
def test_a_live_step_can_be_cancelled(step: m.StepMachine, state: str) -> None:
    assert step.next_state(state, m.CANCEL) == "cancelled"


def test_a_pending_step_is_skipped_and_a_running_one_when_its_handler_says_so(
        step: m.StepMachine) -> None:
    assert step.next_state("pending", m.SKIP) == "skipped"
    assert step.next_state("running", m.SKIP) == "skipped"
    for state in set(STEP_STATES) - {"pending", "running"}:
        with pytest.raises(m.IllegalTransition):
            step.next_state(state, m.SKIP)


@pytest.mark.parametrize("state", ["pending", "succeeded", "failed", "timed_out", "skipped",
                                   "cancelled"])
def test_a_retry_of_the_run_resets_an_ended_step(step: m.StepMachine, state: str) -> None:
    assert step.next_state(state, m.RESET) == "pending"


@pytest.mark.parametrize(
    ("state", "trigger"),
    [
        ("succeeded", m.START), ("failed", m.START), ("cancelled", m.START),
        ("running", m.START), ("pending", m.SUCCEED), ("retrying", m.SUCCEED),
        ("succeeded", m.FAIL), ("pending", m.FAIL), ("cancelled", m.TIME_OUT),
        ("pending", m.CANCEL), ("succeeded", m.CANCEL), ("skipped", m.CANCEL),
        ("running", m.RESET), ("retrying", m.RESET),
    ],
)
def test_illegal_step_transitions_name_the_step(step: m.StepMachine, state: str,
                                                trigger: str) -> None:
    with pytest.raises(m.IllegalTransition) as info:
        step.next_state(state, trigger, what="step 'build'")
    assert str(info.value) == f"{trigger} is not allowed while step 'build' is {state}"


def test_an_illegal_attempt_does_not_disturb_later_decisions(
        run: m.RunMachine, step: m.StepMachine) -> None:
    with pytest.raises(m.IllegalTransition):
        run.next_state("succeeded", m.FINISH, m.Situation(outcome="failed"))
    with pytest.raises(m.IllegalTransition):
        step.next_state("succeeded", m.SUCCEED)
    assert run.next_state("running", m.FINISH, m.Situation(outcome="failed")) == "failed"
    assert step.next_state("running", m.FAIL) == "failed"


def test_transitions_list_every_edge(run: m.RunMachine, step: m.StepMachine) -> None:
    edges = set(run.transitions())
    assert ("start", "queued", "running") in edges
    assert ("finish", "running", "cancelled") in edges
    assert ("retry", "failed", "running") in edges
    assert not any(source in TERMINAL and trigger != "retry" for trigger, source, _ in edges)
    assert not any(source == "succeeded" for _, source, _ in edges)
    step_edges = set(step.transitions())
    assert ("fail", "running", "retrying") in step_edges
    assert ("reset", "cancelled", "pending") in step_edges
    assert not any(source in ("succeeded", "failed") and trigger != "reset"
                   for trigger, source, _ in step_edges)


def test_mermaid_diagrams(run: m.RunMachine, step: m.StepMachine) -> None:
    for diagram, first in ((run.mermaid(), "queued"), (step.mermaid(), "pending")):
        lines = diagram.splitlines()
        assert lines[:2] == ["stateDiagram-v2", f"    [*] --> {first}"]
        assert len(lines) == len(set(lines))  # no edge drawn twice
    assert "    running --> failed: finish" in run.mermaid().splitlines()
    assert "    failed --> [*]" in run.mermaid().splitlines()
    assert "    running --> timed_out: time_out" in step.mermaid().splitlines()
    assert "    timed_out --> [*]" in step.mermaid().splitlines()
