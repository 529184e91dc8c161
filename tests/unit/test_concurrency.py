"""Concurrency groups and locks, the run's side (cistate.domain.run) and the pipeline's
(`concurrency:`, `lock:`): a run of a group waits for its turn, a superseded run is cancelled
saying by which run, a step with a lock waits for it and hands it back however it ends, and
cistate's own answers (granted, superseded, lock_timeout) are refused from anyone else. Then a
property: any interleaving of pushes, claims, grants, step results and cancels over several
runs of one group and one lock keeps one holder at a time, in arrival order, and ends every run.
(The resource's own rules: test_resource.py.)"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cistate.domain import pipeline as p
from cistate.domain import resource as res
from cistate.domain import run as r
from cistate.domain.events import derived_id
from cistate.domain.messages import (
    CancelStep,
    ClaimRequest,
    Control,
    Push,
    StepCommand,
    StepError,
    StepResult,
)

from ._support import NOW, REPO, SHA, Harness, push, types

pytestmark = pytest.mark.unit

KNOWN = {"noop", "script", "approval"}


def parse(text: str, source: str = "svc.yaml") -> p.Pipeline:
    return p.parse(text, source, KNOWN)


GROUPED = """
name: svc
concurrency: {group: "${repo}/${branch}", cancel_in_progress: %s}
steps:
  - {name: build, uses: noop}
  - {name: test, uses: noop}
finally:
  - {name: notify, uses: noop}
"""

LOCKED = """
name: svc
steps:
  - {name: build, uses: noop}
  - {name: deploy, uses: noop, lock: dev-deploy, lock_timeout: 10m, retries: 1}
  - {name: health, uses: noop, lock: dev-deploy}
  - {name: report, uses: noop}
finally:
  - {name: notify, uses: noop}
"""

GROUP = res.group_resource(f"{REPO}/main")
LOCK = res.lock_resource("dev-deploy")


def grouped(cancel_in_progress: bool = False) -> Harness:
    return Harness(r.Decider(parse(GROUPED % str(cancel_in_progress).lower())))


def locked() -> Harness:
    return Harness(r.Decider(parse(LOCKED)))


def commands(decision: r.Decision) -> list[StepCommand]:
    return [o.body for o in decision.outgoing if isinstance(o.body, StepCommand)]


def claims(decision: r.Decision) -> list[ClaimRequest]:
    return [o.body for o in decision.outgoing if isinstance(o.body, ClaimRequest)]


def claim_id(h: Harness, resource: str) -> uuid.UUID:
    return uuid.UUID(h.state.holds[resource]["claim"])


def answer(h: Harness, action: str, resource: str, claim: uuid.UUID | None = None,
           reason: str | None = None) -> Control:
    """The resource's answer to the run's latest claim on `resource` (or to `claim`)."""
    return h.control(action, resource=resource, claim=claim or claim_id(h, resource),
                     reason=reason)


def releases(decision: r.Decision) -> list[tuple[str, uuid.UUID]]:
    return [(c.resource, c.claim) for c in claims(decision) if c.action == "release"]


def handed_back(h: Harness, decision: r.Decision, resource: str, claim: uuid.UUID) -> None:
    """`decision` (a grant of a claim the run let go before) starts nothing and hands the
    claim back again, with a message of its own (the first release has its outbox row)."""
    before = {name: dict(hold) for name, hold in h.state.holds.items()}
    assert types(decision) == ["claim.released"]
    assert decision.events[0].data == {"resource": resource, "claim": str(claim),
                                       "was": "granted late"}
    assert commands(decision) == []
    [back] = decision.outgoing
    assert isinstance(back.body, ClaimRequest)
    assert (back.body.resource, back.body.action, back.body.claim) == \
        (resource, "release", claim)
    assert back.message_id != derived_id(claim, "release")
    h.commit(decision)
    assert h.state.holds == before  # the run's own hold is as it was


def refolds(h: Harness) -> None:
    assert r.fold(h.run_id, h.log).to_json() == h.state.to_json()


# -- the pipeline ---------------------------------------------------------------------------


def test_the_group_template_is_filled_in_with_repo_branch_and_pipeline() -> None:
    pipeline = parse(GROUPED.replace("${repo}/${branch}", "${pipeline}:${repo}@${branch}")
                     % "true")
    assert pipeline.concurrency is not None and pipeline.concurrency.cancel_in_progress
    assert pipeline.concurrency.group_for(REPO, "main", "svc") == f"svc:{REPO}@main"
    # a fixed name: every run of every repository and branch shares it
    fixed = parse(GROUPED.replace("${repo}/${branch}", "prod-deploys") % "false")
    assert fixed.concurrency is not None
    assert fixed.concurrency.group_for(REPO, "dev", "svc") == "prod-deploys"
    assert not fixed.concurrency.cancel_in_progress


def test_a_group_template_with_an_unknown_variable_is_refused_naming_it() -> None:
    text = GROUPED.replace("${repo}/${branch}", "${repo}/${sha}/${tag}") % "false"
    with pytest.raises(p.PipelineError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith("svc.yaml: field 'concurrency.group'")
    assert "${repo}, ${branch}, ${pipeline}" in message
    assert "not ${sha}, ${tag}" in message


def test_cancel_in_progress_defaults_to_false_and_unknown_keys_are_refused() -> None:
    pipeline = parse(GROUPED.replace(", cancel_in_progress: %s", ""))
    assert pipeline.concurrency is not None
    assert pipeline.concurrency.cancel_in_progress is False
    with pytest.raises(p.PipelineError, match="concurrency"):
        parse(GROUPED.replace("cancel_in_progress", "cancel-in-progress") % "true")


def test_a_step_names_its_lock_and_how_long_it_waits_for_it() -> None:
    pipeline = parse(LOCKED)
    assert pipeline.step("deploy").lock == "dev-deploy"
    assert pipeline.step("deploy").lock_timeout == 600
    assert pipeline.step("health").lock_timeout == p.DEFAULT_LOCK_TIMEOUT_SECONDS == 3600
    assert pipeline.step("build").lock is None
    with pytest.raises(p.PipelineError, match="lock"):
        parse(LOCKED.replace("lock: dev-deploy, lock_timeout", "lock: dev deploy, lock_timeout"))


def test_an_approval_step_cannot_take_a_lock() -> None:
    text = """
