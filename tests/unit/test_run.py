"""The Run aggregate on the default `nodejs` pipeline: every transition through decide/apply,
operator requests, stale timers, rejections, and fold == incremental application."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest

from cistate.domain import run as r
from cistate.domain.graph import downstream, upstream
from cistate.domain.messages import (
    ZERO_SHA,
    CancelStep,
    Control,
    Outgoing,
    Push,
    StepCommand,
    StepError,
    StepResult,
)
from cistate.domain.pipeline import parse

from ._support import NOW, REPO, SHA, Harness, default_handler_names, default_pipeline, push, types

pytestmark = pytest.mark.unit

PIPELINE = default_pipeline()
STEPS = [
    "setup", "test", "build", "deploy", "health",
    "tag-release", "img-release", "helm-release", "gitops",
]
RELEASE_STEPS = ["tag-release", "img-release", "helm-release", "gitops"]
FEATURE_STEPS = [s for s in STEPS if s not in RELEASE_STEPS]
WITH_RETRIES = [s.name for s in PIPELINE.steps if s.retries > 0]
WITHOUT_RETRIES = [s.name for s in PIPELINE.steps if s.retries == 0]


@pytest.fixture(scope="module")
def decider() -> r.Decider:
    return r.Decider(PIPELINE)


@pytest.fixture
def h(decider: r.Decider) -> Harness:
    return Harness(decider)


def _commands(decision: r.Decision) -> list[StepCommand]:
    return [o.body for o in decision.outgoing if isinstance(o.body, StepCommand)]


def _only(decision: r.Decision, routing_key: str) -> Outgoing:
    found = [o for o in decision.outgoing if o.routing_key == routing_key]
    assert len(found) == 1, decision.outgoing
    return found[0]


def _downstream_skips(decision: r.Decision) -> list[str]:
    return [e.data["step"] for e in decision.events if e.type == "step.skipped"]


def _assert_fails_the_run(decision: r.Decision, h: Harness, step: str) -> None:
    """The decision records the step's last failure, skips every step that needs it (they
    can never start) and fails the run, naming the step."""
    assert types(decision)[0] in ("step.failed", "step.timed_out")
    assert types(decision)[-1] == "run.failed"
    assert decision.events[-1].data["step"] == step
    assert set(types(decision)[1:-1]) <= {"step.skipped", "step.failed"}
    below = [name for name in downstream(PIPELINE.graph, step) if name != step]
    assert set(_downstream_skips(decision)) >= {n for n in below if n in h.state.active}
    assert h.state.status == "failed" and h.state.step == step
    assert not any(s.state in (r.RUNNING, r.RETRYING, r.PENDING)
                   for s in h.state.steps.values())


def _assert_started(decision: r.Decision, h: Harness, step: str, attempt: int,
                    inputs: dict[str, dict[str, object]]) -> None:
    """The decision starts `step`: a step.started event, its command, and its timeout timer."""
    started = [e for e in decision.events if e.type == "step.started"]
    assert [e.data for e in started] == [{"step": step, "attempt": attempt}]
    assert started[0].meta["attempt"] == attempt
    spec = PIPELINE.step(step)
    command = _only(decision, f"step.{step}.run")
    assert command.not_before is None
    assert command.body == StepCommand(
        run_id=h.run_id, step=step, attempt=attempt, uses=spec.uses, settings=spec.with_,
        timeout=spec.timeout, repo=REPO, ref=h.state.ref or "refs/heads/main", commit=SHA,
        inputs=inputs, sources=spec.inputs,
        # a worker that gets it later does not run it: the attempt has timed out by then
        deadline=h.now + timedelta(seconds=spec.timeout or 0),
    )
    timer = _only(decision, "control")
    assert timer.body == Control(run_id=h.run_id, action="timeout", step=step, attempt=attempt)
    assert spec.timeout
    assert timer.not_before == h.now + timedelta(seconds=spec.timeout)


# ---------------------------------------------------------------------------------------
# the default pipeline itself


def test_default_pipeline_has_the_nodejs_steps_in_order() -> None:
    assert PIPELINE.name == "nodejs"
    assert list(PIPELINE.step_names) == STEPS
    needs = PIPELINE.graph.needs
    assert [needs[name] for name in STEPS[1:6]] == [(name,) for name in STEPS[:5]]  # a line
    assert needs["img-release"] == needs["helm-release"] == ("tag-release",)
    assert needs["gitops"] == ("img-release", "helm-release")
    assert {s.uses for s in PIPELINE.steps} | {"script", "noop", "qa-sync"} \
        == default_handler_names()
    assert PIPELINE.branches is None  # every branch push opens a run
    for name in RELEASE_STEPS:
        assert PIPELINE.step(name).runs_on("main") and PIPELINE.step(name).runs_on("master")
        assert not PIPELINE.step(name).runs_on("feature/x")
    for name in FEATURE_STEPS:
        assert PIPELINE.step(name).runs_on("feature/x")
    assert PIPELINE.step("setup").timeout == 600
    assert PIPELINE.step("test").timeout == 1800
    assert PIPELINE.step("health").timeout == 300


# ---------------------------------------------------------------------------------------
# push


def test_push_on_main_opens_run_and_starts_setup(h: Harness) -> None:
    message_id = h.delivery
    decision = h.decide(push("main", pusher="dev", provider="github"), message_id, "producer")

    assert decision.ignored is None
    assert types(decision) == ["run.requested", "step.started"]
    requested = decision.events[0]
    assert requested.data == {
        "repo": REPO, "ref": "refs/heads/main", "commit": SHA, "pipeline": "nodejs",
        "steps": STEPS, "active": STEPS,
        "push": {"repo": REPO, "ref": "refs/heads/main", "commit": SHA, "pusher": "dev",
                 "provider": "github"},
        # the run pins its pipeline: the whole spec, its hash, where it came from
        "pipeline_sha256": PIPELINE.sha256, "pipeline_source": PIPELINE.source,
        "pipeline_origin": "deployment", "pipeline_spec": dict(PIPELINE.spec),
    }
    for event in decision.events:
        assert event.meta["causation_id"] == str(message_id)
        assert event.meta["correlation_id"] == str(h.run_id)
        assert event.meta["actor"] == "producer"
    assert h.run_id == r.run_id_for(message_id)
    assert len(decision.outgoing) == 2
    _assert_started(decision, h, "setup", 1, {})
    assert _only(decision, "control").not_before == NOW + timedelta(minutes=10)

    h.commit(decision)
    s = h.state
    assert (s.status, s.machine_state, s.step, s.version) == ("running", "running", "setup", 2)
    assert (s.repo, s.ref, s.commit, s.pipeline) == (REPO, "refs/heads/main", SHA, "nodejs")
    assert s.created_at == NOW
    assert s.steps["setup"].state == r.RUNNING
    assert s.steps["setup"].attempts == 1
    assert s.steps["setup"].started_at == NOW
    assert all(s.steps[n].state == r.PENDING for n in STEPS[1:])


def test_push_on_feature_branch_skips_release_steps_and_succeeds_after_health(
        h: Harness) -> None:
    decision = h.send(push("feature/login"))
    assert types(decision) == ["run.requested"] + ["step.skipped"] * 4 + ["step.started"]
    assert decision.events[0].data["active"] == FEATURE_STEPS
    assert [e.data["step"] for e in decision.events[1:5]] == RELEASE_STEPS
    assert all("feature/login" in e.data["reason"] for e in decision.events[1:5])
    _assert_started(decision, h, "setup", 1, {})
    assert all(h.state.steps[n].state == r.SKIPPED for n in RELEASE_STEPS)

    h.advance_to("health", branch="feature/login")
    decision = h.send(h.ok("health", {"status": 200}))
    assert types(decision) == ["step.succeeded", "run.succeeded"]
    assert decision.outgoing == []
    assert h.state.status == "succeeded"
    assert h.state.step is None
    assert [h.state.steps[n].state for n in STEPS] == [r.SUCCEEDED] * 5 + [r.SKIPPED] * 4


def test_decided_events_are_plain_json(h: Harness) -> None:
    # The store encodes event data and meta with json.dumps into jsonb: no UUIDs, datetimes
    # or models may hide in them.
    body = {"repo": REPO, "ref": "refs/heads/main", "commit": SHA, "before": "abcdef1",
            "pusher": "dev", "provider": "gitlab"}
    if "rerun_of" in Push.model_fields:
        body["rerun_of"] = str(uuid.uuid4())
    decisions = [h.send(Push.model_validate(body))]
    decisions.append(h.send(h.fail("setup")))
    decisions.append(h.send(h.control("retry_due", "setup", 2)))
    decisions.append(h.send(h.control("timeout", "setup", 2)))
    decisions.append(h.send(h.control("cancel", reason="r")))
    decisions.append(h.send(h.control("retry"), actor="alice"))
    decisions.append(h.reject(h.ok("setup", attempt=1)))
    for decision in decisions:
        for event in decision.events:
            assert json.loads(json.dumps(event.data)) == event.data, event.type
            assert json.loads(json.dumps(event.meta)) == event.meta, event.type
    assert json.loads(json.dumps(h.state.to_json())) == h.state.to_json()


def test_push_that_runs_no_step_succeeds_at_once() -> None:
    pipeline = parse(
        "name: p\nsteps:\n  - {name: publish, uses: noop, when: {branches: [main]}}\n",
        "p.yaml", {"noop"},
    )
    h = Harness(r.Decider(pipeline))
    decision = h.send(push("feature/x"))
    assert types(decision) == ["run.requested", "step.skipped", "run.succeeded"]
    assert decision.outgoing == []
    assert h.state.status == "succeeded"


def test_push_with_a_bare_branch_name_is_a_branch_push(h: Harness) -> None:
    decision = h.send(push(ref="main"))  # some producers send the bare branch name
    assert h.state.active == STEPS
    assert "step.skipped" not in types(decision)


def test_each_success_starts_the_steps_that_need_it_with_their_upstream_outputs(
        h: Harness) -> None:
    h.send(push("main"))
    recorded: dict[str, dict[str, object]] = {}
    while h.running():
        step = h.running()[0]
        h.tick(30)
        outputs = {"value": f"{step}-out", "index": len(recorded)}
        decision = h.decide(h.ok(step, outputs))
        assert decision.events[0].type == "step.succeeded"
        assert decision.events[0].data == {"step": step, "attempt": 1, "outputs": outputs}
        recorded[step] = outputs
        started = [e.data["step"] for e in decision.events if e.type == "step.started"]
        needs = PIPELINE.graph.needs
        assert started == [name for name in STEPS if step in needs[name]
                           and all(need in recorded for need in needs[name])]
        for name in started:
            command = _only(decision, f"step.{name}.run").body
            assert isinstance(command, StepCommand)
            assert command.inputs == {n: recorded[n] for n in upstream(PIPELINE.graph, name)}
        if step == STEPS[-1]:
            assert types(decision) == ["step.succeeded", "run.succeeded"]
            assert decision.outgoing == []
        h.commit(decision)
        assert h.state.steps[step].state == r.SUCCEEDED
        assert h.state.steps[step].outputs == outputs
        assert h.state.steps[step].finished_at == h.now
    assert list(recorded) == STEPS
    assert h.state.status == "succeeded"
    assert h.state.version == 2 + 2 * len(STEPS)


def test_the_image_and_the_chart_are_released_at_once_and_gitops_waits_for_both(
        h: Harness) -> None:
    outputs = h.advance_to("tag-release")
    decision = h.send(h.ok("tag-release", {"tag": "1.2.3"}))
    assert [e.data["step"] for e in decision.events if e.type == "step.started"] == [
        "img-release", "helm-release"]
    inputs = {**outputs, "tag-release": {"tag": "1.2.3"}}
    for name in ("img-release", "helm-release"):
        command = _only(decision, f"step.{name}.run").body
        assert isinstance(command, StepCommand) and command.inputs == inputs
    # helm-release runs beside img-release, so it reads none of its outputs (it names the
    # image from setup's release_image_repo); img-release reads build's
    assert _only(decision, "step.helm-release.run").body.sources == {
        "setup": "setup", "tag-release": "tag-release"}
    assert _only(decision, "step.img-release.run").body.sources == {
        "setup": "setup", "build": "build", "tag-release": "tag-release"}
    assert types(h.send(h.ok("helm-release", {"chart_version": "1.2.3"}))) == [
        "step.succeeded"]
    decision = h.send(h.ok("img-release", {"release_image_url": "r/shop:1.2.3"}))
    _assert_started(decision, h, "gitops", 1, {
        **inputs, "img-release": {"release_image_url": "r/shop:1.2.3"},
        "helm-release": {"chart_version": "1.2.3"}})


def test_a_failed_image_release_stops_the_chart_release(h: Harness) -> None:
    h.advance_to("helm-release")
    decision = h.send(h.fail("img-release", "registry refused", retryable=False))
    assert types(decision) == ["step.failed", "step.failed", "step.skipped", "run.failed"]
    assert decision.events[1].data["step"] == "helm-release"
    assert decision.events[1].data["error"]["kind"] == "cancelled"
    assert _only(decision, "cancel").body == CancelStep(run_id=h.run_id, step="helm-release",
                                                         attempt=1)
    assert (h.state.status, h.state.step) == ("failed", "img-release")
    assert h.state.steps["helm-release"].state == r.CANCELLED
    assert h.state.steps["gitops"].state == r.SKIPPED


def test_decide_does_not_touch_the_state(h: Harness) -> None:
    h.advance_to("build")
    before = h.state.clone()
    h.decide(h.ok("build", {"image": "x"}))
    h.decide(h.fail("build"))
    h.decide(h.control("cancel"))
    assert h.state == before


def test_redelivered_message_decides_the_same_events_and_message_ids(h: Harness) -> None:
    h.advance_to("test")
    message_id = uuid.uuid4()
    first = h.decide(h.ok("test", {"a": 1}), message_id)
    again = h.decide(h.ok("test", {"a": 1}), message_id)
    assert first.events == again.events
    assert [o.message_id for o in first.outgoing] == [o.message_id for o in again.outgoing]


def test_duplicate_push_for_an_existing_run_is_ignored(h: Harness) -> None:
    h.send(push("main"))
    before = h.state.clone()
    decision = h.send(push("main"))  # the same delivery again
    assert decision.ignored
    assert decision.events == [] and decision.outgoing == []
    assert h.state == before


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (push("main", commit=ZERO_SHA), "branch deletion"),
        (push(ref="refs/tags/v1.2.3"), "not a branch"),
        (push(ref="refs/pull/7/head"), "not a branch"),
    ],
)
def test_ignore_reason_for_pushes_that_open_no_run(message: object, reason: str) -> None:
    assert reason in (r.ignore_reason(message, PIPELINE) or "")  # type: ignore[arg-type]


@pytest.mark.parametrize("branch", ["main", "feature/x", "master"])
def test_branch_pushes_open_a_run_without_a_filter(branch: str) -> None:
    assert r.ignore_reason(push(branch), PIPELINE) is None


def test_ignore_reason_honours_the_pipeline_branch_filter() -> None:
    filtered = parse(
        "name: p\nbranches: [main, 'release/*']\nsteps:\n  - {name: a, uses: noop}\n",
        "p.yaml", {"noop"},
    )
    assert r.ignore_reason(push("main"), filtered) is None
    assert r.ignore_reason(push("release/2.0"), filtered) is None
    reason = r.ignore_reason(push("feature/x"), filtered)
    assert reason is not None and "feature/x" in reason and "filter" in reason


# ---------------------------------------------------------------------------------------
# failures, retries, timeouts


@pytest.mark.parametrize("step", WITH_RETRIES)
def test_failure_with_retries_left_schedules_a_delayed_retry(h: Harness, step: str) -> None:
    outputs = h.advance_to(step)
    spec = PIPELINE.step(step)
    decision = h.send(h.fail(step, "npm test failed"))

    assert types(decision) == ["step.failed", "step.retry_scheduled"]
    failed, scheduled = decision.events
    assert failed.data["step"] == step and failed.data["attempt"] == 1
    assert failed.data["error"]["message"] == "npm test failed"
    assert failed.data["error"]["exit_code"] == 1
    assert failed.data["error"]["output_tail"] == "npm ERR!"
    assert scheduled.data["step"] == step and scheduled.data["attempt"] == 2
    delay = scheduled.data["delay"]
    b = spec.backoff
    assert b.initial * (1 - b.jitter) - 0.001 <= delay <= b.initial * (1 + b.jitter) + 0.001
    timer = _only(decision, "control")
    assert timer.body == Control(run_id=h.run_id, action="retry_due", step=step, attempt=2)
    assert timer.not_before is not None
    assert abs((timer.not_before - h.now).total_seconds() - delay) < 0.001
    assert scheduled.data["due_at"] == timer.not_before.isoformat()
    assert len(decision.outgoing) == 1  # no command until the retry is due

    assert h.state.status == "running"
    assert h.state.steps[step].state == r.RETRYING
    assert h.state.steps[step].error is not None

    h.tick(delay)
    decision = h.send(h.control("retry_due", step, 2))
    assert types(decision) == ["step.started"]
    _assert_started(decision, h, step, 2, outputs)
    assert h.state.steps[step].state == r.RUNNING
    assert h.state.steps[step].attempts == 2
    assert h.state.steps[step].error is None


@pytest.mark.parametrize("step", WITH_RETRIES)
def test_failure_on_the_last_attempt_fails_the_run(h: Harness, step: str) -> None:
    h.advance_to(step)
    max_attempts = PIPELINE.step(step).max_attempts
    for attempt in range(1, max_attempts):
        assert types(h.send(h.fail(step))) == ["step.failed", "step.retry_scheduled"]
        h.send(h.control("retry_due", step, attempt + 1))
    decision = h.send(h.fail(step, "still broken"))
    _assert_fails_the_run(decision, h, step)
    run_failed = decision.events[-1].data
    assert run_failed["step"] == step and run_failed["attempt"] == max_attempts
    assert f"attempt {max_attempts} of {max_attempts}" in run_failed["reason"]
    assert "still broken" in run_failed["reason"]
    assert h.state.status == "failed"
    assert h.state.step == step
    assert h.state.steps[step].state == r.FAILED
    assert h.state.steps[step].attempts == max_attempts
    assert h.state.steps[step].error["message"] == "still broken"  # type: ignore[index]


@pytest.mark.parametrize("step", WITHOUT_RETRIES)
def test_failure_of_a_step_without_retries_fails_the_run(h: Harness, step: str) -> None:
    h.advance_to(step)
    decision = h.send(h.fail(step))
    _assert_fails_the_run(decision, h, step)


def test_non_retryable_failure_fails_the_run_despite_retries_left(h: Harness) -> None:
    h.advance_to("build")
    assert PIPELINE.step("build").retries == 2
    decision = h.send(h.fail("build", "Dockerfile missing", retryable=False))
    _assert_fails_the_run(decision, h, "build")
    assert _downstream_skips(decision) == STEPS[3:]
    assert "not retryable" in decision.events[-1].data["reason"]
    assert h.state.status == "failed"


def test_failure_without_an_error_body_is_recorded_with_a_message(h: Harness) -> None:
    h.advance_to("test")
    result = h.ok("test").model_copy(update={"status": "failed"})
    decision = h.send(result)
    assert decision.events[0].data["error"]["message"]
    assert h.state.status == "failed"


def test_timeout_of_the_running_attempt_cancels_the_worker_and_retries(h: Harness) -> None:
    outputs = h.advance_to("setup")
    h.tick(600)
    decision = h.send(h.control("timeout", "setup", 1))
    assert types(decision) == ["step.timed_out", "step.retry_scheduled"]
    timed_out = decision.events[0].data
    assert timed_out["step"] == "setup" and timed_out["attempt"] == 1
    assert timed_out["error"]["kind"] == "timeout"
    assert "600s" in timed_out["error"]["message"]
    cancel = _only(decision, "cancel")
    assert cancel.body == CancelStep(run_id=h.run_id, step="setup", attempt=1)
    assert cancel.not_before is None
    retry = _only(decision, "control")
    assert retry.body == Control(run_id=h.run_id, action="retry_due", step="setup", attempt=2)
    assert h.state.steps["setup"].state == r.RETRYING
    assert h.state.status == "running"
    _assert_started(h.send(h.control("retry_due", "setup", 2)), h, "setup", 2, outputs)


def test_timeout_without_retries_fails_the_run(h: Harness) -> None:
    h.advance_to("test")
    decision = h.send(h.control("timeout", "test", 1))
    _assert_fails_the_run(decision, h, "test")
    assert _only(decision, "cancel").body == CancelStep(run_id=h.run_id, step="test", attempt=1)
    assert h.state.steps["test"].state == r.TIMED_OUT
    assert "timeout" in decision.events[-1].data["reason"]


def test_timeout_is_not_retried_when_retry_on_excludes_it() -> None:
    pipeline = parse(
        "name: p\nsteps:\n  - {name: a, uses: noop, retries: 3, retry_on: [error], timeout: 5s}\n",
        "p.yaml", {"noop"},
    )
    h = Harness(r.Decider(pipeline))
    h.send(push("main"))
    decision = h.send(h.control("timeout", "a", 1))
    assert types(decision) == ["step.timed_out", "run.failed"]
    assert h.state.status == "failed"


@pytest.mark.parametrize(
    ("retry_on", "kind", "retried"),
    [
        ("[error]", "timeout", False),
        ("[error]", "error", True),
        ("[timeout]", "timeout", True),
        ("[timeout]", "error", False),
    ],
)
def test_retry_on_follows_the_kind_the_worker_reports(retry_on: str, kind: str,
                                                      retried: bool) -> None:
    # The worker enforces the step's timeout too and reports kind=timeout; whether its result
    # or the orchestrator's timer comes first must not change what retry_on decides.
    pipeline = parse(
        f"name: p\nsteps:\n  - {{name: a, uses: noop, retries: 3, retry_on: {retry_on}}}\n",
        "p.yaml", {"noop"},
    )
    h = Harness(r.Decider(pipeline))
    h.send(push("main"))
    result = StepResult(run_id=h.run_id, step="a", attempt=1, status="failed",
                        error=StepError(message="did not finish within 5s", kind=kind))
    decision = h.send(result)
    expected = "step.retry_scheduled" if retried else "run.failed"
    assert types(decision) == ["step.failed", expected]


def test_a_step_without_timeout_gets_no_timer() -> None:
    pipeline = parse("name: p\nsteps:\n  - {name: a, uses: noop, timeout: null}\n",
                     "p.yaml", {"noop"})
    h = Harness(r.Decider(pipeline))
    decision = h.send(push("main"))
    assert [o.routing_key for o in decision.outgoing] == ["step.a.run"]


# ---------------------------------------------------------------------------------------
# stale timers


def _assert_ignored(h: Harness, message: Control) -> None:
    before = h.state.clone()
    decision = h.send(message)
    assert decision.ignored
    assert decision.events == [] and decision.outgoing == []
    assert h.state == before


def test_timeout_for_an_earlier_attempt_is_ignored(h: Harness) -> None:
    h.advance_to("build")
    h.send(h.fail("build"))
    _assert_ignored(h, h.control("timeout", "build", 1))  # while retrying
    h.send(h.control("retry_due", "build", 2))
    _assert_ignored(h, h.control("timeout", "build", 1))  # attempt 2 runs


def test_timeout_after_the_run_moved_on_is_ignored(h: Harness) -> None:
    h.advance_to("deploy")
    _assert_ignored(h, h.control("timeout", "setup", 1))
    _assert_ignored(h, h.control("timeout", "deploy", 2))  # an attempt that never started


def test_timeout_after_the_run_ended_is_ignored(h: Harness) -> None:
    h.advance_to("test")
    h.send(h.fail("test"))
    _assert_ignored(h, h.control("timeout", "test", 1))


def test_retry_due_that_is_stale_is_ignored(h: Harness) -> None:
    h.advance_to("build")
    _assert_ignored(h, h.control("retry_due", "build", 2))  # no retry was scheduled
    h.send(h.fail("build"))
    _assert_ignored(h, h.control("retry_due", "build", 3))  # wrong attempt
    _assert_ignored(h, h.control("retry_due", "setup", 2))  # wrong step
    h.send(h.control("retry_due", "build", 2))
    _assert_ignored(h, h.control("retry_due", "build", 2))  # redelivered timer


def test_retry_due_after_cancel_is_ignored(h: Harness) -> None:
    h.advance_to("build")
    h.send(h.fail("build"))
    h.send(h.control("cancel"))
    _assert_ignored(h, h.control("retry_due", "build", 2))
    assert h.state.status == "cancelled"


@pytest.mark.parametrize("action", ["timeout", "retry_due"])
@pytest.mark.parametrize(("step", "attempt"), [(None, None), ("build", None), (None, 1)])
def test_a_timer_without_step_or_attempt_is_rejected_not_a_crash(
        h: Harness, action: str, step: str | None, attempt: int | None) -> None:
    # The control schema lets a producer send such a body; it must end up recorded as
    # message.rejected (or ignored), never as an exception that leaves it on the queue.
    h.advance_to("build")
    with pytest.raises(r.Rejected):
        h.decide(h.control(action, step, attempt))


# ---------------------------------------------------------------------------------------
# cancel


def test_cancel_while_running_stops_the_worker_and_ends_cancelled(h: Harness) -> None:
    h.advance_to("deploy")
    message_id = uuid.uuid4()
    decision = h.send(h.control("cancel", reason="wrong commit"), message_id,
                      actor="alice")
    after = STEPS[STEPS.index("deploy") + 1:]
    assert types(decision) == ["run.cancel_requested", "step.failed",
                               *["step.skipped"] * len(after), "run.cancelled"]
    assert decision.events[0].data["reason"] == "wrong commit"
    assert decision.events[1].data == {"step": "deploy", "attempt": 1, "error": {
        "message": "cancelled by alice: wrong commit", "kind": "cancelled", "retryable": False,
        "reason": "wrong commit"}}
    assert _downstream_skips(decision) == after
    assert all(e.data["reason"] == "the run was cancelled" for e in decision.events[2:-1])
    assert decision.events[-1].data == {"step": "deploy", "reason": "wrong commit"}
    assert all(e.meta["actor"] == "alice" for e in decision.events)
    assert all(e.meta["causation_id"] == str(message_id) for e in decision.events)
    cancel = _only(decision, "cancel")
    assert cancel.body == CancelStep(run_id=h.run_id, step="deploy", attempt=1)
    assert len(decision.outgoing) == 1
    assert h.state.status == "cancelled"
    assert h.state.step == "deploy"
    assert h.state.steps["deploy"].state == r.CANCELLED
    assert h.state.steps["deploy"].finished_at == h.now


def test_cancel_while_waiting_for_a_retry_sends_no_worker_cancel(h: Harness) -> None:
    h.advance_to("build")
    h.send(h.fail("build"))
    decision = h.send(h.control("cancel"))
    assert types(decision)[:2] == ["run.cancel_requested", "step.failed"]
    assert types(decision)[-1] == "run.cancelled"
    assert decision.outgoing == []
    assert h.state.steps["build"].state == r.CANCELLED
    assert not any(s.state in (r.RUNNING, r.RETRYING) for s in h.state.steps.values())


@pytest.mark.parametrize("ending", ["succeeded", "failed", "cancelled"])
def test_cancel_of_a_terminal_run_is_rejected_and_recorded(h: Harness, ending: str) -> None:
    _finish(h, ending)
    before = h.state.clone()
    with pytest.raises(r.Rejected):
        h.decide(h.control("cancel"))
    assert h.state == before

    message_id = uuid.uuid4()
    decision = h.reject(h.control("cancel"), message_id, actor="bob")
    assert types(decision) == ["message.rejected"]
    event = decision.events[0]
    assert event.data["message_type"] == "control"
    assert event.data["message"]["action"] == "cancel"
    assert event.data["state"] == ending
    assert "cancel" in event.data["reason"] and ending in event.data["reason"]
    assert event.meta == {"causation_id": str(message_id), "correlation_id": str(h.run_id),
                          "actor": "bob"}
    assert decision.outgoing == []
    assert h.state.status == ending
    assert h.state.version == before.version + 1  # the rejection is on the record


def _finish(h: Harness, ending: str) -> None:
    if ending == "succeeded":
        h.advance_to("gitops")
        h.send(h.ok("gitops"))
    elif ending == "failed":
        h.advance_to("build")
        h.send(h.fail("build", retryable=False))
    else:
        h.advance_to("build")
        h.send(h.control("cancel"))
    assert h.state.status == ending


# ---------------------------------------------------------------------------------------
# retry


def test_retry_of_a_failed_run_continues_from_the_failed_step(h: Harness) -> None:
    outputs = h.advance_to("build")
    h.send(h.fail("build", retryable=False))
    h.tick(3600)
    decision = h.send(h.control("retry", reason="registry was down"),
                      actor="alice")
    assert types(decision) == ["run.retried", "step.started"]
    assert decision.events[0].data == {"from_step": "build", "actor": "alice",
                                       "reason": "registry was down", "steps": STEPS[2:]}
    _assert_started(decision, h, "build", 2, outputs)  # attempts count on
    assert outputs == {"setup": h.state.steps["setup"].outputs,
                       "test": h.state.steps["test"].outputs}
    assert h.state.status == "running" and h.state.step == "build"
    assert h.state.steps["setup"].state == r.SUCCEEDED
    assert h.state.steps["build"].error is None

    # and it carries on to the end
    h.send(h.ok("build", {"image": "registry/shop@sha256:1"}))
    h.advance_to("gitops")
    h.send(h.ok("gitops"))
    assert h.state.status == "succeeded"


def test_retry_from_a_named_earlier_step_reruns_it_and_the_steps_after(h: Harness) -> None:
    outputs = h.advance_to("deploy")
    h.send(h.fail("deploy", retryable=False))
    decision = h.send(h.control("retry", step="test"))
    assert decision.events[0].data["from_step"] == "test"
    _assert_started(decision, h, "test", 2, {"setup": outputs["setup"]})
    assert h.state.steps["setup"].state == r.SUCCEEDED
    assert h.state.steps["setup"].attempts == 1
    assert decision.events[0].data["steps"] == STEPS[1:]
    for name in STEPS[2:]:
        step = h.state.steps[name]
        assert (step.state, step.outputs, step.error) == (r.PENDING, {}, None)
    assert h.state.steps["build"].attempts == 1  # kept, so the next attempt is 2

    decision = h.send(h.ok("test", {"t": 2}))
    _assert_started(decision, h, "build", 2, {"setup": outputs["setup"], "test": {"t": 2}})


def test_retry_of_a_cancelled_run_continues_from_the_cancelled_step(h: Harness) -> None:
    outputs = h.advance_to("health")
    h.send(h.control("cancel"))
    decision = h.send(h.control("retry"))
    assert types(decision) == ["run.retried", "step.started"]
    _assert_started(decision, h, "health", 2, outputs)
    assert h.state.status == "running"


def test_retry_keeps_release_steps_skipped_on_a_feature_branch(h: Harness) -> None:
    h.advance_to("health", branch="feature/x")
    h.send(h.fail("health"))
    h.send(h.control("retry", step="setup"))
    assert all(h.state.steps[n].state == r.SKIPPED for n in RELEASE_STEPS)
    h.advance_to("health", branch="feature/x")
    h.send(h.ok("health"))
    assert h.state.status == "succeeded"


@pytest.mark.parametrize("ending", ["running", "succeeded"])
def test_retry_of_a_running_or_succeeded_run_is_rejected(h: Harness, ending: str) -> None:
    if ending == "running":
        h.advance_to("build")
    else:
        _finish(h, "succeeded")
    for step in (None, "setup"):
        with pytest.raises(r.Rejected):
            h.decide(h.control("retry", step=step))


def test_retry_from_a_step_whose_earlier_steps_did_not_succeed_is_rejected(h: Harness) -> None:
    h.advance_to("build")
    h.send(h.fail("build", retryable=False))
    with pytest.raises(r.Rejected, match="build"):
        h.decide(h.control("retry", step="deploy"))
    decision = h.reject(h.control("retry", step="health"))
    assert "build" in decision.events[0].data["reason"]
    assert h.state.status == "failed"


def test_retry_from_an_unknown_or_skipped_step_is_rejected(h: Harness) -> None:
    h.advance_to("test", branch="feature/x")
    h.send(h.fail("test"))
    with pytest.raises(r.Rejected, match="no such step"):
        h.decide(h.control("retry", step="lint"))
    with pytest.raises(r.Rejected, match="skipped"):
        h.decide(h.control("retry", step="gitops"))


def test_result_of_the_attempt_before_a_retry_is_rejected(h: Harness) -> None:
    h.advance_to("build")
    h.send(h.fail("build", retryable=False))
    h.send(h.control("retry"))
    with pytest.raises(r.Rejected):
        h.decide(h.ok("build", attempt=1))
    h.send(h.ok("build", attempt=2))
    assert h.state.step == "deploy"


# ---------------------------------------------------------------------------------------
# results that do not match the run


def test_result_for_another_step_is_rejected(h: Harness) -> None:
    h.advance_to("test")
    with pytest.raises(r.Rejected, match="'build'"):
        h.decide(h.ok("build", attempt=1))
    with pytest.raises(r.Rejected, match="no such step"):
        h.decide(h.ok("lint", attempt=1))


def test_result_for_another_attempt_is_rejected(h: Harness) -> None:
    h.advance_to("setup")
    with pytest.raises(r.Rejected):
        h.decide(h.ok("setup", attempt=2))
    h.send(h.fail("setup"))
    with pytest.raises(r.Rejected):  # the retry is scheduled, attempt 2 has not started
        h.decide(h.ok("setup", attempt=2))
    with pytest.raises(r.Rejected):  # attempt 1 already failed
        h.decide(h.ok("setup", attempt=1))


def test_duplicate_result_after_the_run_moved_on_is_rejected_and_recorded(h: Harness) -> None:
    h.advance_to("test")
    h.send(h.ok("test", {"x": 1}))
    decision = h.reject(h.ok("test", {"x": 1}, attempt=1))
    event = decision.events[0]
    assert event.type == "message.rejected"
    assert event.data["message_type"] == "step-result"
    assert event.data["message"]["step"] == "test"
    assert event.data["state"] == "running"
    assert h.state.step == "build"  # the run did not move
    assert h.state.steps["build"].state == r.RUNNING


@pytest.mark.parametrize("ending", ["succeeded", "failed", "cancelled"])
def test_result_after_the_run_ended_is_rejected(h: Harness, ending: str) -> None:
    _finish(h, ending)
    step = "gitops" if ending == "succeeded" else "build"
    for status in ("ok", "fail"):
        result = h.ok(step) if status == "ok" else h.fail(step)
        with pytest.raises(r.Rejected):
            h.decide(result)
    decision = h.reject(h.ok(step))
    assert decision.events[0].data["state"] == ending
    assert h.state.status == ending


# ---------------------------------------------------------------------------------------
# fold and JSON


def test_fold_of_the_stored_events_equals_the_incremental_state(h: Harness) -> None:
    h.advance_to("build")
    h.tick()
    h.send(h.fail("build"))
    h.tick(2)
    h.send(h.control("retry_due", "build", 2))
    h.reject(h.ok("build", attempt=1))
    h.send(h.control("timeout", "build", 2))
    h.send(h.control("retry_due", "build", 3))
    h.send(h.fail("build", retryable=False))
    h.tick(60)
    h.send(h.control("retry", step="test"))
    h.advance_to("health")
    h.send(h.control("cancel"))

    folded = r.fold(h.run_id, h.log)
    assert folded == h.state
    assert folded.to_json() == h.state.to_json()
    assert folded.version == len(h.log)

    # time travel: folding a prefix gives the state as it was then
    prefix = r.fold(h.run_id, h.log[:2])
    assert prefix.status == "running" and prefix.step == "setup" and prefix.version == 2


def test_run_state_json_shape(h: Harness) -> None:
    h.advance_to("test")
    h.send(h.fail("test", "3 tests failed"))
    body = h.state.to_json()
    assert {"id", "repo", "ref", "commit", "state", "step", "steps", "version"} <= set(body)
    assert body["id"] == str(h.run_id)
    assert (body["repo"], body["ref"], body["commit"]) == (REPO, "refs/heads/main", SHA)
    assert (body["state"], body["step"], body["version"]) == ("failed", "test", h.state.version)
    assert [s["name"] for s in body["steps"]] == STEPS
    for step in body["steps"]:
        assert set(step) == {"name", "state", "attempts", "outputs", "error", "started_at",
                             "finished_at", "timing"}
    setup, test = body["steps"][:2]
    assert setup["state"] == "succeeded" and setup["attempts"] == 1
    assert setup["outputs"] == h.state.steps["setup"].outputs
    assert setup["started_at"] == NOW.isoformat()
    assert test["state"] == "failed"
    assert test["error"]["message"] == "3 tests failed"
    assert body["steps"][2] == {"name": "build", "state": "skipped", "attempts": 0,
                                "outputs": {}, "error": None, "started_at": None,
                                "finished_at": None, "timing": None}
    assert "steps" not in h.state.to_json(with_steps=False)
    for raw in body["steps"]:
        assert r.StepState.from_json(raw) == h.state.steps[raw["name"]]


def test_disabled_step_is_skipped_by_every_run() -> None:
    from cistate.bootstrap import load_default
    from tests.unit._support import default_handler_names

    packaged = load_default(default_handler_names())
    assert not packaged.step("qa-sync").enabled, "qa-sync is off in the default pipeline"
    decider = r.Decider(packaged)
    state = r.RunState(id=uuid.uuid4())
    decision = decider.decide(state, push("main"), uuid.uuid4(), NOW)
    skipped = [e.data for e in decision.events if e.type == "step.skipped"]
    assert skipped == [{"step": "qa-sync", "attempt": 0,
                        "reason": "disabled in the pipeline (enabled: false)"}]
    assert "qa-sync" not in decision.events[0].data["active"]


def test_every_control_action_has_a_rule() -> None:
    # a new action without one would raise KeyError in the orchestrator, not a rejection
    from typing import get_args

    from cistate.domain.messages import ControlAction
    assert set(get_args(ControlAction)) == set(r._ON_CONTROL)


def test_each_step_says_where_its_time_went_queued_waiting_running() -> None:
    # the worker's own start and end of the attempt travel with its result
    pipeline = parse("""
