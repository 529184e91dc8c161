"""Pipeline files: what parses, and errors that point at the file, the step and the field."""

from __future__ import annotations

import random

import pytest

from cistate.bootstrap import load_default
from cistate.domain.pipeline import (
    Backoff,
    PipelineError,
    Step,
    When,
    parse,
    parse_duration,
)

from ._support import default_handler_names

pytestmark = pytest.mark.unit

HANDLERS = {"noop", "script", "setup", "build"}
SOURCE = "ci/shop-pipeline.yaml"


def _parse(text: str, handlers: set[str] = HANDLERS):  # type: ignore[no-untyped-def]
    return parse(text, SOURCE, handlers)


def _error(text: str, handlers: set[str] = HANDLERS) -> str:
    with pytest.raises(PipelineError) as info:
        _parse(text, handlers)
    return str(info.value)


def _one_step(fields: str) -> str:
    return f"name: p\nsteps:\n  - name: setup\n    uses: setup\n  - name: build\n{fields}"


def test_a_full_step_parses_with_its_policies() -> None:
    pipeline = _parse(
        """
name: shop
branches: [main, 'release/*']
steps:
  - name: build
    uses: build
    with: {context: ., file: Containerfile}
    retries: 3
    backoff: {initial: 500ms, factor: 3, max: 1m, jitter: 0.1}
    retry_on: [error]
    timeout: 30m
    when: {branches: [main]}
  - name: lint
    uses: script
    run: npm run lint
"""
    )
    assert pipeline.name == "shop"
    assert pipeline.source == SOURCE
    assert pipeline.step_names == ("build", "lint")
    assert pipeline.branches == ("main", "release/*")
    build = pipeline.step("build")
    assert build.with_ == {"context": ".", "file": "Containerfile"}
    assert (build.retries, build.max_attempts, build.timeout) == (3, 4, 1800.0)
    assert build.backoff == Backoff(initial=0.5, factor=3, max=60, jitter=0.1)
    assert build.retry_on == frozenset({"error"})
    lint = pipeline.step("lint")
    assert lint.run == "npm run lint"
    assert (lint.retries, lint.max_attempts, lint.timeout, lint.when) == (0, 1, 3600.0, None)
    assert lint.retry_on == frozenset({"error", "timeout"})
    with pytest.raises(KeyError):
        pipeline.step("deploy")


def test_unknown_field_names_file_step_and_field() -> None:
    message = _error(_one_step("    uses: build\n    retires: 2\n"))
    assert SOURCE in message
    assert "'build'" in message
    assert "#2" in message
    assert "'retires'" in message
    assert "unknown field" in message


def test_unknown_top_level_field_is_reported() -> None:
    message = _error("name: p\nstage: x\nsteps:\n  - {name: a, uses: noop}\n")
    assert SOURCE in message and "'stage'" in message and "unknown field" in message


def test_unknown_handler_names_the_handler_and_the_known_ones() -> None:
    message = _error(_one_step("    uses: kaniko\n"))
    assert SOURCE in message
    assert "'build'" in message
    assert "'uses'" in message
    assert "'kaniko'" in message
    assert "setup" in message and "noop" in message  # what could have been meant


def test_script_step_needs_run() -> None:
    message = _error(_one_step("    uses: script\n"))
    assert SOURCE in message and "'build'" in message and "run:" in message
    blank = _error(_one_step("    uses: script\n    run: '   '\n"))
    assert "run:" in blank


def test_run_is_only_for_script_steps() -> None:
    message = _error(_one_step("    uses: build\n    run: make\n"))
    assert SOURCE in message and "'build'" in message and "run:" in message


def test_duplicate_step_names_are_rejected() -> None:
    message = _error("name: p\nsteps:\n  - {name: a, uses: noop}\n  - {name: a, uses: noop}\n")
    assert SOURCE in message
    assert "'a'" in message and "#2" in message
    assert "'name'" in message


@pytest.mark.parametrize("name", ["queued", "succeeded", "failed", "cancelled"])
def test_reserved_step_names_are_rejected(name: str) -> None:
    message = _error(f"name: p\nsteps:\n  - {{name: {name}, uses: noop}}\n")
    assert SOURCE in message and f"'{name}'" in message and "reserved" in message


