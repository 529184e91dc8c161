"""`uses: approval`: the run is held for a person, by no worker; approved, rejected, timed
out, refused to a name that is not an approver, cancelled while waiting."""

from __future__ import annotations

import pytest

from cistate.domain import run as r
from cistate.domain.messages import StepCommand
from cistate.domain.pipeline import PipelineError, parse

from ._support import Harness, push, types

pytestmark = pytest.mark.unit

GATED = """
name: gated
steps:
  - {name: build, uses: noop}
  - name: release-gate
    uses: approval
    with: {approvers: [alice, bob], timeout: 2h}
  - {name: release, uses: noop}
"""


def gated() -> Harness:
    h = Harness(r.Decider(parse(GATED, "gated.yaml", {"noop"})))
    h.send(push())
    decision = h.send(h.ok("build"))
    assert types(decision) == ["step.succeeded", "step.waiting"]
    # no command for a worker: only the timer that ends the wait
    assert not any(isinstance(o.body, StepCommand) for o in decision.outgoing)
    [timer] = decision.outgoing
    assert timer.routing_key == "control" and timer.body.action == "timeout"  # type: ignore[attr-defined]
    assert timer.not_before is not None and (timer.not_before - h.now).total_seconds() == 7200
    return h


def test_a_waiting_run_shows_waiting_and_an_approver_lets_it_go_on() -> None:
    h = gated()
    assert h.state.status == "waiting"
    assert h.state.steps["release-gate"].state == "waiting"
    decision = h.send(h.control("approve", "release-gate", reason="change 42 signed off"),
                      actor="api:alice")
    assert types(decision) == ["step.approved", "step.started"]
    assert decision.events[0].data == {"step": "release-gate", "attempt": 1,
                                       "actor": "api:alice", "reason": "change 42 signed off"}
    assert h.state.steps["release-gate"].outputs == {"approved_by": "api:alice",
                                                     "reason": "change 42 signed off"}
    assert h.state.status == "running"
    assert types(h.send(h.ok("release")))[-1] == "run.succeeded"
    assert r.fold(h.run_id, h.log).to_json() == h.state.to_json()


def test_a_rejection_fails_the_step_and_the_run_saying_who_and_why() -> None:
    h = gated()
    decision = h.send(h.control("reject", "release-gate", reason="not this week"),
                      actor="cli:bob")
    assert types(decision) == ["step.rejected", "step.skipped", "run.failed"]
    error = h.state.steps["release-gate"].error or {}
    assert error["message"] == "rejected by cli:bob: not this week"
    assert h.state.status == "failed"


def test_a_name_that_is_not_an_approver_is_refused_and_the_run_still_waits() -> None:
    h = gated()
    with pytest.raises(r.Rejected, match="api:mallory may not approve step 'release-gate': "
                                         "its approvers are alice, bob"):
        h.decide(h.control("approve", "release-gate"), actor="api:mallory")
    assert h.state.status == "waiting"


def test_nobody_deciding_in_time_fails_the_step_with_the_reason() -> None:
    h = gated()
    decision = h.send(h.control("timeout", "release-gate", attempt=1))
    assert types(decision) == ["step.timed_out", "step.skipped", "run.failed"]
    assert "neither approved nor rejected within 7200s" in \
        decision.events[0].data["error"]["message"]
    # a late approval finds nothing to approve
    with pytest.raises(r.Rejected, match="it is timed_out, not waiting"):
        h.decide(h.control("approve", "release-gate"), actor="api:alice")


def test_approving_a_step_that_does_not_wait_is_refused() -> None:
    h = Harness(r.Decider(parse(GATED, "gated.yaml", {"noop"})))
    h.send(push())
    with pytest.raises(r.Rejected, match="it is pending, not waiting"):
        h.decide(h.control("approve", "release-gate"), actor="api:alice")
    with pytest.raises(r.Rejected, match="not an approval step"):
        h.decide(h.control("approve", "build"), actor="api:alice")


def test_a_cancel_while_waiting_ends_the_run_cancelled() -> None:
    h = gated()
    decision = h.send(h.control("cancel", reason="superseded"), actor="api:alice")
    assert "run.cancelled" in types(decision)
    assert h.state.steps["release-gate"].state == "cancelled"


def test_approval_settings_are_checked_at_load() -> None:
    with pytest.raises(PipelineError, match="approval step takes with: approvers and timeout"):
        parse("name: x\nsteps:\n  - {name: g, uses: approval, with: {who: [a]}}\n", "x.yaml",
              set())
    with pytest.raises(PipelineError, match="approvers is a list of names"):
        parse("name: x\nsteps:\n  - {name: g, uses: approval, with: {approvers: alice}}\n",
              "x.yaml", set())


def test_no_worker_serves_an_approval_step() -> None:
    from cistate.domain.pipeline import Catalog

    catalog = Catalog(parse(GATED, "gated.yaml", {"noop"}))
    assert catalog.step_names == ("build", "release")
    assert catalog.handlers == ("noop",)
