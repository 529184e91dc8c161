"""Pipeline spec: YAML -> validated steps, their policies, and the graph of their needs.

Parsing is pure: `parse(text, source, known_handlers)` takes the file's text and the handler
names a worker can run, so the core never imports a handler. Every error names the file, the
step and the field, because the person reading it has to go and fix that file.

A pipeline has `steps:` (a step without `needs:` needs the one before it, so a list is a line)
and, optionally, `finally:` steps that run once every step has ended, whatever the outcome;
`fail_fast: true` (the default) stops the other steps when one fails. What those rules mean
for a run is cistate.domain.graph's; the graph is built here, once, so a pipeline that cannot run
stops start-up with its file named.
"""

from __future__ import annotations

import fnmatch
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from cistate.domain import graph as step_graph
from cistate.domain.messages import EnvName, Network, SecretRef

RESERVED_STATES = frozenset({"queued", "succeeded", "failed", "cancelled"})
DEFAULT_PIPELINE = "nodejs"
DEFAULT_TIMEOUT_SECONDS = 3600.0

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


def parse_duration(value: Any) -> Any:
    """Accept 30, 2.5, "30s", "10m", "1h", "500ms"; leave anything else for pydantic to reject."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration (use seconds, or 500ms/30s/10m/1h)")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class PipelineError(ValueError):
    """A pipeline file that cannot be used, with a message that says where and why."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Backoff(_Spec):
    initial: Seconds = 2.0
    factor: float = Field(default=2.0, ge=1.0, le=10.0)
    max: Seconds = 300.0
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)

    def delay(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the attempt after `failed_attempt` (1-based), jittered
        so that runs failing together do not all retry in the same instant."""
        base = min(self.max, self.initial * self.factor ** min(failed_attempt - 1, 100))
        spread = base * self.jitter
        return min(self.max, max(0.0, base + (rng or random).uniform(-spread, spread)))


class When(_Spec):
    branches: list[str] = Field(min_length=1)

    def matches(self, branch: str | None) -> bool:
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

    @model_validator(mode="after")
    def _script_needs_run(self) -> Step:
        if self.uses == "script" and not (self.run and self.run.strip()):
            raise ValueError("`uses: script` needs a `run:` command")
        if self.uses != "script" and self.run is not None:
            raise ValueError(f"`run:` is only for `uses: script`, not `uses: {self.uses}`")
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

    def runs_on(self, branch: str | None) -> bool:
        return self.enabled and (self.when is None or self.when.matches(branch))

    def skip_reason(self, branch: str | None) -> str:
        if not self.enabled:
            return "disabled in the pipeline (enabled: false)"
        return f"branch {branch!r} does not match when.branches"


class _PipelineSpec(_Spec):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    branches: list[str] | None = Field(default=None, min_length=1)
    steps: list[Step] = Field(min_length=1)
    finally_: list[Step] = Field(default_factory=list, alias="finally")
    fail_fast: bool = True


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
    graph: step_graph.Graph = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        final = set(self.finally_steps)
        graph = step_graph.build([s for s in self.steps if s.name not in final],
                                 [s for s in self.steps if s.name in final])
        object.__setattr__(self, "graph", graph)

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def is_finally(self, name: str) -> bool:
        return name in self.finally_steps

    def accepts_branch(self, branch: str) -> bool:
        return self.branches is None or any(fnmatch.fnmatchcase(branch, p) for p in self.branches)


def parse(text: str, source: str, known_handlers: Iterable[str]) -> Pipeline:
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
    known = frozenset(known_handlers)
    _check_steps(spec.steps, spec.finally_, source, known)
    try:
        return Pipeline(
            name=spec.name,
            steps=(*spec.steps, *spec.finally_),
            branches=tuple(spec.branches) if spec.branches else None,
            source=source,
            finally_steps=tuple(step.name for step in spec.finally_),
            fail_fast=spec.fail_fast,
        )
    except step_graph.GraphError as exc:
        raise PipelineError(f"{source}: {exc}") from None


def load_default(known_handlers: Iterable[str]) -> Pipeline:
    path = resources.files("cistate") / "pipelines" / f"{DEFAULT_PIPELINE}.yaml"
    return parse(path.read_text(encoding="utf-8"), f"<packaged {DEFAULT_PIPELINE}.yaml>",
                 known_handlers)


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
