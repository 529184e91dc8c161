"""The step graph of a pipeline, and which steps may start, stop or be skipped now.

Pure, like tektoncd/pipeline's `dag.go` (`Build(tasks)`, `GetCandidateTasks(graph, done...)`):
`build` turns the declared steps into a validated `Graph` once, at load; every other function
takes the graph and each step's state and answers one scheduling question (`mermaid` draws
it). No I/O, no clock, no randomness: the same pinned pipeline and the same states always give
the same answer, so a decision can be replayed from the run's events.

Rules, as pipeline authors are to be told them:

- A step without `needs:` needs the step before it in the file, and the first step needs
  nothing: a list of steps is a line, so every pipeline written before `needs:` existed means
  what it meant. `needs: []` says "needs nothing": the step starts as soon as the run does.
- A step may start once each of its needs has succeeded or been skipped, and a skipped step
  stands for its own needs: in the line `a, b, c` with `b` skipped by `when:`, `c` starts
  when `a` has succeeded, as today, not at once; and if `a` failed, `c` is skipped too.
- fail_fast (the default): once a main step has failed or timed out, no main step starts any
  more, the running ones are cancelled and the pending ones are skipped. Without fail_fast the
  running ones finish, branches that do not need the failed step go on, and only the steps that
  need it (directly or through other steps) are skipped.
- `finally:` steps are outside the main graph: they start once every main step has ended,
  whatever the outcome (also after a failure or a cancel), and each runs exactly once. Among
  themselves the same line rule holds (no `needs:` means the finally step before it), and a
  finally step's needs only order it: it starts when they have ended, whichever way, because
  clean-up must not be skipped because other clean-up failed. Needs do not cross the two
  lists: a main step cannot wait for a finally step (it would wait forever), and a finally step
  needing a main step would say nothing, since it waits for all of them already.
- The run failed if any step (main or finally) failed or timed out, else it was cancelled if
  any step was cancelled, else it succeeded. A failure wins over a cancel because it is what a
  person has to look at, and a failed finally step fails the run.
"""

from __future__ import annotations

import difflib
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from cistate.domain.status import (
    BLOCKING,
    ENDED,
    FAILURES,
    LIVE,
    SATISFIED,
    Outcome,
    StepStatus,
)

__all__ = ["BLOCKING", "ENDED", "FAILURES", "LIVE", "SATISFIED", "Outcome", "StepStatus"]




class GraphError(ValueError):
    """Needs that cannot be scheduled; the message names the step(s) and what to change."""


class Declared(Protocol):
    """A step as the pipeline file declares it (cistate.domain.pipeline.Step fits)."""

    @property
    def name(self) -> str: ...

    @property
    def needs(self) -> Sequence[str] | None: ...


@dataclass(frozen=True)
class Graph:
    """Validated needs: `needs[name]` is what each step waits for, with the line rule applied."""

    steps: tuple[str, ...]  # the main steps, in file order
    finally_steps: tuple[str, ...]  # in file order
    needs: Mapping[str, tuple[str, ...]]

    @cached_property
    def names(self) -> tuple[str, ...]:
        return self.steps + self.finally_steps

    # Worked out once per graph (a decision asks the scheduling questions several times):
    # the topological order of each list, as _topological gives it.
    @cached_property
    def steps_order(self) -> tuple[str, ...]:
        return tuple(_topological(self.steps, self.needs))

    @cached_property
    def finally_order(self) -> tuple[str, ...]:
        return tuple(_topological(self.finally_steps, self.needs))

    # Answers of `moves`, by the states asked about: a decision asks the same questions of the
    # same few combinations of states, run after run. Bounded; emptied when full.
    @cached_property
    def _moves(self) -> dict[tuple[bool, tuple[str, ...]], Moves]:
        return {}

    def order(self, names: tuple[str, ...]) -> Sequence[str]:
        """_topological(names, needs) for the graph's own lists, without working it out."""
        if names is self.steps:
            return self.steps_order
        if names is self.finally_steps:
            return self.finally_order
        return _topological(names, self.needs)


# ---------------------------------------------------------------------------------------
# build


