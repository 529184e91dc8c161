"""cistate's JSON: fast, and never failing on a value a handler may legitimately return."""

from __future__ import annotations

import json

import pytest

from cistate.domain.events import dumps, loads

pytestmark = pytest.mark.unit


def test_round_trip_of_event_shaped_data() -> None:
    value = {"step": "build", "attempt": 2, "outputs": {"digest": "sha256:ab", "n": 1.5,
                                                         "ok": True, "none": None, "é": "ü"}}
    assert loads(dumps(value)) == value
    assert json.loads(dumps(value)) == value, "the text is standard JSON"


def test_integers_beyond_64_bits_fall_back_instead_of_failing() -> None:
    value = {"outputs": {"huge": 2**70}}
    assert loads(dumps(value)) == value


def test_loads_raises_a_value_error_for_non_json() -> None:
    with pytest.raises(ValueError):
        loads(b"{not json")
