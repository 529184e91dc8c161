"""The contract between the worker and a handler.

A handler receives a `StepRequest` (everything the step needs, including the outputs of the
steps before it) and returns its outputs as a JSON-able dict, or raises `StepFailed`. It reads
earlier outputs by the handler that made them (`output_of("setup", "app_name")`), as it
declares in handlers.REGISTRY; which step that was, the pipeline says (`sources`).
Handlers never touch the event store or the bus: the worker turns what they return into a
result message. They must be idempotent: the same request may run more than once.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from handlers.masking import Masker

if TYPE_CHECKING:
    from handlers.sandbox import Sandbox

TAIL_LINES = 50
LOG_LIMIT = 1 << 20  # characters of a step's output kept with its result


@dataclass(frozen=True)
class StepRequest:
    run_id: str
    repo: str
    ref: str
    commit: str
    step: str
    attempt: int
    settings: Mapping[str, Any]  # the step's `with:` from the pipeline
    script: str | None  # the step's `run:` (only for `uses: script`)
    inputs: Mapping[str, Mapping[str, Any]]  # outputs of earlier steps, by step name
    workdir: Path  # an empty directory that belongs to this attempt alone
    log: StepLog = field(repr=False)
    # where the repo's code runs (handlers.process.run_sandboxed); its workdir is `workdir`
    sandbox: Sandbox = field(repr=False, kw_only=True)
    # which step of `inputs` each handler this one reads made (the pipeline resolved it:
    # StepCommand.sources); None, in commands of runs pinned before: read by step name
    sources: Mapping[str, str] | None = field(default=None, kw_only=True)
    # the worker's folder of repo mirrors that checkouts borrow from (handlers.mirror); None:
    # each checkout fetches the commit from the repo itself
    mirrors: Path | None = field(default=None, kw_only=True)
    # the worker's cache folder (handlers.cache); None: this step caches nothing
    cache_root: Path | None = field(default=None, kw_only=True)
    # a fork's pull request: reads the caches, never writes them (StepCommand.untrusted)
    untrusted: bool = field(default=False, kw_only=True)
    # what the attempt holds until its workspace is removed, which the worker then closes: the
    # repo mirror its checkout borrows objects from (handlers.mirror.borrowed)
    holds: contextlib.ExitStack[bool | None] = field(
        default_factory=contextlib.ExitStack, kw_only=True, repr=False, compare=False)

    def outputs_from(self, producer: str) -> Mapping[str, Any]:
        """The outputs of the earlier step that used handler `producer` (`setup`), whatever
        the pipeline named it; empty when there is none (a handler's optional input)."""
        name = producer if self.sources is None else self.sources.get(producer)
        return self.inputs.get(name, {}) if name is not None else {}

    def output_of(self, producer: str, key: str) -> Any:
        """An output of the earlier step that used handler `producer`, or a StepFailed that
        says which one is missing."""
        outputs = self.outputs_from(producer)
        if key in outputs:
            return outputs[key]
        name = producer if self.sources is None else self.sources.get(producer)
        if name is None:
            raise StepFailed(
                f"step {self.step!r} needs output {key!r} of a step that uses {producer}, and "
                f"none runs before it: add one to its needs (directly or through another step)",
                retryable=False,
            )
        which = f"step {name!r}" + (f" (uses: {producer})" if name != producer else "")
        raise StepFailed(
            f"step {self.step!r} needs output {key!r} of {which}, which the run does not have "
            "(did that step run before this one?)",
            retryable=False,
        )

    def env(self) -> dict[str, str]:
        """The run's identity as environment variables, the only way push data reaches a shell."""
        return identity_env(self.run_id, self.repo, self.ref, self.commit, self.step,
                            self.attempt)


def identity_env(run_id: str, repo: str, ref: str, commit: str, step: str,
                 attempt: int) -> dict[str, str]:
    return {
        "CISTATE_RUN_ID": run_id,
        "CISTATE_REPO": repo,
        "CISTATE_REF": ref,
        "CISTATE_COMMIT": commit,
        "CISTATE_STEP": step,
        "CISTATE_ATTEMPT": str(attempt),
    }


class StepLog:
    """Collects a step's output in memory: all of it up to `limit` characters, else its head
    and its tail with a marker saying how much was cut between them. With a `path`, the
    whole output also goes to that file (tests and debugging). Secret values are masked
    before anything is kept, also when one arrives split across two writes."""

    def __init__(self, path: Path | None = None, limit: int = LOG_LIMIT,
                 masker: Masker | None = None,
                 sink: Callable[[str], None] | None = None) -> None:
        self.path = path
        # gets every piece of output as it is kept, masked (the worker's live log)
        self.sink = sink
        self.masker = masker or Masker(())
        self._stream = self.masker.stream()
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8", errors="replace")
        self._half = limit // 2
        self._head: list[str] = []
        self._head_size = 0
        self._rest: deque[str] = deque()
        self._rest_size = 0
        self._cut = 0
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)

    def write(self, text: str) -> None:
        self._keep(self._stream.feed(text))

    def _keep(self, text: str) -> None:
        if not text:
            return
        if self.sink is not None:
            self.sink(text)
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
        self._lines.extend(text.splitlines())
        if self._head_size < self._half:
            room = self._half - self._head_size
            self._head.append(text[:room])
            self._head_size += min(room, len(text))
            text = text[room:]
        if text:
            self._rest.append(text)
            self._rest_size += len(text)
            while self._rest_size > self._half:
                excess = self._rest_size - self._half
                oldest = self._rest[0]
                if len(oldest) <= excess:
                    self._rest.popleft()
                else:
                    self._rest[0] = oldest[excess:]
                dropped = min(len(oldest), excess)
                self._rest_size -= dropped
                self._cut += dropped

    def line(self, text: str) -> None:
        self.write(text.rstrip("\n") + "\n")

    def flush(self) -> None:
        """Keep what was held back in case it began a secret (the output has ended)."""
        self._keep(self._stream.flush())

    def tail(self) -> str:
        """The last TAIL_LINES lines."""
        self.flush()
        return "\n".join(self._lines)

    def text(self) -> str:
        """The output, bounded to about `limit` characters."""
        self.flush()
        cut = f"\n... [{self._cut} characters cut] ...\n" if self._cut else ""
        return "".join(self._head) + cut + "".join(self._rest)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()


class StepSkipped(Exception):
    """The step has nothing to do, and doing nothing is right (a GitOps folder that already
    holds a newer version): it ends `skipped` with the reason, and the run goes on."""

    def __init__(self, reason: str, outputs: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outputs = outputs or {}


class StepFailed(Exception):
    """A step failed in a way a person can act on.

    `retryable=False` marks failures that another attempt cannot fix (a failing test, a
    missing Dockerfile); the orchestrator then fails the step without using its retries.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        output_tail: str = "",
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.output_tail = output_tail
        self.retryable = retryable

    def reworded(self, message: str, *, retryable: bool = False) -> StepFailed:
        """The same failure (exit code, output tail) told in the step's own terms: a tool's
        failure becomes "the tests of commit X failed"."""
        return StepFailed(message, exit_code=self.exit_code, output_tail=self.output_tail,
                          retryable=retryable)


Handler = Callable[[StepRequest], Awaitable[dict[str, Any]]]
