"""Property: a run's hash chain finds every change to its stored events.

Whatever the events' canonical forms, a chain built the way the store builds it verifies
clean; flipping any bit of any byte of any event's canonical form, deleting any event,
reordering them or inserting one is always found, at the right seq.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cistate.domain.events import GENESIS, MISMATCH, Chained, ChainProblem, chain_problems, link

pytestmark = pytest.mark.unit

canonicals = st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=12)


def stored(forms: list[bytes]) -> list[Chained]:
    """Events 1..n as the store writes them: each hash links to the one before."""
    events, prev = [], GENESIS
    for seq, form in enumerate(forms, start=1):
        prev = link(prev, form)
        events.append(Chained(seq, form, prev))
    return events


def renumbered(events: list[Chained]) -> list[Chained]:
    """Events moved to seqs 1..n in list order, as an UPDATE of their seq would."""
    return [Chained(seq, e.canonical, e.hash) for seq, e in enumerate(events, start=1)]


@given(canonicals)
def test_a_chain_as_the_store_writes_it_verifies_clean(forms: list[bytes]) -> None:
    assert chain_problems(stored(forms), version=len(forms)) == []


@given(canonicals, st.data())
def test_any_flipped_byte_of_any_event_is_found_at_that_event(
        forms: list[bytes], data: st.DataObject) -> None:
    events = stored(forms)
    index = data.draw(st.integers(0, len(events) - 1))
    form = bytearray(events[index].canonical)
    at = data.draw(st.integers(0, len(form) - 1))
    form[at] ^= data.draw(st.integers(1, 255))
    events[index] = Chained(index + 1, bytes(form), events[index].hash)
    assert chain_problems(events, version=len(events)) == [ChainProblem(index + 1, MISMATCH)]


@given(canonicals, st.data())
def test_any_deleted_event_is_found_as_a_gap(forms: list[bytes], data: st.DataObject) -> None:
    events = stored(forms)
    index = data.draw(st.integers(0, len(events) - 1))
    del events[index]
    problems = chain_problems(events, version=len(forms))
    assert problems[0].seq == index + 1 and problems[0].problem.startswith("missing")
    if index < len(events):  # the event after it no longer links to the one before it
        assert ChainProblem(index + 2, MISMATCH) in problems


@given(canonicals.filter(lambda forms: len(forms) > 1), st.data())
def test_a_deleted_event_before_the_last_is_found_without_the_runs_row(
        forms: list[bytes], data: st.DataObject) -> None:
    events = stored(forms)
    del events[data.draw(st.integers(0, len(events) - 2))]
    assert chain_problems(events) != []


@given(canonicals, st.permutations(range(12)))
def test_any_reordering_is_found(forms: list[bytes], order: list[int]) -> None:
    events = stored(forms)
    moved = renumbered([events[i] for i in order if i < len(events)])
    assume(moved != events)
    assert chain_problems(moved, version=len(events)) != []


@given(canonicals, st.binary(min_size=1, max_size=64), st.binary(min_size=32, max_size=32),
       st.data())
def test_any_inserted_event_is_found(forms: list[bytes], form: bytes, forged: bytes,
                                     data: st.DataObject) -> None:
    events = stored(forms)
    index = data.draw(st.integers(0, len(events)))
    inserted = renumbered([*events[:index], Chained(0, form, forged), *events[index:]])
    assert ChainProblem(index + 1, MISMATCH) in chain_problems(inserted, version=len(inserted))


def test_an_event_without_a_hash_and_a_seq_below_1_are_named() -> None:
    first, second = stored([b"a", b"b"])
    problems = chain_problems([Chained(-1, first.canonical, None), second])
    assert [p.seq for p in problems] == [-1, -1, 1, 2]
    assert "out of place" in problems[0].problem and "no hash" in problems[1].problem
    assert problems[2].problem.startswith("missing") and problems[3].problem == MISMATCH
