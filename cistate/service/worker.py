"""The worker: runs handlers for step commands and publishes their results.

A command is acked only after its result is confirmed by the broker; a worker killed mid-step
leaves the command unacked, the broker redelivers it, and the handler (idempotent) runs again.
The result's message_id derives from the command's, so a second run of the same command
publishes a result the orchestrator recognises as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from cistate.adapters.rabbitmq.bus import Bus
from cistate.adapters.rabbitmq.signing import BadSignature
from cistate.domain.events import derived_id, loads
from cistate.domain.messages import (
    MAX_LOG_CHARS,
    MAX_OUTPUTS_BYTES,
    MAX_TEXT_CHARS,
    CancelStep,
    StepCommand,
    StepError,
    StepResult,
    outputs_size,
    storable_problem,
)
from cistate.service.livelog import LiveLog
from handlers import NO_WORKSPACE, WarmUp, mirror
from handlers.base import (
    Handler,
    StepFailed,
    StepLog,
    StepRequest,
    StepSkipped,
    identity_env,
)
from handlers.masking import Masker
from handlers.sandbox import Sandbox, SandboxSettings
from handlers.secrets import Secret, SecretSource, load_scopes, worker_credentials

log = structlog.get_logger("cistate.worker")

HandlerLoader = Callable[[str], Handler]


class Worker:
    def __init__(self, bus: Bus, workdir: Path, load_handler: HandlerLoader,
                 concurrency: int = 4, sandbox: SandboxSettings | None = None,
                 live_logs: bool = True) -> None:
        self.bus = bus
        # running steps' output sent as it comes (cistate.service.livelog); off without a bus
        self.live_logs = live_logs and bus is not None
        self.workdir = workdir
        # a bare mirror per repo that checkouts borrow from (handlers.mirror); hidden from the
        # steps with the rest of the workdir, but for the objects of a step's own repo
        self.mirrors = workdir / mirror.MIRRORS_DIR
        self.load_handler = load_handler
        self.concurrency = concurrency
        self.sandbox = sandbox or SandboxSettings()
        self.secrets = SecretSource(
            self.sandbox.secrets_dir, os.environ,
            load_scopes(self.sandbox.secret_scopes, self.sandbox.secret_scopes_file))
        # the worker's own credentials, masked in every result should a tool print one
        self.own_credentials = worker_credentials(os.environ)
        self._own_masker = Masker(self.own_credentials)  # a step without secrets gets it
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._running: dict[tuple[str, str, int],
                            asyncio.Task[tuple[StepResult, _Workspace | None]]] = {}
        self._cancelled: set[tuple[str, str, int]] = set()
        self.attempts: Counter[tuple[str, str]] = Counter()  # (step, status) (metrics)

    def preload(self, uses: Iterable[str]) -> None:
        """Import these handlers now, before any step waits for it (kubernetes_asyncio alone
        is ~0.2 s). One that does not load is left to fail its steps with the reason."""
        for name in uses:
            try:
                self.load_handler(name)
            except Exception as exc:  # reported again, as a step error, on use
                log.warning("could not load a handler", uses=name, reason=str(exc))

    async def warm_up(self, warm_ups: Iterable[WarmUp]) -> None:
        """Run the served handlers' warm-ups (handlers.warm_up_of), one after another, in
        the background of a worker that takes work already; one that fails is logged and
        its step does that work itself."""
        for warm_up in warm_ups:
            try:
                await warm_up(self.workdir, self.sandbox)
            except Exception as exc:  # the step does it again, and says what fails
                log.warning("a handler's warm-up failed", warm_up=warm_up.__module__,
                            reason=str(exc))

    async def start(self, steps: Iterable[str]) -> None:
        if not self.sandbox.enabled:
            log.warning("CISTATE_SANDBOX=none: steps run unsandboxed, as this worker's user; "
                        "the pushed code can read everything this user can")
        channel = await self.bus.consumer_channel(prefetch=self.concurrency)
        for step in steps:
            queue = await self.bus.declare_step(step, channel=channel)
            await queue.consume(self.on_command, no_ack=False)
        # Cancels (no ack) on a channel of their own: the step channel's delivery tags then
        # run without gaps, which lets one ack frame settle many commands.
        cancel_channel = await self.bus.consumer_channel(prefetch=0)
        cancel_queue = await self.bus.declare_cancel_queue(cancel_channel, self.worker_id)
        await cancel_queue.consume(self.on_cancel, no_ack=True)

    async def on_cancel(self, message: AbstractIncomingMessage) -> None:
        try:
            self._from_orchestrator(message)
            cancel = CancelStep.model_validate_json(message.body)
        except (BadSignature, ValidationError) as exc:
            log.warning("ignored a cancel that is not cistate's", reason=str(exc))
            return
        key = (str(cancel.run_id), cancel.step, cancel.attempt)
        task = self._running.get(key)
        if task is not None:
            log.info("cancelling step", run_id=key[0], step=key[1], attempt=key[2])
            self._cancelled.add(key)
            task.cancel()

    def _from_orchestrator(self, message: AbstractIncomingMessage) -> None:
        """A command or cancel runs only as the orchestrator decided it: signed by `system`.
        The handler, `run:` and `with:` of a step are those of the pipeline, not whatever a
        message that anyone could publish says."""
        sender = self.bus.verified(message)
        if sender != "system":
            raise BadSignature(f"{message.routing_key} messages come from the orchestrator "
                               f"(sender system), not {sender!r}")

    async def on_command(self, message: AbstractIncomingMessage) -> None:
        try:
            self._from_orchestrator(message)
        except BadSignature as exc:
            log.warning("refused a step command", reason=str(exc),
                        routing_key=message.routing_key, message_id=message.message_id)
            await self.bus.dead_letter(message, f"{exc}; nothing was run")
            self.bus.acker.ack(message)
            return
        try:
            command = StepCommand.model_validate(loads(message.body))
        except (ValueError, ValidationError) as exc:
            await self.bus.dead_letter(message, f"step command does not match its schema: {exc}")
            self.bus.acker.ack(message)
            return
        if command.deadline is not None and datetime.now(UTC) > command.deadline:
            # redelivered after its attempt timed out (its worker was killed): the run has
            # moved on, and a lock the attempt held may be another run's; running it now
            # would run two of them at once
            log.warning("did not run a step command that came after its attempt's deadline",
                        run_id=str(command.run_id), step=command.step,
                        attempt=command.attempt, deadline=command.deadline.isoformat())
            self.bus.acker.ack(message)
            self.attempts[(command.step, "expired")] += 1
            return
        command_id = message.message_id or str(uuid.uuid4())
        key = (str(command.run_id), command.step, command.attempt)
        task = asyncio.create_task(self._attempt(command))
        self._running[key] = task
        workspace: _Workspace | None = None
        try:
            result, workspace = await task
        except asyncio.CancelledError:
            if key not in self._cancelled:
                raise  # the worker itself is stopping: leave the message unacked
            # a cancelled attempt removed its workspace itself
            result = _result(command, "failed", error=StepError(
                message=f"step {command.step!r} was cancelled", kind="cancelled",
                retryable=False))
        finally:
            self._running.pop(key, None)
            self._cancelled.discard(key)
        result = result.model_copy(update={"worker": self.worker_id, "token": command.token})
        try:
            await self.bus.publish(
                f"step.{command.step}.result",
                result.model_dump_json().encode(),
                derived_id(command_id, "result"),
                sender=f"handler:{self.worker_id}",
            )
        except Exception as exc:
            # The broker is away: leave the command to be redelivered; the step runs again
            # and its result (same message id) is recognised if the first one got through.
            log.warning("could not publish result; the command will be redelivered",
                        run_id=key[0], step=key[1], error=f"{type(exc).__name__}: {exc}")
            self.bus.acker.nack(message, requeue=True)
            return
        finally:
            # After the result is out, not before: the run's next step need not wait for a
            # tree of thousands of files (node_modules) to be deleted.
            if workspace is not None:
                await workspace.remove()
        self.bus.acker.ack(message)  # after the result is confirmed
        self.attempts[(command.step, result.status)] += 1

    async def execute(self, command: StepCommand) -> StepResult:
        """Run the handler for one attempt; every outcome becomes a result. The attempt's
        workspace is gone when it returns."""
        result, workspace = await self._attempt(command)
        if workspace is not None:
            await workspace.remove()
        return result

    async def _attempt(self, command: StepCommand) -> tuple[StepResult, _Workspace | None]:
        """One attempt and the workspace it leaves for the caller to remove; a cancelled
        attempt removes its own before the cancellation goes on."""
        started = datetime.now(UTC)
        run_dir = self.workdir / "runs" / str(command.run_id)
        attempt_dir = run_dir / f"{command.step}-{command.attempt}-{uuid.uuid4().hex[:8]}"
        # what the attempt holds until its tree is deleted (the repo mirror it borrows from)
        holds = contextlib.ExitStack()
        workspace = (_Workspace(attempt_dir, run_dir, holds)
                     if command.uses not in NO_WORKSPACE else None)
        secrets: list[Secret] = []
        failure: StepFailed | None = None
        try:
            secrets = self.secrets.resolve(command.secrets, step=command.step,
                                           repo=command.repo,
                                           repo_pipeline=command.origin == "repo")
        except StepFailed as exc:
            failure = exc  # before anything runs
        masker = (Masker([*(secret.value for secret in secrets), *self.own_credentials])
                  if secrets else self._own_masker)
        # in memory: the result carries it to the store; live, to those who follow it
        live = LiveLog(self.bus, command, self.worker_id) if self.live_logs else None
        step_log = StepLog(masker=masker, sink=live.write if live else None)
        sandbox = Sandbox(
            settings=self.sandbox, attempt=attempt_dir,
            identity=identity_env(str(command.run_id), command.repo, command.ref,
                                  command.commit, command.step, command.attempt),
            step_env=command.env, secrets=secrets, network=command.network != "none",
            hidden=(self.workdir,),
            read_only_binds=(mirror.objects_of(mirror.path_for(self.mirrors, command.repo)),))
        request = StepRequest(
            run_id=str(command.run_id), repo=command.repo, ref=command.ref,
            commit=command.commit, step=command.step, attempt=command.attempt,
            settings=command.settings, script=command.script, inputs=command.inputs,
            workdir=sandbox.work, log=step_log, sandbox=sandbox, sources=command.sources,
            mirrors=self.mirrors,
            cache_root=self.workdir / "cache", untrusted=command.untrusted, holds=holds,
        )
        try:
            try:
                if failure is not None:
                    raise failure
                if workspace is not None:
                    sandbox.prepare()
                handler = self.load_handler(command.uses)
                if command.timeout:
                    # The orchestrator times the step out too; this stops the process here.
                    outputs = await asyncio.wait_for(handler(request), command.timeout)
                else:
                    outputs = await handler(request)
                result = _result(command, "succeeded", outputs=_checked_outputs(
                    command.step, masker.mask_data(outputs)))
            except StepSkipped as skipped:
                step_log.line(f"cistate: skipped: {skipped.reason}")
                result = _result(command, "skipped", reason=masker.mask(skipped.reason)[
                    :MAX_TEXT_CHARS], outputs=_checked_outputs(
                        command.step, masker.mask_data(skipped.outputs)))
            except StepFailed as exc:
                step_log.line(f"cistate: {exc.message}")
                result = _result(command, "failed", error=_error(
                    masker.mask(exc.message), exit_code=exc.exit_code,
                    output_tail=masker.mask(exc.output_tail) or step_log.tail(),
                    retryable=exc.retryable))
            except TimeoutError:
                result = _result(command, "failed", error=_error(
                    f"step {command.step!r} did not finish within {command.timeout:g}s",
                    kind="timeout", output_tail=step_log.tail()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                step_log.write(traceback.format_exc())
                result = _result(command, "failed", error=_error(
                    masker.mask(f"handler {command.uses!r} crashed: {type(exc).__name__}: {exc}"),
                    output_tail=step_log.tail()))
            finally:
                if live is not None:
                    step_log.flush()  # what was held back in case it began a secret
                    try:
                        await live.close()
                    except asyncio.CancelledError:
                        live.abandon()
                        raise
        except BaseException:  # cancelled, or the worker is going down
            if workspace is not None:
                workspace.remove_now()
            raise
        finally:
            if workspace is None:
                holds.close()
        return result.model_copy(update={
            "log": _text(step_log.text(), MAX_LOG_CHARS) or None, "started_at": started,
            "finished_at": datetime.now(UTC)}), workspace


def _checked_outputs(step: str, outputs: dict[str, Any]) -> dict[str, Any]:
    """A handler's outputs, or a StepFailed saying why they cannot be recorded."""
    problem = storable_problem(outputs, "outputs")
    size = outputs_size(outputs) if problem is None else 0
    if problem is None and size > MAX_OUTPUTS_BYTES:
        problem = f"outputs are {size} bytes as JSON; at most {MAX_OUTPUTS_BYTES} are kept"
    if problem:
        raise StepFailed(f"step {step!r} cannot record its outputs: {problem}",
                         retryable=False)
    return outputs


