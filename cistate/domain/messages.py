"""Bodies of the messages on the bus, validated with pydantic.

`schema/*.schema.json` are generated from these models (`cistate schema export`), and a test
keeps them in step, so producers in other languages validate against the same contract.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

ZERO_SHA = "0" * 40
MAX_OUTPUTS_BYTES = 64 * 1024  # a step's outputs, as JSON
MAX_LOG_CHARS = (1 << 20) + 4096  # the worker bounds a step's log to 1 MiB and a cut marker
MAX_TEXT_CHARS = 64 * 1024  # an error message, an output tail
MAX_ATTEMPT = 10_000
_INT_LIMIT = 2**63  # PostgreSQL's bigint and orjson both stop there
_MAX_DEPTH = 64

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

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        """Refuse, at the door, what PostgreSQL would refuse later (a NUL, a lone surrogate,
        an integer beyond 64 bits, anywhere in the body): a message is dead-lettered with
        this reason once, never redelivered against the database."""
        problem = storable_problem(data)
        if problem:
            raise ValueError(problem)
        return data


def storable_problem(data: Any, where: str = "", depth: int = 0) -> str | None:
    """Why `data` (a JSON value) cannot be stored as it is, naming where; None if it can."""
    if _fits(data, depth):
        return None  # the usual case, without building a path for every value
    return _problem(data, where, depth)


def _fits(data: Any, depth: int) -> bool:
    """Whether _problem would find nothing in `data`: the same rules, without the names.
    Every message passes here (each hop validates a few), so the plain values of a container
    are checked in its loop instead of by a call each."""
    if depth > _MAX_DEPTH:
        return False
    if isinstance(data, str):
        return _text_fits(data)
    if isinstance(data, dict):
        if data and depth >= _MAX_DEPTH:
            return False  # its values would be nested too deep
        for key, value in data.items():
            if isinstance(key, str) and not _text_fits(key):
                return False
            if not _value_fits(value, depth + 1):
                return False
        return True
    if isinstance(data, list | tuple):
        if data and depth >= _MAX_DEPTH:
            return False
        return all(_value_fits(value, depth + 1) for value in data)
    if isinstance(data, int) and not isinstance(data, bool):
        return -_INT_LIMIT <= data < _INT_LIMIT
    return True


def _value_fits(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind is str:
        return "\x00" not in value and (value.isascii() or _encodes(value))
    if kind is int:
        return bool(-_INT_LIMIT <= value < _INT_LIMIT)
    if kind in _PLAIN:
        return True
    return _fits(value, depth)


# values with nothing to check (a model's own fields, as the orchestrator builds commands)
_PLAIN = frozenset({float, bool, type(None), uuid.UUID, datetime})


def _text_fits(text: str) -> bool:
    return "\x00" not in text and (text.isascii() or _encodes(text))


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _problem(data: Any, where: str = "", depth: int = 0) -> str | None:
    """storable_problem's walk, naming where the first problem is."""
    if depth > _MAX_DEPTH:
        return f"{where or 'body'}: nested deeper than {_MAX_DEPTH} levels"
    if isinstance(data, str):
        return _text_problem(data, where or "body")
    if isinstance(data, bool) or data is None or isinstance(data, float):
        return None
    if isinstance(data, int):
        if not -_INT_LIMIT <= data < _INT_LIMIT:
            return f"{where or 'body'}: integer {data} is out of range (64-bit at most)"
        return None
    if isinstance(data, dict):
        for key, value in data.items():
            inner = f"{where}.{key}" if where else str(key)
            problem = (_text_problem(key, f"{inner} (the key)") if isinstance(key, str)
                       else None) or storable_problem(value, inner, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(data, list | tuple):
        for index, value in enumerate(data):
            problem = _problem(value, f"{where}[{index}]", depth + 1)
            if problem:
                return problem
    return None


def _text_problem(text: str, where: str) -> str | None:
    if "\x00" in text:
        return f"{where}: contains a NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{where}: contains a lone UTF-16 surrogate, which is not valid Unicode"
    return None


class PullRequest(_Message):
    """The pull (merge) request a run is for: its number (GitLab: iid), the branch it
    targets, the repository its head commit comes from, and who opened it."""

    number: int = Field(ge=1, le=2**31)
    base: Text = Field(description="the branch it would merge into")
    head_repo: Text = Field(description="clone URL of the repository the head commit is in")
    author: Annotated[str, StringConstraints(max_length=256)] | None = None
    fork: bool = Field(default=False, description="its head is in another repository")


class Push(_Message):
    """A push to a code repository, from the bus (routing key `push`) or a webhook."""

    repo: Text = Field(description="clone URL of the code repository")
    ref: Text = Field(description="full ref (refs/heads/main) or a branch name")
    commit: Sha = Field(description="the pushed commit; all zeros for a deleted branch")
    before: Sha | None = None
    pusher: Annotated[str, StringConstraints(max_length=256)] | None = None
    provider: Annotated[str, StringConstraints(max_length=64)] | None = None
    rerun_of: uuid.UUID | None = Field(default=None, description="the run this one reruns")
    pr: PullRequest | None = Field(default=None, description="a pull request's run: `ref` "
                                   "is refs/pull/<n>/head (GitLab refs/merge-requests/<iid>"
                                   "/head), `commit` its head")

    @property
    def target_branch(self) -> str | None:
        """The branch the pipeline's filters look at: a pull request's base, else the
        pushed branch."""
        return self.pr.base if self.pr is not None else self.branch

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
    message: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
    exit_code: int | None = Field(default=None, ge=-(2**31), lt=2**31)
    output_tail: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)] = ""
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
    attempt: int = Field(ge=1, le=MAX_ATTEMPT)
    uses: str
    settings: dict[str, Any] = Field(default_factory=dict, alias="with")
    script: str | None = Field(default=None, alias="run")
    timeout: float | None = None
    deadline: datetime | None = Field(
        default=None, description="when the attempt times out (`timeout` after it started): "
        "a worker does not start a command that reaches it later, since its attempt has "
        "ended and a lock it held may be another run's by then")
    repo: str
    ref: str
    commit: str
    inputs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="the outputs of the steps upstream, by step name")
    sources: dict[str, StepName] | None = Field(
        default=None, description="which step of `inputs` made what each handler the step's "
        "handler reads: producing handler -> step (the pipeline's resolved `inputs:`); "
        "absent in commands of runs pinned before, whose handlers read `inputs` by step name")
    token: Annotated[str, StringConstraints(max_length=64)] = Field(
        default="", description="the attempt's token; its result must bring it back")
    env: dict[EnvName, str] = Field(default_factory=dict, description="the step's `env:`")
    secrets: list[SecretRef] = Field(
        default_factory=list, description="the secrets the step declares (names only)")
    network: Network = "default"
    origin: Literal["deployment", "repo"] = Field(
        default="deployment", description="whose pipeline the step is of: the deployment's, "
        "or the pushed repository's own (which gets secrets only through their scopes)")
    untrusted: bool = Field(
        default=False, description="the run is of a pull request from a fork: the step reads "
        "the worker's caches but never writes them")


