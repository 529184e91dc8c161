"""Runs pin their pipeline: the spec and its hash in run.requested; later decisions, after
the deployment's file changed, use the pinned one; which pipeline a push runs (Catalog);
and a repository's own .cistate/pipeline.yaml, read by the built-in step, parsed and pinned
by the decision (or failing the run with the file's error)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from cistate.domain import pipeline as p
from cistate.domain import run as r
from cistate.domain.messages import StepCommand
from cistate.service.deciders import Deciders, PinnedPipelineMissing

from ._support import REPO, Harness, push, types

pytestmark = pytest.mark.unit

KNOWN = {"noop", "script", p.REPO_PIPELINE_HANDLER}

LINE = """
name: line
steps:
  - {name: a, uses: noop}
  - {name: b, uses: noop, retries: 2}
"""

EDITED = """
name: line
steps:
  - {name: a, uses: noop}
  - {name: c, uses: script, run: echo edited}
"""

PARALLEL = """
name: repo-own
steps:
  - {name: lint, uses: script, run: sleep 2}
  - {name: unit, uses: script, run: sleep 2, needs: []}
  - {name: report, uses: script, run: echo done, needs: [lint, unit]}
"""


def parse(text: str, source: str = "pipeline.yaml") -> p.Pipeline:
    return p.parse(text, source, KNOWN)


class Events:
    """The store's side of Deciders: the pinning events of runs (what PostgreSQL answers)."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.asked = 0

    async def pinned_pipeline(self, run_id: Any, sha256: str) -> dict[str, Any] | None:
        self.asked += 1
        for type_, data, _ in reversed(self.harness.log):
            if type_ in ("run.requested", "run.pipeline_pinned") and \
                    data.get("pipeline_sha256") == sha256:
                return data
        return None


def commands(decision: r.Decision) -> dict[str, tuple[str, StepCommand]]:
    return {o.body.step: (o.routing_key, o.body) for o in decision.outgoing
            if isinstance(o.body, StepCommand)}


# -- the spec and its hash


def test_the_spec_rebuilds_the_same_pipeline_and_its_hash_is_stable() -> None:
    pipeline = parse(LINE)
    again = p.from_spec(pipeline.spec, "pinned")
    assert again.step_names == pipeline.step_names
    assert again.sha256 == pipeline.sha256 == p.spec_sha256(pipeline.spec)
    assert again.step("b").retries == 2
    # every field is pinned, defaults too: a later cistate with other defaults decides alike
    assert pipeline.spec["steps"][0]["timeout"] == p.DEFAULT_TIMEOUT_SECONDS
    assert pipeline.spec["steps"][0]["retry_on"] == ["error", "timeout"]  # sorted, always
    assert parse(EDITED).sha256 != pipeline.sha256


def test_run_requested_records_the_whole_spec_and_its_hash() -> None:
    pipeline = parse(LINE, "/etc/cistate/line.yaml")
    h = Harness(r.Decider(pipeline))
    decision = h.send(push())
    data = decision.events[0].data
    assert data["pipeline_sha256"] == pipeline.sha256
    assert data["pipeline_spec"] == pipeline.spec
    assert data["pipeline_source"] == "/etc/cistate/line.yaml"
    assert h.state.pipeline_sha256 == pipeline.sha256
    assert r.fold(h.run_id, h.log).pipeline_sha256 == pipeline.sha256


def test_a_run_goes_on_with_its_pinned_pipeline_after_the_file_changed() -> None:
    h = Harness(r.Decider(parse(LINE)))
    h.send(push())
    # the deployment's file is edited and the service restarted: a new process, a new catalog
    deciders = Deciders(p.Catalog(parse(EDITED)))
    events = Events(h)
    decider = asyncio.run(deciders.for_run(h.state, events))
    assert decider.pipeline.step_names == ("a", "b")
    decision = decider.decide(h.state, h.ok("a"), uuid.uuid4(), h.now)
    assert list(commands(decision)) == ["b"]
    # no deployment pipeline has step b now, so no worker serves its name: its command goes
    # to the queue of its handler, which every worker of noop serves
    assert commands(decision)["b"][0] == "step.@noop.run"
    # the pinned decider is built once per hash, not per message
    assert asyncio.run(deciders.for_run(h.state, events)) is decider and events.asked == 1
    # and new pushes take the edited file
    assert deciders.for_push(REPO).pipeline.step_names == ("a", "c")


