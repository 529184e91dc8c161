"""Batched acks against real RabbitMQ: the broker settles exactly what was finished."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from cistate.bus import Bus
from tests.conftest import wait_until as wait_for


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return condition()
    await wait_for(check, timeout=10, what=what)

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(amqp_url: str, bus_prefix: str) -> AsyncIterator[Bus]:
    b = Bus(amqp_url, bus_prefix)
    await b.connect()
    yield b
    await b.close()


async def fill(bus: Bus, step: str, count: int) -> AbstractQueue:
    queue = await bus.declare_step(step)
    for i in range(count):
        await bus.publish(f"step.{step}.run", {"i": i}, f"m{i}")
    return queue


async def message_count(bus: Bus, name: str) -> int:
    channel = await bus.consumer_channel(prefetch=1)
    try:
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count
    finally:
        await channel.close()


async def test_out_of_order_acks_and_nacks_settle_exactly_those_messages(bus: Bus) -> None:
    await fill(bus, "a", 60)
    channel = await bus.consumer_channel(prefetch=60)
    queue = await bus.declare_step("a", channel=channel)
    received: list[AbstractIncomingMessage] = []
    redelivered: list[AbstractIncomingMessage] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        (redelivered if message.redelivered else received).append(message)

    await queue.consume(on_message, no_ack=False)
    await wait_until(lambda: len(received) == 60, what="60 deliveries")
    order = received[:]
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
    await wait_until(lambda: len(redelivered) == 5, what="5 redeliveries")
    await asyncio.sleep(0.3)
    assert {m.body for m in redelivered} == requeued
    assert not channel.is_closed
    for message in redelivered:
        bus.acker.ack(message)
    await bus.acker.flush(everything=True)
    await channel.close()  # anything left unacked would go back to the queue now
    assert await message_count(bus, queue.name) == 0
    assert bus.acker.settled == 65
    assert bus.acker.frames_sent < 40, "acks were not batched"


async def test_a_message_from_a_closed_channel_is_redelivered_not_lost(bus: Bus) -> None:
    await fill(bus, "b", 3)
    first = await bus.consumer_channel(prefetch=3)
    queue = await bus.declare_step("b", channel=first)
    got: list[AbstractIncomingMessage] = []

    async def keep(message: AbstractIncomingMessage) -> None:
        got.append(message)

    await queue.consume(keep, no_ack=False)
    await wait_until(lambda: len(got) == 3, what="3 deliveries")
    await first.close()  # as a broker connection loss would
    for message in got:
        bus.acker.ack(message)  # too late: nothing may be sent on another channel
    await bus.acker.flush(everything=True)

    second = await bus.consumer_channel(prefetch=3)
    again: list[AbstractIncomingMessage] = []

    async def take(message: AbstractIncomingMessage) -> None:
        again.append(message)
        bus.acker.ack(message)

    queue2 = await bus.declare_step("b", channel=second)
    await queue2.consume(take, no_ack=False)
    await wait_until(lambda: len(again) == 3, what="3 redeliveries")
    assert all(m.redelivered for m in again)
    await bus.acker.flush(everything=True)
    await second.close()
    assert await message_count(bus, queue.name) == 0


async def test_many_finishes_in_one_turn_go_out_as_one_frame(bus: Bus) -> None:
    await fill(bus, "c", 32)
    channel = await bus.consumer_channel(prefetch=32)
    queue = await bus.declare_step("c", channel=channel)
    got: list[AbstractIncomingMessage] = []

    async def keep(message: AbstractIncomingMessage) -> None:
        got.append(message)

    await queue.consume(keep, no_ack=False)
    await wait_until(lambda: len(got) == 32, what="32 deliveries")
    before = bus.acker.frames_sent
    for message in got:  # as a group commit resolves all its callers in one turn
        bus.acker.ack(message)
    await wait_until(lambda: bus.acker.frames_sent > before, what="the ack frame")
    await asyncio.sleep(0.1)
    assert bus.acker.frames_sent - before == 1
    await channel.close()
    assert await message_count(bus, queue.name) == 0


async def test_nacks_in_a_batch_go_out_before_the_ack_that_passes_them(bus: Bus) -> None:
    await fill(bus, "d", 20)
    channel = await bus.consumer_channel(prefetch=20)
    queue = await bus.declare_step("d", channel=channel)
    received: list[AbstractIncomingMessage] = []
    redelivered: list[AbstractIncomingMessage] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        (redelivered if message.redelivered else received).append(message)

    await queue.consume(on_message, no_ack=False)
    await wait_until(lambda: len(received) == 20, what="20 deliveries")
    for message in received:  # one turn: one batch holding both nacks and acks
        if message.body in (b'{"i":3}', b'{"i":11}'):
            bus.acker.nack(message, requeue=True)
        else:
            bus.acker.ack(message)
    await wait_until(lambda: len(redelivered) == 2, what="the 2 nacked messages again")
    assert sorted(m.body for m in redelivered) == [b'{"i":11}', b'{"i":3}']
    for message in redelivered:
        bus.acker.ack(message)
    await bus.acker.flush(everything=True)
    await channel.close()
    assert await message_count(bus, queue.name) == 0