name: gated
steps:
  - {name: gate, uses: approval, lock: dev-deploy}
"""
    with pytest.raises(p.PipelineError, match="an approval step cannot take a lock"):
        parse(text)


def test_a_repositorys_own_pipeline_may_set_neither_a_group_nor_a_lock() -> None:
    group = """
name: own
concurrency: {group: "${branch}"}
steps:
  - {name: build, uses: script, run: make}
"""
    with pytest.raises(p.PipelineError, match="field 'concurrency': concurrency groups are "
                                              "the deployment's"):
        p.parse_repo_file(group, ".cistate/pipeline.yaml", KNOWN)
    lock = """
name: own
steps:
  - {name: build, uses: script, run: make, lock: dev-deploy}
"""
    with pytest.raises(p.PipelineError, match=r"step 'build' \(#1\): field 'lock': locks are the "
                                              "deployment's"):
        p.parse_repo_file(lock, ".cistate/pipeline.yaml", KNOWN)
    # the deployment's files may
    assert parse(group).concurrency is not None
    assert parse(lock).step("build").lock == "dev-deploy"


PLAIN = """
name: plain
steps:
  - {name: build, uses: noop, retries: 1, timeout: 10m}
  - {name: deploy, uses: noop}
finally:
  - {name: notify, uses: noop}
