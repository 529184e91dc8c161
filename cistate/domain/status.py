"""The names of states: a step's, a run's, and how a run ends. One home for them; the
machines (cistate.domain.machine) say which moves between them are legal, the graph
(cistate.domain.graph) what they mean for the steps that wait.

The machines take the plain string values (`transitions` would name an Enum state by its
member name), and events and JSON spell them the same way."""

from __future__ import annotations

from enum import StrEnum


class StepStatus(StrEnum):
    """A step's state within a run."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # an approval step: held for a person, by no worker or process
    RETRYING = "retrying"  # an attempt failed and another one is scheduled
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the last attempt failed: no retry is left
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class RunStatus(StrEnum):
    """A run's state. `waiting` is how a running run shows while it only waits for a person
    (an approval step, nothing else live); the run's machine stays `running`."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Outcome(StrEnum):
    """How a run ended: one of its terminal states."""

    SUCCEEDED = RunStatus.SUCCEEDED.value
    FAILED = RunStatus.FAILED.value
    CANCELLED = RunStatus.CANCELLED.value


RUN_STATES = tuple(status.value for status in RunStatus)
TERMINAL = frozenset(outcome.value for outcome in Outcome)  # a run in one changes no more

# what a step's state means for the steps that need it
LIVE = frozenset({StepStatus.RUNNING, StepStatus.WAITING, StepStatus.RETRYING})
ENDED = frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.TIMED_OUT,
                   StepStatus.SKIPPED, StepStatus.CANCELLED})
SATISFIED = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})  # ended well
FAILURES = frozenset({StepStatus.FAILED, StepStatus.TIMED_OUT})
BLOCKING = FAILURES | {StepStatus.CANCELLED}  # dependents can never start
