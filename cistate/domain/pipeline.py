"""Pipeline spec: YAML -> validated steps, their policies, and the graph of their needs.

Parsing is pure: `parse(text, source, known_handlers)` takes the file's text and the handlers
a worker can run (each with the `Input`s it reads of earlier steps), so the core never imports a
handler. Every error names the file, the step and the field, because the person reading it has
to go and fix that file.

A pipeline has `steps:` (a step without `needs:` needs the one before it, so a list is a line)
and, optionally, `finally:` steps that run once every step has ended, whatever the outcome;
`fail_fast: true` (the default) stops the other steps when one fails. What those rules mean
for a run is cistate.domain.graph's; the graph is built here, once, so a pipeline that cannot run
stops start-up with its file named.

Step inputs name their source by handler, never by step name: a handler declares what it reads
(gitops: `app_name` of a step that uses setup), and at load each step's `inputs:` is resolved
to a step name per handler it reads: the one step upstream of it (cistate.domain.graph.upstream)
that uses that handler, unless the file names one (`inputs: {setup: prepare}`). Renaming a step
therefore changes nothing a later step reads, and a step whose producer is missing, ambiguous or
not upstream stops the load, not the run.

A run pins its pipeline: `Pipeline.spec` is the parsed spec as plain JSON (every field, its
defaults too, so a later cistate with other defaults decides the same) and `sha256` its hash;
both go in the run's first event, and `from_spec` builds the same pipeline from them again.
Which pipeline a push runs is the `Catalog`'s: the repository's own file where the deployment
allows it (read by the built-in `pipeline` step, in a worker), else the first deployment
pipeline whose `repos:` globs match, else the default one.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from cistate.domain import graph as step_graph
from cistate.domain.messages import EnvName, Network, SecretRef
from cistate.domain.status import RUN_STATES

# a step may not be named like a run's state (older runs named the running step as theirs)
RESERVED_STATES = frozenset(RUN_STATES) - {"running"}
DEFAULT_PIPELINE = "nodejs"
DEFAULT_TIMEOUT_SECONDS = 3600.0

# The built-in first step of a run whose repository may bring its own pipeline: it reads
# REPO_PIPELINE_FILE at the pushed commit (handlers.repo_pipeline), and what it read becomes
# the run's pinned pipeline.
REPO_PIPELINE_STEP = "pipeline"
REPO_PIPELINE_HANDLER = "repo-pipeline"
REPO_PIPELINE_FILE = ".cistate/pipeline.yaml"
# `uses: approval`: the orchestrator holds the run for a person (no worker runs it);
# `with: {approvers: [names], timeout: 24h}`
APPROVAL_HANDLER = "approval"
DEFAULT_APPROVAL_TIMEOUT = 24 * 3600.0
Origin = Literal["deployment", "repo"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _secret_ref(value: Any) -> Any:
    """`NPM_TOKEN` is short for `{name: NPM_TOKEN}`."""
    return {"name": value} if isinstance(value, str) else value


def _needs_list(value: Any) -> Any:
    """`needs: build` where `needs: [build]` was meant: say so, rather than "not a list"."""
    if isinstance(value, str):
        raise ValueError(f"needs is a list of step names: write `needs: [{value}]`")
    return value


def _inputs_map(value: Any) -> Any:
    """`inputs: [prepare]` where a mapping was meant: say which one."""
    if value is not None and not isinstance(value, dict):
        raise ValueError("inputs maps a handler to the step whose outputs it reads: write "
                         "`inputs: {setup: prepare}`")
    return value


def parse_duration(value: Any) -> Any:
    """Accept 30, 2.5, "30s", "10m", "1h", "500ms"; leave anything else for pydantic to reject."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration (use seconds, or 500ms/30s/10m/1h)")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
LockName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
DEFAULT_LOCK_TIMEOUT_SECONDS = 3600.0
GROUP_VARIABLES = ("repo", "branch", "pipeline")
_TEMPLATE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PipelineError(ValueError):
    """A pipeline file that cannot be used, with a message that says where and why."""


