"""The machines' answers are remembered: the same as asking `transitions` every time."""

from __future__ import annotations

import itertools

import pytest

import handlers
from cistate.domain import machine as m
from cistate.domain.pipeline import parse

pytestmark = pytest.mark.unit

PIPELINE = parse("name: p\nsteps:\n  - {name: a, uses: noop}\n", "<test>", handlers.names())
TRIGGERS = (m.START, m.FINISH, m.CANCEL, m.RETRY, m.SUCCEED, m.FAIL, m.TIME_OUT, m.SKIP,
            m.RESET, "no-such-trigger")
SITUATIONS = [m.Situation(retry_left=left, outcome=outcome) for left, outcome in
              itertools.product((False, True), (None, m.SUCCEEDED, m.FAILED, m.CANCELLED))]


def answer(judge: m._Judge, state: str, trigger: str, situation: m.Situation) -> str:
    try:
        return judge.next_state(state, trigger, situation, what="x")
    except m.IllegalTransition as exc:
        assert str(exc) == f"{trigger} is not allowed while x is {state}"
        return "illegal"


@pytest.mark.parametrize("kind", [m.RunMachine, m.StepMachine])
def test_remembered_answers_are_the_machines_own(kind: type[m._Judge]) -> None:
    judge, fresh = kind(PIPELINE), kind(PIPELINE)  # type: ignore[call-arg]
    for _ in range(2):  # the second time from memory
        for state, trigger, situation in itertools.product(
                [*judge.states, "unknown"], TRIGGERS, SITUATIONS):
            fresh._answers.clear()
            assert answer(judge, state, trigger, situation) == answer(
                fresh, state, trigger, situation)
    assert all(state in judge._known for state, _, _ in judge._answers)
