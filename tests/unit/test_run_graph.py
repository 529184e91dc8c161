"""Runs of pipelines with `needs:`, `finally:` and fail_fast, through decide and apply: what
starts together, what is stopped or skipped, what finally steps are told, what a retry from a
step in the middle runs again, and runs recorded before step graphs."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from cistate.domain import run as r
from cistate.domain.messages import CancelStep, StepCommand
from cistate.domain.pipeline import parse

from ._support import NOW, REPO, SHA, Harness, push, types

pytestmark = pytest.mark.unit

TESTS = [f"t{n}" for n in range(8)]


def _harness(text: str) -> Harness:
    return Harness(r.Decider(parse(text, "graph.yaml", {"noop", "script"})))


def _started(decision: r.Decision) -> list[str]:
    return [e.data["step"] for e in decision.events if e.type == "step.started"]


def _commands(decision: r.Decision) -> dict[str, StepCommand]:
    return {o.body.step: o.body for o in decision.outgoing if isinstance(o.body, StepCommand)}


def _events(decision: r.Decision, type_: str) -> list[dict[str, Any]]:
    return [e.data for e in decision.events if e.type == type_]


def _states(h: Harness) -> dict[str, str]:
    return {name: step.state for name, step in h.state.steps.items()}


DIAMOND = """
name: diamond
steps:
  - {name: a, uses: noop}
  - {name: b, uses: noop, needs: [a]}
  - {name: c, uses: noop, needs: [a]}
  - {name: d, uses: noop, needs: [b, c]}
"""

def fan(fail_fast: bool = True) -> Harness:
    """split -> t0..t7 (one retry each) -> join, and a finally step that prints the outcome."""
    tests = "".join(f"  - {{name: {t}, uses: noop, needs: [split], retries: 1}}\n"
                    for t in TESTS)
    return _harness(
        f"name: fan\nfail_fast: {str(fail_fast).lower()}\nsteps:\n"
        "  - {name: split, uses: noop}\n"
        f"{tests}"
        f"  - {{name: join, uses: noop, needs: [{', '.join(TESTS)}]}}\n"
        "finally:\n"
        "  - {name: report, uses: script, run: 'echo \"$CISTATE_RUN_OUTCOME\"', "
        "env: {TO: team}}\n")


# ---------------------------------------------------------------------------------------
# what starts together


def test_a_diamond_starts_both_branches_at_once_and_joins_when_both_succeeded() -> None:
    h = _harness(DIAMOND)
    assert _started(h.send(push())) == ["a"]
    decision = h.send(h.ok("a", {"x": 1}))
    assert types(decision) == ["step.succeeded", "step.started", "step.started"]
    assert _started(decision) == ["b", "c"]
    assert {name: c.inputs for name, c in _commands(decision).items()} == {
        "b": {"a": {"x": 1}}, "c": {"a": {"x": 1}}}
    assert h.state.status == "running" and h.state.step == "c"  # the last one started
    assert types(h.send(h.ok("c", {"y": 2}))) == ["step.succeeded"]
    assert h.running() == ["b"]
    decision = h.send(h.ok("b", {"z": 3}))
    assert _started(decision) == ["d"]
    assert _commands(decision)["d"].inputs == {"a": {"x": 1}, "b": {"z": 3}, "c": {"y": 2}}
    assert types(h.send(h.ok("d"))) == ["step.succeeded", "run.succeeded"]
    assert h.state.status == "succeeded" and h.state.step is None


def test_fan_out_starts_eight_steps_and_fan_in_waits_for_all_of_them() -> None:
    h = fan()
    h.send(push())
    decision = h.send(h.ok("split", {"s": 0}))
    assert _started(decision) == TESTS
    assert all(c.inputs == {"split": {"s": 0}} for c in _commands(decision).values())
    for n, name in enumerate(reversed(TESTS)):  # in any order
        decision = h.send(h.ok(name, {"n": n}))
        assert _started(decision) == ([] if n < 7 else ["join"])
    join = _commands(decision)["join"]
    assert set(join.inputs) == {"split", *TESTS}
    assert join.env == {}, "a main step is not told an outcome"


def test_a_step_whose_needs_are_empty_starts_with_the_run() -> None:
    h = _harness("""
