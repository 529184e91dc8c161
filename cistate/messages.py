"""Bodies of the messages on the bus, validated with pydantic.

`schema/*.schema.json` are generated from these models (`cistate schema export`), and a test
keeps them in step, so producers in other languages validate against the same contract.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ZERO_SHA = "0" * 40

Sha = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{7,64}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
StepName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
# A secret's name is also the environment variable the step sees it as.
SecretName = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


def message_uuid(raw: str) -> uuid.UUID:
    """A message id as a UUID: producers and git hosts may use ids of their own, which map
    onto UUIDs stably, so the same delivery id always names the same message."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"cistate:message:{raw}")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Push(_Message):
    """A push to a code repository, from the bus (routing key `push`) or a webhook."""

    repo: Text = Field(description="clone URL of the code repository")
    ref: Text = Field(description="full ref (refs/heads/main) or a branch name")
    commit: Sha = Field(description="the pushed commit; all zeros for a deleted branch")
    before: Sha | None = None
    pusher: Annotated[str, StringConstraints(max_length=256)] | None = None
    provider: Annotated[str, StringConstraints(max_length=64)] | None = None
    rerun_of: uuid.UUID | None = Field(default=None, description="the run this one reruns")

    @property
    def branch(self) -> str | None:
        """The branch name, or None for a tag or another kind of ref."""
        if self.ref.startswith("refs/heads/"):
            return self.ref.removeprefix("refs/heads/")
        if self.ref.startswith("refs/"):
            return None
        return self.ref

    @property
    def is_deletion(self) -> bool:
        return set(self.commit) == {"0"}


class StepError(_Message):
    message: str
    exit_code: int | None = None
    output_tail: str = ""
    retryable: bool = True
    kind: Literal["error", "timeout", "cancelled"] = "error"


class SecretRef(_Message):
    """A secret a step declares: `NAME` (an environment variable) or `{name: NAME, as: file}`
    (a file whose path is in `$NAME_FILE`). Only its name travels; the value stays on the
    worker."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: SecretName
    as_: Literal["env", "file"] = Field(default="env", alias="as")


Network = Literal["default", "none"]


class StepCommand(_Message):
    """Tells a worker to run one attempt of one step (routing key `step.<name>.run`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    run_id: uuid.UUID
    step: StepName
    attempt: int = Field(ge=1)
    uses: str
    settings: dict[str, Any] = Field(default_factory=dict, alias="with")
    script: str | None = Field(default=None, alias="run")
    timeout: float | None = None
    repo: str
    ref: str
    commit: str
    inputs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    env: dict[EnvName, str] = Field(default_factory=dict, description="the step's `env:`")
    secrets: list[SecretRef] = Field(
        default_factory=list, description="the secrets the step declares (names only)")
    network: Network = "default"


class StepResult(_Message):
    """A worker's answer to a StepCommand (routing key `step.<name>.result`)."""

    run_id: uuid.UUID
    step: StepName
    attempt: int = Field(ge=1)
    status: Literal["succeeded", "failed"]
    outputs: dict[str, Any] = Field(default_factory=dict)
    error: StepError | None = None
    log: str | None = Field(default=None, description="the step's output (bounded)")
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


ControlAction = Literal["retry", "cancel", "retry_due", "timeout"]


class Control(_Message):
    """Operator requests and timers for one run (routing key `control`).

    `retry_due` and `timeout` are timers cistate sends itself through the outbox with a due
    time; `retry` and `cancel` come from operators.
    """

    run_id: uuid.UUID
    action: ControlAction
    step: StepName | None = None
    attempt: int | None = Field(default=None, ge=1)
    actor: Annotated[str, StringConstraints(max_length=256)] = "system"
    reason: Annotated[str, StringConstraints(max_length=2048)] | None = None


class CancelStep(_Message):
    """Broadcast to every worker (routing key `cancel`): stop this attempt if you run it."""

    run_id: uuid.UUID
    step: StepName
    attempt: int


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "push": Push,
    "step-command": StepCommand,
    "step-result": StepResult,
    "control": Control,
    "cancel-step": CancelStep,
}
