"""The run state machine built from a pipeline: legal moves, illegal ones, and its diagram."""

from __future__ import annotations

import itertools

import pytest

from cistate import machine as m

from ._support import default_pipeline

pytestmark = pytest.mark.unit

PIPELINE = default_pipeline()
STEPS = list(PIPELINE.step_names)
ALL = m.Situation(active=STEPS)
FEATURE = m.Situation(active=STEPS[:5])  # the release steps are skipped


@pytest.fixture(scope="module")
def machine() -> m.RunMachine:
    return m.RunMachine(PIPELINE)


def test_states_are_queued_the_steps_and_the_terminal_states(machine: m.RunMachine) -> None:
    assert machine.states == ["queued", *STEPS, "succeeded", "failed", "cancelled"]
    assert {"succeeded", "failed", "cancelled"} == m.TERMINAL


def test_start_goes_to_the_first_active_step(machine: m.RunMachine) -> None:
    assert machine.next_state("queued", m.START, ALL) == "setup"
    assert machine.next_state("queued", m.START, m.Situation(active=["build", "deploy"])) == \
        "build"
    assert machine.next_state("queued", m.START, m.Situation(active=[])) == "succeeded"


def test_step_succeeded_goes_to_the_next_active_step_or_succeeded(
        machine: m.RunMachine) -> None:
    for here, after in itertools.pairwise(STEPS):
        assert machine.next_state(here, m.STEP_SUCCEEDED, ALL) == after
    assert machine.next_state("gitops", m.STEP_SUCCEEDED, ALL) == "succeeded"
    assert machine.next_state("health", m.STEP_SUCCEEDED, FEATURE) == "succeeded"
    gap = m.Situation(active=["setup", "build", "gitops"])
    assert machine.next_state("setup", m.STEP_SUCCEEDED, gap) == "build"
    assert machine.next_state("build", m.STEP_SUCCEEDED, gap) == "gitops"


@pytest.mark.parametrize("step", STEPS)
def test_step_failed_retries_or_fails(machine: m.RunMachine, step: str) -> None:
    retry = m.Situation(active=STEPS, retry_left=True)
    assert machine.next_state(step, m.STEP_FAILED, retry) == step
    assert machine.next_state(step, m.STEP_FAILED, ALL) == "failed"


@pytest.mark.parametrize("state", ["queued", *STEPS])
def test_cancel_from_any_live_state(machine: m.RunMachine, state: str) -> None:
    assert machine.next_state(state, m.CANCEL, ALL) == "cancelled"


@pytest.mark.parametrize("state", ["failed", "cancelled"])
@pytest.mark.parametrize("target", STEPS)
def test_retry_from_failed_or_cancelled_to_the_target(
        machine: m.RunMachine, state: str, target: str) -> None:
    assert machine.next_state(state, m.RETRY, m.Situation(active=STEPS, target=target)) == \
        target


@pytest.mark.parametrize(
    ("state", "trigger", "situation"),
    [
        ("succeeded", m.STEP_SUCCEEDED, ALL),
        ("failed", m.STEP_SUCCEEDED, ALL),
        ("cancelled", m.STEP_FAILED, ALL),
        ("queued", m.STEP_SUCCEEDED, ALL),
        ("queued", m.STEP_FAILED, ALL),
        ("setup", m.START, ALL),
        ("failed", m.START, ALL),
        ("succeeded", m.CANCEL, ALL),
        ("failed", m.CANCEL, ALL),
        ("cancelled", m.CANCEL, ALL),
        ("setup", m.RETRY, m.Situation(active=STEPS, target="setup")),
        ("queued", m.RETRY, m.Situation(active=STEPS, target="setup")),
        ("succeeded", m.RETRY, m.Situation(active=STEPS, target="setup")),
        ("failed", m.RETRY, ALL),  # no target
        ("failed", m.RETRY, m.Situation(active=STEPS, target="lint")),  # no such step
        ("failed", "explode", ALL),  # no such trigger
        ("nowhere", m.START, ALL),  # no such state
    ],
)
def test_illegal_transitions_raise(machine: m.RunMachine, state: str, trigger: str,
                                   situation: m.Situation) -> None:
    with pytest.raises(m.IllegalTransition) as info:
        machine.next_state(state, trigger, situation)
    assert info.value.state == state
    assert info.value.trigger == trigger
    assert state in str(info.value) and trigger in str(info.value)


def test_an_illegal_attempt_does_not_disturb_later_decisions(machine: m.RunMachine) -> None:
    with pytest.raises(m.IllegalTransition):
        machine.next_state("succeeded", m.STEP_SUCCEEDED, ALL)
    assert machine.next_state("build", m.STEP_SUCCEEDED, ALL) == "deploy"
    assert machine.next_state("test", m.STEP_FAILED, ALL) == "failed"


def test_transitions_lists_every_edge(machine: m.RunMachine) -> None:
    edges = set(machine.transitions())
    assert ("start", "queued", "setup") in edges
    assert ("step_succeeded", "health", "succeeded") in edges
    assert ("step_failed", "build", "build") in edges
    assert ("cancel", "gitops", "cancelled") in edges
    assert ("retry", "cancelled", "tag-release") in edges
    assert not any(source in m.TERMINAL and trigger != "retry" for trigger, source, _ in edges)
    assert not any(source == "succeeded" for _, source, _ in edges)


def test_mermaid_diagram(machine: m.RunMachine) -> None:
    diagram = machine.mermaid()
    assert diagram.startswith("stateDiagram-v2\n")
    lines = diagram.splitlines()
    assert "    [*] --> queued" in lines
    for step in STEPS:
        node = step.replace("-", "_")
        assert f"    {node} --> cancelled: cancel" in lines
        assert f"    failed --> {node}: retry" in lines
    assert "    tag_release --> img_release: step_succeeded" in lines
    for terminal in ("succeeded", "failed", "cancelled"):
        assert f"    {terminal} --> [*]" in lines
    assert "-" not in "".join(line.split(":")[0].replace("-->", "") for line in lines[1:])
    assert len(lines) == len(set(lines))  # no edge drawn twice
