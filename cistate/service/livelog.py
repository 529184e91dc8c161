"""Live step logs: a running step's output, as it comes, for `runs logs --follow` and the API.

Worker side, `LiveLog`: the step's StepLog hands it every piece of output once masked; it
sends what gathered every FLUSH_SECONDS (or sooner, once CHUNK_CHARS gathered) as a signed
`step.<name>.log` message, in order, one at a time (each confirmed before the next), and a
last one (`final`) when the output ends. Memory is bounded: at most MAX_PENDING_CHARS wait to
be sent (a broker that lags loses the middle of the live view, said in the log, never the
worker's memory); the whole log still travels with the result, as before. At most
LIVE_LIMIT_CHARS of one execution are sent live.

Orchestrator side, `LiveLogs`: consumes `<prefix>.logs`, checks the signature and the
attempt's token, and stores the pieces (Store.add_log_chunk: a redelivered piece once, an
execution's pieces in their order: one that comes before the piece ahead of it goes back to
the queue, for at most EARLY_TRIES deliveries, after which that piece counts as lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from cistate.adapters.rabbitmq.bus import Bus
from cistate.adapters.rabbitmq.signing import BadSignature
from cistate.domain.events import derived_id, loads
from cistate.domain.messages import LOG_CHUNK_CHARS, LogChunk, StepCommand

if TYPE_CHECKING:  # the worker side needs no database
    from cistate.adapters.postgres.store import LiveChunk, Store

log = structlog.get_logger("cistate.livelog")

FLUSH_SECONDS = 0.2  # bench/livelog.py: 0.5 gave a p99 of 877 ms from print to follower
CHUNK_CHARS = LOG_CHUNK_CHARS
MAX_PENDING_CHARS = 1 << 20
LIVE_LIMIT_CHARS = 8 << 20
SEND_TRIES = 3
EARLY_TRIES = 40
EARLY_WAIT_SECONDS = 0.05


class LiveLog:
    """One execution's live output (see the module's docstring)."""

    def __init__(self, bus: Bus, command: StepCommand, worker: str) -> None:
        self.bus = bus
        self.command = command
        self.sender = f"handler:{worker}"
        self.execution = uuid.uuid4()
        self._pending: list[str] = []
        self._pending_chars = 0
        self._sent_chars = 0
        self._dropped = 0
        self._seq = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def write(self, text: str) -> None:
        """A piece of masked output (StepLog's sink): kept to send, never blocking. The
        sender starts with the first piece: a step that prints nothing (a noop) sends
        nothing and costs no task."""
        if self._task is None:
            self._task = asyncio.create_task(self._send_forever())
        text = text.replace("\x00", "\ufffd")  # PostgreSQL's text has no NUL
        if self._pending_chars + len(text) > MAX_PENDING_CHARS:
            self._dropped += len(text)
            return
        self._pending.append(text)
        self._pending_chars += len(text)
        if self._pending_chars >= CHUNK_CHARS:
            self._wake.set()

    def abandon(self) -> None:
        """Stop sending (the attempt was cancelled): what is left is not sent."""
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        """Send what is left, and the final piece, when anything was printed; never raises
        (a live log is a view)."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=10)
            if not self._task.done():
                self._task.cancel()

    async def _send_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            closing = self._closing
            text = self._take()
            while text or closing:
                piece, text = text[:CHUNK_CHARS], text[CHUNK_CHARS:]
                final = closing and not text
                await self._send(piece, final)
                if final:
                    return

    def _take(self) -> str:
        text = "".join(self._pending)
        self._pending, self._pending_chars = [], 0
        if self._dropped:
            text = (f"[... {self._dropped} characters of output not shown live: the broker "
                    "was slow; the stored log has them]\n") + text
            self._dropped = 0
        room = LIVE_LIMIT_CHARS - self._sent_chars
        if room <= 0:
            return ""  # past the limit, and said so
        if len(text) > room:
            text = text[:room] + (f"\n[live log stops at {LIVE_LIMIT_CHARS} characters; the "
                                  "stored log keeps its head and tail]\n")
            self._sent_chars = LIVE_LIMIT_CHARS
        else:
            self._sent_chars += len(text)
        return text

    async def _send(self, text: str, final: bool) -> None:
        self._seq += 1
        command = self.command
        chunk = LogChunk(run_id=command.run_id, step=command.step, attempt=command.attempt,
                         execution=self.execution, seq=self._seq, text=text, final=final,
                         token=command.token)
        for tries in range(1, SEND_TRIES + 1):
            try:
                await self.bus.publish(f"step.{command.step}.log",
                                       chunk.model_dump_json().encode(),
                                       derived_id(self.execution, self._seq),
                                       sender=self.sender)
                return
            except Exception as exc:  # the view loses a piece; the step goes on
                if tries == SEND_TRIES:
                    log.warning("could not send a piece of live log", step=command.step,
                                run_id=str(command.run_id),
                                error=f"{type(exc).__name__}: {exc}")
                else:
                    await asyncio.sleep(0.2 * tries)


Tokens = Callable[[uuid.UUID, str, int], str]


class LiveLogs:
    """Stores the live pieces workers send (the orchestrator role)."""

    def __init__(self, store: Store, bus: Bus, tokens: Tokens | None) -> None:
        self.store = store
        self.bus = bus
        self.tokens = tokens
        # how often a piece came before the piece ahead of it, by message id
        self._early: dict[str, int] = {}

    async def start(self) -> None:
        channel = await self.bus.consumer_channel(prefetch=64)
        queue = await self.bus.declare_logs(channel=channel)
        await queue.consume(self.on_message, no_ack=False)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            sender = self.bus.verified(message)
            if not sender.startswith("handler:"):
                raise BadSignature(f"live logs come from workers, not {sender}")
            chunk = LogChunk.model_validate(loads(message.body))
            expected = self.tokens(chunk.run_id, chunk.step, chunk.attempt) if self.tokens \
                else ""
            if expected and not hmac.compare_digest(expected, chunk.token):
                raise BadSignature("the piece does not carry its attempt's token")
        except (BadSignature, ValidationError, ValueError) as exc:
            await self.bus.dead_letter(message, f"not a live log piece: {exc}")
            self.bus.acker.ack(message)
            return
        key = message.message_id or ""
        tries = self._early.get(key, 0)
        try:
            stored = await self.store.add_log_chunk(chunk, in_turn=tries < EARLY_TRIES)
        except Exception as exc:
            log.warning("could not store a piece of live log; it will be redelivered",
                        error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1)
            self.bus.acker.nack(message, requeue=True)
            return
        if stored == "early":  # the piece before it is on its way (or was lost)
            if len(self._early) >= 10_000:
                self._early.pop(next(iter(self._early)))
            self._early[key] = tries + 1
            await asyncio.sleep(EARLY_WAIT_SECONDS)
            self.bus.acker.nack(message, requeue=True)
            return
        self._early.pop(key, None)
        self.bus.acker.ack(message)


# -- following a step's live output (runs logs --follow, the API's ?follow=1)

ENDED = frozenset({"succeeded", "failed", "timed_out", "skipped", "cancelled"})
FOLLOW_POLL_SECONDS = 0.1
# how often a follower loads the run to see whether the step ended (a fold: dearer than the
# pieces' query, which runs every poll)
FOLLOW_STATE_SECONDS = 0.5
# after the step ended, how long the last pieces (sent before the result) may take to arrive
LAST_PIECES_SECONDS = 2.0


class StepNotFound(Exception):
    """The run, or its step, does not exist."""


@dataclass(frozen=True)
class Piece:
    """A stored piece of the step's output, and the header line shown before it when an
    execution's output begins with it ("" otherwise)."""

    chunk: LiveChunk
    header: str = ""


@dataclass(frozen=True)
class Ended:
    state: str
    exit_status: int


def header(attempt: int, again: bool) -> str:
    return f"--- attempt {attempt}" + (", run again by another worker" if again else "") \
        + " ---\n"


async def follow(store: Store, run_id: uuid.UUID, step: str, after: int = 0,
                 poll: float = FOLLOW_POLL_SECONDS) -> AsyncIterator[Piece | Ended]:
    """The step's pieces of output as they arrive (after the piece `after`, to read on),
    then Ended once the step has ended (or its run ended before it started). The pieces of
    one execution come in order, once; each execution begins under a header."""
    last, ended_for, checked = after, 0.0, 0.0
    clock = asyncio.get_running_loop().time
    seen: set[tuple[int, uuid.UUID]] = set()
    latest: tuple[int, uuid.UUID] | None = None  # the execution that began last
    finals: set[tuple[int, uuid.UUID]] = set()
    if after:
        for attempt, execution, final in await store.log_executions(run_id, step, after):
            latest = (attempt, execution)
            seen.add(latest)
            if final:
                finals.add(latest)
    while True:
        chunks = await store.log_chunks(run_id, step, after=last)
        for chunk in chunks:
            last = chunk.id
            key = (chunk.attempt, chunk.execution)
            begins = ""
            if key not in seen:
                again = any(attempt == chunk.attempt for attempt, _ in seen)
                seen.add(key)
                latest = key
                begins = header(chunk.attempt, again)
            yield Piece(chunk, begins)
            if chunk.final:
                finals.add(key)
        if clock() - checked < FOLLOW_STATE_SECONDS and not any(c.final for c in chunks):
            await asyncio.sleep(poll)
            continue
        checked = clock()
        state = await store.load(run_id)
        current = state.steps.get(step) if state is not None else None
        if state is None or current is None:
            raise StepNotFound(f"no step {step!r} in run {run_id}" if state
                               else f"no run {run_id}")
        ended = current.state in ENDED or (state.status in ENDED and current.attempts == 0)
        if ended and not chunks:
            if latest is None or latest in finals or ended_for >= LAST_PIECES_SECONDS:
                yield Ended(current.state, exit_status(current.state, current.error))
                return
            ended_for += FOLLOW_STATE_SECONDS
        await asyncio.sleep(poll)


def exit_status(state: str, error: dict[str, Any] | None) -> int:
    """What `runs logs --follow` exits with: 0 when the step succeeded or was skipped, its
    process's exit code when it failed with one, else 1."""
    if state in ("succeeded", "skipped"):
        return 0
    code = (error or {}).get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1
