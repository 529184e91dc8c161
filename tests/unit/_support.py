"""Shared helpers for the unit tier: the default pipeline, message builders, and a harness
that applies decisions to a run's state the way the orchestrator does."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import yaml

import handlers
from cistate.bootstrap import load_default
from cistate.domain import run as r
from cistate.domain.messages import Control, Push, StepError, StepResult
from cistate.domain.pipeline import Pipeline

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "https://git.example.com/acme/shop.git"


def default_handler_names() -> set[str]:
    """The `uses:` names of the packaged nodejs pipeline, plus script and noop."""
    text = (resources.files("cistate") / "pipelines" / "nodejs.yaml").read_text("utf-8")
    raw = yaml.safe_load(text)
    return {step["uses"] for step in raw["steps"]} | {"script", "noop"}


def default_pipeline() -> Pipeline:
    """The packaged pipeline with its disabled steps (qa-sync) left out: the steps every run
    of it goes through. test_disabled_step_is_skipped_by_every_run covers the disabled one."""
    packaged = load_default(handlers.inputs())
    return dataclasses.replace(packaged, steps=tuple(s for s in packaged.steps if s.enabled))


def push(branch: str = "main", *, ref: str | None = None, commit: str = SHA,
         **extra: Any) -> Push:
    return Push(repo=REPO, ref=ref or f"refs/heads/{branch}", commit=commit, **extra)


@dataclass
class Harness:
    """One run, driven message by message: decide, then apply the events (orchestrator-style).

    `log` keeps the stored (type, data, recorded_at) triples so the run can be re-folded.
    """

    decider: r.Decider
    delivery: uuid.UUID = field(default_factory=uuid.uuid4)
    now: datetime = NOW
    state: r.RunState = field(init=False)
    log: list[tuple[str, dict[str, Any], datetime]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = r.RunState(id=r.run_id_for(self.delivery))

    @property
    def run_id(self) -> uuid.UUID:
        return self.state.id

    def tick(self, seconds: float = 1.0) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def decide(self, message: Push | StepResult | Control, message_id: uuid.UUID | None = None,
               actor: str = "system") -> r.Decision:
        """Decide without applying (raises Rejected like the real decider)."""
        return self.decider.decide(self.state, message, message_id or uuid.uuid4(), self.now,
                                   actor)

    def send(self, message: Push | StepResult | Control, message_id: uuid.UUID | None = None,
             actor: str = "system") -> r.Decision:
        """Decide and apply; a push uses the harness's delivery id by default."""
        if message_id is None and isinstance(message, Push):
            message_id = self.delivery
        decision = self.decide(message, message_id, actor)
        self.commit(decision)
        return decision

    def commit(self, decision: r.Decision) -> None:
        for event in decision.events:
            r.apply(self.state, event.type, event.data, self.now)
            self.log.append((str(event.type), event.data, self.now))
        if decision.pinned is not None:  # as the orchestrator: the run's pipeline from now on
            self.decider = decision.pinned

    def reject(self, message: StepResult | Control, message_id: uuid.UUID | None = None,
               actor: str = "system") -> r.Decision:
        """Send a message the run must refuse; record the rejection as the orchestrator does."""
        message_id = message_id or uuid.uuid4()
        try:
            self.decide(message, message_id, actor)
        except r.Rejected as exc:
            kind = "step-result" if isinstance(message, StepResult) else "control"
            decision = self.decider.rejection(self.state, message_id, kind,
                                              message.model_dump(mode="json"), exc.reason, actor)
            self.commit(decision)
            return decision
        raise AssertionError(f"{message!r} was not rejected")

    # -- message builders for this run

    def attempt_of(self, step: str) -> int:
        return self.state.steps[step].attempts

    def ok(self, step: str, outputs: dict[str, Any] | None = None,
           attempt: int | None = None) -> StepResult:
        return StepResult(run_id=self.run_id, step=step,
                          attempt=attempt or self.attempt_of(step), status="succeeded",
                          outputs=outputs or {})

    def fail(self, step: str, message: str = "boom", *, retryable: bool = True,
             attempt: int | None = None, exit_code: int | None = 1) -> StepResult:
        return StepResult(
            run_id=self.run_id, step=step, attempt=attempt or self.attempt_of(step),
            status="failed",
            error=StepError(message=message, exit_code=exit_code, output_tail="npm ERR!",
                            retryable=retryable),
        )

    def control(self, action: str, step: str | None = None, attempt: int | None = None,
                **kw: Any) -> Control:
        return Control(run_id=self.run_id, action=action, step=step, attempt=attempt,  # type: ignore[arg-type]
                       **kw)

    def advance_to(self, target: str, branch: str = "main") -> dict[str, dict[str, Any]]:
        """Open a run and let steps succeed, the first running one in file order each time,
        until `target` runs; returns the outputs of the steps that succeeded."""
        if not self.state.exists:
            self.send(push(branch))
        outputs: dict[str, dict[str, Any]] = {}
        while True:
            running = self.running()
            if target in running:
                return outputs
            assert running and self.state.status == "running", self.state.to_json()
            step = running[0]
            outputs[step] = {"from": step, "n": len(outputs)}
            self.send(self.ok(step, outputs[step]))

    def running(self) -> list[str]:
        return [name for name, step in self.state.steps.items() if step.state == r.RUNNING]


def types(decision: r.Decision) -> list[str]:
    return [str(e.type) for e in decision.events]