@pytest.mark.parametrize("name", ["Build", "1st", "build_image", "-x", "a" * 64])
def test_step_names_must_be_usable_as_routing_keys(name: str) -> None:
    message = _error(f"name: p\nsteps:\n  - {{name: '{name}', uses: noop}}\n")
    assert SOURCE in message and "'name'" in message


def test_invalid_yaml_names_the_file() -> None:
    message = _error("name: p\nsteps: [\n")
    assert message.startswith(f"{SOURCE}: ")
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["- just\n- a list\n", "just a string\n", ""])
def test_yaml_that_is_not_a_mapping_is_rejected(text: str) -> None:
    assert _error(text).startswith(f"{SOURCE}: ")


@pytest.mark.parametrize(
    "text", ["name: p\n", "name: p\nsteps: []\n", "steps:\n  - {name: a, uses: noop}\n"])
def test_name_and_at_least_one_step_are_required(text: str) -> None:
    assert SOURCE in _error(text)


def test_step_without_a_name_is_located_by_number() -> None:
    message = _error("name: p\nsteps:\n  - {name: a, uses: noop}\n  - {uses: noop}\n")
    assert "step #2" in message and "'name'" in message


# ---------------------------------------------------------------------------------------
# durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30.0), ("10m", 600.0), ("1h", 3600.0), ("500ms", 0.5), ("1.5m", 90.0),
     ("90", 90.0), (" 2 s ", 2.0), (45, 45.0), (2.5, 2.5), (0, 0.0)],
)
def test_durations(value: object, seconds: float) -> None:
    step = _parse(f"name: p\nsteps:\n  - name: a\n    uses: noop\n    timeout: {value!r}\n"
                  if isinstance(value, str) else
                  f"name: p\nsteps:\n  - name: a\n    uses: noop\n    timeout: {value}\n"
                  ).step("a")
    assert step.timeout == seconds
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["ten minutes", "10 min", "1d", "-5s", "s"])
def test_bad_duration_names_step_and_field(value: str) -> None:
    message = _error(f"name: p\nsteps:\n  - name: deploy\n    uses: noop\n"
                     f"    timeout: '{value}'\n")
    assert SOURCE in message and "'deploy'" in message and "'timeout'" in message
    assert value in message


def test_negative_duration_is_rejected() -> None:
    message = _error("name: p\nsteps:\n  - {name: a, uses: noop, timeout: -1}\n")
    assert "'timeout'" in message


def test_bad_backoff_duration_names_the_nested_field() -> None:
    message = _error("name: p\nsteps:\n  - {name: a, uses: noop, backoff: {initial: 2x}}\n")
    assert "'a'" in message and "backoff.initial" in message


def test_timeout_can_be_turned_off() -> None:
    assert _parse("name: p\nsteps:\n  - {name: a, uses: noop, timeout: null}\n").step(
        "a").timeout is None


@pytest.mark.parametrize(
    "fields",
    ["retries: -1", "retries: 101", "retry_on: [error, oom]", "backoff: {factor: 0.5}",
     "backoff: {jitter: 1.5}", "when: {branches: []}", "when: {tags: [v*]}"],
)
def test_bad_policies_are_rejected(fields: str) -> None:
    message = _error(f"name: p\nsteps:\n  - name: a\n    uses: noop\n    {fields}\n")
    assert SOURCE in message and "'a'" in message


# ---------------------------------------------------------------------------------------
# branch filters


@pytest.mark.parametrize(
    ("branch", "runs"),
    [("main", True), ("release/1.2", True), ("hotfix-7", True),
     ("feature/main", False), ("mainline", False), ("Main", False), (None, False)],
)
def test_when_branches_are_glob_patterns(branch: str | None, runs: bool) -> None:
    when = When(branches=["main", "release/*", "hotfix-?"])
    assert when.matches(branch) is runs
    step = Step(name="a", uses="noop", when=when)
    assert step.runs_on(branch) is runs


def test_step_without_when_runs_on_every_ref() -> None:
    step = Step(name="a", uses="noop")
    assert step.runs_on("main") and step.runs_on("feature/x") and step.runs_on(None)