"""
# PLAIN's hash before groups and locks were added: runs pinned then must keep finding it
PLAIN_SHA256 = "e6937b8d7fb0169f0d2e4da35f91c616c38045073dd92d73688c2c7858dd6668"


def test_a_pipeline_without_groups_or_locks_keeps_its_spec_and_its_hash() -> None:
    pipeline = p.parse(PLAIN, "plain.yaml", {"noop"})
    assert "concurrency" not in pipeline.spec
    for step in [*pipeline.spec["steps"], *pipeline.spec["finally"]]:
        assert "lock" not in step and "lock_timeout" not in step
    assert pipeline.sha256 == PLAIN_SHA256 == p.spec_sha256(pipeline.spec)


def test_a_pinned_spec_keeps_its_group_and_locks() -> None:
    pipeline = parse(LOCKED.replace("name: svc\n", "name: svc\nconcurrency: "
                                    "{group: '${branch}', cancel_in_progress: true}\n"))
    assert pipeline.spec["concurrency"] == {"group": "${branch}", "cancel_in_progress": True}
    again = p.from_spec(pipeline.spec, "pinned")
    assert again.sha256 == pipeline.sha256
    assert again.concurrency == pipeline.concurrency
    assert again.step("deploy").lock == "dev-deploy"
    assert again.step("deploy").lock_timeout == 600
    # a lock changes the hash: a run pinned with it keeps deciding with it
    assert parse(LOCKED).sha256 != parse(LOCKED.replace(", lock_timeout: 10m", "")).sha256


# -- a run of a concurrency group ------------------------------------------------------------


def test_a_run_of_a_group_waits_for_its_turn_and_starts_when_granted() -> None:
    h = grouped()
    opened = h.send(push())
    assert types(opened) == ["run.requested", "claim.requested"]
    assert commands(opened) == []
    [ask] = claims(opened)
    assert (ask.resource, ask.action, ask.run_id, ask.step, ask.supersede) == \
        (GROUP, "acquire", h.run_id, None, False)
    assert opened.events[1].data == {"resource": GROUP, "claim": str(ask.claim), "n": 1}
    assert h.state.status == "waiting"
    assert h.state.to_json()["holds"] == {GROUP: "waiting"}
    assert h.state.waiting_gate() == GROUP
    # nothing runs: a result for the first step is refused
    with pytest.raises(r.Rejected):
        h.decide(StepResult(run_id=h.run_id, step="build", attempt=1, status="succeeded"))
    turn = h.send(answer(h, "granted", GROUP, ask.claim))
    assert types(turn) == ["claim.granted", "step.started"]
    assert [c.step for c in commands(turn)] == ["build"]
    assert h.state.status == "running" and h.state.to_json()["holds"] == {GROUP: "held"}
    refolds(h)


def test_each_branch_has_a_group_of_its_own_and_cancel_in_progress_is_asked() -> None:
    h = grouped(cancel_in_progress=True)
    [ask] = claims(h.send(push("dev")))
    assert ask.resource == res.group_resource(f"{REPO}/dev")
    assert ask.supersede is True


def test_a_run_hands_its_group_back_only_when_it_has_ended() -> None:
    h = grouped()
    h.send(push())
    h.send(answer(h, "granted", GROUP))
    assert releases(h.send(h.ok("build"))) == []
    ended = h.send(h.ok("test"))
    assert releases(ended) == []  # its finally step still runs
    assert h.state.hold_state(GROUP) == "held"
    last = h.send(h.ok("notify"))
    assert types(last)[-2:] == ["run.succeeded", "claim.released"]
    assert last.events[-1].data == {"resource": GROUP, "claim": str(claim_id(h, GROUP)),
                                    "was": "held"}
    assert releases(last) == [(GROUP, claim_id(h, GROUP))]
    assert h.state.to_json()["holds"] == {GROUP: "released"}
    refolds(h)


def test_a_run_cancelled_while_it_waits_ends_at_once_and_withdraws_its_claim() -> None:
    h = grouped()
    h.send(push())
    claim = claim_id(h, GROUP)
    cancelled = h.send(h.control("cancel", reason="not needed"), actor="cli:alice")
    assert types(cancelled) == ["run.cancel_requested", "step.skipped", "step.skipped",
                                "step.skipped", "run.cancelled", "claim.released"]
    assert commands(cancelled) == []  # not even its finally step runs: nothing started
    assert cancelled.events[-2].data == {"step": None, "reason": "not needed"}
    assert cancelled.events[-1].data["was"] == "waiting"
    assert releases(cancelled) == [(GROUP, claim)]
    assert h.state.status == "cancelled"
    # its turn comes after all (the release overtook the request): nothing starts, and
    # the group is handed back
    handed_back(h, h.decide(answer(h, "granted", GROUP, claim)), GROUP, claim)
    assert h.state.status == "cancelled"
    refolds(h)


def test_a_run_superseded_while_it_waits_is_cancelled_saying_by_which_run() -> None:
    h = grouped(cancel_in_progress=True)
    h.send(push())
    newer = uuid.uuid4()
    decision = h.send(answer(h, "superseded", GROUP, reason=f"superseded by {newer}"))
    assert "run.cancelled" in types(decision)
    assert decision.events[types(decision).index("run.cancelled")].data["reason"] == \
        f"superseded by {newer}"
    assert releases(decision) == [(GROUP, claim_id(h, GROUP))]
    assert h.state.status == "cancelled"


def test_a_run_superseded_while_it_runs_stops_its_steps_and_ends_cancelled() -> None:
    h = grouped(cancel_in_progress=True)
    h.send(push())
    h.send(answer(h, "granted", GROUP))
    newer = uuid.uuid4()
    why = f"superseded by {newer}"
    decision = h.send(answer(h, "superseded", GROUP, reason=why))
    assert types(decision) == ["run.cancel_requested", "step.failed", "step.skipped",
                               "step.started"]
    stopped = decision.events[1].data
    assert stopped["step"] == "build" and stopped["error"]["kind"] == "cancelled"
    assert stopped["error"]["reason"] == why
    assert [o.body.step for o in decision.outgoing if isinstance(o.body, CancelStep)] == \
        ["build"]
    assert [c.step for c in commands(decision)] == ["notify"]
    # the group is kept while the finally step runs, and handed back once the run has ended
    assert releases(decision) == []
    assert h.state.hold_state(GROUP) == "held"
    ended = h.send(h.ok("notify"))
    assert types(ended) == ["step.succeeded", "run.cancelled", "claim.released"]
    assert ended.events[1].data == {"step": "build", "reason": why}
    assert releases(ended) == [(GROUP, claim_id(h, GROUP))]
    # told twice (a redelivery), or after the run ended: nothing more happens
    assert h.decide(answer(h, "superseded", GROUP, reason=why)).ignored
    refolds(h)


def test_a_supersede_of_an_older_claim_of_the_run_is_ignored() -> None:
    h = grouped(cancel_in_progress=True)
    h.send(push())
    h.send(answer(h, "granted", GROUP))
    stale = h.decide(answer(h, "superseded", GROUP, claim=uuid.uuid4(), reason="x"))
    assert stale.ignored and stale.events == []


def test_a_grant_twice_or_of_another_claim_changes_nothing() -> None:
    h = grouped()
    h.send(push())
    first = answer(h, "granted", GROUP)
    h.send(first)
    again = h.decide(first)  # redelivered
    assert again.ignored and again.events == [] and again.outgoing == []
    other = h.decide(answer(h, "granted", GROUP, claim=uuid.uuid4()))
    assert other.ignored and other.events == []
    assert h.decide(answer(h, "granted", LOCK, claim=uuid.uuid4())).ignored


def test_a_release_that_overtakes_its_request_strands_nobody() -> None:
    """Two relays or orchestrators may deliver a run's release before its request: the
    resource, knowing no such claim, changes nothing; when the request comes and is granted,
    the run (ended by then) hands the claim back, and the next run gets its turn."""
    a, b = grouped(), grouped()
    [ask_a] = claims(a.send(push()))
    [ask_b] = claims(b.send(push()))
    [gone] = claims(a.send(a.control("cancel"), actor="cli:alice"))
    assert gone.action == "release" and a.state.status == "cancelled"
    group = res.ResourceState(GROUP)

    def resource(request: ClaimRequest) -> list[Control]:
        decision = res.decide(group, request, uuid.uuid4())
        for event in decision.events:
            res.apply(group, str(event.type), event.data)
        return [o.body for o in decision.outgoing if isinstance(o.body, Control)]

    assert resource(gone) == []  # before its request: nothing to release yet
    [turn_a] = resource(ask_a)
    assert resource(ask_b) == []  # b waits behind the cancelled run
    [back] = claims(a.send(turn_a))
    assert (back.action, back.claim) == ("release", ask_a.claim)
    [turn_b] = resource(back)
    assert (turn_b.action, turn_b.run_id) == ("granted", b.run_id)
    assert [c.step for c in commands(b.send(turn_b))] == ["build"]
    assert group.holder is not None and group.holder.run_id == b.run_id


@pytest.mark.parametrize("action", ["granted", "superseded", "lock_timeout"])
def test_cistates_own_answers_are_refused_from_an_operator(action: str) -> None:
    h = grouped()
    h.send(push())
    message = (h.control(action, "build", attempt=1) if action == "lock_timeout"
               else answer(h, action, GROUP))
    with pytest.raises(r.Rejected, match=f"{action!r} is cistate's own message"):
        h.decide(message, actor="api:mallory")
    rejected = h.reject(message, actor="api:mallory")
    assert types(rejected) == ["message.rejected"]
    assert h.state.status == "waiting"


def test_a_retried_run_waits_for_its_group_again_and_never_supersedes() -> None:
    h = grouped(cancel_in_progress=True)
    h.send(push())
    first = claim_id(h, GROUP)
    h.send(answer(h, "granted", GROUP))
    h.send(h.fail("build", retryable=False))
    h.send(h.ok("notify"))
    assert h.state.status == "failed" and h.state.hold_state(GROUP) == "released"
    retried = h.send(h.control("retry"), actor="cli:alice")
    assert types(retried)[:2] == ["run.retried", "claim.requested"]
    assert commands(retried) == []
    [ask] = claims(retried)
    assert ask.action == "acquire" and ask.supersede is False and ask.claim != first
    assert retried.events[1].data["n"] == 2
    assert h.state.status == "waiting"
    # the first claim's grant, delivered late, does not start it: it is handed back
    handed_back(h, h.decide(answer(h, "granted", GROUP, first)), GROUP, first)
    assert h.state.status == "waiting"
    turn = h.send(answer(h, "granted", GROUP, ask.claim))
    assert [c.step for c in commands(turn)] == ["build"]
    refolds(h)


# -- a step with a lock ----------------------------------------------------------------------


def to_deploy(h: Harness) -> r.Decision:
    """Open a run of LOCKED and let build succeed: deploy waits for its lock."""
    h.send(push())
    waiting = h.send(h.ok("build"))
    assert types(waiting) == ["step.succeeded", "claim.requested", "step.waiting"]
    return waiting


def test_a_step_waits_for_its_lock_and_a_timer_bounds_the_wait() -> None:
    h = locked()
    waiting = to_deploy(h)
    assert waiting.events[2].data == {"step": "deploy", "attempt": 1, "lock": "dev-deploy",
                                      "timeout": 600}
    assert commands(waiting) == []
    [ask] = claims(waiting)
    assert (ask.resource, ask.action, ask.step) == (LOCK, "acquire", "deploy")
    [timer] = [o for o in waiting.outgoing if o.routing_key == "control"]
    assert isinstance(timer.body, Control) and timer.body.action == "lock_timeout"
    assert (timer.body.step, timer.body.attempt) == ("deploy", 1)
    assert timer.not_before is not None and (timer.not_before - h.now).total_seconds() == 600
    assert h.state.status == "waiting" and h.state.steps["deploy"].state == "waiting"
    granted = h.send(answer(h, "granted", LOCK))
    assert types(granted) == ["claim.granted", "step.started"]
    assert [c.step for c in commands(granted)] == ["deploy"]
    # the timer, due later, finds nothing to fail
    assert h.decide(h.control("lock_timeout", "deploy", attempt=1)).ignored
    refolds(h)


def test_the_lock_is_held_across_consecutive_steps_and_released_after_the_last() -> None:
    h = locked()
    to_deploy(h)
    h.send(answer(h, "granted", LOCK))
    claim = claim_id(h, LOCK)
    health = h.send(h.ok("deploy"))
    # health names the same lock: it starts at once, without asking for it again
    assert types(health) == ["step.succeeded", "step.started"]
    assert claims(health) == [] and h.state.hold_state(LOCK) == "held"
    done = h.send(h.ok("health"))
    assert types(done) == ["step.succeeded", "step.started", "claim.released"]
    assert [c.step for c in commands(done)] == ["report"]
    assert done.events[-1].data == {"resource": LOCK, "claim": str(claim), "was": "held"}
    assert releases(done) == [(LOCK, claim)]
    # once: the rest of the run does not hand it back again
    assert releases(h.send(h.ok("report"))) == []
    assert releases(h.send(h.ok("notify"))) == []
    assert h.state.status == "succeeded"
    refolds(h)


def test_the_lock_is_kept_while_its_step_waits_for_a_retry() -> None:
    h = locked()
    to_deploy(h)
    h.send(answer(h, "granted", LOCK))
    backoff = h.send(h.fail("deploy"))
    assert types(backoff) == ["step.failed", "step.retry_scheduled"]
    assert releases(backoff) == [] and h.state.hold_state(LOCK) == "held"
    again = h.send(h.control("retry_due", "deploy", attempt=2))
    assert types(again) == ["step.started"] and claims(again) == []
    assert [(c.step, c.attempt) for c in commands(again)] == [("deploy", 2)]


def _lock_ends(h: Harness, how: str) -> r.Decision:
    """Take deploy (holding the lock) to its end, `how`; the decision that ended it."""
    if how == "cancel while waiting":
        return h.send(h.control("cancel"), actor="cli:alice")
    if how == "lock_timeout":
        return h.send(h.control("lock_timeout", "deploy", attempt=1))
    h.send(answer(h, "granted", LOCK))
    if how == "failed":
        return h.send(h.fail("deploy", retryable=False))
    if how == "retries exhausted":
        h.send(h.fail("deploy"))
        h.send(h.control("retry_due", "deploy", attempt=2))
        return h.send(h.fail("deploy"))
    if how == "step timeout":
        h.send(h.control("timeout", "deploy", attempt=1))
        h.send(h.control("retry_due", "deploy", attempt=2))
        return h.send(h.control("timeout", "deploy", attempt=2))
    if how == "cancel":
        return h.send(h.control("cancel"), actor="cli:alice")
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["failed", "retries exhausted", "step timeout", "cancel",
                                 "cancel while waiting", "lock_timeout"])
def test_the_lock_is_released_however_its_step_ends(how: str) -> None:
    h = locked()
    to_deploy(h)
    claim = claim_id(h, LOCK)
    was = "waiting" if how in ("cancel while waiting", "lock_timeout") else "held"
    ended = _lock_ends(h, how)
    assert h.state.steps["deploy"].state in ("failed", "timed_out", "cancelled")
    assert h.state.steps["health"].state != "running"
    assert "claim.released" in types(ended)
    released = ended.events[types(ended).index("claim.released")].data
    assert released == {"resource": LOCK, "claim": str(claim), "was": was}
    assert releases(ended) == [(LOCK, claim)]
    assert h.state.hold_state(LOCK) == "released"
    # what follows never hands it back twice
    for name in ("report", "notify"):
        if h.state.steps[name].state == "running":
            assert releases(h.send(h.ok(name))) == []
    refolds(h)


def test_a_lock_wait_that_times_out_fails_the_step_with_the_reason() -> None:
    h = locked()
    to_deploy(h)
    ended = h.send(h.control("lock_timeout", "deploy", attempt=1))
    assert types(ended)[:3] == ["step.timed_out", "step.skipped", "step.skipped"]
    error = ended.events[0].data["error"]
    assert error["kind"] == "lock_timeout" and error["retryable"] is False
    assert "waited 600s for lock 'dev-deploy'" in error["message"]
    # deploy has retries left, yet a lock wait is not retried
    assert "step.retry_scheduled" not in types(ended)
    h.send(h.ok("notify"))
    assert h.state.status == "failed"
    # the lock comes after all: nothing starts, and it is handed back
    handed_back(h, h.decide(answer(h, "granted", LOCK)), LOCK, claim_id(h, LOCK))


def test_a_grant_of_a_lock_claim_let_go_before_starts_nothing_and_hands_it_back() -> None:
    h = locked()
    to_deploy(h)
    first = claim_id(h, LOCK)
    h.send(answer(h, "granted", LOCK))
    h.send(h.ok("deploy"))
    h.send(h.ok("health"))  # lock released
    handed_back(h, h.decide(answer(h, "granted", LOCK, first)), LOCK, first)
    assert h.state.steps["report"].state == "running"


def test_a_retried_run_asks_for_its_lock_with_a_new_claim() -> None:
    h = locked()
    to_deploy(h)
    first = claim_id(h, LOCK)
    h.send(h.control("lock_timeout", "deploy", attempt=1))
    h.send(h.ok("notify"))
    h.send(h.control("retry"), actor="cli:alice")
    assert h.state.steps["deploy"].state == "waiting"
    second = claim_id(h, LOCK)
    assert second != first and h.state.holds[LOCK]["n"] == 2
    handed_back(h, h.decide(answer(h, "granted", LOCK, first)), LOCK, first)
    started = h.send(answer(h, "granted", LOCK, second))
    assert [(c.step, c.attempt) for c in commands(started)] == [("deploy", 2)]


# -- any interleaving over several runs ------------------------------------------------------

WORLD = """
name: svc
concurrency: {group: "${branch}", cancel_in_progress: %s}
steps:
  - {name: build, uses: noop}
  - {name: deploy, uses: noop, lock: dev-deploy, retries: 1}
  - {name: health, uses: noop, lock: dev-deploy}