def build(steps: Sequence[Declared], finally_steps: Sequence[Declared] = ()) -> Graph:
    """The graph of a pipeline's `steps:` and `finally:`; GraphError if it cannot run."""
    main = tuple(step.name for step in steps)
    final = tuple(step.name for step in finally_steps)
    _check_unique(main, final)
    needs: dict[str, tuple[str, ...]] = {}
    implicit: set[str] = set()
    for group, own, other, kind in ((steps, main, final, "step"),
                                    (finally_steps, final, main, "finally step")):
        previous: str | None = None
        for step in group:
            if step.needs is None:
                needs[step.name] = () if previous is None else (previous,)
                implicit.add(step.name)
            else:
                needs[step.name] = _checked_needs(step.name, step.needs, own, other, kind)
            previous = step.name
    for names, kind in ((main, "step"), (final, "finally step")):
        _check_acyclic(names, needs, implicit, kind)
    return Graph(steps=main, finally_steps=final, needs=needs)


def _check_unique(main: tuple[str, ...], final: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for kind, names in (("step", main), ("finally step", final)):
        for name in names:
            if name in seen:
                raise GraphError(f"{kind} {name!r}: a step of that name comes earlier; names "
                                 "are shared by steps: and finally:, so rename one of them")
            seen.add(name)


def _checked_needs(
    name: str, declared: Sequence[str], own: tuple[str, ...], other: tuple[str, ...], kind: str
) -> tuple[str, ...]:
    where = f"{kind} {name!r}"
    if isinstance(declared, str):  # `needs: build` where `needs: [build]` was meant
        raise GraphError(f"{where}: needs is a list of step names: write `needs: [{declared}]`")
    seen: list[str] = []
    for need in declared:
        if need == name:
            raise GraphError(f"{where}: needs itself; a step cannot wait for its own end")
        if need in seen:
            raise GraphError(f"{where}: needs {need!r} twice; name it once")
        if need in other and kind == "step":
            raise GraphError(
                f"{where}: needs {need!r}, a finally step; finally steps start only after "
                f"every step has ended, so no step can wait for one: move {need!r} into "
                "steps: or drop the need")
        if need in other:
            raise GraphError(
                f"{where}: needs {need!r}, which is a main step; finally steps start once "
                f"every main step has ended anyway, so drop {need!r} from its needs")
        if need not in own:
            close = difflib.get_close_matches(need, own, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise GraphError(f"{where}: needs {need!r}, but there is no {kind} of that name "
                             f"({kind}s: {', '.join(own)}){hint}")
        seen.append(need)
    return tuple(seen)


def _check_acyclic(
    names: tuple[str, ...], needs: Mapping[str, tuple[str, ...]], implicit: set[str], kind: str
) -> None:
    """Name one cycle, in the order its steps would run, starting at its first step in the
    file; and say which of its needs come from the line rule, since those are not written."""
    ordered = _topological(names, needs)
    if len(ordered) == len(names):
        return
    # every step left over needs another one left over: walking needs from any of them
    # must come back to a step already walked
    placed = set(ordered)
    left = [name for name in names if name not in placed]
    walk = [left[0]]
    while True:
        here = next(need for need in needs[walk[-1]] if need in left)
        if here in walk:
            break
        walk.append(here)
    cycle = walk[walk.index(here):][::-1]  # now each step needs the one before it
    first = min(cycle, key=names.index)
    start = cycle.index(first)
    cycle = cycle[start:] + cycle[:start]
    notes = [
        f"{name} has no `needs:`, so it needs the {kind} before it, {needs[name][0]}"
        for name in cycle if name in implicit
    ]
    note = f" ({'; '.join(notes)})" if notes else ""
    raise GraphError(f"needs form a cycle: {' -> '.join([*cycle, first])}{note}; "
                     "drop or change one of these needs")


def _topological(names: tuple[str, ...], needs: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Kahn's algorithm, taking the earliest step in the file whenever several may go next,
    so the order is stable and a line stays in file order. Steps on a cycle, and those
    after one, are left out."""
    index = {name: number for number, name in enumerate(names)}
    waiting = {name: len(needs[name]) for name in names}
    needed_by: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        for need in needs[name]:
            needed_by[need].append(name)
    heap = [index[name] for name in names if waiting[name] == 0]
    heapq.heapify(heap)
    ordered: list[str] = []
    while heap:
        name = names[heapq.heappop(heap)]
        ordered.append(name)
        for dependent in needed_by[name]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(heap, index[dependent])
    return ordered


# ---------------------------------------------------------------------------------------
# scheduling


def topological_order(graph: Graph) -> list[str]:
    """Every step so that each comes after its needs: the main steps, then the finally steps
    (which run after all of them); ties go in file order. For drawing and for walking."""
    return [*graph.steps_order, *graph.finally_order]


@dataclass(frozen=True)
class Moves:
    """Every scheduling answer for one set of states: what to stop first, else what to
    skip, else what to start; the first failed main step (whom a stop names); and how the
    run ended when nothing is left to do."""

    stopping: tuple[str, ...]
    blocked: tuple[tuple[str, str], ...]  # (step, the step that blocks it), in file order
    starting: tuple[str, ...]  # the main steps ready, then the finally steps ready
    first_failure: str | None
    outcome: Outcome | None


MOVES_KEPT = 4096  # answers remembered per graph


def moves(graph: Graph, states: Mapping[str, str], fail_fast: bool = True) -> Moves:
    """to_cancel, unreachable, ready + finally_ready and outcome for `states`, answered once
    per combination of states (they depend on nothing else) and remembered on the graph."""
    key = (fail_fast, tuple(states.get(name, "") for name in graph.names))
    memo = graph._moves
    found = memo.get(key)
    if found is None:
        found = Moves(
            stopping=tuple(to_cancel(graph, states, fail_fast)),
            blocked=tuple(unreachable(graph, states, fail_fast).items()),
            starting=tuple(ready(graph, states, fail_fast) + finally_ready(graph, states)),
            first_failure=_first_failure(graph, _statuses(graph, states)),
            outcome=outcome(graph, states),
        )
        if len(memo) >= MOVES_KEPT:
            memo.clear()
        memo[key] = found
    return found


def ready(graph: Graph, states: Mapping[str, str], fail_fast: bool = True) -> list[str]:
    """Main steps that may start now, in file order: pending, with every need succeeded or
    skipped (and a skipped need's own needs likewise); none once a main step failed or timed
    out, if fail_fast."""
    status = _statuses(graph, states)
    if fail_fast and _first_failure(graph, status) is not None:
        return []
    done = _cleared(graph, graph.steps, status, frozenset({StepStatus.SUCCEEDED}))
    return [
        name for name in graph.steps
        if status[name] is StepStatus.PENDING
        and all(need in done for need in graph.needs[name])
    ]


def to_cancel(graph: Graph, states: Mapping[str, str], fail_fast: bool = True) -> list[str]:
    """Main steps to stop now (running, or waiting for a retry): with fail_fast, every live
    main step once one has failed or timed out. Finally steps are never cancelled here."""
    status = _statuses(graph, states)
    if not fail_fast or _first_failure(graph, status) is None:
        return []
    return [name for name in graph.steps if status[name] in LIVE]


def unreachable(graph: Graph, states: Mapping[str, str], fail_fast: bool = True) -> dict[str, str]:
    """Pending main steps that can never start, to mark skipped, each with the step that
    blocks it (for the skip's reason): a need that failed, timed out or was cancelled, directly
    or through other needs (skipped ones included); with fail_fast, after a failure, every
    pending main step (blocked by the first failed step)."""
    status = _statuses(graph, states)
    stopped = _first_failure(graph, status) if fail_fast else None
    blocked: dict[str, str] = {}  # skipped steps too: they pass on what blocks their needs
    for name in graph.steps_order:
        if status[name] not in (StepStatus.PENDING, StepStatus.SKIPPED):
            continue
        for need in graph.needs[name]:
            if status[need] in BLOCKING:
                blocked[name] = need
                break
            if need in blocked:
                blocked[name] = blocked[need]
                break
        else:
            if stopped is not None:
                blocked[name] = stopped
    return {name: blocked[name] for name in graph.steps
            if name in blocked and status[name] is StepStatus.PENDING}


def finally_ready(graph: Graph, states: Mapping[str, str]) -> list[str]:
    """Finally steps that may start now, in file order: none until every main step has
    ended; then the pending ones whose finally needs have ended, whichever way (a skipped one
    once its own needs have)."""
    status = _statuses(graph, states)
    if any(status[name] not in ENDED for name in graph.steps):
        return []
    done = _cleared(graph, graph.finally_steps, status, ENDED)
    return [
        name for name in graph.finally_steps
        if status[name] is StepStatus.PENDING
        and all(need in done for need in graph.needs[name])
    ]


def outcome(graph: Graph, states: Mapping[str, str]) -> Outcome | None:
    """How the run ended, or None while any step (main or finally) has not ended."""
    status = _statuses(graph, states)
    if any(state not in ENDED for state in status.values()):
        return None
    if any(state in FAILURES for state in status.values()):
        return Outcome.FAILED
    if StepStatus.CANCELLED in status.values():
        return Outcome.CANCELLED
    return Outcome.SUCCEEDED


def downstream(graph: Graph, *steps: str) -> list[str]:
    """The given steps and every step that needs one of them, directly or through others, in
    file order: what `runs retry --from STEP` runs again. A main step's downstream includes
    every finally step, since they run after all main steps; the rest keep their outputs."""
    _check_known(graph, steps)
    reached = set(steps)
    if reached & set(graph.steps):
        reached |= set(graph.finally_steps)
    for name in topological_order(graph):
        if any(need in reached for need in graph.needs[name]):
            reached.add(name)
    return [name for name in graph.names if name in reached]


def upstream(graph: Graph, step: str) -> list[str]:
    """The steps `step` waits for, directly or through others, in file order (without itself):
    whose outputs it may read, and which must have succeeded or been skipped before a retry
    from it. A finally step's upstream includes every main step."""
    _check_known(graph, (step,))
    reached = set(graph.needs[step])
    if step in graph.finally_steps:
        reached |= set(graph.steps)
    for name in reversed(topological_order(graph)):
        if name in reached:
            reached.update(graph.needs[name])
    return [name for name in graph.names if name in reached]


def mermaid(graph: Graph, states: Mapping[str, str] | None = None) -> str:
    """The graph as a Mermaid flowchart (`cistate graph`): an arrow from each need to the
    step that waits for it, a dotted one from the last main steps to the first finally
    steps (which wait for every main step, whatever its end); with `states`, each step
    shows and is styled by its state."""
    def node(name: str) -> str:
        return "s_" + name.replace("-", "_")  # no '-', and never a Mermaid keyword (`end`)

    lines = ["flowchart TD"]
    for name in topological_order(graph):
        state = (states or {}).get(name)
        label = f"{name}<br/>{state}" if state else name
        lines.append(f'    {node(name)}["{label}"]')
    for name in topological_order(graph):
        lines += [f"    {node(need)} --> {node(name)}" for need in graph.needs[name]]
    needed = {need for name in graph.steps for need in graph.needs[name]}
    last = [name for name in graph.steps if name not in needed]
    for name in graph.finally_steps:
        if not graph.needs[name]:
            lines += [f"    {node(step)} -.-> {node(name)}" for step in last]
    if states:
        colours = {StepStatus.SUCCEEDED: "#c8e6c9", StepStatus.FAILED: "#ffcdd2",
                   StepStatus.TIMED_OUT: "#ffcdd2", StepStatus.RUNNING: "#bbdefb",
                   StepStatus.RETRYING: "#fff9c4", StepStatus.CANCELLED: "#ffe0b2",
                   StepStatus.SKIPPED: "#eeeeee", StepStatus.PENDING: "#ffffff"}
        used = {states[name] for name in graph.names if name in states}
        for status, colour in colours.items():
            if status in used:
                lines.append(f"    classDef {status} fill:{colour}")
        for name in graph.names:
            if states.get(name) in colours:
                lines.append(f"    class {node(name)} {states[name]}")
    return "\n".join(lines) + "\n"


def _check_known(graph: Graph, steps: Sequence[str]) -> None:
    unknown = [step for step in steps if step not in graph.needs]
    if unknown:
        raise GraphError(f"no step named {', '.join(map(repr, unknown))} "
                         f"(steps: {', '.join(graph.names)})")


def _cleared(
    graph: Graph, names: tuple[str, ...], status: Mapping[str, StepStatus],
    done: frozenset[StepStatus],
) -> set[str]:
    """The steps whose dependents may go on: those in a `done` state, and skipped ones whose
    needs are all cleared, so that skipping a step never lets the next one jump ahead."""
    cleared: set[str] = set()
    for name in graph.order(names):
        if status[name] is StepStatus.SKIPPED:
            if all(need in cleared for need in graph.needs[name]):
                cleared.add(name)
        elif status[name] in done:
            cleared.add(name)
    return cleared


def _first_failure(graph: Graph, status: Mapping[str, StepStatus]) -> str | None:
    return next((name for name in graph.steps if status[name] in FAILURES), None)


def _statuses(graph: Graph, states: Mapping[str, str]) -> dict[str, StepStatus]:
    """Every step's state as a StepStatus; a missing step or an unknown state is a caller's
    mistake that would otherwise read as "not ready" and leave a run hanging."""
    try:
        return {name: _BY_VALUE[states[name]] for name in graph.names}
    except KeyError:
        pass
    missing = [name for name in graph.names if name not in states]
    if missing:
        raise ValueError(f"no state given for step(s) {', '.join(missing)}")
    wrong = next(name for name in graph.names if states[name] not in _BY_VALUE)
    raise ValueError(f"step {wrong!r} has state {states[wrong]!r}, not one of "
                     f"{', '.join(StepStatus)}")


_BY_VALUE: dict[str, StepStatus] = {status.value: status for status in StepStatus}
