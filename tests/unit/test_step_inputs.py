"""Step inputs name their source by handler: a handler declares what it reads (handlers.REGISTRY),
the pipeline's load finds the step upstream that uses that handler (or takes the one `inputs:`
names), the run pins that, and a step's command carries it, so renaming a step cannot break a
later one at run time; a file where it cannot be found is refused at load, naming file, step
and field."""

from __future__ import annotations

import re
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

import handlers
from cistate.bootstrap import load_default
from cistate.domain import pipeline as p
from cistate.domain import run as r
from cistate.domain.messages import StepCommand
from handlers.base import StepFailed, StepLog, StepRequest
from handlers.cd_settings import for_request
from handlers.health import deployed_namespace
from handlers.sandbox import Sandbox, SandboxSettings

from ._support import Harness, push

pytestmark = pytest.mark.unit

SOURCE = "pipelines/shop.yaml"
KNOWN = handlers.inputs()

RENAMED = """
name: shop
steps:
  - {name: prepare, uses: setup}
  - {name: image, uses: build}
  - {name: dev, uses: deploy, with: {namespace: "dev-${app}"}}
  - {name: check, uses: health}
"""


def parse(text: str, source: str = SOURCE) -> p.Pipeline:
    return p.parse(text, source, KNOWN)


def refused(text: str) -> str:
    with pytest.raises(p.PipelineError) as info:
        parse(text)
    return str(info.value)


def commands(decision: r.Decision) -> dict[str, StepCommand]:
    return {o.body.step: o.body for o in decision.outgoing if isinstance(o.body, StepCommand)}


def request_for(command: StepCommand, tmp_path: Path) -> StepRequest:
    """The request a worker makes of a command (cistate.service.worker)."""
    sandbox = Sandbox(settings=SandboxSettings(), attempt=tmp_path / "attempt", identity={})
    return StepRequest(
        run_id=str(command.run_id), repo=command.repo, ref=command.ref, commit=command.commit,
        step=command.step, attempt=command.attempt, settings=command.settings,
        script=command.script, inputs=command.inputs, workdir=tmp_path, log=StepLog(),
        sandbox=sandbox, sources=command.sources)


# -- a renamed step


def test_a_pipeline_that_renames_setup_runs_and_later_steps_get_its_outputs(
        tmp_path: Path) -> None:
    pipeline = parse(RENAMED)
    assert pipeline.step("image").inputs == {"setup": "prepare"}
    assert pipeline.step("dev").inputs == {"setup": "prepare", "build": "image"}
    assert pipeline.step("check").inputs == {"setup": "prepare", "deploy": "dev"}
    h = Harness(r.Decider(pipeline))
    assert commands(h.send(push()))["prepare"].sources == {}
    setup = {"app_name": "shop", "image_url": "reg/dev/shop:abc1234", "branch": "main"}
    image = commands(h.send(h.ok("prepare", setup)))["image"]
    assert image.sources == {"setup": "prepare"}
    assert request_for(image, tmp_path).output_of("setup", "image_url") == setup["image_url"]
    dev = commands(h.send(h.ok("image", {"image_url": "reg/dev/shop@sha256:1"})))["dev"]
    request = request_for(dev, tmp_path)
    assert request.output_of("setup", "app_name") == "shop"
    assert request.outputs_from("build") == {"image_url": "reg/dev/shop@sha256:1"}
    # what deploy does with it: the namespace template's ${app} is setup's app name
    assert for_request(request).namespace_for(request) == "dev-shop"
    check = commands(h.send(h.ok("dev", {"namespace": "dev-shop"})))["check"]
    assert deployed_namespace(request_for(check, tmp_path),
                              for_request(request_for(check, tmp_path))) == "dev-shop"
    h.send(h.ok("check"))
    assert h.state.status == "succeeded"