name: t
steps:
  - {name: build, uses: noop}
  - {name: gate, uses: approval}
""", "t.yaml", {"noop", "approval"})
    h = Harness(r.Decider(pipeline))
    h.send(push())
    began = h.now + timedelta(seconds=0.25)  # the command took a quarter second to arrive
    h.tick(3)
    result = h.ok("build").model_copy(update={
        "started_at": began, "finished_at": began + timedelta(seconds=2.5), "worker": "w1"})
    decision = h.send(result)
    [succeeded] = [e for e in decision.events if e.type == "step.succeeded"]
    assert succeeded.data["ran"]["worker"] == "w1"
    assert h.state.steps["build"].timing == {"queued": 0.25, "running": 2.5}
    h.tick(60)
    h.send(h.control("approve", "gate"), actor="api:alice")
    assert h.state.steps["gate"].timing == {"waiting": 60.0}
    assert r.fold(h.run_id, h.log).steps["build"].timing == {"queued": 0.25, "running": 2.5}


def test_every_command_is_what_the_worker_validates_it_to_be() -> None:
    # The decider builds commands without validating them again (model_construct, from the
    # pinned pipeline and stored outputs). Each must serialise to exactly the body the
    # worker validates back into the same command, for every kind of field a step sets.
    text = """name: fields
