"""The run state machine, built with `transitions` from a pipeline spec.

States: `queued`, one state per step (the run is running that step), and the terminal
`succeeded`, `failed`, `cancelled`. The machine decides which transitions are legal and where
each one leads; it does no I/O and has no callbacks, so a decision is a plain synchronous
call (no AsyncMachine: its cancellation of concurrent transitions is not wanted here).

One machine is built per pipeline (building costs milliseconds) and a single probe model is
reused for every decision by setting its state first: no add_model/remove_model per message.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from transitions import Machine, MachineError

from cistate.pipeline import Pipeline

QUEUED, SUCCEEDED, FAILED, CANCELLED = "queued", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# triggers
START = "start"
STEP_SUCCEEDED = "step_succeeded"
STEP_FAILED = "step_failed"
CANCEL = "cancel"
RETRY = "retry"


@dataclass(frozen=True)
class Situation:
    """What the machine's conditions may look at, besides the state itself."""

    active: Collection[str]  # steps that run for this run (its branch passes their `when`)
    retry_left: bool = False  # the failed attempt may be tried again
    target: str | None = None  # the step an operator asked to retry from


class IllegalTransition(Exception):
    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"{trigger} is not allowed while the run is {state}")
        self.state = state
        self.trigger = trigger


class _Probe:
    state: str


class RunMachine:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        steps = list(pipeline.step_names)
        self.states = [QUEUED, *steps, SUCCEEDED, FAILED, CANCELLED]
        self._probe = _Probe()
        self._machine = Machine(
            model=self._probe,
            states=self.states,
            initial=QUEUED,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            send_event=False,
        )
        add = self._machine.add_transition
        # start and step_succeeded go to the first active step after the current one, or
        # to succeeded when none is left
        for index, origin in enumerate([QUEUED, *steps]):
            trigger = START if origin == QUEUED else STEP_SUCCEEDED
            later = steps[index:]
            for position, dest in enumerate(later):
                add(trigger, origin, dest, conditions=[_first_active(dest, later[:position])])
            add(trigger, origin, SUCCEEDED, conditions=[_none_active(later)])
        for step in steps:
            add(STEP_FAILED, step, step, conditions=[_retry_left])  # another attempt
            add(STEP_FAILED, step, FAILED, unless=[_retry_left])
        add(CANCEL, [QUEUED, *steps], CANCELLED)
        for dest in steps:
            add(RETRY, [FAILED, CANCELLED], dest, conditions=[_is_target(dest)])

    def next_state(self, state: str, trigger: str, situation: Situation) -> str:
        """Where `trigger` takes a run in `state`; IllegalTransition if it may not fire."""
        probe = self._probe
        probe.state = state
        try:
            fired = probe.trigger(trigger, situation)  # type: ignore[attr-defined]
        except (MachineError, AttributeError, ValueError):
            raise IllegalTransition(state, trigger) from None
        if not fired:
            raise IllegalTransition(state, trigger)
        return probe.state

    def transitions(self) -> list[tuple[str, str, str]]:
        """(trigger, source, dest) for every transition, for diagrams and docs."""
        found: list[tuple[str, str, str]] = []
        for name, event in self._machine.events.items():
            for source, transitions in event.transitions.items():
                for transition in transitions:
                    found.append((name, source, str(transition.dest)))
        return found

    def mermaid(self) -> str:
        """The machine as a Mermaid state diagram (`cistate graph`)."""
        lines = ["stateDiagram-v2", f"    [*] --> {QUEUED}"]
        seen: set[tuple[str, str, str]] = set()
        for trigger, source, dest in self.transitions():
            key = (trigger, _node(source), _node(dest))
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"    {_node(source)} --> {_node(dest)}: {trigger}")
        for terminal in (SUCCEEDED, FAILED, CANCELLED):
            lines.append(f"    {terminal} --> [*]")
        return "\n".join(lines) + "\n"


def _node(state: str) -> str:
    return state.replace("-", "_")  # Mermaid state ids cannot contain '-'


def _first_active(dest: str, skipped: list[str]) -> Callable[[Situation], bool]:
    def condition(situation: Situation) -> bool:
        return dest in situation.active and not any(s in situation.active for s in skipped)

    return condition


def _none_active(later: list[str]) -> Callable[[Situation], bool]:
    def condition(situation: Situation) -> bool:
        return not any(s in situation.active for s in later)

    return condition


def _retry_left(situation: Situation) -> bool:
    return situation.retry_left


def _is_target(dest: str) -> Callable[[Situation], bool]:
    def condition(situation: Situation) -> bool:
        return situation.target == dest

    return condition