@dataclass(frozen=True)
class Input:
    """Outputs a handler reads of an earlier step, named by the handler that makes them
    (`setup`), never by a step's name: which step that is, each pipeline says (Step.inputs)."""

    producer: str  # the `uses:` of the step that makes them
    keys: tuple[str, ...]  # the outputs read (for messages)
    # read when a step upstream uses `producer`, done without otherwise (helm-release reads
    # img-release's image when it ran before, else setup's): never a reason to refuse a file
    optional: bool = False


# what each known handler reads: `uses:` name -> its inputs
HandlerInputs = Mapping[str, Sequence[Input]]


def declared_inputs(known_handlers: Iterable[str] | HandlerInputs) -> dict[str, tuple[Input, ...]]:
    """Each known handler's inputs; a plain list of names declares none."""
    if isinstance(known_handlers, Mapping):
        return {name: tuple(inputs) for name, inputs in known_handlers.items()}
    return {name: () for name in known_handlers}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Backoff(_Spec):
    initial: Seconds = 2.0
    factor: float = Field(default=2.0, ge=1.0, le=10.0)
    max: Seconds = 300.0
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)

    def delay(self, failed_attempt: int, rng: random.Random) -> float:
        """Seconds to wait before the attempt after `failed_attempt` (1-based), jittered
        (by `rng`, seeded by the caller: the domain has no unseeded randomness) so that runs
        failing together do not all retry in the same instant."""
        base = min(self.max, self.initial * self.factor ** min(failed_attempt - 1, 100))
        spread = base * self.jitter
        return min(self.max, max(0.0, base + rng.uniform(-spread, spread)))


class When(_Spec):
    branches: list[str] = Field(min_length=1)
    # pull request runs too, by their base branch (by default a step with `when:` does not
    # run for pull requests: release steps never do unless the pipeline says so)
    pull_request: bool = False

    def matches(self, branch: str | None, pull_request: bool = False) -> bool:
        if pull_request and not self.pull_request:
            return False
        return branch is not None and any(fnmatch.fnmatchcase(branch, p) for p in self.branches)


class Step(_Spec):
    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    run: str | None = None
    retries: int = Field(default=0, ge=0, le=100)
    backoff: Backoff = Field(default_factory=Backoff)
    retry_on: frozenset[str] = Field(default=frozenset({"error", "timeout"}))
    timeout: Seconds | None = DEFAULT_TIMEOUT_SECONDS
    when: When | None = None
    enabled: bool = True  # a disabled step is skipped by every run
    # what the step's processes see: `env:` values, the secrets it names, and the network
    env: dict[EnvName, str] = Field(default_factory=dict)
    secrets: list[Annotated[SecretRef, BeforeValidator(_secret_ref)]] = Field(
        default_factory=list)
    network: Network = "default"
    # the steps it waits for; None: the step before it in the file (the first: none)
    needs: Annotated[list[str], BeforeValidator(_needs_list)] | None = None
    # a lock (`lock: dev-deploy`): one run at a time runs the steps that name it; the others
    # wait (in arrival order) up to lock_timeout, then fail
    lock: LockName | None = None
    lock_timeout: Seconds = DEFAULT_LOCK_TIMEOUT_SECONDS
    # where its handler's inputs come from: producing handler -> step. Written in the file
    # only to choose (`inputs: {setup: prepare}`); after parse, every input its handler reads
    # (the rest found upstream), which is what a run pins. None: a spec pinned before inputs
    # were resolved, whose handlers read earlier outputs by step name.
    inputs: Annotated[dict[str, str], BeforeValidator(_inputs_map)] | None = None

    @field_serializer("retry_on")
    def _sorted(self, value: frozenset[str]) -> list[str]:
        return sorted(value)  # a set's order varies between processes; a pinned hash may not

    @model_validator(mode="after")
    def _script_needs_run(self) -> Step:
        if self.uses == "script" and not (self.run and self.run.strip()):
            raise ValueError("`uses: script` needs a `run:` command")
        if self.uses != "script" and self.run is not None:
            raise ValueError(f"`run:` is only for `uses: script`, not `uses: {self.uses}`")
        if self.uses == APPROVAL_HANDLER:
            _check_approval(self.with_)
            if self.lock is not None:
                raise ValueError("an approval step cannot take a lock: it would hold it for "
                                 "as long as a person takes; put `lock:` on the steps after it")
        unknown = self.retry_on - {"error", "timeout"}
        if unknown:
            raise ValueError(f"retry_on takes error and timeout, not {sorted(unknown)}")
        reserved = sorted(key for key in self.env if key.upper().startswith("CISTATE_"))
        if reserved:
            raise ValueError(f"env: {', '.join(reserved)}: names starting with CISTATE_ are "
                             "cistate's own (the run's identity); choose another name")
        seen: set[str] = set()
        for secret in self.secrets:
            variable = secret.name + ("_FILE" if secret.as_ == "file" else "")
            if secret.name in seen:
                raise ValueError(f"secrets: {secret.name} is named twice")
            if variable in self.env:
                raise ValueError(f"secrets: {secret.name} would set ${variable}, which env: "
                                 "sets too; rename one of them")
            seen.add(secret.name)
        return self

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    @property
    def is_approval(self) -> bool:
        return self.uses == APPROVAL_HANDLER

    @property
    def approvers(self) -> tuple[str, ...]:
        """Who may approve or reject it (the names of API tokens, CLI users); none: any
        operator."""
        return tuple(self.with_.get("approvers") or ())

    @property
    def wait_seconds(self) -> float | None:
        """How long an approval step waits for a person before it fails."""
        if "timeout" in self.with_:
            return float(parse_duration(self.with_["timeout"]))
        return self.timeout

    def runs_on(self, branch: str | None, pull_request: bool = False) -> bool:
        return self.enabled and (self.when is None or self.when.matches(branch, pull_request))

    def skip_reason(self, branch: str | None, pull_request: bool = False) -> str:
        if not self.enabled:
            return "disabled in the pipeline (enabled: false)"
        if pull_request and self.when is not None and not self.when.pull_request:
            return ("a pull request's run: a step with when: runs for pull requests only "
                    "with when: {pull_request: true}")
        return f"branch {branch!r} does not match when.branches"


