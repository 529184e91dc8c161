"""Batched acks against real RabbitMQ: the broker settles exactly what was finished."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from cistate.adapters.rabbitmq.bus import Bus
from cistate.adapters.rabbitmq.signing import Signer
from tests.conftest import wait_until as wait_for

pytestmark = pytest.mark.integration


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return condition()
    await wait_for(check, timeout=10, what=what)


@pytest.fixture
async def bus(amqp_url: str, bus_prefix: str) -> AsyncIterator[Bus]:
    b = Bus(amqp_url, bus_prefix, Signer(b"bus-tests-key-0123456789"))
    await b.connect()
    yield b
    await b.close()


@dataclass
class Consumer:
    """A step queue filled with `count` messages and consumed on a channel of its own,
    keeping every delivery (first deliveries and redeliveries apart) unsettled."""

    bus: Bus
    step: str
    count: int
    channel: AbstractChannel | None = None
    queue: AbstractQueue | None = None
    received: list[AbstractIncomingMessage] = field(default_factory=list)
    redelivered: list[AbstractIncomingMessage] = field(default_factory=list)

    async def start(self) -> Consumer:
        await self.bus.declare_step(self.step)
        for i in range(self.count):
            await self.bus.publish(f"step.{self.step}.run", {"i": i}, f"m{i}")
        self.channel = await self.bus.consumer_channel(prefetch=self.count)
        self.queue = await self.bus.declare_step(self.step, channel=self.channel)
        await self.queue.consume(self.on_message, no_ack=False)
        await wait_until(lambda: len(self.received) == self.count,
                         what=f"{self.count} deliveries")
        return self

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        (self.redelivered if message.redelivered else self.received).append(message)

    async def left_in_queue(self) -> int:
        """Close the channel (what is unsettled goes back) and count the queue."""
        assert self.channel is not None and self.queue is not None
        await self.bus.acker.flush(everything=True)
        await self.channel.close()
        probe = await self.bus.consumer_channel(prefetch=1)
        try:
            queue = await probe.declare_queue(self.queue.name, passive=True)
            count = queue.declaration_result.message_count
            assert count is not None
            return count
        finally:
            await probe.close()


async def test_out_of_order_acks_and_nacks_settle_exactly_those_messages(bus: Bus) -> None:
    consumer = await Consumer(bus, "a", 60).start()
    order = consumer.received[:]
    random.Random(7).shuffle(order)
    requeued = {m.body for m in order[:5]}
    for index, message in enumerate(order):
        if message.body in requeued:
            bus.acker.nack(message, requeue=True)
        else:
            bus.acker.ack(message)
        if index % 7 == 0:
            await asyncio.sleep(0)  # let some batches go out mid-way, as under load
    # exactly the nacked ones come back; the channel survived every frame
    await wait_until(lambda: len(consumer.redelivered) == 5, what="5 redeliveries")
    await asyncio.sleep(0.3)
    assert {m.body for m in consumer.redelivered} == requeued
    assert consumer.channel is not None and not consumer.channel.is_closed
    for message in consumer.redelivered:
        bus.acker.ack(message)
    assert await consumer.left_in_queue() == 0
    assert bus.acker.finished == 65
    assert bus.acker.frames_sent < 40, "acks were not batched"


async def test_nacks_in_a_batch_go_out_before_the_ack_that_passes_them(bus: Bus) -> None:
    consumer = await Consumer(bus, "d", 20).start()
    for message in consumer.received:  # one turn: one batch holding both nacks and acks
        if message.body in (b'{"i":3}', b'{"i":11}'):
            bus.acker.nack(message, requeue=True)
        else:
            bus.acker.ack(message)
    await wait_until(lambda: len(consumer.redelivered) == 2, what="the 2 nacked messages again")
    assert sorted(m.body for m in consumer.redelivered) == [b'{"i":11}', b'{"i":3}']
    for message in consumer.redelivered:
        bus.acker.ack(message)
    assert await consumer.left_in_queue() == 0


async def test_many_finishes_in_one_turn_go_out_as_one_frame(bus: Bus) -> None:
    consumer = await Consumer(bus, "c", 32).start()
    before = bus.acker.frames_sent
    for message in consumer.received:  # as a group commit resolves all its callers at once
        bus.acker.ack(message)
    await wait_until(lambda: bus.acker.frames_sent > before, what="the ack frame")
    await asyncio.sleep(0.1)
    assert bus.acker.frames_sent - before == 1
    assert await consumer.left_in_queue() == 0


async def test_a_message_from_a_closed_channel_is_redelivered_not_lost(bus: Bus) -> None:
    first = await Consumer(bus, "b", 3).start()
    assert first.channel is not None
    await first.channel.close()  # as a broker connection loss would
    for message in first.received:
        bus.acker.ack(message)  # too late: nothing may be sent on another channel
    await bus.acker.flush(everything=True)

    second = Consumer(bus, "b", 0)
    second.channel = await bus.consumer_channel(prefetch=3)
    second.queue = await bus.declare_step("b", channel=second.channel)
    await second.queue.consume(second.on_message, no_ack=False)
    await wait_until(lambda: len(second.redelivered) == 3, what="3 redeliveries")
    for message in second.redelivered:
        bus.acker.ack(message)
    assert await second.left_in_queue() == 0


async def test_finished_deliveries_behind_a_running_one_are_acked_after_the_hold(
        bus: Bus) -> None:
    consumer = await Consumer(bus, "e", 3).start()
    running, *finished = consumer.received  # the first is still being handled (a long step)
    before = bus.acker.frames_sent
    for message in finished:
        bus.acker.ack(message)
    # no further activity: the hold's timer sends them, one frame each (no multiple ack
    # may pass the running delivery)
    await wait_until(lambda: bus.acker.frames_sent - before == 2, what="the held acks")
    assert await consumer.left_in_queue() == 1  # only the running one goes back
    assert running.delivery_tag == 1