def _renamed_default() -> str:
    """The packaged pipeline with every step renamed (`setup` -> `my-setup`), needs too."""
    text = (resources.files("cistate") / "pipelines" / "nodejs.yaml").read_text("utf-8")
    text = re.sub(r"(?m)^  - name: ", "  - name: my-", text)
    return re.sub(r"needs: \[([^]]*)\]",
                  lambda m: "needs: [" + ", ".join(
                      f"my-{name.strip()}" for name in m.group(1).split(",")) + "]", text)


def test_the_default_pipeline_with_every_step_renamed_reads_what_it_read_before(
        tmp_path: Path) -> None:
    pipeline = parse(_renamed_default())
    h = Harness(r.Decider(pipeline))
    decision = h.send(push())
    outputs = {
        "setup": {"app_name": "shop", "image_url": "reg/dev/shop:abc1234",
                  "release_image_repo": "reg/releases/shop", "branch": "main"},
        "test": {}, "build": {"image_url": "reg/dev/shop:abc1234", "image_digest": "sha256:1"},
        "deploy": {"namespace": "dev"}, "health": {}, "tag-release": {"tag": "1.2.3"},
        "img-release": {"release_image_url": "reg/releases/shop:1.2.3"},
        "helm-release": {"chart_name": "shop", "chart_version": "1.2.3",
                         "chart_repo": "oci://charts"},
        "gitops": {"commit": "c" * 40},
    }
    seen: dict[str, StepCommand] = {}
    while h.state.status == "running" or h.state.status == "queued":
        started = commands(decision)
        seen.update(started)
        if not started:
            break
        for name in started:
            decision = h.send(h.ok(name, outputs[name.removeprefix("my-")]))
    assert h.state.status == "succeeded"
    for name, command in seen.items():
        uses = pipeline.step(name).uses
        reads = {read.producer for read in KNOWN[uses]}
        assert command.sources is not None
        assert set(command.sources) <= reads
        assert all(step == f"my-{producer}" for producer, step in command.sources.items())
        request = request_for(command, tmp_path)
        for read in KNOWN[uses]:
            if read.producer in command.sources:
                assert request.outputs_from(read.producer) == outputs[read.producer]
    # helm-release runs beside img-release: it reads none of its outputs, as before
    assert "img-release" not in (seen["my-helm-release"].sources or {})
    assert request_for(seen["my-gitops"], tmp_path).output_of("helm-release",
                                                               "chart_version") == "1.2.3"


def test_helm_release_after_img_release_reads_its_image() -> None:
    pipeline = parse("""
name: p
steps:
  - {name: setup, uses: setup}
  - {name: build, uses: build}
  - {name: tag, uses: tag-release}
  - {name: image, uses: img-release}
  - {name: chart, uses: helm-release}
""")
    assert pipeline.step("chart").inputs == {"setup": "setup", "tag-release": "tag",
                                             "img-release": "image"}


# -- what load refuses


def test_load_refuses_a_step_whose_producer_no_step_uses() -> None:
    message = refused("""
name: p
steps:
  - {name: prepare, uses: setup}
  - {name: release, uses: helm-release}
""")
    assert message.startswith(f"{SOURCE}: step 'release' (#2): field 'uses': ")
    assert "helm-release reads tag of a step that uses tag-release" in message
    assert "no step of the pipeline uses tag-release" in message


def test_load_refuses_a_step_whose_producer_does_not_run_before_it() -> None:
    message = refused("""
name: p
steps:
  - {name: prepare, uses: setup}
  - {name: image, uses: build, needs: []}
""")
    assert message.startswith(f"{SOURCE}: step 'image' (#2): field 'needs': ")
    assert "build reads image_url of a step that uses setup" in message
    assert "add 'prepare' to its needs" in message


def test_load_refuses_two_producers_upstream_until_inputs_says_which() -> None:
    text = """
name: p
steps:
  - {name: one, uses: setup}
  - {name: two, uses: setup}
  - {name: image, uses: build%s}
"""
    message = refused(text % "")
    assert message.startswith(f"{SOURCE}: step 'image' (#3): field 'inputs': ")
    assert "2 steps before it use it (one, two)" in message
    assert "`inputs: {setup: one}`" in message
    assert parse(text % ", inputs: {setup: two}").step("image").inputs == {"setup": "two"}