class Concurrency(_Spec):
    """`concurrency: {group: "${repo}/${branch}", cancel_in_progress: true}`: one run of a
    group at a time; a newer run waits for the older one, or (cancel_in_progress) cancels
    it and supersedes the older ones still waiting."""

    group: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    cancel_in_progress: bool = False

    @field_validator("group")
    @classmethod
    def _known_variables(cls, value: str) -> str:
        unknown = sorted(set(_TEMPLATE_VARIABLE.findall(value)) - set(GROUP_VARIABLES))
        if unknown:
            raise ValueError(f"the group template knows ${{{'}, ${'.join(GROUP_VARIABLES)}}}, "
                             f"not ${{{'}, ${'.join(unknown)}}}")
        return value

    def group_for(self, repo: str, branch: str | None, pipeline: str) -> str:
        """The group's name for a run: the template with its variables filled in."""
        values = {"repo": repo, "branch": branch or "", "pipeline": pipeline}
        return _TEMPLATE_VARIABLE.sub(lambda match: values[match.group(1)], self.group)


class _PipelineSpec(_Spec):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    # which repositories' pushes run it, as URL globs (a file in CISTATE_PIPELINES); none: any
    repos: list[str] | None = Field(default=None, min_length=1)
    branches: list[str] | None = Field(default=None, min_length=1)
    steps: list[Step] = Field(min_length=1)
    finally_: list[Step] = Field(default_factory=list, alias="finally")
    fail_fast: bool = True
    concurrency: Concurrency | None = None


def _check_approval(settings: dict[str, Any]) -> None:
    extra = sorted(set(settings) - {"approvers", "timeout"})
    if extra:
        raise ValueError(f"an approval step takes with: approvers and timeout, not {extra}")
    approvers = settings.get("approvers", [])
    if not isinstance(approvers, list) or not all(
            isinstance(name, str) and name for name in approvers):
        raise ValueError("with.approvers is a list of names (API token names, CLI users)")
    if "timeout" in settings:
        seconds = parse_duration(settings["timeout"])
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
            raise ValueError("with.timeout is a duration such as 24h or 30m")