def test_pipeline_branch_filter() -> None:
    filtered = _parse("name: p\nbranches: [main, 'release/*']\nsteps:\n  - {name: a, uses: noop}\n")
    assert filtered.accepts_branch("main")
    assert filtered.accepts_branch("release/2024.05")
    assert not filtered.accepts_branch("feature/x")
    assert not filtered.accepts_branch("maint")
    everything = _parse("name: p\nsteps:\n  - {name: a, uses: noop}\n")
    assert everything.branches is None
    assert everything.accepts_branch("anything/at-all")
    assert "'branches'" in _error("name: p\nbranches: []\nsteps:\n  - {name: a, uses: noop}\n")


# ---------------------------------------------------------------------------------------
# backoff


def test_backoff_grows_exponentially_without_jitter() -> None:
    backoff = Backoff(initial=2, factor=3, max=1000, jitter=0)
    assert [backoff.delay(n, random.Random(0)) for n in range(1, 6)] == [2, 6, 18, 54, 162]


def test_backoff_is_capped_at_max() -> None:
    backoff = Backoff(initial=1, factor=2, max=10, jitter=0)
    assert [backoff.delay(n, random.Random(0)) for n in range(1, 8)] == [1, 2, 4, 8, 10, 10, 10]
    assert Backoff(jitter=0).delay(50, random.Random(0)) == 300  # the default cap


