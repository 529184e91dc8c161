"""Event types and their JSON form.

An event is a fact about one run. It is immutable once appended; `data` holds the fact,
`meta` says who and what caused it (causation_id, correlation_id, actor, attempt).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson


class EventType(StrEnum):
    RUN_REQUESTED = "run.requested"
    STEP_STARTED = "step.started"
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


def derived_id(parent: uuid.UUID | str, *parts: object) -> uuid.UUID:
    name = ":".join([str(parent), *map(str, parts)])
    return uuid.uuid5(CISTATE_NAMESPACE, name)


def dumps(value: Any) -> str:
    """JSON text, fast (orjson); values orjson refuses (integers beyond 64 bits) go through
    the standard library rather than fail the message that carries them."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def loads(text: str | bytes) -> Any:
    """Parse JSON text (raises a ValueError subclass when it is not JSON)."""
    return orjson.loads(text)
