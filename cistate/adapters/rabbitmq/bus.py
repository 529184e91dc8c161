"""RabbitMQ (aio-pika): topology, publishing with confirms, consuming with manual ack.

Topology (names start with the configured prefix, `cistate` by default):
  exchange  <p>                 topic; routing keys push, control, claim, notice, cancel,
                                step.<name>.run, step.<name>.result
  exchange  <p>.dead            fanout; messages that cannot be handled, reason in the
                                `x-cistate-reason` header
  queue     <p>.orchestrator    quorum; push, control, claim, step.*.result
  queue     <p>.step.<name>     quorum; step.<name>.run
  queue     <p>.notify          quorum; notice (commit statuses, notifications)
  queue     <p>.logs            quorum; step.*.log (running steps' live output)
  queue     <p>.dead            quorum; everything dead-lettered
  queue     <p>.cancel.<id>     one per worker, exclusive; cancel (a broadcast)

Only the orchestrator role declares the exchanges, the orchestrator and dead-letter queues
(its broker user may configure them; scripts/rabbitmq-users.sh). Workers declare their own
step and cancel queues; producers, the api and workers find the exchanges passively, which
needs no permission.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from cistate.adapters.rabbitmq.signing import (
    SENDER_HEADER,
    SIGNATURE_HEADER,
    UNSIGNED_KEYS,
    BadSignature,
    Signer,
)
from cistate.config import redact
from cistate.domain.events import dumps


def _log() -> Any:
    """The bus's logger, made when first needed: importing structlog loads rich (~70 ms), and
    a producer's `cistate push` publishes one message and never logs."""
    import structlog

    return structlog.get_logger("cistate.bus")


REASON_HEADER = "x-cistate-reason"
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
# A message redelivered this often (a handler that crashes its process every time) is
# dead-lettered by the broker instead of looping forever.
DELIVERY_LIMIT = 20
# How long a finished delivery waits for the deliveries before it to finish, so that one ack
# frame settles them all, before it is acked on its own.
ACK_HOLD_SECONDS = 0.01

# How often a process that may not declare the exchanges looks for them again, and how often
# it says that it is still waiting.
TOPOLOGY_POLL_SECONDS = 1.0
TOPOLOGY_LOG_EVERY = 30

Consumer = Callable[[AbstractIncomingMessage], Awaitable[None]]


class TopologyMissing(Exception):
    """cistate's exchanges are not on the broker, and this process does not declare them."""


class Unroutable(Exception):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


@dataclass(frozen=True)
class Frame:
    """One frame to send for settled deliveries: an ack (of every outstanding delivery up to
    `tag` if `multiple`) or a nack."""
    tag: int
    multiple: bool = False
    nack: bool = False
    requeue: bool = True


@dataclass
class AckPlan:
    """Which frames settle the finished deliveries of one channel: pure bookkeeping.

    The broker numbers a channel's deliveries 1, 2, 3, ... Once every tag up to T is
    finished, one ack of T with multiple=True settles them all, in place of one frame each.
    Only tags handed to `finish` count, so a delivery still being handled (or one this
    process never saw) is never acked by a multiple ack. A finished delivery behind one still
    running waits up to `hold` seconds for the gap to close, then is acked on its own, so a
    long step does not keep the deliveries after it unacked (holding prefetch slots). A nack
    is sent before any multiple ack that covers its tag: the broker would otherwise ack it,
    then refuse the nack of an unknown tag by closing the channel."""

    floor: int = 0  # every tag <= floor is settled
    acks: dict[int, float] = field(default_factory=dict)  # finished -> when; not sent yet
    nacks: dict[int, bool] = field(default_factory=dict)  # tag -> requeue, not sent yet
    settled: set[int] = field(default_factory=set)  # > floor, settled by a frame of its own

    def finish(self, tag: int, ack: bool = True, requeue: bool = True,
               now: float = 0.0) -> None:
        if tag <= self.floor or tag in self.settled or tag in self.acks or tag in self.nacks:
            raise ValueError(f"delivery tag {tag} is already settled")
        if ack:
            self.acks[tag] = now
        else:
            self.nacks[tag] = requeue

    def take(self, now: float = 0.0, hold: float = 0.0) -> list[Frame]:
        """The frames to send at time `now`, in order; the plan counts them as sent."""
        frames = [Frame(tag, nack=True, requeue=requeue)
                  for tag, requeue in sorted(self.nacks.items())]
        self.settled.update(self.nacks)
        self.nacks.clear()
        top, highest_ack = self.floor, 0
        while top + 1 in self.acks or top + 1 in self.settled:
            top += 1
            if self.acks.pop(top, None) is not None:
                highest_ack = top
        if highest_ack:
            frames.append(Frame(highest_ack, multiple=True))
        self.settled = {tag for tag in self.settled if tag > top}
        self.floor = top
        for tag in sorted(tag for tag, at in self.acks.items() if now - at >= hold):
            frames.append(Frame(tag))  # waited long enough behind a delivery still running
            self.settled.add(tag)
            del self.acks[tag]
        return frames

    def due(self, hold: float) -> float | None:
        """When the oldest ack still held must go, if any is held."""
        return min(self.acks.values()) + hold if self.acks else None