name: p
steps:
  - {name: build, uses: noop}
  - {name: lint, uses: noop, needs: []}
  - {name: deploy, uses: noop}
""")
    assert _started(h.send(push())) == ["build", "lint"]
    assert _started(h.send(h.ok("build"))) == []  # deploy needs lint: the step before it
    assert _started(h.send(h.ok("lint", {"l": 1}))) == ["deploy"]


def test_a_when_skipped_step_stands_for_its_needs() -> None:
    h = _harness("""
name: p
steps:
  - {name: a, uses: noop}
  - {name: b, uses: noop, when: {branches: [main]}}
  - {name: c, uses: noop}
""")
    decision = h.send(push("feature/x"))
    assert types(decision) == ["run.requested", "step.skipped", "step.started"]
    assert _started(h.send(h.ok("a", {"a": 1}))) == ["c"]


# ---------------------------------------------------------------------------------------
# failures: fail fast or go on


def test_with_fail_fast_a_failure_stops_the_running_siblings_and_skips_the_rest() -> None:
    h = fan()
    h.send(push())
    h.send(h.ok("split"))
    h.send(h.ok("t1"))
    h.send(h.fail("t2"))  # waits for its retry
    decision = h.send(h.fail("t0", "3 tests failed", retryable=False))
    assert types(decision)[0] == "step.failed"
    stopped = _events(decision, "step.failed")[1:]
    assert [d["step"] for d in stopped] == ["t2", *TESTS[3:]]
    assert all(d["error"]["kind"] == "cancelled" and d["attempt"] == h.attempt_of(d["step"])
               and "'t0' failed and the pipeline fails fast" in d["error"]["message"]
               for d in stopped)
    cancels = [o.body for o in decision.outgoing if o.routing_key == "cancel"]
    assert cancels == [CancelStep(run_id=h.run_id, step=t, attempt=1) for t in TESTS[3:]], \
        "t2 has no worker: it waits for its retry"
    assert _events(decision, "step.skipped") == [
        {"step": "join", "attempt": 0, "reason": "it needs 't0', which failed"}]
    # the finally step runs, told the run failed
    assert _started(decision) == ["report"]
    report = _commands(decision)["report"]
    assert report.env == {"TO": "team", "CISTATE_RUN_OUTCOME": "failed"}
    assert report.inputs == {"split": {}, "t1": {}}
    assert _states(h) == {"split": "succeeded", "t0": "failed", "t1": "succeeded",
                          **{t: "cancelled" for t in TESTS[2:]}, "join": "skipped",
                          "report": "running"}
    # a stopped step's late result is refused; the finally step's ends the run
    h.reject(h.fail("t5", attempt=1))
    decision = h.send(h.ok("report"))
    assert types(decision) == ["step.succeeded", "run.failed"]
    assert decision.events[-1].data["step"] == "t0"
    assert "3 tests failed (not retryable)" in decision.events[-1].data["reason"]
    assert h.state.status == "failed" and h.state.step == "t0"


def test_without_fail_fast_siblings_finish_and_only_what_needs_the_failure_is_skipped() -> None:
    h = _harness("""
name: p
fail_fast: false
steps:
  - {name: a, uses: noop}
  - {name: b, uses: noop, needs: [a]}
  - {name: c, uses: noop, needs: [b]}
  - {name: docs, uses: noop, needs: []}
  - {name: publish, uses: noop, needs: [docs]}
