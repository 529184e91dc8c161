"""RabbitMQ (aio-pika): topology, publishing with confirms, consuming with manual ack.

Topology (names start with the configured prefix, `cistate` by default):
  exchange  <p>                 topic; routing keys push, control, cancel,
                                step.<name>.run, step.<name>.result
  exchange  <p>.dead            fanout; messages that cannot be handled, reason in the
                                `x-cistate-reason` header
  queue     <p>.orchestrator    quorum; push, control, step.*.result
  queue     <p>.step.<name>     quorum; step.<name>.run
  queue     <p>.dead            quorum; everything dead-lettered
  queue     <p>.cancel.<id>     one per worker, exclusive; cancel (a broadcast)
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from cistate.events import dumps

REASON_HEADER = "x-cistate-reason"
# A message redelivered this often (a handler that crashes its process every time) is
# dead-lettered by the broker instead of looping forever.
DELIVERY_LIMIT = 20

Consumer = Callable[[AbstractIncomingMessage], Awaitable[None]]


class Bus:
    def __init__(self, url: str, prefix: str = "cistate") -> None:
        self.url = url
        self.prefix = prefix
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        self._queues: list[AbstractQueue] = []  # keep declared objects referenced (robust)

    @property
    def exchange_name(self) -> str:
        return self.prefix

    def queue_name(self, role: str) -> str:
        return f"{self.prefix}.{role}"

    async def connect(self) -> None:
        self._connection = await aio_pika.connect_robust(self.url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await self._channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        self._dead = await self._channel.declare_exchange(
            f"{self.prefix}.dead", aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await self._declare_queue(self.queue_name("dead"), dead_letter=False)
        await dead_queue.bind(self._dead)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _declare_queue(self, name: str, dead_letter: bool = True,
                             channel: AbstractChannel | None = None) -> AbstractQueue:
        args: dict[str, Any] = {"x-queue-type": "quorum"}
        if dead_letter:
            args |= {"x-dead-letter-exchange": f"{self.prefix}.dead",
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
        for key in ("push", "control", "step.*.result"):
            await queue.bind(self.exchange_name, key)
        return queue

    async def declare_step(self, step: str,
                           channel: AbstractChannel | None = None) -> AbstractQueue:
        queue = await self._declare_queue(self.queue_name(f"step.{step}"), channel=channel)
        await queue.bind(self.exchange_name, f"step.{step}.run")
        return queue

    async def declare_all(self, steps: Iterable[str]) -> None:
        """Declare every durable queue, so messages published before a consumer starts wait."""
        await self.declare_orchestrator()
        for step in steps:
            await self.declare_step(step)

    async def publish(
        self,
        routing_key: str,
        body: dict[str, Any] | bytes,
        message_id: uuid.UUID | str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm (raises if it is not confirmed)."""
        if self._exchange is None:
            raise RuntimeError("bus is not connected")
        payload = body if isinstance(body, bytes) else dumps(body).encode()
        await self._exchange.publish(
            aio_pika.Message(
                payload,
                message_id=str(message_id),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers or {},
            ),
            routing_key=routing_key,
            mandatory=False,
        )

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
