"""The step graph: what `needs:` and `finally:` mean, which steps start, stop or are skipped,
errors that name the steps, and a property driving random graphs to their end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cistate.domain.graph import (
    BLOCKING,
    ENDED,
    FAILURES,
    LIVE,
    SATISFIED,
    Graph,
    GraphError,
    Outcome,
    StepStatus,
    build,
    downstream,
    finally_ready,
    mermaid,
    moves,
    outcome,
    ready,
    to_cancel,
    topological_order,
    unreachable,
    upstream,
)

pytestmark = pytest.mark.unit

S = StepStatus


@dataclass(frozen=True)
class Decl:
    name: str
    needs: Sequence[str] | None = None


def _graph(*main: Decl | str, final: Sequence[Decl | str] = ()) -> Graph:
    def decl(step: Decl | str) -> Decl:
        return step if isinstance(step, Decl) else Decl(step)

    return build([decl(step) for step in main], [decl(step) for step in final])


def _states(graph: Graph, **given: S) -> dict[str, str]:
    """Every step pending unless named."""
    return {name: given.get(name, S.PENDING) for name in graph.names}


def _error(*main: Decl, final: Sequence[Decl] = ()) -> str:
    with pytest.raises(GraphError) as info:
        _graph(*main, final=final)
    return str(info.value)


DIAMOND = _graph(Decl("a"), Decl("b", ["a"]), Decl("c", ["a"]), Decl("d", ["b", "c"]))
FAN = _graph(Decl("split"), *(Decl(f"t{n}", ["split"]) for n in range(8)),
             Decl("join", [f"t{n}" for n in range(8)]))
TESTS = [f"t{n}" for n in range(8)]


# ---------------------------------------------------------------------------------------
# what needs mean


def test_steps_without_needs_form_a_line_in_file_order() -> None:
    graph = _graph("setup", "test", "build")
    assert graph.needs == {"setup": (), "test": ("setup",), "build": ("test",)}
    assert ready(graph, _states(graph)) == ["setup"]
    assert ready(graph, _states(graph, setup=S.SUCCEEDED)) == ["test"]
    assert ready(graph, _states(graph, setup=S.SUCCEEDED, test=S.RUNNING)) == []


def test_an_empty_needs_list_starts_the_step_with_the_run() -> None:
    graph = _graph("setup", Decl("lint", []), "test")
    assert graph.needs["lint"] == ()
    assert graph.needs["test"] == ("lint",)  # the line rule follows the file, not the needs
    assert ready(graph, _states(graph)) == ["setup", "lint"]


def test_a_diamond_joins_only_when_both_branches_are_done() -> None:
    assert ready(DIAMOND, _states(DIAMOND)) == ["a"]
    assert ready(DIAMOND, _states(DIAMOND, a=S.SUCCEEDED)) == ["b", "c"]
    assert ready(DIAMOND, _states(DIAMOND, a=S.SUCCEEDED, b=S.SUCCEEDED, c=S.RUNNING)) == []
    assert ready(DIAMOND, _states(DIAMOND, a=S.SUCCEEDED, b=S.SUCCEEDED, c=S.RETRYING)) == []
    assert ready(DIAMOND, _states(DIAMOND, a=S.SUCCEEDED, b=S.SUCCEEDED,
                                  c=S.SUCCEEDED)) == ["d"]


def test_a_skipped_need_does_not_hold_up_its_dependents() -> None:
    assert ready(DIAMOND, _states(DIAMOND, a=S.SUCCEEDED, b=S.SKIPPED, c=S.SUCCEEDED)) == ["d"]


def test_a_skipped_step_in_a_line_does_not_let_the_next_one_jump_ahead() -> None:
    graph = _graph("a", "b", "c")
    assert ready(graph, _states(graph, b=S.SKIPPED)) == ["a"]
    assert ready(graph, _states(graph, a=S.RUNNING, b=S.SKIPPED)) == []
    assert ready(graph, _states(graph, a=S.SUCCEEDED, b=S.SKIPPED)) == ["c"]


def test_a_failure_is_passed_on_through_a_skipped_step() -> None:
    graph = _graph("a", "b", "c", Decl("d", []))
    states = _states(graph, a=S.FAILED, b=S.SKIPPED, d=S.RUNNING)
    assert unreachable(graph, states, fail_fast=False) == {"c": "a"}
    assert ready(graph, states, fail_fast=False) == []


def test_fan_out_starts_every_branch_and_fan_in_waits_for_all_eight() -> None:
    assert ready(FAN, _states(FAN, split=S.SUCCEEDED)) == TESTS
    seven = {name: S.SUCCEEDED for name in TESTS[:7]}
    assert ready(FAN, _states(FAN, split=S.SUCCEEDED, **seven, t7=S.RUNNING)) == []
    assert ready(FAN, _states(FAN, split=S.SUCCEEDED, **seven, t7=S.SUCCEEDED)) == ["join"]


def test_a_need_may_name_a_step_later_in_the_file() -> None:
    graph = _graph(Decl("deploy", ["build"]), Decl("build", []))
    assert ready(graph, _states(graph)) == ["build"]
    assert topological_order(graph) == ["build", "deploy"]


def test_topological_order_puts_needs_first_and_keeps_file_order_between_equals() -> None:
    assert topological_order(DIAMOND) == ["a", "b", "c", "d"]
    graph = _graph(Decl("z", ["y"]), Decl("x", []), Decl("y", []), final=["f1", "f2"])
    assert topological_order(graph) == ["x", "y", "z", "f1", "f2"]


# ---------------------------------------------------------------------------------------
# failures: fail fast or go on


def test_with_fail_fast_a_failure_starts_nothing_and_cancels_the_running_siblings() -> None:
    states = _states(FAN, split=S.SUCCEEDED, t0=S.FAILED, t1=S.RUNNING, t2=S.RETRYING,
                     t3=S.SUCCEEDED)
    assert ready(FAN, states) == []
    assert to_cancel(FAN, states) == ["t1", "t2"]
    assert unreachable(FAN, states) == {name: "t0" for name in [*TESTS[4:], "join"]}


def test_with_fail_fast_a_timeout_counts_as_a_failure() -> None:
    states = _states(DIAMOND, a=S.SUCCEEDED, b=S.TIMED_OUT, c=S.RUNNING)
    assert to_cancel(DIAMOND, states) == ["c"]
    assert unreachable(DIAMOND, states) == {"d": "b"}


def test_without_fail_fast_siblings_finish_and_only_the_failed_steps_downstream_is_skipped(
) -> None:
    graph = _graph("a", Decl("b", ["a"]), Decl("c", ["b"]), Decl("other", []),
                   Decl("after-other", ["other"]))
    states = _states(graph, a=S.FAILED, other=S.RUNNING)
    assert to_cancel(graph, states, fail_fast=False) == []
    assert unreachable(graph, states, fail_fast=False) == {"b": "a", "c": "a"}
    states = _states(graph, a=S.FAILED, b=S.SKIPPED, c=S.SKIPPED, other=S.SUCCEEDED)
    assert ready(graph, states, fail_fast=False) == ["after-other"]


def test_a_cancelled_need_blocks_its_dependents_too() -> None:
    states = _states(DIAMOND, a=S.SUCCEEDED, b=S.SUCCEEDED, c=S.CANCELLED)
    assert unreachable(DIAMOND, states, fail_fast=False) == {"d": "c"}
    assert ready(DIAMOND, states, fail_fast=False) == []


def test_steps_blocked_through_a_later_file_position_are_found_in_one_call() -> None:
    graph = _graph(Decl("c", ["b"]), Decl("b", ["a"]), Decl("a", []))
    assert unreachable(graph, _states(graph, a=S.FAILED), fail_fast=False) == \
        {"c": "a", "b": "a"}


def test_a_failure_of_a_finally_step_does_not_stop_main_steps() -> None:
    graph = _graph("a", final=["f"])
    states = _states(graph, f=S.FAILED)
    assert ready(graph, states) == ["a"]
    assert to_cancel(graph, states) == []


# ---------------------------------------------------------------------------------------
# finally


FINAL = _graph("build", "test", final=["report", "clean"])


def test_finally_steps_wait_until_every_main_step_has_ended() -> None:
    assert finally_ready(FINAL, _states(FINAL, build=S.SUCCEEDED)) == []
    assert finally_ready(FINAL, _states(FINAL, build=S.SUCCEEDED, test=S.RUNNING)) == []
    assert finally_ready(FINAL, _states(FINAL, build=S.SUCCEEDED, test=S.RETRYING)) == []
    assert finally_ready(FINAL, _states(FINAL, build=S.SUCCEEDED,
                                        test=S.SUCCEEDED)) == ["report"]


@pytest.mark.parametrize("ending", [
    {"build": S.FAILED, "test": S.SKIPPED},
    {"build": S.SUCCEEDED, "test": S.TIMED_OUT},
    {"build": S.CANCELLED, "test": S.CANCELLED},
], ids=["after-a-failure", "after-a-timeout", "after-a-cancel"])
def test_finally_steps_run_whatever_the_main_steps_outcome(ending: dict[str, S]) -> None:
    assert finally_ready(FINAL, _states(FINAL, **ending)) == ["report"]


def test_finally_steps_form_a_line_whose_needs_only_order_them() -> None:
    ended = {"build": S.SUCCEEDED, "test": S.SUCCEEDED}
    assert FINAL.needs["clean"] == ("report",)
    assert finally_ready(FINAL, _states(FINAL, **ended, report=S.RUNNING)) == []
    assert finally_ready(FINAL, _states(FINAL, **ended, report=S.FAILED)) == ["clean"]


def test_a_skipped_finally_step_stands_for_its_needs() -> None:
    graph = _graph("a", final=["f1", "f2", "f3"])
    assert finally_ready(graph, _states(graph, a=S.SUCCEEDED, f1=S.RUNNING, f2=S.SKIPPED)) == []
    assert finally_ready(graph, _states(graph, a=S.SUCCEEDED, f1=S.FAILED,
                                        f2=S.SKIPPED)) == ["f3"]


def test_finally_steps_with_empty_needs_start_together() -> None:
    graph = _graph("a", final=[Decl("f1", []), Decl("f2", []), "f3"])
    assert finally_ready(graph, _states(graph, a=S.FAILED)) == ["f1", "f2"]


def test_finally_steps_are_never_ready_as_main_steps_nor_cancelled() -> None:
    states = _states(FINAL, build=S.FAILED, test=S.SKIPPED, report=S.RUNNING)
    assert ready(FINAL, states) == []
    assert to_cancel(FINAL, states) == []
    assert unreachable(FINAL, states) == {}


# ---------------------------------------------------------------------------------------
# outcome


@pytest.mark.parametrize(("given", "expected"), [
    ({"build": S.SUCCEEDED, "test": S.SUCCEEDED, "report": S.SUCCEEDED, "clean": S.SUCCEEDED},
     Outcome.SUCCEEDED),
    ({"build": S.SUCCEEDED, "test": S.SKIPPED, "report": S.SUCCEEDED, "clean": S.SUCCEEDED},
     Outcome.SUCCEEDED),
    ({"build": S.FAILED, "test": S.SKIPPED, "report": S.SUCCEEDED, "clean": S.SUCCEEDED},
     Outcome.FAILED),
    ({"build": S.SUCCEEDED, "test": S.SUCCEEDED, "report": S.SUCCEEDED, "clean": S.TIMED_OUT},
     Outcome.FAILED),
    ({"build": S.SUCCEEDED, "test": S.CANCELLED, "report": S.SUCCEEDED, "clean": S.SUCCEEDED},
     Outcome.CANCELLED),
    ({"build": S.FAILED, "test": S.CANCELLED, "report": S.SUCCEEDED, "clean": S.SUCCEEDED},
     Outcome.FAILED),
    ({"build": S.CANCELLED, "test": S.CANCELLED, "report": S.FAILED, "clean": S.SUCCEEDED},
     Outcome.FAILED),
], ids=["all-succeeded", "skips-are-fine", "main-failed", "finally-failed", "cancelled",
        "failure-wins-over-its-cancelled-siblings", "finally-failed-after-cancel"])
def test_outcome_of_an_ended_run(given: dict[str, S], expected: Outcome) -> None:
    assert outcome(FINAL, given) is expected


def test_no_outcome_while_a_finally_step_has_not_run() -> None:
    assert outcome(FINAL, _states(FINAL, build=S.SUCCEEDED, test=S.SUCCEEDED,
                                  report=S.SUCCEEDED)) is None
    assert outcome(FINAL, _states(FINAL, build=S.SUCCEEDED, test=S.RETRYING,
                                  report=S.SUCCEEDED, clean=S.SUCCEEDED)) is None


def test_states_must_name_every_step_with_a_known_state() -> None:
    with pytest.raises(ValueError, match="no state given for step\\(s\\) clean"):
        ready(FINAL, {"build": "pending", "test": "pending", "report": "pending"})
    with pytest.raises(ValueError, match="step 'test' has state 'done', not one of pending"):
        ready(FINAL, {**_states(FINAL), "test": "done"})


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["DIAMOND", "FAN", "FINAL"]), st.data(), st.booleans())
def test_moves_answer_as_the_questions_asked_one_by_one(name: str, data: st.DataObject,
                                                       fail_fast: bool) -> None:
    # moves() is what a decision asks, remembered per combination of states: asked twice
    # (the second answer comes from the memo) it says what each question says on its own.
    graph = {"DIAMOND": DIAMOND, "FAN": FAN, "FINAL": FINAL}[name]
    states = {step: data.draw(st.sampled_from(list(S))).value for step in graph.names}
    for answer in (moves(graph, states, fail_fast), moves(graph, dict(states), fail_fast)):
        assert answer.stopping == tuple(to_cancel(graph, states, fail_fast))
        assert dict(answer.blocked) == unreachable(graph, states, fail_fast)
        assert answer.starting == tuple(ready(graph, states, fail_fast)
                                        + finally_ready(graph, states))
        assert answer.outcome == outcome(graph, states)
        failed = [step for step in graph.steps if states[step] in FAILURES]
        assert answer.first_failure == (failed[0] if failed else None)


def test_moves_refuse_states_that_miss_a_step_every_time() -> None:
    partial = {"build": "pending", "test": "pending", "report": "pending"}
    for _ in range(2):  # a refusal is never remembered as an answer
        with pytest.raises(ValueError, match="no state given for step\\(s\\) clean"):
            moves(FINAL, partial)


def test_plain_strings_of_the_run_model_are_accepted_as_states() -> None:
    assert ready(DIAMOND, {"a": "succeeded", "b": "skipped", "c": "succeeded",
                           "d": "pending"}) == ["d"]


# ---------------------------------------------------------------------------------------
# retry from a step


def test_retry_from_the_middle_reruns_only_what_is_downstream() -> None:
    graph = _graph("setup", "build", Decl("unit", ["build"]), Decl("lint", ["setup"]),
                   Decl("deploy", ["unit"]), final=["notify"])
    assert downstream(graph, "build") == ["build", "unit", "deploy", "notify"]
    assert downstream(graph, "lint") == ["lint", "notify"]
    assert downstream(graph, "deploy", "lint") == ["lint", "deploy", "notify"]
    assert downstream(graph, "notify") == ["notify"]


def test_after_a_retry_reset_only_the_downstream_steps_start_again() -> None:
    done = {"a": S.SUCCEEDED, "b": S.SUCCEEDED, "c": S.FAILED, "d": S.SKIPPED}
    states = {**done, **{name: S.PENDING for name in downstream(DIAMOND, "c")}}
    assert states == {"a": S.SUCCEEDED, "b": S.SUCCEEDED, "c": S.PENDING, "d": S.PENDING}
    assert ready(DIAMOND, states) == ["c"]


def test_upstream_is_what_a_step_waits_for() -> None:
    assert upstream(DIAMOND, "d") == ["a", "b", "c"]
    assert upstream(DIAMOND, "b") == ["a"]
    assert upstream(DIAMOND, "a") == []
    graph = _graph("a", Decl("b", []), final=["f1", "f2"])
    assert upstream(graph, "f2") == ["a", "b", "f1"]


def test_retry_from_an_unknown_step_is_refused_naming_it() -> None:
    with pytest.raises(GraphError, match="no step named 'deplyo' \\(steps: a, b, c, d\\)"):
        downstream(DIAMOND, "deplyo")
    with pytest.raises(GraphError, match="no step named 'x'"):
        upstream(DIAMOND, "x")


# ---------------------------------------------------------------------------------------
# refused graphs


def test_a_cycle_is_refused_naming_its_steps_in_order() -> None:
    message = _error(Decl("build", ["test"]), Decl("test", ["build"]))
    assert message.startswith("needs form a cycle: build -> test -> build; ")


def test_a_longer_cycle_is_named_from_its_first_step_in_the_file() -> None:
    message = _error(Decl("entry", []), Decl("a", ["c"]), Decl("b", ["a"]),
                     Decl("c", ["b", "entry"]))
    assert "needs form a cycle: a -> b -> c -> a;" in message


def test_a_cycle_through_the_line_rule_says_which_need_is_implicit() -> None:
    message = _error(Decl("setup"), Decl("build", ["test"]), Decl("test"))
    assert message == (
        "needs form a cycle: build -> test -> build (test has no `needs:`, so it needs the "
        "step before it, build); drop or change one of these needs"
    )


def test_a_cycle_among_finally_steps_is_refused() -> None:
    message = _error(Decl("a"), final=[Decl("f1", ["f2"]), Decl("f2")])
    assert message.startswith("needs form a cycle: f1 -> f2 -> f1 (f2 has no `needs:`, so it "
                              "needs the finally step before it, f1)")


def test_an_unknown_need_is_refused_naming_the_step_and_a_likely_name() -> None:
    message = _error(Decl("build"), Decl("deploy", ["biuld"]))
    assert message == ("step 'deploy': needs 'biuld', but there is no step of that name "
                       "(steps: build, deploy); did you mean 'build'?")


def test_a_duplicate_need_is_refused() -> None:
    assert _error(Decl("a"), Decl("b"), Decl("c", ["a", "b", "a"])) == \
        "step 'c': needs 'a' twice; name it once"


def test_a_step_needing_itself_is_refused() -> None:
    assert _error(Decl("a"), Decl("b", ["a", "b"])) == \
        "step 'b': needs itself; a step cannot wait for its own end"


def test_a_need_written_as_one_string_is_refused_with_the_list_form() -> None:
    assert _error(Decl("build"), Decl("test", "build")) == \
        "step 'test': needs is a list of step names: write `needs: [build]`"


def test_a_main_step_cannot_need_a_finally_step() -> None:
    message = _error(Decl("build", ["clean"]), final=[Decl("clean")])
    assert message.startswith("step 'build': needs 'clean', a finally step; ")


def test_a_finally_step_cannot_need_a_main_step() -> None:
    message = _error(Decl("build"), final=[Decl("clean", ["build"])])
    assert message.startswith("finally step 'clean': needs 'build', which is a main step; ")


def test_a_name_used_by_a_step_and_a_finally_step_is_refused() -> None:
    message = _error(Decl("build"), final=[Decl("build")])
    assert message.startswith("finally step 'build': a step of that name comes earlier")


# ---------------------------------------------------------------------------------------
# drawing


def test_mermaid_draws_needs_and_finally_steps_after_the_last_steps() -> None:
    graph = _graph("a", Decl("b", ["a"]), Decl("end", ["a"]), Decl("tag-release", []),
                   final=["report", "clean"])
    lines = mermaid(graph).splitlines()
    assert lines[0] == "flowchart TD"
    assert '    s_tag_release["tag-release"]' in lines
    assert '    s_end["end"]' in lines  # `end` is a Mermaid keyword: never an id
    assert {"    s_a --> s_b", "    s_a --> s_end", "    s_report --> s_clean"} <= set(lines)
    assert [line for line in lines if "-.->" in line] == [
        "    s_b -.-> s_report", "    s_end -.-> s_report", "    s_tag_release -.-> s_report"]
    assert not any("class" in line for line in lines)


def test_mermaid_with_states_labels_and_styles_each_step() -> None:
    states = _states(DIAMOND, a=S.SUCCEEDED, b=S.FAILED, c=S.CANCELLED, d=S.SKIPPED)
    lines = mermaid(DIAMOND, states).splitlines()
    assert '    s_b["b<br/>failed"]' in lines
    assert "    class s_b failed" in lines and "    class s_d skipped" in lines
    assert "    classDef failed fill:#ffcdd2" in lines
    assert not any(line.startswith("    classDef running") for line in lines)


# ---------------------------------------------------------------------------------------
# property: any graph, any order of endings, runs to a consistent end


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    """Random DAGs: `needs` may point later in the file (the run order is a random
    permutation), and `needs` left out only where the line rule keeps the graph acyclic."""
    count = draw(st.integers(1, 7))
    names = [f"s{n}" for n in range(count)]
    rank = draw(st.permutations(range(count)))
    main: list[Decl] = []
    for index, name in enumerate(names):
        earlier = [other for other in names if rank[names.index(other)] < rank[index]]
        line_ok = index == 0 or rank[index - 1] < rank[index]
        if line_ok and draw(st.booleans()):
            main.append(Decl(name))
        else:
            main.append(Decl(name, draw(st.lists(st.sampled_from(earlier), unique=True))
                             if earlier else []))
    final: list[Decl] = []
    for index in range(draw(st.integers(0, 3))):
        name = f"f{index}"
        if draw(st.booleans()):
            final.append(Decl(name))
        else:
            before = [step.name for step in final]
            final.append(Decl(name, draw(st.lists(st.sampled_from(before), unique=True))
                              if before else []))
    return build(main, final)


def _ancestors(graph: Graph, step: str) -> set[str]:
    found: set[str] = set()
    todo = list(graph.needs[step])
    while todo:
        need = todo.pop()
        if need not in found:
            found.add(need)
            todo.extend(graph.needs[need])
    return found


@settings(max_examples=300, deadline=None)
@given(graphs(), st.booleans(), st.data())
def test_any_graph_and_any_order_of_endings_reach_a_consistent_end(
        graph: Graph, fail_fast: bool, data: st.DataObject) -> None:
    skipped_at_start = data.draw(st.sets(st.sampled_from(graph.steps)))  # `when:` skips
    states: dict[str, StepStatus] = {
        name: S.SKIPPED if name in skipped_at_start else S.PENDING for name in graph.names}
    started = dict.fromkeys(graph.names, 0)
    retries = dict.fromkeys(graph.names, 0)
    operator_cancelled = False

    def cancel() -> None:
        for name in to_cancel(graph, states, fail_fast):
            assert fail_fast and states[name] in LIVE and name in graph.steps
            states[name] = S.CANCELLED

    def skip() -> None:
        for name, cause in unreachable(graph, states, fail_fast).items():
            assert states[name] is S.PENDING and name in graph.steps
            assert states[cause] in BLOCKING
            assert fail_fast or cause in _ancestors(graph, name)
            states[name] = S.SKIPPED

    def start() -> None:
        for name in ready(graph, states, fail_fast):
            assert states[name] is S.PENDING
            assert all(states[up] in SATISFIED for up in _ancestors(graph, name))
            assert not (fail_fast and any(states[s] in FAILURES for s in graph.steps))
            states[name] = S.RUNNING
            started[name] += 1

    def start_finally() -> None:
        for name in finally_ready(graph, states):
            assert states[name] is S.PENDING
            assert all(states[step] in ENDED for step in graph.steps)
            assert all(states[up] in ENDED for up in _ancestors(graph, name))
            states[name] = S.RUNNING
            started[name] += 1

    for _ in range(200):
        # the run model may ask in any order; asking every question twice reaches a fixpoint
        for question in data.draw(st.permutations([cancel, skip, start, start_finally])) * 2:
            question()
        live = [name for name in graph.names if states[name] in LIVE]
        if fail_fast and any(states[name] in FAILURES for name in graph.steps):
            assert not set(live) & set(graph.steps), states
        if not live:
            break
        assert outcome(graph, states) is None
        if not operator_cancelled and data.draw(st.integers(0, 9)) == 0:
            operator_cancelled = True  # what the run model does on `runs cancel`
            for name in graph.steps:
                if states[name] not in ENDED:
                    states[name] = S.CANCELLED
            continue
        # several results may be in before the next decision, or all of them
        arrived = data.draw(st.one_of(st.just(live), st.lists(st.sampled_from(live),
                                                              min_size=1, unique=True)))
        for name in arrived:
            if states[name] is S.RETRYING:
                states[name] = S.RUNNING  # the retry timer fired
                continue
            ends = [S.SUCCEEDED, S.FAILED, S.TIMED_OUT]
            if retries[name] < 2:
                ends.append(S.RETRYING)
            states[name] = data.draw(st.sampled_from(ends))
            retries[name] += states[name] is S.RETRYING
    else:
        pytest.fail(f"the run did not end: {states}")

    assert all(state in ENDED for state in states.values()), states
    assert all(started[name] == 1 for name in graph.finally_steps), started
    assert all(started[name] <= 1 for name in graph.steps), started
    ended = outcome(graph, states)
    main_ok = all(states[name] in SATISFIED for name in graph.steps)
    finally_ok = all(states[name] is S.SUCCEEDED for name in graph.finally_steps)
    assert (ended is Outcome.SUCCEEDED) == (main_ok and finally_ok), states
    assert (ended is Outcome.FAILED) == any(state in FAILURES for state in states.values())
    if not operator_cancelled and not fail_fast:
        # independent branches go on: only steps downstream of a failure are left unstarted
        for name in graph.steps:
            if started[name] == 0 and name not in skipped_at_start:
                assert any(states[up] in FAILURES for up in _ancestors(graph, name)), name