class StepResult(_Message):
    """A worker's answer to a StepCommand (routing key `step.<name>.result`)."""

    run_id: uuid.UUID
    step: StepName
    attempt: int = Field(ge=1, le=MAX_ATTEMPT)
    # skipped: the handler found nothing to do, rightly (`reason` says why)
    status: Literal["succeeded", "failed", "skipped"]
    outputs: dict[str, Any] = Field(
        default_factory=dict, description=f"at most {MAX_OUTPUTS_BYTES} bytes as JSON")
    error: StepError | None = None
    reason: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)] | None = Field(
        default=None, description="why a skipped step had nothing to do")
    log: Annotated[str, StringConstraints(max_length=MAX_LOG_CHARS)] | None = Field(
        default=None, description="the step's output (bounded)")
    worker: Annotated[str, StringConstraints(max_length=256)] | None = None
    token: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None, description="the token of the command this result answers")
    started_at: datetime | None = None
    finished_at: datetime | None = None


    @model_validator(mode="after")
    def _bounded_outputs(self) -> StepResult:
        size = outputs_size(self.outputs)
        if size > MAX_OUTPUTS_BYTES:
            raise ValueError(f"outputs are {size} bytes as JSON; at most {MAX_OUTPUTS_BYTES}")
        return self


def outputs_size(outputs: dict[str, Any]) -> int:
    if not outputs:
        return 2  # {}: what most steps give, on every result
    return len(json.dumps(outputs, separators=(",", ":"), default=str).encode())


ControlAction = Literal["retry", "cancel", "retry_due", "timeout", "approve", "reject",
                        "lock_timeout", "granted", "superseded", "ok_to_test"]
# what only cistate itself sends a run (timers, and a resource's answers to its claims)
INTERNAL_ACTIONS = frozenset({"retry_due", "timeout", "lock_timeout", "granted", "superseded"})
ResourceName = Annotated[str, StringConstraints(min_length=6, max_length=512,
                                                pattern=r"^(group|lock):")]