""")
    assert _started(h.send(push())) == ["a", "docs"]
    decision = h.send(h.fail("a"))
    assert types(decision) == ["step.failed", "step.skipped", "step.skipped"]
    assert [d["reason"] for d in _events(decision, "step.skipped")] == [
        "it needs 'a', which failed", "it needs 'a', which failed"]
    assert decision.outgoing == []  # docs is not stopped
    assert h.state.status == "running"
    assert _started(h.send(h.ok("docs"))) == ["publish"]
    decision = h.send(h.ok("publish"))
    assert types(decision) == ["step.succeeded", "run.failed"]
    assert decision.events[-1].data["step"] == "a"


def test_without_fail_fast_the_first_failure_is_the_step_the_run_ended_in() -> None:
    h = fan(fail_fast=False)
    h.send(push())
    h.send(h.ok("split"))
    h.tick()
    h.send(h.fail("t6", retryable=False))
    h.tick()
    h.send(h.fail("t2", retryable=False))
    for name in TESTS:
        if h.state.steps[name].state == r.RUNNING:
            h.send(h.ok(name))
    assert _commands(h.decide(h.ok("report"))) == {}
    assert h.state.steps["join"].state == r.SKIPPED
    decision = h.send(h.ok("report"))
    assert decision.events[-1].data["step"] == "t6"


def test_a_timeout_of_one_parallel_step_retries_it_alone() -> None:
    h = _harness("""
name: p
steps:
  - {name: a, uses: noop, needs: [], retries: 1, timeout: 5s, backoff: {jitter: 0}}
  - {name: b, uses: noop, needs: []}
""")
    h.send(push())
    decision = h.send(h.control("timeout", "a", 1))
    assert types(decision) == ["step.timed_out", "step.retry_scheduled"]
    assert [o.routing_key for o in decision.outgoing] == ["cancel", "control"]
    assert h.state.steps["b"].state == r.RUNNING
    assert _started(h.send(h.control("retry_due", "a", 2))) == ["a"]
    h.send(h.ok("b"))
    assert types(h.send(h.ok("a", attempt=2))) == ["step.succeeded", "run.succeeded"]


# ---------------------------------------------------------------------------------------
# finally


FINALLY = """
name: p
steps:
  - {name: build, uses: noop}
  - {name: test, uses: noop}
finally:
  - {name: report, uses: noop}
  - {name: clean, uses: noop}
"""


@pytest.mark.parametrize(("ending", "outcome"), [("ok", "succeeded"), ("fail", "failed")])
def test_finally_steps_run_in_their_line_after_every_step_and_are_told_the_outcome(
        ending: str, outcome: str) -> None:
    h = _harness(FINALLY)
    h.send(push())
    h.send(h.ok("build", {"image": "i"}))
    decision = h.send(h.ok("test") if ending == "ok" else h.fail("test"))
    assert _started(decision) == ["report"]
    assert _commands(decision)["report"].env == {"CISTATE_RUN_OUTCOME": outcome}
    assert h.state.status == "running"
    decision = h.send(h.ok("report", {"sent": True}))
    assert _started(decision) == ["clean"]
    clean = _commands(decision)["clean"]
    assert clean.env == {"CISTATE_RUN_OUTCOME": outcome}
    assert set(clean.inputs) == ({"build", "test", "report"} if ending == "ok"
                                 else {"build", "report"})
    decision = h.send(h.ok("clean"))
    assert types(decision) == ["step.succeeded", f"run.{outcome}"]


def test_a_failed_finally_step_fails_the_run_and_the_next_one_still_runs() -> None:
    h = _harness(FINALLY)
    h.send(push())
    h.send(h.ok("build"))
    h.send(h.ok("test"))
    decision = h.send(h.fail("report", "mail server down"))
    assert _started(decision) == ["clean"]
    assert _commands(decision)["clean"].env == {"CISTATE_RUN_OUTCOME": "failed"}
    decision = h.send(h.ok("clean"))
    assert types(decision) == ["step.succeeded", "run.failed"]
    assert decision.events[-1].data["step"] == "report"
    assert h.state.status == "failed" and h.state.step == "report"


def test_after_a_cancel_the_finally_steps_run_told_the_run_was_cancelled() -> None:
    h = _harness(FINALLY)
    h.send(push())
    decision = h.send(h.control("cancel", reason="wrong commit"), actor="alice")
    assert types(decision) == ["run.cancel_requested", "step.failed", "step.skipped",
                               "step.started"]
    assert h.state.steps["build"].state == r.CANCELLED
    assert h.state.steps["test"].state == r.SKIPPED
    assert _commands(decision)["report"].env == {"CISTATE_RUN_OUTCOME": "cancelled"}
    assert h.state.status == "running", "the run ends once its finally steps have"
    h.send(h.ok("report"))
    decision = h.send(h.ok("clean"))
    assert types(decision) == ["step.succeeded", "run.cancelled"]
    assert decision.events[-1].data == {"step": "build", "reason": "wrong commit"}
    assert h.state.status == "cancelled" and h.state.step == "build"


def test_a_cancel_while_the_finally_steps_run_stops_them_too() -> None:
    h = _harness(FINALLY)
    h.send(push())
    h.send(h.ok("build"))
    h.send(h.ok("test"))
    decision = h.send(h.control("cancel"))
    assert types(decision) == ["run.cancel_requested", "step.failed", "step.skipped",
                               "run.cancelled"]
    assert _events(decision, "step.skipped")[0]["reason"] == \
        "the run was cancelled while its finally steps ran"
    assert [o.body for o in decision.outgoing] == [
        CancelStep(run_id=h.run_id, step="report", attempt=1)]
    assert decision.events[-1].data["step"] == "report"
    assert h.state.status == "cancelled"


def test_a_second_cancel_stops_the_finally_steps_the_first_one_started() -> None:
    h = _harness(FINALLY)
    h.send(push())
    h.send(h.control("cancel"))
    decision = h.send(h.control("cancel"))
    assert types(decision) == ["run.cancel_requested", "step.failed", "step.skipped",
                               "run.cancelled"]
    assert h.state.status == "cancelled"
    with pytest.raises(r.Rejected, match="cancel is not allowed while the run is cancelled"):
        h.decide(h.control("cancel"))


# ---------------------------------------------------------------------------------------
# retry


MIDDLE = """
name: p
steps:
  - {name: setup, uses: noop}
  - {name: build, uses: noop}
  - {name: unit, uses: noop, needs: [build]}
  - {name: lint, uses: noop, needs: [setup]}
  - {name: deploy, uses: noop, needs: [unit, lint]}
