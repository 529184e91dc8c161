"""A concurrency group's or a lock's own rules (cistate.domain.resource), as pure functions of
its events: one holder, the others wait in the order their requests were recorded; a release
grants the next; a waiting claim withdrawn leaves the queue; duplicates and unknown releases
change nothing; cancel_in_progress supersedes the older claims (the holder keeps it until its
run hands it back); and the events fold back to the same state."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cistate.domain import resource as res
from cistate.domain.messages import ClaimRequest, Control

pytestmark = pytest.mark.unit

GROUP = res.group_resource("shop/main")


def run_ids(n: int) -> list[uuid.UUID]:
    return [uuid.uuid5(uuid.NAMESPACE_URL, f"run-{i}") for i in range(n)]


def claim_of(run_id: uuid.UUID, n: int = 1) -> uuid.UUID:
    return uuid.uuid5(run_id, f"claim-{n}")


def acquire(run_id: uuid.UUID, *, n: int = 1, supersede: bool = False,
            step: str | None = None, resource: str = GROUP) -> ClaimRequest:
    return ClaimRequest(resource=resource, action="acquire", run_id=run_id,
                        claim=claim_of(run_id, n), step=step, supersede=supersede)


def release(run_id: uuid.UUID, *, n: int = 1, resource: str = GROUP) -> ClaimRequest:
    return ClaimRequest(resource=resource, action="release", run_id=run_id,
                        claim=claim_of(run_id, n))


@dataclass
class Resource:
    """One resource, driven request by request: decide, then apply its events (as the
    store does); `log` keeps the events so that the state can be folded again."""

    name: str = GROUP
    state: res.ResourceState = field(init=False)
    log: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = res.ResourceState(self.name)

    def send(self, request: ClaimRequest,
             message_id: uuid.UUID | None = None) -> res.ResourceDecision:
        before = self.state.to_json()
        decision = res.decide(self.state, request, message_id or uuid.uuid4())
        assert self.state.to_json() == before, "decide changed the state it was given"
        for event in decision.events:
            res.apply(self.state, str(event.type), event.data)
            self.log.append((str(event.type), event.data))
        if decision.after is not None:
            assert decision.after.to_json() == self.state.to_json()
        return decision


def types(decision: res.ResourceDecision) -> list[str]:
    return [str(e.type) for e in decision.events]


def told(decision: res.ResourceDecision) -> list[tuple[str, uuid.UUID, uuid.UUID | None]]:
    """(action, run, claim) of each Control the decision sends a run."""
    found: list[tuple[str, uuid.UUID, uuid.UUID | None]] = []
    for o in decision.outgoing:
        assert o.routing_key == "control" and isinstance(o.body, Control)
        assert o.body.resource == GROUP
        found.append((o.body.action, o.body.run_id, o.body.claim))
    return found


def holder_run(r: Resource) -> uuid.UUID | None:
    return r.state.holder.run_id if r.state.holder else None


def waiting_runs(r: Resource) -> list[uuid.UUID]:
    return [c.run_id for c in r.state.waiting]


def test_the_first_claim_is_granted_and_the_others_wait_in_arrival_order() -> None:
    a, b, c = run_ids(3)
    r = Resource()
    first = r.send(acquire(a))
    assert types(first) == ["resource.granted"]
    assert told(first) == [("granted", a, claim_of(a))]
    second = r.send(acquire(b))
    assert types(second) == ["resource.queued"]
    assert second.outgoing == []  # nobody is told anything while it waits
    assert second.events[0].data["position"] == 1
    assert second.events[0].data["holder_run_id"] == str(a)
    third = r.send(acquire(c))
    assert third.events[0].data["position"] == 2
    assert holder_run(r) == a and waiting_runs(r) == [b, c]


def test_a_release_by_the_holder_grants_the_next_in_the_same_decision() -> None:
    a, b, c = run_ids(3)
    r = Resource()
    for run in (a, b, c):
        r.send(acquire(run))
    handed = r.send(release(a))
    assert types(handed) == ["resource.released", "resource.granted"]
    assert told(handed) == [("granted", b, claim_of(b))]
    assert holder_run(r) == b and waiting_runs(r) == [c]
    assert told(r.send(release(b))) == [("granted", c, claim_of(c))]
    last = r.send(release(c))
    assert types(last) == ["resource.released"] and last.outgoing == []
    assert r.state.holder is None and r.state.waiting == []
    # free again: the next claim is granted at once
    assert told(r.send(acquire(a, n=2))) == [("granted", a, claim_of(a, 2))]


def test_a_waiting_claim_released_is_withdrawn_and_the_holder_keeps_it() -> None:
    a, b, c = run_ids(3)
    r = Resource()
    for run in (a, b, c):
        r.send(acquire(run))
    gone = r.send(release(b))
    assert types(gone) == ["resource.withdrawn"] and gone.outgoing == []
    assert holder_run(r) == a and waiting_runs(r) == [c]
    # the holder's release skips the withdrawn claim
    assert told(r.send(release(a))) == [("granted", c, claim_of(c))]


def test_a_claim_asked_again_and_a_release_of_no_claim_change_nothing() -> None:
    a, b = run_ids(2)
    r = Resource()
    r.send(acquire(a))
    r.send(acquire(b))
    before = r.state.to_json()
    for request in (acquire(a), acquire(b), acquire(b, supersede=True), release(a, n=2)):
        decision = r.send(request)
        assert decision.events == [] and decision.outgoing == []
        assert decision.ignored
    assert r.state.to_json() == before
    r.send(release(a))
    again = r.send(release(a))  # released before: not a second release (nor b's)
    assert again.ignored and again.events == []
    assert holder_run(r) == b


def test_cancel_in_progress_supersedes_the_waiting_claims_and_tells_the_holder_once() -> None:
    a, b, c, d, e = run_ids(5)
    r = Resource()
    for run in (a, b, c):
        r.send(acquire(run))
    newer = r.send(acquire(d, supersede=True))
    assert types(newer) == ["resource.superseded"] * 3 + ["resource.queued"]
    superseded = {(act, run) for act, run, _ in told(newer)}
    assert superseded == {("superseded", b), ("superseded", c), ("superseded", a)}
    for o in newer.outgoing:
        assert isinstance(o.body, Control) and o.body.reason == f"superseded by {d}"
    assert all(e.data["by_run_id"] == str(d) for e in newer.events[:3])
    # the holder keeps it until its run has ended; the queue holds the newer run only
    assert holder_run(r) == a and r.state.holder_superseded
    assert waiting_runs(r) == [d]
    newest = r.send(acquire(e, supersede=True))
    # d leaves the queue; a was told before and is not told again
    assert told(newest) == [("superseded", d, claim_of(d))]
    assert holder_run(r) == a and waiting_runs(r) == [e]
    # the superseded claims' releases (their runs ended) change nothing but their own
    assert r.send(release(b)).ignored
    assert r.send(release(d)).ignored
    handed = r.send(release(a))
    assert told(handed) == [("granted", e, claim_of(e))]
    assert holder_run(r) == e and not r.state.holder_superseded


def test_cancel_in_progress_on_a_free_resource_is_granted_and_supersedes_nobody() -> None:
    [a] = run_ids(1)
    r = Resource()
    decision = r.send(acquire(a, supersede=True))
    assert types(decision) == ["resource.granted"]
    assert told(decision) == [("granted", a, claim_of(a))]


def test_a_run_never_supersedes_its_own_claims() -> None:
    a, b = run_ids(2)
    r = Resource()
    r.send(acquire(a))
    r.send(acquire(b))
    # a retried run of b claims again while its first claim still waits (n=2)
    decision = r.send(acquire(b, n=2, supersede=True))
    assert told(decision) == [("superseded", a, claim_of(a))]
    assert waiting_runs(r) == [b, b]


def test_the_same_request_gives_the_same_decision() -> None:
    """Controls are named after the claim: deciding again (a Conflict, another process)
    sends the same messages, which the outbox stores once."""
    a, b = run_ids(2)
    state = res.ResourceState(GROUP)
    res.apply(state, res.GRANTED, res.Claim(claim_of(a), a).to_json())
    message_id = uuid.uuid4()
    one = res.decide(state, acquire(b, supersede=True), message_id)
    two = res.decide(state, acquire(b, supersede=True), message_id)
    assert one.events == two.events
    assert [(o.message_id, o.body) for o in one.outgoing] == \
        [(o.message_id, o.body) for o in two.outgoing]
    assert one.events[0].meta == {"causation_id": str(message_id), "actor": "system"}


def test_a_lock_claim_names_the_step_that_asked() -> None:
    [a] = run_ids(1)
    lock = res.lock_resource("dev-deploy")
    r = Resource(lock)
    decision = r.send(acquire(a, step="deploy", resource=lock))
    [grant] = decision.outgoing
    assert isinstance(grant.body, Control)
    assert (grant.body.action, grant.body.resource, grant.body.step) == \
        ("granted", lock, "deploy")
    assert res.kind_of(lock) == res.LOCK and res.kind_of(GROUP) == res.GROUP


# -- any sequence of requests -------------------------------------------------------------

RUNS = run_ids(4)


@st.composite
def requests(draw: st.DrawFn) -> list[tuple[uuid.UUID, ClaimRequest]]:
    """(message id, request): each claim of a few runs acquired once (some superseding) and
    maybe released, in any order (a release may come before its acquire), some delivered
    again (at least once: the same message id)."""
    messages: list[tuple[uuid.UUID, ClaimRequest]] = []
    for run in RUNS:
        for n in range(1, draw(st.integers(0, 2)) + 1):
            messages.append((uuid.uuid4(), acquire(run, n=n, supersede=draw(st.booleans()))))
            if draw(st.booleans()):
                messages.append((uuid.uuid4(), release(run, n=n)))
    ordered = draw(st.permutations(messages))
    again = draw(st.lists(st.sampled_from(messages), max_size=4)) if messages else []
    for message in again:
        ordered.insert(draw(st.integers(0, len(ordered))), message)
    return ordered


@settings(max_examples=200, deadline=None)
@given(requests())
def test_any_requests_keep_one_holder_and_grant_in_arrival_order(
        sequence: list[tuple[uuid.UUID, ClaimRequest]]) -> None:
    r = Resource()
    handled: set[uuid.UUID] = set()  # as the store: a message that recorded events is done
    arrival: list[uuid.UUID] = []  # claims in the order the resource recorded them
    granted: list[uuid.UUID] = []
    left_queue: set[uuid.UUID] = set()  # withdrawn or superseded before their turn
    for message_id, request in sequence:
        if message_id in handled:
            continue
        holder_before = r.state.holder
        decision = r.send(request, message_id)
        if decision.events:
            handled.add(message_id)
        for event in decision.events:
            claim = uuid.UUID(event.data["claim"])
            if event.type in (res.QUEUED, res.GRANTED) and claim not in arrival:
                arrival.append(claim)
            if event.type == res.GRANTED:
                granted.append(claim)
            if event.type in (res.WITHDRAWN, res.SUPERSEDED) and claim not in granted:
                left_queue.add(claim)
        # one holder, never waiting too; nobody waits twice; nobody waits on a free one
        state = r.state
        waiting = [c.claim for c in state.waiting]
        assert len(waiting) == len(set(waiting))
        assert state.holder is None or state.holder.claim not in waiting
        assert state.holder is not None or not waiting
        # the holder changes only by its own release
        if holder_before is not None and state.holder != holder_before:
            assert request.action == "release" and request.claim == holder_before.claim
        # the queue is in arrival order
        assert waiting == [c for c in arrival if c in waiting]
        # only grants and supersedes are told, each to the claim's own run
        for o in decision.outgoing:
            assert isinstance(o.body, Control) and o.body.action in ("granted", "superseded")
        assert res.fold(GROUP, r.log).to_json() == state.to_json()
        assert state.version == len(r.log)
    # each claim is granted once, in arrival order, but for those that left the queue
    assert len(granted) == len(set(granted))
    assert granted == [c for c in arrival if c not in left_queue][:len(granted)]


def test_an_older_runs_claim_arriving_after_a_newer_ones_is_superseded_not_the_newer() -> None:
    # Two orchestrators recorded run `old`'s push before run `new`'s, but new's claim got to
    # the group first: cancel_in_progress must keep the newer run, whatever order the
    # messages crossed in.
    old, new = run_ids(2)
    pushed = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    group = Resource()
    group.send(acquire(new, supersede=True).model_copy(
        update={"requested_at": pushed + timedelta(milliseconds=5)}))
    decision = group.send(acquire(old, supersede=True).model_copy(
        update={"requested_at": pushed}))
    assert [e.type for e in decision.events] == [res.SUPERSEDED]
    [told] = [o.body for o in decision.outgoing]
    assert isinstance(told, Control)
    assert (told.run_id, told.action, told.reason) == (old, "superseded",
                                                       f"superseded by {new}")
    assert group.state.holder is not None and group.state.holder.run_id == new
    assert group.state.waiting == []
    # the older run hands back what it never got: nothing changes
    assert group.send(release(old)).ignored is not None
    assert group.state.holder.run_id == new
    # in the usual order the newer one supersedes the older, as before
    first = Resource()
    first.send(acquire(old, supersede=True).model_copy(update={"requested_at": pushed}))
    later = first.send(acquire(new, supersede=True).model_copy(
        update={"requested_at": pushed + timedelta(milliseconds=5)}))
    assert [e.type for e in later.events] == [res.SUPERSEDED, res.QUEUED]
    assert later.events[0].data["run_id"] == str(old)
