"""Run a child process for a step: argv only (never a shell with push data), output to the
step log, its own process group so that cancelling or timing out the step stops everything
it started."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from handlers.base import StepFailed, StepLog

KILL_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Completed:
    exit_code: int
    tail: str


async def run(
    argv: Sequence[str],
    *,
    cwd: Path,
    log: StepLog,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
    check: bool = True,
    retryable: bool = False,
) -> Completed:
    """Run argv in cwd, streaming stdout+stderr into log.

    With check=True a non-zero exit raises StepFailed naming `what` (default: the program).
    The child gets the worker's environment plus `env`; pass secrets through env or files,
    never argv (argv is visible to every user of the machine).
    """
    full_env = {**os.environ, **(env or {})}
    log.line(f"$ {' '.join(argv)}")
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=full_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            text = raw.decode("utf-8", errors="replace")
            log.write(text)
            lines.append(text.rstrip("\n"))
            del lines[:-50]
        exit_code = await proc.wait()
    except BaseException:
        # Cancelled (step cancelled or timed out) or the worker is going down: stop the
        # whole process group, politely first.
        await _stop_group(proc)
        raise
    tail = "\n".join(lines)
    if check and exit_code != 0:
        name = what or Path(argv[0]).name
        raise StepFailed(
            f"{name} exited with code {exit_code}",
            exit_code=exit_code,
            output_tail=tail,
            retryable=retryable,
        )
    return Completed(exit_code, tail)


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE_SECONDS)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
