"""Event types and their JSON form.

An event is a fact about one run. It is immutable once appended; `data` holds the fact,
`meta` says who and what caused it (causation_id, correlation_id, actor, attempt).

Each stored event carries a hash chained to the run's event before it (`link`); the store
computes it when it appends, over the canonical form PostgreSQL makes of the stored row
(schema/migrations/004_event_hash_chain.sql), and `chain_problems` says where a run's stored
events no longer match their chain.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from cistate.domain.jsontext import dumps as dumps
from cistate.domain.jsontext import loads as loads


class EventType(StrEnum):
    RUN_REQUESTED = "run.requested"
    RUN_PIPELINE_PINNED = "run.pipeline_pinned"  # the repository's own pipeline, once read
    STEP_STARTED = "step.started"
    STEP_WAITING = "step.waiting"  # an approval step holds the run for a person
    STEP_APPROVED = "step.approved"
    STEP_REJECTED = "step.rejected"
    STEP_SUCCEEDED = "step.succeeded"
    STEP_FAILED = "step.failed"
    STEP_RETRY_SCHEDULED = "step.retry_scheduled"
    STEP_TIMED_OUT = "step.timed_out"
    STEP_SKIPPED = "step.skipped"
    RUN_SUCCEEDED = "run.succeeded"
    RUN_FAILED = "run.failed"
    RUN_CANCEL_REQUESTED = "run.cancel_requested"
    RUN_CANCELLED = "run.cancelled"
    RUN_RETRIED = "run.retried"
    MESSAGE_REJECTED = "message.rejected"
    # a run's claims on a concurrency group or a lock (cistate.domain.resource)
    CLAIM_REQUESTED = "claim.requested"
    CLAIM_GRANTED = "claim.granted"
    CLAIM_RELEASED = "claim.released"
    # what the outside is told of a run (cistate.domain.notices)
    NOTICE_SENT = "notice.sent"  # a commit status or notification, handed to the notifier
    NOTICE_DELIVERED = "notice.delivered"  # the host or receiver took it
    NOTICE_FAILED = "notice.failed"  # it did not (`retrying`: it is tried again)
    NOTICE_SUPERSEDED = "notice.superseded"  # a newer one of its context went first
    # a resource's own stream
    RESOURCE_QUEUED = "resource.queued"  # a claim waits behind the holder
    RESOURCE_GRANTED = "resource.granted"  # a claim holds it now
    RESOURCE_RELEASED = "resource.released"  # the holder handed it back
    RESOURCE_WITHDRAWN = "resource.withdrawn"  # a waiting claim was given up
    RESOURCE_SUPERSEDED = "resource.superseded"  # a newer run of the group replaces it


@dataclass(frozen=True)
class NewEvent:
    """An event decided but not yet stored: it has no position, seq or time yet."""

    type: EventType
    data: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """An event as stored."""

    position: int
    run_id: uuid.UUID
    seq: int
    type: str
    data: dict[str, Any]
    meta: dict[str, Any]
    message_id: uuid.UUID | None
    recorded_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "run_id": str(self.run_id),
            "seq": self.seq,
            "type": self.type,
            "data": self.data,
            "meta": self.meta,
            "recorded_at": self.recorded_at.isoformat(),
        }


# Namespace for ids derived from other ids: a redelivered message derives the same ids, so
# every insert it causes collides with the first delivery's instead of duplicating it.
CISTATE_NAMESPACE = uuid.UUID("6f1f3c2e-4b7a-4f5e-9a53-1c0de5e7a7e5")


_NAMESPACE_BYTES = CISTATE_NAMESPACE.bytes


def derived_id(parent: uuid.UUID | str, *parts: object) -> uuid.UUID:
    """uuid.uuid5(CISTATE_NAMESPACE, "parent:part:..."), without working out the
    namespace's bytes for every id (a hop derives several)."""
    name = ":".join([str(parent), *map(str, parts)])
    digest = hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()  # noqa: S324 (uuid5)
    return uuid.UUID(bytes=digest[:16], version=5)


def run_id_for(message_id: uuid.UUID) -> uuid.UUID:
    """A push's run id follows from its delivery id, so a redelivered push finds its run.
    Here, not in run.py, so that a producer (`cistate push`) can name the run it opened
    without loading the machines."""
    return derived_id(message_id, "run")


# What a run's first event is chained to.
GENESIS = b""


def link(prev: bytes, canonical: bytes) -> bytes:
    """An event's hash: SHA-256 over the previous event's hash and the event's canonical
    form (the same as the SQL function cistate_event_hash that the store appends with)."""
    return hashlib.sha256(prev + canonical).digest()


@dataclass(frozen=True)
class Chained:
    """One stored event as the chain sees it."""

    seq: int
    canonical: bytes
    hash: bytes | None  # None: written without one (past the store)


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    problem: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "problem": self.problem}


MISMATCH = ("hash mismatch: this event was edited, or the one before it was deleted, "
            "inserted or moved")
UNHASHED = "no hash: written past the store, which hashes every event it appends"


def chain_problems(events: Sequence[Chained], version: int | None = None
                   ) -> list[ChainProblem]:
    """Where one run's stored events (in seq order) break their chain: seqs missing from
    1..the last one (..`version`, the run's row, when known: that is how a deleted last
    event shows), seqs below 1, and each event whose hash is not `link` of the stored hash
    before it and its own canonical form.

    Each link is checked against the stored hash before it, not a recomputed chain, so that
    an edited event is named alone rather than with every event after it.
    """
    problems: list[ChainProblem] = []
    expected, prev = 1, GENESIS
    for event in events:
        if event.seq < expected:
            problems.append(ChainProblem(event.seq, f"seq {event.seq} is out of place: a run's "
                                         "events are numbered from 1 (moved?)"))
        elif event.seq > expected:
            problems.append(ChainProblem(expected, _missing(expected, event.seq - 1)))
        if event.hash is None:
            problems.append(ChainProblem(event.seq, UNHASHED))
        elif event.hash != link(prev, event.canonical):
            problems.append(ChainProblem(event.seq, MISMATCH))
        expected, prev = max(expected, event.seq + 1), event.hash or GENESIS
    if version is not None and version >= expected:
        problems.append(ChainProblem(expected, _missing(expected, version) + f"; the run's row "
                                     f"is at version {version}"))
    return problems


def _missing(first: int, last: int) -> str:
    if first == last:
        return f"missing: there is no event {first} (deleted?)"
    return f"missing: there are no events {first}-{last} ({last - first + 1} events; deleted?)"