def test_backoff_jitter_stays_within_bounds_and_spreads() -> None:
    backoff = Backoff(initial=10, factor=2, max=10_000, jitter=0.2)
    rng = random.Random(42)
    for attempt in (1, 2, 3):
        base = 10 * 2 ** (attempt - 1)
        delays = [backoff.delay(attempt, rng) for _ in range(300)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert min(delays) < base * 0.9 and max(delays) > base * 1.1  # really jittered
    assert backoff.delay(1, random.Random(7)) == backoff.delay(1, random.Random(7))


def test_backoff_with_jitter_never_waits_longer_than_max() -> None:
    # `max` is what a pipeline author reads as the longest wait between attempts.
    backoff = Backoff(initial=2, factor=2, max=30, jitter=0.2)
    rng = random.Random(1)
    delays = [backoff.delay(attempt, rng) for attempt in range(1, 12) for _ in range(50)]
    assert all(0 <= d <= 30 for d in delays), max(delays)


def test_backoff_defaults() -> None:
    assert Backoff() == Backoff(initial=2.0, factor=2.0, max=300.0, jitter=0.2)


# ---------------------------------------------------------------------------------------
# the packaged default


def test_default_pipeline_needs_its_handlers() -> None:
    names = default_handler_names()
    assert load_default(names).name == "nodejs"
    with pytest.raises(PipelineError) as info:
        load_default(names - {"gitops"})
    message = str(info.value)
    assert "nodejs.yaml" in message and "'gitops'" in message and "'uses'" in message


def test_the_example_pipelines_parse() -> None:
    """The README points users at examples/: they must stay valid."""
    from pathlib import Path

    import handlers
    from cistate.domain.pipeline import parse

    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
    assert examples, "examples/ holds at least one pipeline"
    for path in examples:
        pipeline = parse(path.read_text(), str(path), handlers.names())
        assert pipeline.steps


# ---------------------------------------------------------------------------------------
# needs, finally, fail_fast


GRAPH = """
name: p
fail_fast: false
steps:
  - {name: setup, uses: setup}
  - {name: unit, uses: noop}
  - {name: lint, uses: noop, needs: [setup]}
  - {name: build, uses: build, needs: [unit, lint]}
  - {name: docs, uses: noop, needs: []}
finally:
  - {name: report, uses: script, run: 'echo "$CISTATE_RUN_OUTCOME"'}
  - {name: clean, uses: noop}
"""


def test_needs_finally_and_fail_fast_parse_into_the_graph() -> None:
    pipeline = _parse(GRAPH)
    assert pipeline.step_names == ("setup", "unit", "lint", "build", "docs", "report", "clean")
    assert pipeline.finally_steps == ("report", "clean")
    assert pipeline.fail_fast is False
    assert pipeline.step("lint").needs == ["setup"] and pipeline.step("unit").needs is None
    graph = pipeline.graph
    assert graph.steps == ("setup", "unit", "lint", "build", "docs")
    assert graph.finally_steps == ("report", "clean")
    assert dict(graph.needs) == {
        "setup": (), "unit": ("setup",), "lint": ("setup",), "build": ("unit", "lint"),
        "docs": (), "report": (), "clean": ("report",)}
    assert pipeline.is_finally("clean") and not pipeline.is_finally("build")


def test_a_pipeline_without_needs_is_the_line_it_always_was() -> None:
    pipeline = _parse("name: p\nsteps:\n  - {name: a, uses: noop}\n  - {name: b, uses: noop}\n"
                      "  - {name: c, uses: noop}\n")
    assert dict(pipeline.graph.needs) == {"a": (), "b": ("a",), "c": ("b",)}
    assert pipeline.fail_fast is True and pipeline.finally_steps == ()


def test_the_graph_follows_a_replaced_list_of_steps() -> None:
    import dataclasses

    pipeline = _parse(GRAPH)
    fewer = dataclasses.replace(pipeline, steps=pipeline.steps[:2])
    assert fewer.graph.steps == ("setup", "unit") and fewer.graph.finally_steps == ()


@pytest.mark.parametrize(("text", "expected"), [
    ("steps:\n  - {name: a, uses: noop, needs: [b]}\n  - {name: b, uses: noop}\n",
     f"{SOURCE}: needs form a cycle: a -> b -> a (b has no `needs:`, so it needs the step "
     "before it, a); drop or change one of these needs"),
    ("steps:\n  - {name: build, uses: noop}\n  - {name: test, uses: noop, needs: [biuld]}\n",
     f"{SOURCE}: step 'test': needs 'biuld', but there is no step of that name "
     "(steps: build, test); did you mean 'build'?"),
    ("steps:\n  - {name: a, uses: noop, needs: [clean]}\nfinally:\n  - {name: clean, uses: noop}\n",
     f"{SOURCE}: step 'a': needs 'clean', a finally step; "),
    ("steps:\n  - {name: a, uses: noop}\nfinally:\n  - {name: clean, uses: noop, needs: [a]}\n",
     f"{SOURCE}: finally step 'clean': needs 'a', which is a main step; "),
], ids=["cycle", "unknown-need", "main-needs-finally", "finally-needs-main"])
def test_needs_that_cannot_run_stop_loading_naming_the_file(text: str, expected: str) -> None:
    assert _error("name: p\n" + text).startswith(expected)


def test_needs_written_as_one_name_says_how_to_write_the_list() -> None:
    message = _error("name: p\nsteps:\n  - {name: a, uses: noop}\n"
                     "  - {name: b, uses: noop, needs: a}\n")
    assert message.startswith(f"{SOURCE}: step 'b' (#2): field 'needs': ")
    assert "needs is a list of step names: write `needs: [a]`" in message


@pytest.mark.parametrize(("step", "expected"), [
    ("{name: cancelled, uses: noop}", "finally step 'cancelled' (#1): field 'name': "
                                      "'cancelled' is reserved for runs"),
    ("{name: a, uses: noop}", "finally step 'a' (#1): field 'name': a step of that name comes "
                              "earlier"),
    ("{name: clean, uses: kaniko}", "finally step 'clean' (#1): field 'uses': no handler named "
                                    "'kaniko'"),
    ("{name: clean, uses: noop, retires: 1}", "finally step 'clean' (#1): field 'retires': "
                                              "unknown field"),
    ("{name: clean, uses: script}", "finally step 'clean' (#1): Value error, `uses: script` "
                                    "needs a `run:`"),
], ids=["reserved", "duplicate", "unknown-handler", "unknown-field", "script-without-run"])
def test_finally_steps_are_checked_as_steps_are(step: str, expected: str) -> None:
    message = _error(f"name: p\nsteps:\n  - {{name: a, uses: noop}}\nfinally:\n  - {step}\n")
    assert message.startswith(f"{SOURCE}: "), message
    assert expected in message, message


def test_fail_fast_is_a_boolean() -> None:
    assert "'fail_fast'" in _error("name: p\nfail_fast: sometimes\nsteps:\n"
                                   "  - {name: a, uses: noop}\n")