finally:
  - {name: notify, uses: noop}
"""


def _failed_at_deploy(h: Harness) -> None:
    h.send(push())
    h.send(h.ok("setup", {"sha": "1"}))
    h.send(h.ok("build", {"image": "v1"}))
    h.send(h.ok("lint", {"lint": "ok"}))
    h.send(h.ok("unit", {"unit": "ok"}))
    h.send(h.fail("deploy", retryable=False))
    h.send(h.ok("notify"))
    assert h.state.status == "failed"


def test_retry_from_a_step_in_the_middle_reruns_only_what_is_downstream_of_it() -> None:
    h = _harness(MIDDLE)
    _failed_at_deploy(h)
    decision = h.send(h.control("retry", "build", reason="new base image"), actor="bob")
    assert decision.events[0].data == {"from_step": "build", "actor": "bob",
                                       "reason": "new base image",
                                       "steps": ["build", "unit", "deploy", "notify"]}
    assert types(decision) == ["run.retried", "step.started"]
    assert _commands(decision)["build"].inputs == {"setup": {"sha": "1"}}
    assert _commands(decision)["build"].attempt == 2
    for name in ("setup", "lint"):  # kept, with their outputs and attempts
        assert h.state.steps[name].state == r.SUCCEEDED and h.state.steps[name].attempts == 1
    assert h.state.steps["lint"].outputs == {"lint": "ok"}
    assert [h.state.steps[n].state for n in ("unit", "deploy", "notify")] == [r.PENDING] * 3
    decision = h.send(h.ok("build", {"image": "v2"}))
    assert _started(decision) == ["unit"]
    decision = h.send(h.ok("unit", {"unit": "ok2"}))
    assert _commands(decision)["deploy"].inputs == {
        "setup": {"sha": "1"}, "build": {"image": "v2"}, "unit": {"unit": "ok2"},
        "lint": {"lint": "ok"}}
    h.send(h.ok("deploy"))
    decision = h.send(h.ok("notify"))
    assert types(decision) == ["step.succeeded", "run.succeeded"]
    assert h.state.steps["notify"].attempts == 2


def test_retry_without_from_reruns_every_failed_and_stopped_step() -> None:
    h = fan()
    h.send(push())
    h.send(h.ok("split", {"s": 1}))
    h.send(h.ok("t3"))
    h.send(h.fail("t0", retryable=False))
    h.send(h.ok("report"))
    decision = h.send(h.control("retry"))
    rerun = [t for t in TESTS if t != "t3"]
    assert decision.events[0].data["from_step"] == "t0"
    assert decision.events[0].data["steps"] == [*rerun, "join", "report"]
    assert _started(decision) == rerun
    assert h.state.steps["t3"].state == r.SUCCEEDED


def test_retry_is_refused_when_a_step_the_target_needs_did_not_succeed() -> None:
    h = _harness(MIDDLE.replace("needs: [unit, lint]", "needs: [unit, lint]\n    ")
                 .replace("name: p\n", "name: p\nfail_fast: false\n"))
    h.send(push())
    h.send(h.ok("setup"))
    h.send(h.fail("build", retryable=False))
    h.send(h.ok("lint"))
    h.send(h.ok("notify"))
    assert h.state.status == "failed"
    with pytest.raises(r.Rejected, match="step\\(s\\) it needs, build, unit, did not succeed"):
        h.decide(h.control("retry", "deploy"))
    with pytest.raises(r.Rejected, match="it needs, build"):
        h.decide(h.control("retry", "notify"))
    assert types(h.decide(h.control("retry", "lint")))[0] == "run.retried"


def test_retry_of_a_step_that_leaves_a_failure_behind_is_refused_when_failing_fast() -> None:
    h = _harness(DIAMOND)
    h.send(push())
    h.send(h.ok("a"))
    h.send(h.fail("b", retryable=False))  # c is stopped
    with pytest.raises(r.Rejected, match="step\\(s\\) b failed and do not follow from it"):
        h.decide(h.control("retry", "c"))
    decision = h.send(h.control("retry"))
    assert decision.events[0].data["steps"] == ["b", "c", "d"]
    assert _started(decision) == ["b", "c"]


# ---------------------------------------------------------------------------------------
# runs recorded before step graphs


def test_a_run_recorded_before_step_graphs_folds_and_goes_on() -> None:
    pipeline = parse("name: p\nsteps:\n  - {name: a, uses: noop}\n  - {name: b, uses: noop}\n"
                     "  - {name: c, uses: noop}\n", "p.yaml", {"noop"})
    run_id = uuid.uuid4()
    requested = {"repo": REPO, "ref": "refs/heads/main", "commit": SHA, "pipeline": "p",
                 "steps": ["a", "b", "c"], "active": ["a", "b", "c"],
                 "push": {"repo": REPO, "ref": "refs/heads/main", "commit": SHA}}
    old = [  # as the line-only decider recorded them: the later steps left pending
        ("run.requested", requested, NOW), ("step.started", {"step": "a", "attempt": 1}, NOW),
        ("step.succeeded", {"step": "a", "attempt": 1, "outputs": {"x": 1}}, NOW),
        ("step.started", {"step": "b", "attempt": 1}, NOW),
        ("step.failed", {"step": "b", "attempt": 1, "error": {"message": "e"}}, NOW),
        ("run.failed", {"step": "b", "attempt": 1, "reason": "r"}, NOW),
        ("run.retried", {"from_step": "b", "actor": "op", "reason": None}, NOW),
        ("step.started", {"step": "b", "attempt": 2}, NOW),
        ("run.cancel_requested", {"reason": None}, NOW),
        ("run.cancelled", {"step": "b", "reason": None}, NOW),
    ]
    state = r.fold(run_id, old)
    assert (state.status, state.step) == ("cancelled", "b")
    assert [s.state for s in state.steps.values()] == ["succeeded", "cancelled", "pending"]
    # a projection row of a run in flight then named the running step as its machine state
    state.machine_state = "b"
    assert state.status == "running"
    h = Harness(r.Decider(pipeline))
    h.state = state
    h.state.steps["b"].state = r.RUNNING
    decision = h.send(h.ok("b", attempt=2))
    assert _started(decision) == ["c"]
    assert _commands(decision)["c"].inputs == {"a": {"x": 1}, "b": {}}
