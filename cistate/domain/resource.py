"""Resources that runs take turns at: a concurrency group (a run holds it from start to end)
and a lock (a run holds it while its steps that name the lock run).

A resource is an aggregate of its own, beside the runs: its events are in a stream of its
own (PostgreSQL serialises each stream's appends, so two orchestrators agree on one order),
and it and the runs talk through outbox messages only. A run asks for a resource with a
claim (`ClaimRequest` acquire), the resource grants it to one claim at a time and queues the
others in the order it recorded their requests (arrival order, as the event store decided
it), and the run hands it back (`ClaimRequest` release) when it no longer needs it; a release
of the holder grants the next claim in the same decision.

Pure: no clock, no I/O. fold/apply rebuild a ResourceState from its events; decide answers a
request with events and the control messages that tell runs (granted, superseded).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cistate.domain.events import EventType as E
from cistate.domain.events import NewEvent, derived_id
from cistate.domain.state import GROUP as GROUP
from cistate.domain.state import TRUST as TRUST
from cistate.domain.state import kind_of as kind_of

if TYPE_CHECKING:  # the messages' models load when a resource decides, not to read one
    from cistate.domain.messages import ClaimRequest, ControlAction, Outgoing

LOCK = "lock"
# GROUP; and TRUST, not a resource: a fork's pull request waits on its own run until a
# trusted person says /ok-to-test (a hold of the run, in the run's events only)
TRUST_GATE = f"{TRUST}:ok-to-test"

QUEUED, GRANTED, RELEASED = E.RESOURCE_QUEUED, E.RESOURCE_GRANTED, E.RESOURCE_RELEASED
WITHDRAWN, SUPERSEDED = E.RESOURCE_WITHDRAWN, E.RESOURCE_SUPERSEDED


def group_resource(group: str) -> str:
    return f"{GROUP}:{group}"


def lock_resource(lock: str) -> str:
    return f"{LOCK}:{lock}"


@dataclass(frozen=True)
class Claim:
    claim: uuid.UUID
    run_id: uuid.UUID
    step: str | None = None  # the step that asked first (locks); None for a group
    # when the run's push was recorded (ISO 8601, UTC): which of two runs is newer, whatever
    # order their claims reach the resource in
    requested_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = {"claim": str(self.claim), "run_id": str(self.run_id), "step": self.step}
        if self.requested_at is not None:
            body["requested_at"] = self.requested_at
        return body

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Claim:
        return cls(uuid.UUID(raw["claim"]), uuid.UUID(raw["run_id"]), raw.get("step"),
                   raw.get("requested_at"))

    def pushed_after(self, other: Claim) -> bool:
        """This claim's run was pushed after `other`'s (unknown or equal times: no; then
        the order the resource recorded them in decides)."""
        if self.requested_at is None or other.requested_at is None:
            return False
        return _instant(self.requested_at) > _instant(other.requested_at)


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


@dataclass
class ResourceState:
    name: str
    holder: Claim | None = None
    waiting: list[Claim] = field(default_factory=list)  # in arrival order
    # the holder's run was told it is superseded (once is enough; it releases when it ends)
    holder_superseded: bool = False
    version: int = 0

    def find(self, claim: uuid.UUID) -> Claim | None:
        if self.holder is not None and self.holder.claim == claim:
            return self.holder
        return next((c for c in self.waiting if c.claim == claim), None)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version,
                "holder": self.holder.to_json() if self.holder else None,
                "holder_superseded": self.holder_superseded,
                "waiting": [c.to_json() for c in self.waiting]}

    def copy(self) -> ResourceState:
        return ResourceState(self.name, self.holder, list(self.waiting),
                             self.holder_superseded, self.version)


def apply(state: ResourceState, type_: str, data: dict[str, Any]) -> None:
    state.version += 1
    claim = Claim.from_json(data)
    if type_ == QUEUED:
        state.waiting.append(claim)
    elif type_ == GRANTED:
        state.waiting = [c for c in state.waiting if c.claim != claim.claim]
        state.holder, state.holder_superseded = claim, False
    elif type_ == RELEASED:
        if state.holder is not None and state.holder.claim == claim.claim:
            state.holder, state.holder_superseded = None, False
    elif type_ in (WITHDRAWN, SUPERSEDED):
        if state.holder is not None and state.holder.claim == claim.claim:
            state.holder_superseded = True  # it still holds it until its run ends
        else:
            state.waiting = [c for c in state.waiting if c.claim != claim.claim]


def fold(name: str, events: list[tuple[str, dict[str, Any]]]) -> ResourceState:
    state = ResourceState(name)
    for type_, data in events:
        apply(state, type_, data)
    return state


@dataclass
class ResourceDecision:
    events: list[NewEvent] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)
    ignored: str | None = None
    after: ResourceState | None = None  # the state the events lead to


def decide(state: ResourceState, request: ClaimRequest, message_id: uuid.UUID,
           actor: str = "system") -> ResourceDecision:
    """What `request` does to the resource; the state is left as it was."""
    return _Decide(state, message_id, actor).request(request)


class _Decide:
    def __init__(self, state: ResourceState, message_id: uuid.UUID, actor: str) -> None:
        self.state = state.copy()
        self.decision = ResourceDecision()
        self.meta = {"causation_id": str(message_id), "actor": actor}

    def event(self, type_: E, claim: Claim, **data: Any) -> None:
        body = {**claim.to_json(), **data}
        self.decision.events.append(NewEvent(type_, body, dict(self.meta)))
        apply(self.state, type_, body)

    def tell(self, claim: Claim, action: ControlAction, reason: str | None = None) -> None:
        from cistate.domain.messages import Control, Outgoing

        body = Control(run_id=claim.run_id, action=action, resource=self.state.name,
                       claim=claim.claim, step=claim.step, reason=reason)
        self.decision.outgoing.append(
            Outgoing("control", body, derived_id(claim.claim, action)))

    def request(self, request: ClaimRequest) -> ResourceDecision:
        requested_at = request.requested_at.isoformat() if request.requested_at else None
        claim = Claim(request.claim, request.run_id, request.step, requested_at)
        if request.action == "acquire":
            self.acquire(claim, request.supersede)
        else:
            self.release(claim)
        self.decision.after = self.state
        return self.decision

    def acquire(self, claim: Claim, supersede: bool) -> None:
        if self.state.find(claim.claim) is not None:
            self.decision.ignored = "this claim was made before"
            return
        if supersede:
            others = [c for c in (self.state.holder, *self.state.waiting)
                      if c is not None and c.run_id != claim.run_id]
            newer = [c for c in others if c.pushed_after(claim)]
            if newer:
                # a newer run's claim got here first (two relays or orchestrators): this
                # older run is the one superseded, never the newer
                newest = newer[-1]
                self.event(SUPERSEDED, claim, by_run_id=str(newest.run_id))
                self.tell(claim, "superseded", f"superseded by {newest.run_id}")
                return
            # cancel_in_progress: the older runs of the group make way for this one; queued
            # ones leave the queue now, the holder keeps it until its run has ended
            by = f"superseded by {claim.run_id}"
            for older in list(self.state.waiting):
                if older.run_id != claim.run_id:
                    self.event(SUPERSEDED, older, by_run_id=str(claim.run_id))
                    self.tell(older, "superseded", by)
            holder = self.state.holder
            if (holder is not None and holder.run_id != claim.run_id
                    and not self.state.holder_superseded):
                self.event(SUPERSEDED, holder, by_run_id=str(claim.run_id))
                self.tell(holder, "superseded", by)
        if self.state.holder is None and not self.state.waiting:
            self.event(GRANTED, claim)
            self.tell(claim, "granted")
            return
        holder = self.state.holder
        self.event(QUEUED, claim, position=len(self.state.waiting) + 1,
                   holder_run_id=str(holder.run_id) if holder else None)

    def release(self, claim: Claim) -> None:
        found = self.state.find(claim.claim)
        if found is None:
            self.decision.ignored = "no such claim holds or waits (released before)"
            return
        if self.state.holder is not None and self.state.holder.claim == claim.claim:
            self.event(RELEASED, found)
            if self.state.waiting:
                following = self.state.waiting[0]
                self.event(GRANTED, following)
                self.tell(following, "granted")
            return
        self.event(WITHDRAWN, found)
