"""The run's and the steps' state machines, built with `transitions`.

A run is `queued -> running -> succeeded | failed | cancelled` (and back to `running` on an
operator's retry); each step of it is `pending -> running -> retrying -> running ... ->
succeeded | failed | timed_out`, or `skipped` / `cancelled`, and `pending` again when a retry
runs it once more. The machines judge what a run or a step may do next and where that leads;
which steps are ready is domain.graph's, and what is recorded is domain.run's. They do no
I/O and have no callbacks, so a decision is a plain synchronous call (no AsyncMachine: its
cancellation of concurrent transitions is not wanted here).

Both are built once per pipeline (building costs milliseconds, DESIGN.md "Known pitfalls"),
and a single probe model of each is reused for every decision by setting its state first: no
add_model/remove_model per message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transitions import Machine, MachineError

from cistate.domain.pipeline import Pipeline
from cistate.domain.status import RUN_STATES, RunStatus, StepStatus

# the run's states, as the plain strings the machines take (cistate.domain.status names them)
QUEUED, RUNNING = RunStatus.QUEUED.value, RunStatus.RUNNING.value
SUCCEEDED, FAILED = RunStatus.SUCCEEDED.value, RunStatus.FAILED.value
CANCELLED = RunStatus.CANCELLED.value
# a step's states, likewise
PENDING, STEP_RUNNING = StepStatus.PENDING.value, StepStatus.RUNNING.value
RETRYING, TIMED_OUT = StepStatus.RETRYING.value, StepStatus.TIMED_OUT.value
SKIPPED, WAITING = StepStatus.SKIPPED.value, StepStatus.WAITING.value
STEP_STATES = tuple(status.value for status in StepStatus)

# the run's triggers
START = "start"  # the run opens: queued -> running
FINISH = "finish"  # every step has ended: running -> the outcome
CANCEL = "cancel"  # an operator asks: the run stays running while its finally steps run
RETRY = "retry"  # an operator asks: failed | cancelled -> running

# a step's triggers (START and CANCEL too)
SUCCEED = "succeed"
FAIL = "fail"
TIME_OUT = "time_out"
SKIP = "skip"
RESET = "reset"  # a retry of the run runs the step again
WAIT = "wait"  # an approval step starts (it waits for a person), or a step waits for a lock
APPROVE = "approve"
REJECT = "reject"


@dataclass(frozen=True)
class Situation:
    """What the machines' conditions may look at, besides the state itself."""

    retry_left: bool = False  # the failed attempt may be tried again
    outcome: str | None = None  # how the run ends (cistate.domain.graph.outcome), for FINISH


Condition = Callable[[Situation], bool]


class IllegalTransition(Exception):
    def __init__(self, state: str, trigger: str, what: str = "the run") -> None:
        super().__init__(f"{trigger} is not allowed while {what} is {state}")
        self.state = state
        self.trigger = trigger


class _Probe:
    state: str


_ILLEGAL = "\x00illegal"  # never a state: the trigger may not fire there


class _Judge:
    """One `transitions` Machine over a probe model; `next_state` asks it."""

    kind = "the run"

    def __init__(self, states: Sequence[str], initial: str) -> None:
        self.states = list(states)
        self._known = frozenset(states)
        self._answers: dict[tuple[str, str, Situation], str] = {}
        self._probe = _Probe()
        self._machine = Machine(
            model=self._probe,
            states=self.states,
            initial=initial,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            send_event=False,
        )

    def _add(self, trigger: str, source: str | list[str], dest: str,
             conditions: Sequence[Condition] = (), unless: Sequence[Condition] = ()) -> None:
        sources: list[Any] = [source] if isinstance(source, str) else list(source)
        checks: list[Any] = list(conditions)
        vetoes: list[Any] = list(unless)
        self._machine.add_transition(trigger, sources, dest, conditions=checks, unless=vetoes)

    def next_state(self, state: str, trigger: str, situation: Situation | None = None,
                   what: str | None = None) -> str:
        """Where `trigger` takes a model in `state`; IllegalTransition if it may not fire.

        The machine has no callbacks and its conditions look only at the situation, so its
        answer for a (state, trigger, situation) never changes: each is asked once and
        remembered (a decision asks a few; there are a few dozen of them in all)."""
        situation = situation or Situation()
        key = (state, trigger, situation)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._ask(state, trigger, situation)
            if state in self._known:
                self._answers[key] = answer
        if answer is _ILLEGAL:
            raise IllegalTransition(state, trigger, what or self.kind)
        return answer

    def _ask(self, state: str, trigger: str, situation: Situation) -> str:
        probe = self._probe
        probe.state = state
        try:
            fired = probe.trigger(trigger, situation)  # type: ignore[attr-defined]
        except (MachineError, AttributeError, ValueError):
            return _ILLEGAL
        return probe.state if fired else _ILLEGAL

    def transitions(self) -> list[tuple[str, str, str]]:
        """(trigger, source, dest) for every transition, for diagrams and docs."""
        found: list[tuple[str, str, str]] = []
        for name, event in self._machine.events.items():
            for source, transitions in event.transitions.items():
                for transition in transitions:
                    found.append((name, source, str(transition.dest)))
        return found

    def mermaid(self, terminal: Sequence[str]) -> str:
        lines = ["stateDiagram-v2", f"    [*] --> {self._machine.initial}"]
        seen: set[tuple[str, str, str]] = set()
        for trigger, source, dest in self.transitions():
            key = (trigger, source, dest)
            if key not in seen:
                seen.add(key)
                lines.append(f"    {source} --> {dest}: {trigger}")
        lines += [f"    {state} --> [*]" for state in terminal]
        return "\n".join(lines) + "\n"