class Acker:
    """Settles deliveries in batches: callers hand over finished messages (`ack`, `nack`)
    without waiting, and one task sends, at the end of each turn of the event loop, the
    fewest frames that settle them (see AckPlan). Messages handled in the same turn - a
    group commit, a burst of publisher confirms - share one ack frame.

    A message is handed over only after its effect is durable (the caller's rule), so a
    batch never acks anything unfinished. Plans are per channel: after a reconnect the new
    channel counts tags from 1 again, and a delivery of the closed one cannot be settled any
    more; the broker redelivers it and the consumer recognises it as a duplicate."""

    def __init__(self, hold: float = ACK_HOLD_SECONDS) -> None:
        self.hold = hold
        self._plans: dict[aiormq.abc.AbstractChannel, AckPlan] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._sending = asyncio.Lock()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self.frames_sent = 0
        self.finished = 0  # messages handed over

    def ack(self, message: AbstractIncomingMessage) -> None:
        self._finish(message, ack=True)

    def nack(self, message: AbstractIncomingMessage, requeue: bool = True) -> None:
        self._finish(message, ack=False, requeue=requeue)

    def _finish(self, message: AbstractIncomingMessage, ack: bool,
                requeue: bool = True) -> None:
        try:
            channel = message.channel
        except aiormq.exceptions.ChannelInvalidStateError:
            return  # the channel is gone and the broker will redeliver the message
        if message.delivery_tag is None:
            return
        loop = asyncio.get_running_loop()
        self._plans.setdefault(channel, AckPlan()).finish(
            message.delivery_tag, ack, requeue, loop.time())
        self.finished += 1
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_forever())
        self._wake.set()

    async def _send_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self, everything: bool = False) -> None:
        """Send every frame due now (`everything`: held acks too), in order. One flush at a
        time: a frame taken by one must not be overtaken by a later multiple ack."""
        async with self._sending:
            await self._flush(everything)

    async def _flush(self, everything: bool) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for channel, plan in list(self._plans.items()):
            if channel.is_closed:
                del self._plans[channel]
                continue
            try:
                for frame in plan.take(now, 0.0 if everything else self.hold):
                    # wait=False: queued for the connection's writer in this order, without
                    # a round through the event loop per frame to see it written
                    if frame.nack:
                        await channel.basic_nack(frame.tag, requeue=frame.requeue, wait=False)
                    else:
                        await channel.basic_ack(frame.tag, multiple=frame.multiple,
                                                wait=False)
                    self.frames_sent += 1
            except Exception as exc:  # the channel or connection is going away
                _log().warning("could not settle deliveries; the broker will redeliver them",
                            error=f"{type(exc).__name__}: {exc}")
                self._plans.pop(channel, None)
        due = [d for plan in self._plans.values() if (d := plan.due(self.hold)) is not None]
        if due and self._timer is None:
            self._timer = loop.call_at(min(due), self._wake_held)

    def _wake_held(self) -> None:
        self._timer = None
        self._wake.set()

    async def close(self) -> None:
        """Send what is due, then stop."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.flush(everything=True)


class Bus:
    """`signer` signs what this process publishes (all but pushes) and checks what it
    consumes (`verified`); without one (a producer's `cistate push`) it publishes pushes."""

    def __init__(self, url: str, prefix: str = "cistate", signer: Signer | None = None
                 ) -> None:
        self.url = url
        self.prefix = prefix
        self.signer = signer
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        self._queues: list[AbstractQueue] = []  # keep declared objects referenced (robust)
        self.acker = Acker()

    @property
    def exchange_name(self) -> str:
        return self.prefix

    def queue_name(self, role: str) -> str:
        return f"{self.prefix}.{role}"

    @property
    def dead_exchange_name(self) -> str:
        return f"{self.prefix}.dead"

    async def connect(self, declare: bool = True, wait: bool = False) -> None:
        """Connect, then `declare` the exchanges and the dead-letter queue (the orchestrator
        role's broker user may), or else find the exchanges without declaring them:
        TopologyMissing if they are not there, or with `wait`, wait until an orchestrator
        has declared them."""
        # Named, so that an operator can tell cistate's connections apart in RabbitMQ's
        # management UI and `rabbitmqctl list_connections client_properties`.
        self._connection = await aio_pika.connect_robust(self.url, client_properties={
            "connection_name": f"cistate {socket.gethostname()} pid {os.getpid()}"})
        # on_return_raises: a mandatory publish that no queue takes fails (Unroutable)
        self._channel = await self._connection.channel(publisher_confirms=True,
                                                       on_return_raises=True)
        if not declare:
            await self._find_exchanges(wait)
            return
        self._exchange = await self._channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        self._dead = await self._channel.declare_exchange(
            self.dead_exchange_name, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await self._declare_queue(self.queue_name("dead"), dead_letter=False)
        await dead_queue.bind(self._dead)

    async def _find_exchanges(self, wait: bool) -> None:
        polls = 0
        while missing := await self._missing_exchanges():
            problem = (f"exchange {missing!r} is not on the broker ({redact(self.url)}); "
                       "cistate's orchestrator role declares its exchanges and queues when it "
                       "starts: start `cistate serve --role orchestrator` with "
                       f"CISTATE_BUS_PREFIX={self.prefix} on this broker and vhost")
            if not wait:
                raise TopologyMissing(problem)
            if polls % TOPOLOGY_LOG_EVERY == 0:
                _log().warning("waiting for the orchestrator to declare the exchanges",
                            problem=problem)
            polls += 1
            await asyncio.sleep(TOPOLOGY_POLL_SECONDS)
        # Passive, also when the robust channel restores them after a reconnect.
        self._exchange = await self._chan.get_exchange(self.exchange_name)
        self._dead = await self._chan.get_exchange(self.dead_exchange_name)

    async def _missing_exchanges(self) -> str | None:
        """The first of cistate's exchanges that is not there (a passive declare needs no
        permission), or None. Asked on a channel of its own: the broker closes the channel
        of a passive declare that finds nothing."""
        assert self._connection is not None
        for name in (self.exchange_name, self.dead_exchange_name):
            probe = await self._connection.channel(publisher_confirms=False)
            try:
                await probe.declare_exchange(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return name
            finally:
                await probe.close()
        return None

    async def close(self) -> None:
        if self._connection is not None:
            await self.acker.close()
            await self._connection.close()
            self._connection = None

    async def _declare_queue(self, name: str, dead_letter: bool = True,
                             channel: AbstractChannel | None = None) -> AbstractQueue:
        args: dict[str, Any] = {"x-queue-type": "quorum"}
        if dead_letter:
            args |= {"x-dead-letter-exchange": self.dead_exchange_name,
                     "x-delivery-limit": DELIVERY_LIMIT}
        queue = await (channel or self._chan).declare_queue(name, durable=True, arguments=args)
        self._queues.append(queue)
        return queue

    @property
    def _chan(self) -> AbstractChannel:
        if self._channel is None:
            raise RuntimeError("bus is not connected")
        return self._channel

    async def declare_orchestrator(self, channel: AbstractChannel | None = None) -> AbstractQueue:
        queue = await self._declare_queue(self.queue_name("orchestrator"), channel=channel)
        for key in ("push", "control", "claim", "step.*.result"):
            await queue.bind(self.exchange_name, key)
        return queue

    async def declare_step(self, step: str,
                           channel: AbstractChannel | None = None) -> AbstractQueue:
        queue = await self._declare_queue(self.queue_name(f"step.{step}"), channel=channel)
        await queue.bind(self.exchange_name, f"step.{step}.run")
        return queue

    async def declare_notify(self, channel: AbstractChannel | None = None) -> AbstractQueue:
        """The notifier's queue: commit statuses and notifications to deliver."""
        queue = await self._declare_queue(self.queue_name("notify"), channel=channel)
        await queue.bind(self.exchange_name, "notice")
        return queue

    async def declare_logs(self, channel: AbstractChannel | None = None) -> AbstractQueue:
        """Live step logs: the pieces of running steps' output workers send."""
        queue = await self._declare_queue(self.queue_name("logs"), channel=channel)
        await queue.bind(self.exchange_name, "step.*.log")
        return queue

    async def declare_all(self, steps: Iterable[str]) -> None:
        """Declare every durable queue, so messages published before a consumer starts wait."""
        await self.declare_orchestrator()
        await self.declare_notify()
        await self.declare_logs()
        for step in steps:
            await self.declare_step(step)

    async def publish(
        self,
        routing_key: str,
        body: dict[str, Any] | bytes,
        message_id: uuid.UUID | str,
        headers: dict[str, Any] | None = None,
        sender: str = "system",
        mandatory: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm (raises if it is not confirmed). All but
        pushes are signed as coming from `sender`. `mandatory`: Unroutable if no queue is
        bound for the routing key (the broker would drop it)."""
        if self._exchange is None:
            raise RuntimeError("bus is not connected")
        payload = body if isinstance(body, bytes) else dumps(body).encode()
        all_headers = dict(headers or {})
        if routing_key not in UNSIGNED_KEYS:
            if self.signer is None:
                raise RuntimeError(f"a {routing_key} message must be signed: no bus key")
            all_headers[SENDER_HEADER] = sender
            all_headers[SIGNATURE_HEADER] = self.signer.sign(
                routing_key, str(message_id), sender, payload)
        robust = self._chan  # the exchange's channel
        if robust.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{robust!r} closed")
        try:
            # What aio-pika's Exchange.publish does, without building an aio_pika.Message
            # to turn into these properties: this runs for every command and result.
            channel = await robust.get_underlay_channel()
            await channel.basic_publish(
                payload,
                exchange=self._exchange.name,
                routing_key=routing_key,
                properties=aiormq.spec.Basic.Properties(
                    content_type="application/json",
                    delivery_mode=PERSISTENT,
                    headers=all_headers,
                    message_id=str(message_id),
                ),
                mandatory=mandatory,
            )
        except aiormq.exceptions.PublishError:
            raise Unroutable(
                f"no queue on the broker ({redact(self.url)}) takes routing key "
                f"{routing_key!r} of exchange {self.exchange_name!r}, so the message was not "
                "kept: start `cistate serve --role orchestrator` once, which declares its "
                "queue") from None

    def verified(self, message: AbstractIncomingMessage) -> str:
        """The sender a consumed message's signature vouches for (BadSignature if none)."""
        if self.signer is None:
            raise BadSignature("this process has no bus key to check signatures with")
        headers = message.headers or {}
        return self.signer.verify(message.routing_key or "", message.message_id,
                                  headers.get(SENDER_HEADER), headers.get(SIGNATURE_HEADER),
                                  message.body)

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Move a message we will never handle to the dead-letter queue, with the reason."""
        if self._dead is None:
            raise RuntimeError("bus is not connected")
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:1000]
        headers["x-cistate-routing-key"] = message.routing_key or ""
        await self._dead.publish(
            aio_pika.Message(
                message.body,
                message_id=message.message_id,
                content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers,
            ),
            routing_key=message.routing_key or "",
        )

    async def consume(self, queue: AbstractQueue, consumer: Consumer) -> str:
        tag: str = await queue.consume(consumer, no_ack=False)
        return tag

    async def consumer_channel(self, prefetch: int) -> AbstractChannel:
        if self._connection is None:
            raise RuntimeError("bus is not connected")
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def declare_cancel_queue(self, channel: AbstractChannel,
                                   worker_id: str) -> AbstractQueue:
        queue = await channel.declare_queue(
            self.queue_name(f"cancel.{worker_id}"), exclusive=True, auto_delete=True)
        await queue.bind(self.exchange_name, "cancel")
        self._queues.append(queue)
        return queue

    async def ping(self) -> None:
        if self._connection is None or self._connection.is_closed:
            raise ConnectionError("not connected to RabbitMQ")