@dataclass(frozen=True)
class Pipeline:
    """A loaded pipeline. `steps` holds every step, those of `finally:` last, in file order
    (what a worker serves, what start-up checks, how a run lists them); `finally_steps` names
    the ones from `finally:`. `graph` is built from them (GraphError if they cannot run)."""

    name: str
    steps: tuple[Step, ...]
    branches: tuple[str, ...] | None = None  # which branch pushes open a run (None: all)
    source: str = "<memory>"
    finally_steps: tuple[str, ...] = ()
    fail_fast: bool = True
    repos: tuple[str, ...] | None = None  # the repos whose pushes it is for (None: any)
    # deployment: a file of the deployment's; repo: read from the pushed repository
    origin: Origin = "deployment"
    concurrency: Concurrency | None = None
    graph: step_graph.Graph = field(init=False, repr=False, compare=False)
    spec: Mapping[str, Any] = field(init=False, repr=False, compare=False)
    sha256: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        final = set(self.finally_steps)
        graph = step_graph.build([s for s in self.steps if s.name not in final],
                                 [s for s in self.steps if s.name in final])
        object.__setattr__(self, "graph", graph)
        spec: dict[str, Any] = {
            "name": self.name,
            "repos": list(self.repos) if self.repos else None,
            "branches": list(self.branches) if self.branches else None,
            "steps": [_step_spec(s) for s in self.steps if s.name not in final],
            "finally": [_step_spec(s) for s in self.steps if s.name in final],
            "fail_fast": self.fail_fast,
        }
        if self.concurrency is not None:  # absent otherwise: older pins keep their hashes
            spec["concurrency"] = self.concurrency.model_dump(mode="json")
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "sha256", spec_sha256(spec))

    def pinned(self) -> dict[str, Any]:
        """What a run records of it: enough to decide the run with, now and after any change
        of the deployment's files (from_spec(pinned["pipeline_spec"]) builds it again)."""
        return {"pipeline": self.name, "pipeline_sha256": self.sha256,
                "pipeline_source": self.source, "pipeline_origin": self.origin,
                "pipeline_spec": dict(self.spec)}

    def reading_repo_file(self) -> Pipeline:
        """This pipeline with the built-in step that reads the repository's own pipeline
        first: every step that would start with the run waits for it."""
        return _with_first_step(self, _repo_file_step(), self.origin, self.source)

    def step(self, name: str) -> Step:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, Step]:
        return {step.name: step for step in self.steps}

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def is_finally(self, name: str) -> bool:
        return name in self.finally_steps

    def accepts_branch(self, branch: str) -> bool:
        return self.branches is None or any(fnmatch.fnmatchcase(branch, p) for p in self.branches)

    def serves_repo(self, repo: str) -> bool:
        return self.repos is None or any(fnmatch.fnmatchcase(repo, p) for p in self.repos)


def _step_spec(step: Step) -> dict[str, Any]:
    dumped: dict[str, Any] = step.model_dump(mode="json", by_alias=True)
    if step.when is not None and not step.when.pull_request:  # as pinned before PR runs
        del dumped["when"]["pull_request"]
    if step.lock is None:  # absent: the specs (and hashes) of steps without a lock as before
        del dumped["lock"], dumped["lock_timeout"]
    return dumped


def spec_sha256(spec: Mapping[str, Any]) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _repo_file_step() -> Step:
    """The built-in step that reads the repository's pipeline file (it reads no outputs)."""
    return Step(name=REPO_PIPELINE_STEP, uses=REPO_PIPELINE_HANDLER, retries=2, timeout=300.0,
                inputs={})


def _with_first_step(pipeline: Pipeline, first: Step, origin: Origin, source: str) -> Pipeline:
    """`pipeline` with `first` before its steps; the steps that started with the run (the
    first step, and any with `needs: []`) need it instead."""
    steps: list[Step] = [first]
    for index, step in enumerate(pipeline.steps):
        if pipeline.is_finally(step.name):
            steps.append(step)
        elif index == 0 or step.needs == []:
            steps.append(step.model_copy(update={"needs": [first.name]}))
        else:
            steps.append(step)
    return Pipeline(name=pipeline.name, steps=tuple(steps), branches=pipeline.branches,
                    source=source, finally_steps=pipeline.finally_steps,
                    fail_fast=pipeline.fail_fast, repos=pipeline.repos, origin=origin,
                    concurrency=pipeline.concurrency)


