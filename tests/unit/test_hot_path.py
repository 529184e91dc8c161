"""What the per-message shortcuts must give: the same as the long way round."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cistate.adapters.postgres.store import steps_json
from cistate.domain.events import dumps
from cistate.domain.run import RunState, StepState

pytestmark = pytest.mark.unit

_TIMES = st.one_of(st.none(), st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)),
                               timezone(timedelta(hours=-5, minutes=-30))])))


@given(st.lists(st.tuples(_TIMES, _TIMES), max_size=4))
def test_a_runs_steps_are_written_as_their_json_says(times: list[tuple[datetime | None,
                                                                          datetime | None]]
                                                    ) -> None:
    steps = [StepState(f"s{i}", "succeeded", i, {"k": [1, "v"]}, None, started, finished)
             for i, (started, finished) in enumerate(times)]
    assert steps_json(steps) == dumps([step.to_json() for step in steps])


def test_outputs_orjson_cannot_write_are_written_all_the_same() -> None:
    step = StepState("s", "succeeded", 1, {"n": 2**70}, None, datetime.now(UTC), None)
    assert steps_json([step]) == dumps([step.to_json()])


def test_a_working_copy_keeps_every_field_and_shares_no_step() -> None:
    now = datetime.now(UTC)
    state = RunState(
        id=uuid.uuid4(), repo="r", ref="main", commit="c" * 40, pipeline="p",
        pipeline_sha256="ab" * 32, machine_state="running", step="a",
        steps={"a": StepState("a", "running", 1, {}, None, now, None)}, active=["a"],
        push={"repo": "r"}, holds={"lock:l": {"claim": "c", "state": "held", "n": 1}},
        notices={"cistate/p": {"notice": "n", "delivery": "sent"}}, version=3,
        created_at=now, updated_at=now)
    defaults = RunState(id=state.id)
    assert all(getattr(state, f.name) != getattr(defaults, f.name)
               for f in dataclasses.fields(RunState) if f.name != "id"), "set every field"
    copy = state.working_copy()
    assert copy == state
    assert copy.steps["a"] is not state.steps["a"] and copy.active is not state.active
    step = StepState("a", "failed", 2, {"o": 1}, {"message": "m"}, now, now)
    assert step.copy() == step and step.copy() is not step