@pytest.mark.parametrize(("inputs", "field", "problem"), [
    ("{setup: prep}", "inputs.setup",
     "there is no step named 'prep' (steps: prepare, lint, image, late); did you mean 'prepare'?"),
    ("{setup: late}", "inputs.setup", "step 'late' does not run before 'image'"),
    ("{setup: lint}", "inputs.setup", "step 'lint' uses script, not setup"),
    ("{tag-release: prepare}", "inputs.tag-release",
     "build reads no outputs of a step that uses tag-release (it reads those of setup)"),
])
def test_load_refuses_inputs_naming_a_step_that_cannot_be_the_source(
        inputs: str, field: str, problem: str) -> None:
    message = refused(f"""
name: p
steps:
  - {{name: prepare, uses: setup}}
  - {{name: lint, uses: script, run: make lint}}
  - {{name: image, uses: build, inputs: {inputs}}}
  - {{name: late, uses: setup}}
""")
    assert message.startswith(f"{SOURCE}: step 'image' (#3): field '{field}': "), message
    assert problem in message


def test_inputs_of_a_handler_that_reads_nothing_are_refused() -> None:
    message = refused("""
name: p
steps:
  - {name: prepare, uses: setup}
finally:
  - {name: report, uses: script, run: echo, inputs: {setup: prepare}}
""")
    assert message.startswith(f"{SOURCE}: finally step 'report' (#1): field 'inputs.setup': ")
    assert "it reads no other step's outputs" in message


def test_a_repo_pipeline_without_a_producer_fails_its_run_naming_the_step() -> None:
    decider = r.Decider(p.parse(
        "name: d\nsteps:\n  - {name: a, uses: noop}\n", "deploy.yaml", KNOWN,
    ).reading_repo_file(), known_handlers=KNOWN)
    h = Harness(decider)
    h.send(push())
    text = "name: own\nsteps:\n  - {name: push-chart, uses: gitops}\n"
    h.send(h.ok(p.REPO_PIPELINE_STEP, {"found": True, "path": p.REPO_PIPELINE_FILE,
                                        "text": text}))
    error = h.state.steps[p.REPO_PIPELINE_STEP].error or {}
    assert h.state.status == "failed"
    assert "step 'push-chart' (#1): field 'uses': gitops reads app_name" in error["message"]


# -- pinned


def test_resolved_inputs_round_trip_through_the_pinned_spec() -> None:
    pipeline = parse(RENAMED)
    assert pipeline.spec["steps"][1]["inputs"] == {"setup": "prepare"}
    again = p.from_spec(pipeline.spec, "pinned")
    assert again.sha256 == pipeline.sha256
    assert [s.inputs for s in again.steps] == [s.inputs for s in pipeline.steps]


def test_a_pinned_spec_whose_inputs_name_a_later_step_is_refused() -> None:
    spec: dict[str, Any] = dict(parse(RENAMED).spec)
    spec["steps"] = [dict(step) for step in spec["steps"]]
    spec["steps"][1]["inputs"] = {"setup": "check"}
    with pytest.raises(p.PipelineError) as info:
        p.from_spec(spec, "pinned")
    assert "the pinned pipeline is not valid" in str(info.value)
    assert "step 'image' (#2): field 'inputs.setup': step 'check' does not run before" in str(
        info.value)