def from_spec(spec: Mapping[str, Any], source: str, origin: Origin = "deployment") -> Pipeline:
    """The pipeline a run pinned (Pipeline.spec), built again; PipelineError if it is not a
    valid spec (a damaged event: the chain check says more)."""
    try:
        parsed = _PipelineSpec.model_validate(dict(spec))
        pipeline = _pipeline(parsed, source, origin)
        _check_inputs(pipeline)
    except (ValidationError, step_graph.GraphError, PipelineError) as exc:
        raise PipelineError(f"{source}: the pinned pipeline is not valid: {exc}") from None
    return pipeline


def _pipeline(spec: _PipelineSpec, source: str, origin: Origin) -> Pipeline:
    return Pipeline(
        name=spec.name,
        steps=(*spec.steps, *spec.finally_),
        branches=tuple(spec.branches) if spec.branches else None,
        source=source,
        finally_steps=tuple(step.name for step in spec.finally_),
        fail_fast=spec.fail_fast,
        repos=tuple(spec.repos) if spec.repos else None,
        origin=origin,
        concurrency=spec.concurrency,
    )


def parse(text: str, source: str, known_handlers: Iterable[str] | HandlerInputs,
          origin: Origin = "deployment") -> Pipeline:
    """The pipeline in `text` (the file `source`), for the handlers `known_handlers` names
    (with what each reads, HandlerInputs; names alone read nothing); PipelineError saying
    where it is wrong."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping with `name` and `steps`")
    try:
        spec = _PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(_describe(exc, source, raw)) from None
    known = {**declared_inputs(known_handlers), APPROVAL_HANDLER: ()}  # the orchestrator's own
    _check_steps(spec.steps, spec.finally_, source, frozenset(known))
    if origin == "repo":
        _check_repo_steps(spec, source)
    try:
        pipeline = _pipeline(spec, source, origin)
    except step_graph.GraphError as exc:
        raise PipelineError(f"{source}: {exc}") from None
    return _resolve_inputs(pipeline, known)


def parse_repo_file(text: str, source: str,
                    known_handlers: Iterable[str] | HandlerInputs) -> Pipeline:
    """A repository's own pipeline, as its run pins it: the built-in step that read it
    first (succeeded by then), every step that would start with the run after it."""
    pipeline = parse(text, source, known_handlers, origin="repo")
    return _with_first_step(pipeline, _repo_file_step(), "repo", source)


def _check_repo_steps(spec: _PipelineSpec, source: str) -> None:
    """What a pushed pipeline may not do: name the built-in step, say which repos it is
    for, or set a handler's `with:` settings (where to deploy, which cluster, registry or
    GitOps repo): those are the deployment's, from its environment, never the pusher's."""
    if spec.repos is not None:
        raise PipelineError(f"{source}: field 'repos': a repository's own pipeline is for "
                            "that repository only; `repos:` is for the deployment's files")
    if spec.concurrency is not None:
        raise PipelineError(f"{source}: field 'concurrency': concurrency groups are the "
                            "deployment's (its pipeline files), since they order the runs of "
                            "every repository that shares one")
    steps = [("step", n, s) for n, s in enumerate(spec.steps, 1)]
    steps += [("finally step", n, s) for n, s in enumerate(spec.finally_, 1)]
    for kind, number, step in steps:
        where = f"{source}: {kind} {step.name!r} (#{number})"
        if step.name == REPO_PIPELINE_STEP:
            raise PipelineError(f"{where}: field 'name': {step.name!r} is the built-in step "
                                "that reads this file; choose another name")
        if step.uses == REPO_PIPELINE_HANDLER:
            raise PipelineError(f"{where}: field 'uses': {step.uses!r} is cistate's own")
        if step.lock is not None:
            raise PipelineError(
                f"{where}: field 'lock': locks are the deployment's (a pushed pipeline could "
                "hold one every other run waits for); the deployment's pipeline sets them")
        if step.with_:
            raise PipelineError(
                f"{where}: field 'with': a repository's pipeline cannot set handler "
                f"settings ({', '.join(sorted(step.with_))}); they are the deployment's "
                "(CISTATE_* in its environment)")


@dataclass(frozen=True)
class Catalog:
    """The deployment's pipelines and which one a push runs: the repository's own file when
    `repo_files` (CISTATE_REPO_PIPELINES globs) match its URL, else the first of `pipelines`
    (CISTATE_PIPELINES, by file name) whose `repos:` match, else `default`."""

    default: Pipeline
    pipelines: tuple[Pipeline, ...] = ()
    repo_files: tuple[str, ...] = ()

    def choose(self, repo: str) -> Pipeline:
        deployment = self.choose_deployment(repo)
        return deployment.reading_repo_file() if self.reads_repo_file(repo) else deployment

    def choose_deployment(self, repo: str) -> Pipeline:
        """The deployment's pipeline for `repo` (what runs when its own file is not read)."""
        return next((p for p in self.pipelines if p.serves_repo(repo)), self.default)

    def reads_repo_file(self, repo: str) -> bool:
        return any(fnmatch.fnmatchcase(repo, glob) for glob in self.repo_files)

    @property
    def all(self) -> tuple[Pipeline, ...]:
        return (*self.pipelines, self.default)

    @property
    def step_names(self) -> tuple[str, ...]:
        """Every step a worker runs in any deployment pipeline, each once (what a worker
        serves; approval steps are the orchestrator's, no worker's)."""
        return tuple(dict.fromkeys(s.name for p in self.all for s in p.steps
                                   if not s.is_approval))

    @property
    def served(self) -> frozenset[tuple[str, str]]:
        """The (step, uses) pairs of the deployment's pipelines: commands of those go to the
        queue of the step's name, any other to the queue of its handler."""
        return frozenset((s.name, s.uses) for p in self.all for s in p.steps)

    @property
    def handlers(self) -> tuple[str, ...]:
        """The handlers the deployment's pipelines have workers run, each once."""
        return tuple(dict.fromkeys(s.uses for p in self.all for s in p.steps
                                   if not s.is_approval))