def test_a_run_from_before_pinning_is_decided_with_the_deployments_pipeline() -> None:
    h = Harness(r.Decider(parse(LINE)))
    h.send(push())
    h.state.pipeline_sha256 = None  # as a run recorded before migration 005
    deciders = Deciders(p.Catalog(parse(LINE)))
    decider = asyncio.run(deciders.for_run(h.state, Events(h)))
    assert decider.pipeline.sha256 == parse(LINE).sha256


def test_a_pinned_spec_edited_in_the_store_is_refused_with_a_reason() -> None:
    h = Harness(r.Decider(parse(LINE)))
    h.send(push())
    h.log[0][1]["pipeline_spec"]["steps"][1]["uses"] = "script"
    with pytest.raises(PinnedPipelineMissing, match="does not hash"):
        asyncio.run(Deciders(p.Catalog(parse(LINE))).for_run(h.state, Events(h)))


# -- which pipeline a push runs


def test_the_catalog_chooses_by_repo_globs_then_the_default() -> None:
    web = parse("name: web\nrepos: ['https://git.example.com/web/*']\n"
                "steps: [{name: a, uses: noop}]\n")
    api = parse("name: api\nrepos: ['*/api.git', '*/api-*.git']\n"
                "steps: [{name: a, uses: noop}]\n")
    catalog = p.Catalog(parse(LINE), (api, web))
    assert catalog.choose("https://git.example.com/web/shop.git").name == "web"
    assert catalog.choose("https://git.example.com/team/api-v2.git").name == "api"
    assert catalog.choose("https://git.example.com/team/other.git").name == "line"
    assert catalog.step_names == ("a", "b")


def test_a_repo_that_may_bring_its_pipeline_reads_it_first() -> None:
    catalog = p.Catalog(parse(LINE), repo_files=("https://git.example.com/acme/*",))
    chosen = catalog.choose(REPO)
    assert chosen.step_names == (p.REPO_PIPELINE_STEP, "a", "b")
    assert chosen.graph.needs["a"] == (p.REPO_PIPELINE_STEP,)
    assert catalog.choose("https://elsewhere.example/x.git").step_names == ("a", "b")


# -- a repository's own pipeline


def repo_run(text: str | None) -> tuple[Harness, r.Decision]:
    """A push of a repo allowed its own pipeline, and the built-in step's result: the file
    `text` (None: the repo has none)."""
    catalog = p.Catalog(parse(LINE), repo_files=("*",))
    h = Harness(Deciders(catalog, known_handlers=KNOWN).for_push(REPO))
    first = h.send(push())
    key, command = commands(first)[p.REPO_PIPELINE_STEP]
    assert key == "step.@repo-pipeline.run" and command.uses == p.REPO_PIPELINE_HANDLER
    outputs: dict[str, Any] = {"found": False, "path": p.REPO_PIPELINE_FILE}
    if text is not None:
        outputs = {"found": True, "path": p.REPO_PIPELINE_FILE, "blob": "ab" * 20,
                   "text": text}
    return h, h.send(h.ok(p.REPO_PIPELINE_STEP, outputs))


def test_a_repo_pipeline_is_pinned_and_its_parallel_steps_start_together() -> None:
    h, decision = repo_run(PARALLEL)
    assert types(decision) == ["step.succeeded", "run.pipeline_pinned", "step.started",
                               "step.started"]
    pinned = decision.events[1].data
    assert pinned["pipeline"] == "repo-own" and pinned["pipeline_origin"] == "repo"
    assert pinned["steps"] == [p.REPO_PIPELINE_STEP, "lint", "unit", "report"]
    assert p.spec_sha256(pinned["pipeline_spec"]) == pinned["pipeline_sha256"]
    assert "text" not in decision.events[0].data["outputs"]  # the spec is recorded instead
    started = commands(decision)
    assert set(started) == {"lint", "unit"}
    # a repository's steps go to the queue of their handler: no worker knows their names
    assert {key for key, _ in started.values()} == {"step.@script.run"}
    assert all(command.origin == "repo" for _, command in started.values())
    assert h.state.pipeline == "repo-own"
    assert h.state.pipeline_sha256 == pinned["pipeline_sha256"]
    h.send(h.ok("lint"))
    last = h.send(h.ok("unit"))
    assert list(commands(last)) == ["report"]
    assert types(h.send(h.ok("report")))[-1] == "run.succeeded"
    # the whole run refolds from its events to the same state
    assert r.fold(h.run_id, h.log).to_json() == h.state.to_json()


