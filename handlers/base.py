"""The contract between the worker and a handler.

A handler receives a `StepRequest` (everything the step needs, including the outputs of the
steps before it) and returns its outputs as a JSON-able dict, or raises `StepFailed`.
Handlers never touch the event store or the bus: the worker turns what they return into a
result message. They must be idempotent: the same request may run more than once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

TAIL_LINES = 50


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

    def output_of(self, step: str, key: str) -> Any:
        """An earlier step's output, or a StepFailed that says which one is missing."""
        try:
            return self.inputs[step][key]
        except KeyError:
            raise StepFailed(
                f"step {self.step!r} needs output {key!r} of step {step!r}, which the run "
                "does not have (did that step run before this one?)",
                retryable=False,
            ) from None

    def env(self) -> dict[str, str]:
        """The run's identity as environment variables, the only way push data reaches a shell."""
        return {
            "CISTATE_RUN_ID": self.run_id,
            "CISTATE_REPO": self.repo,
            "CISTATE_REF": self.ref,
            "CISTATE_COMMIT": self.commit,
            "CISTATE_STEP": self.step,
            "CISTATE_ATTEMPT": str(self.attempt),
        }


class StepLog:
    """Collects a step's output: the whole of it in a file, the last lines in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", encoding="utf-8", errors="replace")
        self._tail: list[str] = []

    def write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        for line in text.splitlines():
            self._tail.append(line)
        del self._tail[:-TAIL_LINES]

    def line(self, text: str) -> None:
        self.write(text.rstrip("\n") + "\n")

    def tail(self) -> str:
        return "\n".join(self._tail)

    def close(self) -> None:
        self._file.close()


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


Handler = Callable[[StepRequest], Awaitable[dict[str, Any]]]