steps:
  - name: first
    uses: script
    run: echo "héllo" && exit 0
    timeout: 90s
    env: {GREETING: "grüß dich", EMPTY: ""}
    secrets: [NPM_TOKEN, {name: KUBECONFIG, as: file}]
    network: none
  - name: second
    uses: noop
    timeout: 0
    with: {nested: {list: [1, 2.5, null, true], text: "x"}}
"""
    pipeline = parse(text, "<test>", ["script", "noop"])
    h = Harness(r.Decider(pipeline, lambda run, step, attempt: f"tok-{step}-{attempt}"))
    commands = _commands(h.send(push()))
    commands += _commands(h.send(StepResult(
        run_id=h.run_id, step="first", attempt=1, status="succeeded",
        outputs={"made": {"a": [1, "b"]}}, token="tok-first-1")))
    assert [c.step for c in commands] == ["first", "second"]
    for command in commands:
        body = command.model_dump_json(by_alias=True)
        validated = StepCommand.model_validate_json(body)
        assert validated == command
        assert validated.model_dump_json(by_alias=True) == body
    first, second = commands
    assert first.env == {"GREETING": "grüß dich", "EMPTY": ""} and first.network == "none"
    assert [(s.name, s.as_) for s in first.secrets] == [("NPM_TOKEN", "env"),
                                                        ("KUBECONFIG", "file")]
    assert first.timeout == 90.0 and first.deadline == NOW + timedelta(seconds=90)
    assert second.inputs == {"first": {"made": {"a": [1, "b"]}}}
    assert second.settings == {"nested": {"list": [1, 2.5, None, True], "text": "x"}}