def test_without_a_file_the_deployments_pipeline_runs() -> None:
    h, decision = repo_run(None)
    assert list(commands(decision)) == ["a"]
    assert commands(decision)["a"][0] == "step.a.run"
    assert h.state.pipeline == "line"


@pytest.mark.parametrize(("text", "expected"), [
    ("name: x\nsteps:\n  - {name: a, uses: noop, needs: [b]}\n"
     "  - {name: b, uses: noop, needs: [a]}\n", "cycle"),
    ("name: x\nsteps:\n  - {name: a, uses: nope}\n", "field 'uses': no handler named 'nope'"),
    ("name: x\nsteps:\n  - {name: a, uses: noop, with: {namespace: kube-system}}\n",
     "field 'with': a repository's pipeline cannot set handler settings (namespace)"),
    ("name: x\nsteps:\n  - {name: pipeline, uses: noop}\n", "is the built-in step"),
    ("name: x\nsteps: [\n", "not valid YAML"),
])
def test_a_repo_pipeline_that_does_not_parse_fails_the_run_saying_why(
        text: str, expected: str) -> None:
    h, decision = repo_run(text)
    failed = next(e.data for e in decision.events if e.type == "step.failed")
    message = failed["error"]["message"]
    assert expected in message
    assert message.startswith(f"{p.REPO_PIPELINE_FILE} at ")  # names the file and commit
    assert failed["error"]["retryable"] is False
    assert types(decision)[-1] == "run.failed"
    assert h.state.steps[p.REPO_PIPELINE_STEP].state == "failed"


def test_a_needs_cycle_is_named_step_by_step() -> None:
    h, decision = repo_run("name: x\nsteps:\n  - {name: a, uses: noop, needs: [c]}\n"
                           "  - {name: b, uses: noop, needs: [a]}\n"
                           "  - {name: c, uses: noop, needs: [b]}\n")
    message = next(e.data for e in decision.events if e.type == "step.failed")["error"]["message"]
    assert "needs form a cycle: a -> b -> c -> a" in message
    assert h.state.status == "failed"


# -- seeded jitter


def test_the_backoff_of_a_retry_is_the_same_every_time_it_is_decided() -> None:
    pipeline = parse(LINE)
    h = Harness(r.Decider(pipeline))
    h.send(push())
    h.send(h.ok("a"))
    first = h.decide(h.fail("b"))
    second = h.decide(h.fail("b"))
    delay = [e.data["delay"] for e in first.events if e.type == "step.retry_scheduled"]
    assert delay == [e.data["delay"] for e in second.events if e.type == "step.retry_scheduled"]
    base = pipeline.step("b").backoff.initial
    assert delay[0] != base  # jittered, not the bare base (0.2 of it either way)
    assert abs(delay[0] - base) <= base * 0.2 + 1e-9


# -- a handler that finds nothing to do


def test_a_step_its_handler_skips_ends_skipped_and_the_run_goes_on() -> None:
    h = Harness(r.Decider(parse(LINE)))
    h.send(push())
    skipped = h.ok("a").model_copy(update={"status": "skipped",
                                           "reason": "QA already holds 0.0.5",
                                           "outputs": {"held_version": "0.0.5"}})
    decision = h.send(skipped)
    assert types(decision) == ["step.skipped", "step.started"]
    assert decision.events[0].data["reason"] == "QA already holds 0.0.5"
    assert h.state.steps["a"].state == "skipped"
    assert h.state.steps["a"].outputs == {"held_version": "0.0.5",
                                          "skipped_reason": "QA already holds 0.0.5"}
    assert types(h.send(h.ok("b")))[-1] == "run.succeeded"
    assert r.fold(h.run_id, h.log).to_json() == h.state.to_json()
    # a result saying skipped for a step that is not running is refused like any other
    with pytest.raises(r.Rejected):
        h.decide(skipped)