finally:
  - {name: notify, uses: noop}
"""
WORLD_DECIDERS = {flag: r.Decider(parse(WORLD % str(flag).lower())) for flag in (False, True)}
WORLD_LOCK = res.lock_resource("dev-deploy")
OPERATOR = "cli:op"
# what a worker does with a command, by a draw of 0-9: mostly it succeeds; else it fails (to
# be retried, or for good), or is lost with it (the step's timeout timer ends the wait)
WORKER = ("succeeded",) * 7 + ("failed", "fatal", "lost")


@dataclass
class Envelope:
    kind: str  # push | claim | control | result | command
    body: Any
    message_id: uuid.UUID
    actor: str = "system"
    timer: bool = False  # a timer (retry_due, timeout, lock_timeout): due at some later time


@dataclass
class World:
    """Runs and resources that talk only through messages, delivered in any order, at least
    once; each aggregate's decisions applied as the store would (a message that recorded
    events is a duplicate when delivered again)."""

    decider: r.Decider
    runs: dict[uuid.UUID, r.RunState] = field(default_factory=dict)
    run_log: dict[uuid.UUID, list[tuple[str, dict[str, Any], Any]]] = field(
        default_factory=dict)
    resources: dict[str, res.ResourceState] = field(default_factory=dict)
    resource_log: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    pending: list[Envelope] = field(default_factory=list)
    delivered: list[Envelope] = field(default_factory=list)
    handled: set[tuple[str, uuid.UUID]] = field(default_factory=set)
    outbox: set[uuid.UUID] = field(default_factory=set)
    groups: dict[uuid.UUID, str] = field(default_factory=dict)  # run -> its group
    # (resource, run) in the order runs recorded claim.granted
    run_grants: dict[str, list[uuid.UUID]] = field(default_factory=dict)
    made: int = 0

    def fresh(self) -> uuid.UUID:
        """A new message id (the same in every replay of an example, unlike uuid4)."""
        self.made += 1
        return uuid.uuid5(uuid.NAMESPACE_OID, str(self.made))

    def post(self, envelope: Envelope) -> None:
        assert envelope.message_id not in self.outbox, f"outbox id used twice: {envelope}"
        self.outbox.add(envelope.message_id)
        self.pending.append(envelope)

    def deliver(self, envelope: Envelope, worker: str) -> None:
        self.delivered.append(envelope)
        if envelope.kind == "claim":
            self.to_resource(envelope.body, envelope.message_id)
        elif envelope.kind == "command":
            self.work(envelope.body, worker)
        elif envelope.kind == "push":
            self.to_run(r.run_id_for(envelope.message_id), envelope.body, envelope)
        else:
            self.to_run(envelope.body.run_id, envelope.body, envelope)

    def work(self, command: StepCommand, outcome: str) -> None:
        if outcome == "lost":
            return
        error = None if outcome == "succeeded" else StepError(
            message="boom", retryable=outcome == "failed")
        result = StepResult(run_id=command.run_id, step=command.step, attempt=command.attempt,
                            status="succeeded" if outcome == "succeeded" else "failed",
                            error=error)
        self.pending.append(Envelope("result", result, self.fresh()))

    def to_run(self, run_id: uuid.UUID, message: Push | StepResult | Control,
               envelope: Envelope) -> None:
        key = (str(run_id), envelope.message_id)
        if key in self.handled:
            return
        state = self.runs.get(run_id) or r.RunState(id=run_id)
        try:
            decision = self.decider.decide(state, message, envelope.message_id, NOW,
                                           envelope.actor)
        except r.Rejected as exc:
            decision = self.decider.rejection(state, envelope.message_id, envelope.kind,
                                              message.model_dump(mode="json"), exc.reason,
                                              envelope.actor)
        if decision.ignored:
            return
        self.handled.add(key)
        log = self.run_log.setdefault(run_id, [])
        for event in decision.events:
            r.apply(state, str(event.type), event.data, NOW)
            log.append((str(event.type), event.data, NOW))
            if event.type == "claim.granted":
                self.run_grants.setdefault(event.data["resource"], []).append(run_id)
        self.runs[run_id] = state
        if isinstance(message, Push):
            self.groups[run_id] = next(iter(state.holds))
        for out in decision.outgoing:
            if isinstance(out.body, CancelStep):
                continue  # the worker stops; the run recorded the end already
            kind = {ClaimRequest: "claim", Control: "control", StepCommand: "command"}[
                type(out.body)]
            self.post(Envelope(kind, out.body, out.message_id, timer=out.not_before is not None))

    def to_resource(self, request: ClaimRequest, message_id: uuid.UUID) -> None:
        key = (request.resource, message_id)
        if key in self.handled:
            return
        state = self.resources.setdefault(request.resource,
                                          res.ResourceState(request.resource))
        decision = res.decide(state, request, message_id)
        if decision.ignored:
            return
        self.handled.add(key)
        log = self.resource_log.setdefault(request.resource, [])
        for event in decision.events:
            res.apply(state, str(event.type), event.data)
            log.append((str(event.type), event.data))
        for out in decision.outgoing:
            self.post(Envelope("control", out.body, out.message_id))

    # -- what must hold

    def check(self) -> None:
        for name, state in self.resources.items():
            waiting = [c.claim for c in state.waiting]
            assert len(waiting) == len(set(waiting))
            assert state.holder is None or state.holder.claim not in waiting
            holders = [run_id for run_id, run in self.runs.items()
                       if run.hold_state(name) == r.HOLD_HELD]
            # the resource's holder is the authority: a run holds it only as that holder
            # (a run hands it back in the decision that marks its hold released)
            for run_id in holders:
                hold = self.runs[run_id].holds[name]
                assert state.holder is not None and str(state.holder.claim) == hold["claim"], \
                    f"{run_id} holds {name} but the resource says {state.to_json()}"
            assert len(holders) <= 1
        locked_runs = [run_id for run_id, run in self.runs.items()
                       if any(step.state == r.RUNNING
                              and self.decider.pipeline.step(name).lock is not None
                              for name, step in run.steps.items())]
        assert len(locked_runs) <= 1, f"two runs run steps that need the lock: {locked_runs}"
        for run_id in locked_runs:
            assert self.runs[run_id].hold_state(WORLD_LOCK) == r.HOLD_HELD
        for group in set(self.groups.values()):
            started = [run_id for run_id, run in self.runs.items()
                       if self.groups[run_id] == group and any(
                           step.state in r.LIVE for step in run.steps.values())]
            assert len(started) <= 1, f"two runs of {group} at once: {started}"
            for run_id in started:
                assert self.runs[run_id].hold_state(group) == r.HOLD_HELD

    def check_end(self, cancel_in_progress: bool) -> None:
        for run_id, run in self.runs.items():
            assert run.status in ("succeeded", "failed", "cancelled"), run.to_json()
            assert all(hold["state"] == r.HOLD_RELEASED for hold in run.holds.values()), \
                (run_id, run.holds)
            assert r.fold(run_id, self.run_log[run_id]).to_json() == run.to_json()
            # a superseded run says by which run: a newer one of its group
            for type_, data, _ in self.run_log[run_id]:
                reason = data.get("reason") or ""
                if type_ == "run.cancelled" and reason.startswith("superseded by "):
                    assert cancel_in_progress
                    by = uuid.UUID(reason.removeprefix("superseded by "))
                    assert by != run_id and self.groups[by] == self.groups[run_id]
        for name, state in self.resources.items():
            assert state.holder is None and state.waiting == [], state.to_json()
            log = self.resource_log[name]
            assert res.fold(name, log).to_json() == state.to_json()
            arrival: list[str] = []
            granted: list[str] = []
            left_queue: set[str] = set()
            for type_, data in log:
                if type_ in (res.QUEUED, res.GRANTED) and data["claim"] not in arrival:
                    arrival.append(data["claim"])
                if type_ == res.GRANTED:
                    granted.append(data["claim"])
                if type_ in (res.WITHDRAWN, res.SUPERSEDED) and data["claim"] not in granted:
                    left_queue.add(data["claim"])
            # a claim is superseded only by a claim of another run recorded after it
            if not cancel_in_progress:
                assert res.SUPERSEDED not in [type_ for type_, _ in log]
            for n, (type_, data) in enumerate(log):
                if type_ == res.SUPERSEDED and data["claim"] in arrival:
                    later = [d["claim"] for _, d in log[n:] if d["run_id"] == data["by_run_id"]]
                    assert later and arrival.index(data["claim"]) < arrival.index(later[0])
                elif type_ == res.SUPERSEDED:
                    # superseded as it arrived: a claim of a run pushed after its own was
                    # recorded first (the messages crossed)
                    newer = [d for _, d in log[:n] if d["run_id"] == data["by_run_id"]]
                    assert newer and newer[0]["requested_at"] > data["requested_at"]
            # granted one at a time in the order their requests were recorded, but for the
            # claims that left the queue before their turn
            assert granted == [c for c in arrival if c not in left_queue]
            # and the runs took their turns in that order (some never saw theirs: they had
            # ended, and handed the claim back)
            run_of = {data["claim"]: uuid.UUID(data["run_id"]) for _, data in log}
            expected = [run_of[c] for c in granted]
            took = self.run_grants.get(name, [])
            assert _is_subsequence(took, expected), (took, expected)


def _is_subsequence(seq: list[uuid.UUID], of: list[uuid.UUID]) -> bool:
    it = iter(of)
    return all(any(x == y for y in it) for x in seq)


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.lists(st.sampled_from(["main", "dev", "qa"]), min_size=2, max_size=5),
       st.data())
def test_any_interleaving_keeps_one_holder_in_arrival_order_and_ends_every_run(
        cancel_in_progress: bool, branches: list[str], data: st.DataObject) -> None:
    world = World(WORLD_DECIDERS[cancel_in_progress])
    for n, branch in enumerate(branches):
        body = Push(repo=REPO, ref=f"refs/heads/{branch}", commit=SHA, pusher=f"p{n}")
        world.post(Envelope("push", body, world.fresh()))
    cancels, retries, redeliveries = 2, 1, 3
    for _ in range(2000):
        if not world.pending:
            break
        # an operator now and then: cancel a run, or retry one that ended
        if world.runs and data.draw(st.integers(0, 9)) == 0:
            run_id = data.draw(st.sampled_from(list(world.runs)))
            action = data.draw(st.sampled_from(["cancel", "retry"]))
            if action == "cancel" and cancels:
                cancels -= 1
                world.to_run(run_id, Control(run_id=run_id, action="cancel", reason="op"),
                             Envelope("control", None, world.fresh(), actor=OPERATOR))
            elif action == "retry" and retries and world.runs[run_id].status != "running":
                retries -= 1
                world.to_run(run_id, Control(run_id=run_id, action="retry"),
                             Envelope("control", None, world.fresh(), actor=OPERATOR))
            world.check()
        # any message in flight (timers less often: they are due later), or one again
        if world.delivered and redeliveries and data.draw(st.integers(0, 19)) == 0:
            redeliveries -= 1
            envelope = data.draw(st.sampled_from(world.delivered))
        else:
            timers = [e for e in world.pending if e.timer]
            others = [e for e in world.pending if not e.timer]
            pool = timers if not others or (timers and data.draw(st.integers(0, 29)) == 0) \
                else others
            envelope = pool[data.draw(st.integers(0, len(pool) - 1))]
            world.pending.remove(envelope)
        worker = WORKER[data.draw(st.integers(0, 9))] if envelope.kind == "command" else ""
        world.deliver(envelope, worker)
        world.check()
    assert not world.pending, "the messages never drained"
    world.check_end(cancel_in_progress)
