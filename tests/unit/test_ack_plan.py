"""AckPlan: batched acks settle exactly the deliveries that finished, and nothing else.

A small model of the broker's side of one channel checks every frame the plan produces: a
frame naming a tag the broker no longer holds would close the channel (the broker answers
PRECONDITION_FAILED "unknown delivery tag"), and a multiple ack covering a delivery still
being handled would lose that message if the process then died.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cistate.adapters.rabbitmq.bus import AckPlan, Frame

pytestmark = pytest.mark.unit


class Broker:
    """The unacked deliveries of one channel, as RabbitMQ keeps them."""

    def __init__(self, count: int) -> None:
        self.outstanding = set(range(1, count + 1))
        self.acked: set[int] = set()
        self.nacked: set[int] = set()

    def receive(self, frame: Frame) -> None:
        assert frame.tag in self.outstanding, f"unknown delivery tag {frame.tag}: {frame}"
        if frame.nack:
            self.outstanding.discard(frame.tag)
            self.nacked.add(frame.tag)
            return
        covered = {t for t in self.outstanding if t <= frame.tag} if frame.multiple \
            else {frame.tag}
        self.outstanding -= covered
        self.acked |= covered


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, list[tuple[int, str]]]:
    """Deliveries 1..n; some finish (ack or nack) in a random order, with sends between."""
    n = draw(st.integers(1, 40))
    order = draw(st.permutations(range(1, n + 1)))
    finished = order[: draw(st.integers(0, n))]
    steps: list[tuple[int, str]] = []
    for tag in finished:
        steps.append((tag, draw(st.sampled_from(["ack", "ack", "ack", "nack", "requeue"]))))
        if draw(st.booleans()):
            steps.append((draw(st.integers(0, 3)), "send"))  # after 0-3 ticks of time
    return n, steps


@settings(max_examples=400, deadline=None)
@given(histories())
def test_frames_settle_exactly_the_finished_deliveries(
        history: tuple[int, list[tuple[int, str]]]) -> None:
    count, steps = history
    plan, broker = AckPlan(), Broker(count)
    wanted: dict[int, str] = {}
    now = 0.0
    for tag, what in steps:
        if what == "send":
            now += tag
            for frame in plan.take(now, hold=2.0):
                broker.receive(frame)
            # never acked: anything not finished with an ack
            assert broker.acked <= {t for t, w in wanted.items() if w == "ack"}
            continue
        wanted[tag] = what
        plan.finish(tag, ack=what == "ack", requeue=what == "requeue", now=now)
    for frame in plan.take(now + 2.0, hold=2.0):
        broker.receive(frame)
    assert broker.acked == {t for t, w in wanted.items() if w == "ack"}
    assert broker.nacked == {t for t, w in wanted.items() if w != "ack"}
    assert broker.outstanding == set(range(1, count + 1)) - set(wanted)


def test_deliveries_finished_in_order_take_one_frame() -> None:
    plan = AckPlan()
    for tag in range(1, 65):
        plan.finish(tag)
    assert plan.take() == [Frame(64, multiple=True)]
    assert plan.floor == 64


def test_a_delivery_still_running_holds_back_the_multiple_ack_but_not_the_others() -> None:
    plan = AckPlan()
    for tag in (1, 2, 4, 5):  # 3 is still being handled
        plan.finish(tag)
    assert plan.take() == [Frame(2, multiple=True), Frame(4), Frame(5)]
    plan.finish(3)
    plan.finish(6)
    # 4 and 5 were acked on their own: the next multiple ack (6) covers 3 and 6 only
    assert plan.take() == [Frame(6, multiple=True)]
    assert plan.floor == 6 and not plan.settled


def test_an_ack_behind_a_running_delivery_waits_for_it_up_to_the_hold() -> None:
    plan = AckPlan()
    plan.finish(2, now=10.0)  # 1 still running
    plan.finish(3, now=10.5)
    assert plan.take(now=10.9, hold=1.0) == []
    assert plan.due(hold=1.0) == 11.0
    plan.finish(1, now=10.95)  # the gap closes in time: one frame for all three
    assert plan.take(now=10.95, hold=1.0) == [Frame(3, multiple=True)]
    assert plan.due(hold=1.0) is None
    plan.finish(5, now=20.0)  # 4 runs long: 5 goes on its own once the hold is over
    assert plan.take(now=20.5, hold=1.0) == []
    assert plan.take(now=21.0, hold=1.0) == [Frame(5)]


def test_a_nack_goes_out_before_the_multiple_ack_that_passes_it() -> None:
    plan = AckPlan()
    plan.finish(1)
    plan.finish(2, ack=False, requeue=True)
    plan.finish(3)
    assert plan.take() == [Frame(2, nack=True, requeue=True), Frame(3, multiple=True)]


def test_finishing_a_delivery_twice_is_a_bug_and_says_so() -> None:
    plan = AckPlan()
    plan.finish(1)
    with pytest.raises(ValueError, match="delivery tag 1 is already settled"):
        plan.finish(1)
    plan.take()
    with pytest.raises(ValueError, match="already settled"):
        plan.finish(1, ack=False)
