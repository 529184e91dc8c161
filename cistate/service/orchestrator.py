"""The orchestrator: consumes push, result and control messages; folds, decides, appends.

For each message: load the run (cache, else its projection row), decide, store the events
with the outbox rows in one transaction, publish the outbox rows with confirms, then ack.
A Conflict (another orchestrator appended first) reloads and decides again; a Duplicate (a
redelivered message) is acked with nothing changed. Messages that can never be handled go to
the dead-letter queue with a reason; messages that arrive in the wrong state become
`message.rejected` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel, ValidationError

from cistate.adapters.postgres.store import Append, Conflict, Duplicate, OutboxRow, Store
from cistate.adapters.rabbitmq.bus import Bus
from cistate.adapters.rabbitmq.signing import BadSignature
from cistate.domain import resource as res
from cistate.domain import run as r
from cistate.domain.events import loads
from cistate.domain.messages import (
    ClaimRequest,
    Control,
    ControlAction,
    NoticeResult,
    Push,
    StepResult,
    message_uuid,
    outputs_size,
)
from cistate.domain.repos import RepoPolicy
from cistate.domain.status import TERMINAL
from cistate.service.deciders import Deciders

log = structlog.get_logger("cistate.orchestrator")

MAX_CONFLICT_RETRIES = 20
CACHE_SIZE = 10_000
# How long the relay leaves an orchestrator's own rows alone before publishing them itself:
# a lease, renewed while this process still publishes them (a confirm may take longer under
# load), so that only the rows of a process that stopped, or failed to publish, are
# published again. A row held this long in all is left to the relay anyway.
OUTBOX_GRACE = timedelta(seconds=5)
OUTBOX_RENEW_SECONDS = 1.0
OUTBOX_MAX_HOLD = timedelta(seconds=60)
REQUEUE_PAUSE_SECONDS = 1.0


class Unprocessable(Exception):
    """A message no state of any run could accept: it goes to the dead-letter queue."""


@dataclass(frozen=True)
class Outcome:
    run_id: uuid.UUID
    status: str  # recorded | duplicate | ignored | rejected
    detail: str | None = None
    state: r.RunState | None = None


Message = Push | StepResult | Control | ClaimRequest


def parse(routing_key: str, body: bytes) -> Message:
    """The message for a routing key; Unprocessable (with a reason a person can use) if not."""
    model: type[BaseModel]
    if routing_key == "push":
        model = Push
    elif routing_key == "control":
        model = Control
    elif routing_key == "claim":
        model = ClaimRequest
    elif routing_key.startswith("step.") and routing_key.endswith(".result"):
        model = StepResult
    else:
        raise Unprocessable(f"no message type for routing key {routing_key!r}")
    try:
        raw = loads(body)
    except ValueError as exc:
        raise Unprocessable(f"body is not JSON: {exc}") from None
    try:
        message = model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise Unprocessable(f"{routing_key} message does not match its schema: {problems}"
                            ) from None
    assert isinstance(message, Push | StepResult | Control | ClaimRequest)
    return message


class Orchestrator:
    def __init__(self, store: Store, deciders: Deciders | r.Decider, bus: Bus | None = None,
                 repos: RepoPolicy | None = None) -> None:
        self.store = store
        # each run is decided with the pipeline it pinned (a lone Decider: one for all)
        self.deciders = deciders if isinstance(deciders, Deciders) else Deciders.of(deciders)
        self.bus = bus
        self.repos = repos or RepoPolicy()
        self._cache: OrderedDict[uuid.UUID, r.RunState] = OrderedDict()
        self._locks: dict[uuid.UUID | str, tuple[asyncio.Lock, int]] = {}
        self._resources: OrderedDict[str, res.ResourceState] = OrderedDict()
        self._sent: list[int] = []
        # outbox rows this process publishes, or published and has not marked sent yet:
        # id -> (when it took them, when their lease in the table ends)
        self._held: dict[int, tuple[datetime, datetime]] = {}
        self._commits = GroupCommit(store)
        self._flusher: asyncio.Task[None] | None = None
        self.outcomes: Counter[str] = Counter()  # messages handled, by outcome (metrics)

    # -- the consumer

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        routing_key = message.routing_key or ""
        try:
            message_id = _message_id(message)
            # Results and control messages come from cistate's own roles: signed, and the
            # signature names who acted. A push comes from a producer and names no actor.
            sender = None if routing_key == "push" else self._verified(message)
            body = parse(routing_key, message.body)
            if isinstance(body, ClaimRequest):
                outcome = await self.claim(body, message_id, sender or "")
            else:
                outcome = await self.submit(body, message_id, actor=sender or _actor(body))
        except (Unprocessable, asyncpg.DataError) as exc:
            # A data error is the message's own (a value PostgreSQL cannot store), not the
            # database being away: redelivering it would fail the same way every time.
            reason = str(exc) if isinstance(exc, Unprocessable) else (
                f"PostgreSQL cannot store this message's data: {type(exc).__name__}: {exc}")
            assert self.bus is not None
            log.warning("dead-lettered", routing_key=routing_key, reason=reason,
                        message_id=message.message_id)
            await self.bus.dead_letter(message, reason)
            self.bus.acker.ack(message)
            self.outcomes["dead_lettered"] += 1
            return
        except Exception as exc:
            # The database or the broker is away (a restart, a network cut): nothing was
            # committed, or the commit will be found again as a duplicate. Put the message
            # back after a pause rather than spinning on it.
            log.warning("could not handle message; it will be redelivered",
                        routing_key=routing_key, error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
            assert self.bus is not None
            self.bus.acker.nack(message, requeue=True)
            self.outcomes["requeued"] += 1
            return
        # one line per message is for debugging: at info level it costs a write per hop
        log.debug(outcome.status, run_id=str(outcome.run_id), routing_key=routing_key,
                  detail=outcome.detail)
        assert self.bus is not None
        self.bus.acker.ack(message)  # sent with the other acks of this turn, in one frame
        self.outcomes[outcome.status] += 1

    def _verified(self, message: AbstractIncomingMessage) -> str:
        assert self.bus is not None
        try:
            return self.bus.verified(message)
        except BadSignature as exc:
            raise Unprocessable(str(exc)) from None

    async def submit(
        self,
        message: Push | StepResult | Control | NoticeResult,
        message_id: uuid.UUID,
        actor: str = "system",
        record_rejection: bool = True,
    ) -> Outcome:
        """Decide and store what `message` does to its run. Used by the consumer and by the
        API for operator requests (which report a rejection instead of recording it)."""
        run_id = r.run_id_for(message_id) if isinstance(message, Push) else message.run_id
        if isinstance(message, Push):
            refused = self.repos.problem(message.repo)
            if refused is not None:
                raise Unprocessable(refused)
            reason = r.ignore_reason(message, self.deciders.for_push(message.repo).pipeline)
            if reason is not None:
                return Outcome(run_id, "ignored", reason)
        # One decision at a time per run in this process (other processes: Conflict).
        async with self._one_at_a_time(run_id):
            return await self._submit_locked(run_id, message, message_id, actor,
                                             record_rejection)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, key: uuid.UUID | str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    # -- resources: a run's claims on concurrency groups and locks

    async def claim(self, request: ClaimRequest, message_id: uuid.UUID,
                    sender: str) -> Outcome:
        """Decide and store what a run's claim does to its resource (cistate.domain.resource):
        the resource's events and the messages that tell runs their turn, in one
        transaction. Only cistate itself asks (a run's decision, through the outbox)."""
        if sender != "system":
            raise Unprocessable(f"claim messages are cistate's own (a run's decision); "
                                f"{sender or 'an unsigned sender'} may not send one")
        name = request.resource
        async with self._one_at_a_time(name):
            for _ in range(MAX_CONFLICT_RETRIES):
                cached = self._resources.get(name)
                state = cached or await self.store.load_resource(name)
                now = datetime.now(UTC)
                decision = res.decide(state, request, message_id)
                if (decision.ignored or decision.after is None) and cached is not None:
                    # another orchestrator may have appended since: never drop a request
                    # (a release above all) on what this process last saw
                    self._resources.pop(name, None)
                    continue
                if decision.ignored or decision.after is None:
                    return Outcome(request.run_id, "ignored", decision.ignored)
                try:
                    rows = await self.store.append_resource(
                        decision.after, state.version, decision, message_id, now,
                        now + OUTBOX_GRACE if self.bus else None)
                except Conflict:
                    self._resources.pop(name, None)
                    continue
                except Duplicate:
                    self._resources.pop(name, None)
                    return Outcome(request.run_id, "duplicate", "message already handled")
                except BaseException:
                    self._resources.pop(name, None)
                    raise
                self._remember_resource(decision.after)
                await self._publish(rows, now, now + OUTBOX_GRACE)
                return Outcome(request.run_id, "recorded", decision.events[-1].type)
        raise RuntimeError(f"resource {name}: gave up after {MAX_CONFLICT_RETRIES} conflicts")

    def _remember_resource(self, state: res.ResourceState) -> None:
        if state.holder is None:
            self._resources.pop(state.name, None)  # free: nothing worth keeping
            return
        self._resources[state.name] = state
        self._resources.move_to_end(state.name)
        while len(self._resources) > CACHE_SIZE:
            self._resources.popitem(last=False)

    async def _submit_locked(
        self, run_id: uuid.UUID, message: Push | StepResult | Control | NoticeResult,
        message_id: uuid.UUID, actor: str, record_rejection: bool,
    ) -> Outcome:
        # A push opens a new run: nothing to load. A redelivered one collides on insert
        # (Duplicate or Conflict), and the retry below loads what is there.
        fresh = isinstance(message, Push) and run_id not in self._cache
        for _ in range(MAX_CONFLICT_RETRIES):
            cached = not fresh and run_id in self._cache
            state = r.RunState(id=run_id) if fresh else await self._load(run_id)
            fresh = False
            if not state.exists and not isinstance(message, Push):
                raise Unprocessable(f"no run {run_id}")
            now = datetime.now(UTC)
            status = "recorded"
            decider = (self.deciders.for_push(message.repo)
                       if isinstance(message, Push) and not state.exists
                       else await self.deciders.for_run(state, self.store))
            try:
                decision = decider.decide(state, message, message_id, now, actor)
            except r.Rejected as exc:
                if not record_rejection:
                    return Outcome(run_id, "rejected", exc.reason, state)
                status = "rejected"
                decision = decider.rejection(
                    state, message_id, _kind(message), _rejected_body(message), exc.reason,
                    actor)
            if decision.ignored and cached:
                # Another orchestrator may have recorded events of the run since this
                # process cached it: a decision that stores nothing (a grant, a timer the
                # run "no longer waits for") is made again on the stored run, never dropped
                # on a stale copy. (A decision that stores events needs no such care: its
                # append conflicts on the version.)
                self._cache.pop(run_id, None)
                continue
            if decision.ignored:
                return Outcome(run_id, "ignored", decision.ignored, state)
            expected = state.version
            for event in decision.events:
                r.apply(state, event.type, event.data, now)
            try:
                rows = await self._commits.append(Append(
                    state, expected, decision.events, decision.outgoing, message_id, now,
                    outbox_grace=now + OUTBOX_GRACE if self.bus else None,
                    log=_step_log(message) if status == "recorded" else None,
                ))
            except Conflict:
                self._cache.pop(run_id, None)
                continue
            except Duplicate:
                self._cache.pop(run_id, None)
                return Outcome(run_id, "duplicate", "message already handled")
            except BaseException:
                self._cache.pop(run_id, None)
                raise
            self._remember(state)
            if decision.pinned is not None and state.pipeline_sha256 is not None:
                self.deciders.remember(state.pipeline_sha256, decision.pinned)
            await self._publish(rows, now, now + OUTBOX_GRACE)
            return Outcome(run_id, status, decision.events[-1].type, state)
        raise RuntimeError(f"run {run_id}: gave up after {MAX_CONFLICT_RETRIES} conflicts")

    async def _load(self, run_id: uuid.UUID) -> r.RunState:
        cached = self._cache.get(run_id)
        if cached is not None:
            return cached
        stored = await self.store.load(run_id)
        return stored if stored is not None else r.RunState(id=run_id)

    def _remember(self, state: r.RunState) -> None:
        if state.status in TERMINAL:
            self._cache.pop(state.id, None)  # terminal runs only change by operator request
            return
        self._cache[state.id] = state
        self._cache.move_to_end(state.id)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def _publish(self, rows: list[OutboxRow], since: datetime, lease: datetime) -> None:
        if self.bus is None or not rows:
            return
        for row in rows:
            self._held[row.id] = (since, lease)
        try:
            if len(rows) == 1:  # the usual case: no task for gather to wrap it in
                await self.bus.publish(rows[0].routing_key, rows[0].body, rows[0].message_id)
            else:
                await asyncio.gather(*(
                    self.bus.publish(row.routing_key, row.body, row.message_id)
                    for row in rows))
        except BaseException:
            for row in rows:  # not published: the relay's, once their lease ends
                self._held.pop(row.id, None)
            raise
        self._sent.extend(row.id for row in rows)

    def held(self) -> list[int]:
        """The outbox rows this process is publishing (or published and has not marked sent
        yet), which the relay of this process leaves alone however long their confirms
        take; none that it has held longer than OUTBOX_MAX_HOLD."""
        oldest = datetime.now(UTC) - OUTBOX_MAX_HOLD
        return [row for row, (since, _) in self._held.items() if since > oldest]

    # -- background: keeping the lease of rows still being published

    async def renew_leases_forever(self, interval: float = OUTBOX_RENEW_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.renew_leases()

    async def renew_leases(self) -> int:
        """Move the lease of held rows whose lease ends within half the grace on by
        OUTBOX_GRACE, so that another process's relay does not publish them again while
        this one still waits for their confirms; returns how many. A process that stops
        renews nothing: its rows fall due within OUTBOX_GRACE, and any relay publishes them."""
        now = datetime.now(UTC)
        soon, oldest = now + OUTBOX_GRACE / 2, now - OUTBOX_MAX_HOLD
        ids = [row for row, (since, lease) in self._held.items()
               if lease <= soon and since > oldest]
        if not ids:
            return 0
        lease = now + OUTBOX_GRACE
        try:
            await self.store.renew_outbox_lease(ids, lease)
        except Exception:
            log.warning("could not renew the lease of outbox rows being published; the relay "
                        "may publish them again", count=len(ids), exc_info=True)
            return 0
        for row in ids:
            held = self._held.get(row)
            if held is not None:
                self._held[row] = (held[0], lease)
        return len(ids)

    # -- operator requests (API and CLI): rejections are answered, not recorded

    async def control(self, run_id: uuid.UUID, action: ControlAction, actor: str,
                      reason: str | None = None, step: str | None = None) -> Outcome:
        message = Control(run_id=run_id, action=action, reason=reason, step=step)
        try:
            return await self.submit(message, uuid.uuid4(), actor, record_rejection=False)
        except Unprocessable as exc:
            return Outcome(run_id, "not_found", str(exc))

    async def rerun(self, run_id: uuid.UUID, actor: str) -> Outcome:
        """A new run for the same push as `run_id`, linked to it."""
        old = await self.store.load(run_id)
        if old is None:
            return Outcome(run_id, "not_found", f"no run {run_id}")
        push = Push.model_validate({**old.push, "rerun_of": run_id})
        outcome = await self.submit(push, uuid.uuid4(), actor)
        return outcome

    # -- background: marking sent rows in batches

    async def flush_sent_forever(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush_sent()

    async def flush_sent(self) -> None:
        ids, self._sent = self._sent, []
        if ids:
            try:
                await self.store.mark_sent(ids)
            except Exception:
                # Unmarked rows get published again by the relay; consumers dedupe them.
                log.warning("could not mark outbox rows sent", count=len(ids), exc_info=True)
            finally:
                for row in ids:
                    self._held.pop(row, None)


class GroupCommit:
    """Stores the decisions of messages handled meanwhile with one statement
    (Store.append_many): one round trip and one commit for all of them. Each caller still
    gets its own outcome (rows, Conflict, Duplicate) and acks only after the statement that
    holds its decision has committed.

    At most `max_in_flight` statements run at once: under load, the decisions made while
    they run wait for the next one together (as PostgreSQL's own group commit gathers the
    commits that arrive during a WAL flush), so a statement carries several decisions
    instead of each taking its own round trip and commit. With nothing in flight a decision
    is stored after the other messages of its turn of the event loop joined it."""

    def __init__(self, store: Store, max_batch: int = 64, max_in_flight: int = 2) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._pending: list[tuple[Append, asyncio.Future[list[OutboxRow] | Exception]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self.statements = 0  # how many statements stored decisions (tests, benchmarks)

    async def append(self, item: Append) -> list[OutboxRow]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[OutboxRow] | Exception] = loop.create_future()
        self._pending.append((item, future))
        self._schedule()
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    def _schedule(self) -> None:
        if self._pending and not self._scheduled and len(self._flushes) < self.max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending or len(self._flushes) >= self.max_in_flight:
            return
        batch = self._pending[:self.max_batch]
        del self._pending[:self.max_batch]
        self.statements += 1
        task = asyncio.create_task(self._store(batch))
        self._flushes.add(task)
        task.add_done_callback(self._stored)
        self._schedule()  # more than a batch waited: the rest, if a statement may start

    def _stored(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._schedule()  # what gathered meanwhile

    async def _store(self, batch: list[tuple[Append, asyncio.Future[Any]]]) -> None:
        try:
            results = await self.store.append_many([item for item, _ in batch])
        except asyncpg.DataError:
            if len(batch) == 1:
                raise_into(batch)
                return
            # One message's data refused the whole statement: store each on its own, so
            # that only that one fails (and is dead-lettered), and the others commit.
            for single in batch:
                await self._store([single])
            return
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


def raise_into(batch: list[tuple[Append, asyncio.Future[Any]]]) -> None:
    """Hand the exception being handled to every caller in `batch`."""
    exc = sys.exc_info()[1]
    assert exc is not None
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _rejected_body(message: Push | StepResult | Control | NoticeResult) -> dict[str, Any]:
    """What a `message.rejected` event keeps of the message: all of a push or a control
    (small, bounded), but of a result only who sent it and how big it was; a result for a
    step that is not running may be anything up to the bus's size limit."""
    if not isinstance(message, StepResult):
        return message.model_dump(mode="json")
    error = message.error
    return {
        "run_id": str(message.run_id), "step": message.step, "attempt": message.attempt,
        "status": message.status, "worker": message.worker,
        "error": None if error is None else {
            "kind": error.kind, "exit_code": error.exit_code, "retryable": error.retryable},
        "outputs_bytes": outputs_size(message.outputs),
        "log_chars": len(message.log or ""),
    }


def _message_id(message: AbstractIncomingMessage) -> uuid.UUID:
    if not message.message_id:
        raise Unprocessable("message has no message_id (set the AMQP message-id property)")
    return message_uuid(message.message_id)


def _actor(push: Push | StepResult | Control) -> str:
    assert isinstance(push, Push), "results and control messages name their signed sender"
    return f"producer:{push.pusher}" if push.pusher else "producer"


def _kind(message: Push | StepResult | Control | NoticeResult) -> str:
    if isinstance(message, Push):
        return "push"
    if isinstance(message, NoticeResult):
        return "notice-result"
    if isinstance(message, StepResult):
        return "step-result"
    return f"control.{message.action}"


def _step_log(message: Any) -> tuple[str, int, str] | None:
    if isinstance(message, StepResult) and message.log is not None:
        return (message.step, message.attempt, message.log)
    return None