def _error(message: str, *, output_tail: str = "", **kw: Any) -> StepError:
    return StepError(message=_text(message, MAX_TEXT_CHARS),
                     output_tail=_text(output_tail, MAX_TEXT_CHARS), **kw)


def _text(text: str, limit: int) -> str:
    """Output as it can be stored: NUL bytes shown as U+FFFD, at most `limit` characters."""
    text = text.replace("\x00", "\ufffd")
    return text if len(text) <= limit else text[: limit - 40] + "\n... [cut at the limit]"


@dataclass(frozen=True)
class _Workspace:
    """An attempt's folder (`attempt`) in its run's folder (`run_dir`), to be removed, and
    what the attempt holds while its folder is there (`holds`: the repo mirror its checkout
    borrows objects from, which no prune may remove before the tree is gone)."""

    attempt: Path
    run_dir: Path
    holds: contextlib.ExitStack[bool | None]

    async def remove(self) -> None:
        """The attempt's folder, deleted in a thread (the event loop goes on), then what it
        held let go, then the run's folder once no attempt uses it. That last part stays on
        the loop: an attempt of the same run making its folder (synchronously, on the loop)
        cannot come in between."""
        try:
            await asyncio.to_thread(self._delete_tree)
        finally:
            self.holds.close()
        self._drop_run_dir()

    def remove_now(self) -> None:
        try:
            self._delete_tree()
        finally:
            self.holds.close()
        self._drop_run_dir()

    def _delete_tree(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.attempt)

    def _drop_run_dir(self) -> None:
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()


def _result(command: StepCommand, status: str, **kw: object) -> StepResult:
    return StepResult.model_validate({
        "run_id": command.run_id, "step": command.step, "attempt": command.attempt,
        "status": status, **kw,
    })