class Control(_Message):
    """Operator requests, timers and resource answers for one run (routing key `control`).

    `retry_due`, `timeout` and `lock_timeout` are timers cistate sends itself through the
    outbox with a due time; `granted` and `superseded` are a concurrency group's or a lock's
    answers to the run's claim on it (`resource`, `claim`); `retry`, `cancel`, `approve` and
    `reject` (of an approval step) come from operators. Who asked is the message's signed
    sender (cistate.adapters.rabbitmq.signing), never a field of the body.
    """

    run_id: uuid.UUID
    action: ControlAction
    step: StepName | None = None
    attempt: int | None = Field(default=None, ge=1, le=MAX_ATTEMPT)
    reason: Annotated[str, StringConstraints(max_length=2048)] | None = None
    resource: ResourceName | None = None
    claim: uuid.UUID | None = None


class ClaimRequest(_Message):
    """A run asks for a concurrency group or a lock, or hands it back (routing key `claim`,
    from cistate's own outbox). `claim` names this one request: a redelivery or a late
    release of an older claim never touches a newer one."""

    resource: ResourceName
    action: Literal["acquire", "release"]
    run_id: uuid.UUID
    claim: uuid.UUID
    step: StepName | None = None
    supersede: bool = Field(default=False, description="cancel_in_progress: the group's "
                            "older runs are cancelled (running) or superseded (waiting)")
    requested_at: datetime | None = Field(default=None, description="when the run's push "
                                          "was recorded: which run is newer")


LOG_CHUNK_CHARS = 32 * 1024  # of output in one live log message


class LogChunk(_Message):
    """A piece of a running step's output, as the worker has it (routing key
    `step.<name>.log`, signed by the worker), masked like the stored log. `execution` names
    one run of the attempt by a worker (a redelivered command runs it again: its output is
    its own); `seq` orders the pieces of one execution, and a redelivered piece is stored
    once. `final`: the execution's output has ended."""

    run_id: uuid.UUID
    step: StepName
    attempt: int = Field(ge=1, le=MAX_ATTEMPT)
    execution: uuid.UUID
    seq: int = Field(ge=1, le=2**31 - 1)
    text: Annotated[str, StringConstraints(max_length=LOG_CHUNK_CHARS)] = ""
    final: bool = False
    token: Annotated[str, StringConstraints(max_length=64)] = ""


NoticeKind = Literal["status", "run.ended", "approval.requested"]


class Notice(_Message):
    """What the outside is told about a run (routing key `notice`, from cistate's outbox):
    a commit status for the git host, or a notification for the webhook receivers.
    `order_at` (when the run's push was recorded) and `seq` (the run's version when it was
    decided) order the notices of one commit and context: a newer one is never overwritten
    by an older one (cistate.service.notifier)."""

    run_id: uuid.UUID
    kind: NoticeKind
    repo: Text
    commit: Sha
    provider: Annotated[str, StringConstraints(max_length=64)] | None = None
    pipeline: Annotated[str, StringConstraints(max_length=100)]
    order_at: datetime
    seq: int = Field(ge=1)
    context: Annotated[str, StringConstraints(max_length=255)] | None = None
    state: Literal["pending", "success", "failure", "error"] | None = None
    description: Annotated[str, StringConstraints(max_length=1024)] = ""
    step: StepName | None = None
    # for receivers: the run's state, and the approval's approvers
    run_state: str | None = None
    approvers: list[str] = Field(default_factory=list)


class NoticeResult(_Message):
    """What became of a notice (the notifier's report; it reaches the run in-process, never
    from the bus): delivered, failed (`retrying` when it is tried again), or superseded by a
    newer notice of its commit and context, never sent."""

    run_id: uuid.UUID
    notice: uuid.UUID  # the notice's message id
    kind: NoticeKind
    target: Annotated[str, StringConstraints(max_length=255)]
    outcome: Literal["delivered", "failed", "superseded"]
    retrying: bool = False
    attempt: int = Field(default=1, ge=1, le=1000)
    http_status: int | None = Field(default=None, ge=0, le=999)
    reason: Annotated[str, StringConstraints(max_length=2048)] | None = None
    context: Annotated[str, StringConstraints(max_length=255)] | None = None
    state: str | None = None


@dataclass(frozen=True)
class Outgoing:
    """A message to publish once the events that decided it are stored (an outbox row)."""

    routing_key: str
    body: BaseModel
    message_id: uuid.UUID
    not_before: datetime | None = None


class CancelStep(_Message):
    """Broadcast to every worker (routing key `cancel`): stop this attempt if you run it."""

    run_id: uuid.UUID
    step: StepName
    attempt: int = Field(ge=1, le=MAX_ATTEMPT)


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "push": Push,
    "step-command": StepCommand,
    "step-result": StepResult,
    "control": Control,
    "claim": ClaimRequest,
    "notice": Notice,
    "step-log": LogChunk,
    "cancel-step": CancelStep,
}