def _check_steps(steps: Sequence[Step], finally_steps: Sequence[Step], source: str,
                 known: frozenset[str]) -> None:
    seen: set[str] = set()
    numbered = [("step", number, step) for number, step in enumerate(steps, 1)]
    numbered += [("finally step", number, step) for number, step in enumerate(finally_steps, 1)]
    for kind, number, step in numbered:
        where = f"{source}: {kind} {step.name!r} (#{number})"
        if step.name in RESERVED_STATES:
            raise PipelineError(f"{where}: field 'name': {step.name!r} is reserved for runs")
        if step.name in seen:
            raise PipelineError(f"{where}: field 'name': a step of that name comes earlier "
                                "(steps: and finally: share one set of names)")
        seen.add(step.name)
        if step.uses not in known:
            raise PipelineError(
                f"{where}: field 'uses': no handler named {step.uses!r} "
                f"(known: {', '.join(sorted(known))})"
            )


def _numbered(pipeline: Pipeline) -> list[tuple[str, Step]]:
    """Each step, in order, with how errors name it: `step 'build' (#3)`, `finally step
    'clean' (#1)` (numbered within its list, as in the file)."""
    counts = {"step": 0, "finally step": 0}
    numbered = []
    for step in pipeline.steps:
        kind = "finally step" if pipeline.is_finally(step.name) else "step"
        counts[kind] += 1
        numbered.append((f"{kind} {step.name!r} (#{counts[kind]})", step))
    return numbered


def _check_inputs(pipeline: Pipeline) -> None:
    """The steps each `inputs:` names exist, run before it, and use the handler they are
    named for (what a handler reads is _resolve_inputs' question)."""
    for where, step in _numbered(pipeline):
        _check_step_inputs(pipeline, where, step)


