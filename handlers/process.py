"""Start a child process for a step: argv only (never a shell with push data), output to the
step log, its own process group so that cancelling or timing out the step stops everything
it started.

Two doors, one spawner:
- `run_sandboxed` for anything that runs code or files of the pushed repository (scripts,
  npm, the repo's chart, image builds): through the step sandbox (`handlers.sandbox`), with
  an environment built from nothing;
- `run` for cistate's own tools working on cistate's own files with the worker's
  credentials (git fetch/push, helm push/pull): the worker's environment without
  cistate's CISTATE_* settings, which no tool needs.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import shlex
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cistate.domain.messages import MAX_TEXT_CHARS
from handlers.base import StepFailed, StepLog
from handlers.sandbox import Command, Profile, Sandbox

KILL_GRACE_SECONDS = 5.0
TAIL_LINES = 50
READ_SIZE = 1 << 16


@dataclass(frozen=True)
class Completed:
    exit_code: int
    tail: str


def tool_env() -> dict[str, str]:
    """The environment of cistate's own tools (git, cp, buildah, helm): the worker's, without
    its CISTATE_* settings (database and broker URLs, the bus key, secrets)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CISTATE_")}


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
    """Run one of cistate's own tools in cwd, streaming stdout+stderr into log.

    With check=True a non-zero exit raises StepFailed naming `what` (default: the program).
    Pass secrets through env or files, never argv (argv is visible to every user of the
    machine). Never use this for the repo's code: that is `run_sandboxed`.
    """
    command = Command(list(argv), {**tool_env(), **(env or {})}, cwd)
    try:
        return await _spawn(command, shown=argv, log=log, what=what, check=check,
                            retryable=retryable)
    except FileNotFoundError:
        raise StepFailed(
            f"{argv[0]} is not installed on this worker (needed for "
            f"{what or Path(argv[0]).name})", retryable=False) from None


async def run_sandboxed(
    argv: Sequence[str],
    *,
    sandbox: Sandbox,
    cwd: Path,
    log: StepLog,
    env: Mapping[str, str] | None = None,
    profile: Profile = Profile.STEP,
    network: bool | None = None,
    what: str | None = None,
    check: bool = True,
    retryable: bool = False,
    shared: Sequence[Path] = (),
    with_work: bool = True,
) -> Completed:
    """Run argv inside the attempt's sandbox (see `handlers.sandbox`); `env` adds to the
    environment the sandbox builds from nothing; `shared` are cache folders bound writable;
    a BUILDER process `with_work=False` does not see the checkout."""
    status_read, status_write = os.pipe() if sandbox.settings.enabled else (-1, -1)
    try:
        command = sandbox.command(argv, cwd=cwd, profile=profile, env=env, network=network,
                                  status_fd=status_write if status_write >= 0 else None,
                                  shared=shared, with_work=with_work)
        extra = (status_write,) if status_write >= 0 else ()
        try:
            done = await _spawn(command, shown=argv, log=log, what=what, check=False,
                                retryable=retryable, pass_fds=extra)
        except FileNotFoundError:
            raise StepFailed(
                f"the step sandbox could not start {what or Path(argv[0]).name}: "
                f"{command.argv[0]} is not installed (scripts/sandbox.sh installs bubblewrap); "
                "nothing of the step ran unsandboxed", retryable=False) from None
        if command.sandboxed and not _started(status_read):
            raise StepFailed(
                f"the step sandbox could not start {what or Path(argv[0]).name}: "
                f"{_last_line(done.tail)}; nothing of the step ran unsandboxed (check that "
                "bubblewrap is installed and the worker runs as root, or set "
                "CISTATE_SANDBOX=none on a trusted single-user worker)",
                exit_code=done.exit_code, output_tail=done.tail, retryable=False)
    finally:
        for fd in (status_read, status_write):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
    if check and done.exit_code != 0:
        raise _failed(argv, done, what, retryable)
    return done


async def _spawn(
    command: Command,
    *,
    shown: Sequence[str],
    log: StepLog,
    what: str | None,
    check: bool,
    retryable: bool,
    pass_fds: Sequence[int] = (),
) -> Completed:
    log.line(f"$ {shlex.join(shown)}")
    proc = await asyncio.create_subprocess_exec(
        *command.argv,
        cwd=command.cwd,
        env=command.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    tail = ""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        assert proc.stdout is not None
        # Whatever has arrived, not whole lines: output shows as it comes, a line longer
        # than the reader's buffer is no error, and a secret printed in two pieces reaches
        # the log's masking as two pieces (which it is built for).
        while chunk := await proc.stdout.read(READ_SIZE):
            text = decoder.decode(chunk)
            log.write(text)
            # bounded: a long line without a newline would otherwise be kept whole and
            # copied again with every read (16 MB of one line: 2.8 s of CPU; 256 MB: minutes)
            tail = _last_lines(tail + text)[-MAX_TEXT_CHARS:]
        log.write(decoder.decode(b"", final=True))
        exit_code = await proc.wait()
    except BaseException:
        # Cancelled (step cancelled or timed out) or the worker is going down: stop the
        # whole process group, politely first.
        await _stop_group(proc)
        raise
    done = Completed(exit_code, "\n".join(tail.rstrip("\n").split("\n")[-TAIL_LINES:]))
    if check and exit_code != 0:
        raise _failed(shown, done, what, retryable)
    return done


def _failed(argv: Sequence[str], done: Completed, what: str | None,
            retryable: bool) -> StepFailed:
    name = what or Path(argv[0]).name
    return StepFailed(
        f"{name} exited with code {done.exit_code}",
        exit_code=done.exit_code,
        output_tail=done.tail,
        retryable=retryable,
    )


def _last_lines(text: str) -> str:
    if text.count("\n") <= 2 * TAIL_LINES:
        return text
    return "\n".join(text.split("\n")[-(TAIL_LINES + 1):])


def _started(status_fd: int) -> bool:
    """Whether bwrap reported that the command inside it started."""
    os.set_blocking(status_fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(status_fd, 65536):
            chunks.append(chunk)
    return b'"child-pid"' in b"".join(chunks)


def _last_line(tail: str) -> str:
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


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