def test_a_run_pinned_before_inputs_sends_commands_without_sources(tmp_path: Path) -> None:
    """Its spec has no `inputs`: handlers read earlier outputs by step name, as they did."""
    spec: dict[str, Any] = dict(parse(
        "name: old\nsteps:\n  - {name: setup, uses: setup}\n  - {name: build, uses: build}\n",
    ).spec)
    spec["steps"] = [{k: v for k, v in step.items() if k != "inputs"} for step in spec["steps"]]
    h = Harness(r.Decider(p.from_spec(spec, "pinned")))
    h.send(push())
    build = commands(h.send(h.ok("setup", {"image_url": "reg/dev/app:1"})))["build"]
    assert build.sources is None
    assert "sources" not in StepCommand.model_validate(
        {k: v for k, v in build.model_dump(by_alias=True).items() if k != "sources"}
    ).model_fields_set
    assert request_for(build, tmp_path).output_of("setup", "image_url") == "reg/dev/app:1"


# -- what a handler is told


def _request(tmp_path: Path, inputs: dict[str, dict[str, Any]],
             sources: dict[str, str] | None) -> StepRequest:
    command = StepCommand(run_id=uuid.uuid4(), step="gitops", attempt=1, uses="gitops",
                          repo="https://git.example.com/app.git", ref="refs/heads/main",
                          commit="a" * 40, inputs=inputs, sources=sources)
    return request_for(command, tmp_path)


def test_output_of_names_the_step_the_pipeline_chose_when_an_output_is_missing(
        tmp_path: Path) -> None:
    request = _request(tmp_path, {"prepare": {}}, {"setup": "prepare"})
    with pytest.raises(StepFailed) as info:
        request.output_of("setup", "app_name")
    assert "output 'app_name' of step 'prepare' (uses: setup)" in info.value.message
    # an optional input no step upstream made
    assert request.outputs_from("img-release") == {}
    with pytest.raises(StepFailed) as info:
        request.output_of("img-release", "release_image_url")
    assert "of a step that uses img-release, and none runs before it" in info.value.message


def test_a_command_with_sources_never_reads_a_step_by_its_name(tmp_path: Path) -> None:
    """A step named like a handler is not that handler's step when the pipeline says which
    one is."""
    request = _request(tmp_path, {"setup": {"app_name": "wrong"}, "prep": {"app_name": "ok"}},
                       {"setup": "prep"})
    assert request.output_of("setup", "app_name") == "ok"
    assert _request(tmp_path, {"setup": {"app_name": "old"}}, None).output_of(
        "setup", "app_name") == "old"


# -- the declarations


READS = re.compile(r"""(?:output_of|outputs_from)\(\s*["']([a-z-]+)["']""")


def test_each_handler_declares_exactly_the_handlers_whose_outputs_it_reads() -> None:
    """handlers.REGISTRY is read without importing the modules: it must say what their code
    reads (the shared delivery settings' namespace template included)."""
    root = Path(handlers.__file__).parent
    shared = set(READS.findall((root / "cd_settings.py").read_text()))
    for name, entry in handlers.REGISTRY.items():
        code = (root / (entry.module.removeprefix("handlers.") + ".py")).read_text()
        read = set(READS.findall(code))
        if "namespace_for(" in code:
            read |= shared
        assert read == {i.producer for i in entry.inputs}, name
        assert all(i.producer in handlers.REGISTRY for i in entry.inputs), name


def test_the_packaged_and_example_pipelines_load_with_the_handlers_inputs() -> None:
    default = load_default(KNOWN)
    assert default.step("gitops").inputs == {"setup": "setup", "helm-release": "helm-release"}
    examples = Path(__file__).resolve().parents[2] / "examples"
    for path in sorted(examples.glob("*.yaml")):
        assert p.parse(path.read_text(), str(path), KNOWN).steps


def test_inputs_that_are_not_a_mapping_say_how_to_write_them() -> None:
    message = refused("name: p\nsteps:\n  - {name: a, uses: setup}\n"
                      "  - {name: b, uses: build, inputs: [a]}\n")
    assert message == (f"{SOURCE}: step 'b' (#2): field 'inputs': Value error, inputs maps a "
                       "handler to the step whose outputs it reads: write "
                       "`inputs: {setup: prepare}`")