def _check_step_inputs(pipeline: Pipeline, where: str, step: Step) -> None:
    upstream = step_graph.upstream(pipeline.graph, step.name)
    for producer, name in (step.inputs or {}).items():
        at = f"{pipeline.source}: {where}: field 'inputs.{producer}'"
        if name not in pipeline.step_names:
            close = difflib.get_close_matches(name, pipeline.step_names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PipelineError(f"{at}: there is no step named {name!r} (steps: "
                                f"{', '.join(pipeline.step_names)}){hint}")
        if name not in upstream:
            raise PipelineError(
                f"{at}: step {name!r} does not run before {step.name!r}, so its outputs "
                f"are not there yet; add {name!r} to the needs of {step.name!r} "
                "(directly or through a step it needs)")
        uses = pipeline.step(name).uses
        if uses != producer:
            raise PipelineError(f"{at}: step {name!r} uses {uses}, not {producer}; name "
                                f"a step that uses {producer}")


def _resolve_inputs(pipeline: Pipeline, known: Mapping[str, tuple[Input, ...]]) -> Pipeline:
    """`pipeline` with each step's `inputs` naming the step of every input its handler
    reads: the one the file names, else the one step upstream that uses its producer. A
    required input without such a step, two such steps and no choice, or a choice of an input
    the handler does not read: PipelineError naming file, step and field."""
    steps: list[Step] = []
    for where, step in _numbered(pipeline):
        at = f"{pipeline.source}: {where}"
        reads = known.get(step.uses, ())
        chosen = step.inputs or {}
        producers = [read.producer for read in reads]
        for producer in chosen:
            if producer not in producers:
                what = (f"it reads those of {', '.join(producers)}" if producers
                        else "it reads no other step's outputs")
                raise PipelineError(
                    f"{at}: field 'inputs.{producer}': {step.uses} reads no outputs of a step "
                    f"that uses {producer} ({what}); drop it from inputs:")
        _check_step_inputs(pipeline, where, step)
        upstream = step_graph.upstream(pipeline.graph, step.name)
        resolved: dict[str, str] = {}
        for read in reads:
            if read.producer in chosen:
                resolved[read.producer] = chosen[read.producer]
                continue
            found = [name for name in upstream if pipeline.step(name).uses == read.producer]
            what = (f"{step.uses} reads {', '.join(read.keys)} of a step that uses "
                    f"{read.producer}")
            if len(found) == 1:
                resolved[read.producer] = found[0]
            elif found:
                raise PipelineError(
                    f"{at}: field 'inputs': {what}, and {len(found)} steps before it use "
                    f"it ({', '.join(found)}); say which: "
                    f"`inputs: {{{read.producer}: {found[0]}}}`")
            elif not read.optional:
                elsewhere = [s.name for s in pipeline.steps
                             if s.uses == read.producer and s.name != step.name]
                if elsewhere:
                    raise PipelineError(
                        f"{at}: field 'needs': {what}, and {', '.join(elsewhere)}, which "
                        f"use{'s' if len(elsewhere) == 1 else ''} it, "
                        f"do{'es' if len(elsewhere) == 1 else ''} not run before it; add "
                        f"{elsewhere[0]!r} to its needs (directly or through a step it needs)")
                raise PipelineError(
                    f"{at}: field 'uses': {what}, and no step of the pipeline uses "
                    f"{read.producer}; add one (`uses: {read.producer}`) before it")
        steps.append(step.model_copy(update={"inputs": resolved}))
    return dataclasses.replace(pipeline, steps=tuple(steps))


def _describe(exc: ValidationError, source: str, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = source
        if len(loc) >= 2 and loc[0] in ("steps", "finally") and isinstance(loc[1], int):
            index = loc[1]
            kind = "step" if loc[0] == "steps" else "finally step"
            steps = raw.get(str(loc[0]))
            name = None
            if isinstance(steps, list) and index < len(steps) and isinstance(steps[index], dict):
                name = steps[index].get("name")
            where += f": {kind} {name!r} (#{index + 1})" if name else f": {kind} #{index + 1}"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc)
        problem = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: field {field!r}: {problem}" if field else f"{where}: {problem}")
    return "\n".join(lines)