class RunMachine(_Judge):
    """queued -> running -> succeeded | failed | cancelled; retry: failed | cancelled ->
    running. `finish` goes to the outcome cistate.domain.graph names, and only once it names one."""

    kind = "the run"

    def __init__(self, pipeline: Pipeline) -> None:
        # waiting is how a running run shows (RunState.status), not a state of its own
        super().__init__([s for s in RUN_STATES if s != RunStatus.WAITING], QUEUED)
        self.pipeline = pipeline
        self._add(START, QUEUED, RUNNING)
        for outcome in (SUCCEEDED, FAILED, CANCELLED):
            self._add(FINISH, RUNNING, outcome, conditions=[_outcome_is(outcome)])
        # the live steps are stopped, the finally steps run: the run ends when they have
        self._add(CANCEL, [QUEUED, RUNNING], RUNNING)
        self._add(RETRY, [FAILED, CANCELLED], RUNNING)

    def mermaid(self, terminal: Sequence[str] = (SUCCEEDED, FAILED, CANCELLED)) -> str:
        """The run's machine as a Mermaid state diagram (`cistate graph --machines`)."""
        return super().mermaid(terminal)


class StepMachine(_Judge):
    """A step's life within a run, the same for every step of the pipeline (a step's own
    policy reaches it through Situation.retry_left)."""

    kind = "the step"

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(STEP_STATES, PENDING)
        self.pipeline = pipeline
        # retrying: its timer is due; waiting: the lock it waited for is its run's now
        self._add(START, [PENDING, RETRYING, WAITING], STEP_RUNNING)
        self._add(SUCCEED, STEP_RUNNING, SUCCEEDED)
        for trigger, ended in ((FAIL, FAILED), (TIME_OUT, TIMED_OUT)):
            self._add(trigger, STEP_RUNNING, RETRYING, conditions=[_retry_left])
            self._add(trigger, STEP_RUNNING, ended, unless=[_retry_left])
        self._add(CANCEL, [STEP_RUNNING, WAITING, RETRYING], CANCELLED)
        self._add(WAIT, [PENDING, RETRYING], WAITING)
        self._add(APPROVE, WAITING, SUCCEEDED)
        self._add(REJECT, WAITING, FAILED)
        self._add(TIME_OUT, WAITING, TIMED_OUT)  # nobody decided in time
        self._add(SKIP, PENDING, SKIPPED)  # the run's rules: when:, needs that cannot run
        self._add(SKIP, STEP_RUNNING, SKIPPED)  # its handler found nothing to do
        # pending too: runs recorded before the graph left the steps after a failure pending
        self._add(RESET, [PENDING, SUCCEEDED, FAILED, TIMED_OUT, SKIPPED, CANCELLED], PENDING)

    def mermaid(self, terminal: Sequence[str] = (
            SUCCEEDED, FAILED, TIMED_OUT, SKIPPED, CANCELLED)) -> str:
        """A step's machine as a Mermaid state diagram (`cistate graph --machines`)."""
        return super().mermaid(terminal)


def _outcome_is(outcome: str) -> Callable[[Situation], bool]:
    def condition(situation: Situation) -> bool:
        return situation.outcome == outcome

    return condition


def _retry_left(situation: Situation) -> bool:
    return situation.retry_left
