"""The outbox relay: publishes outbox rows that are due and not yet sent.

It covers what the fast path leaves: rows written by the API or CLI, delayed rows (retry
backoff, timeouts) when they fall due, and rows of an orchestrator that died between commit
and publish. It wakes on NOTIFY (on a dedicated connection: a pooled one is released with
UNLISTEN *) and polls anyway, so a missed notification only delays a row by one interval.
Several relays may run at once: rows are claimed with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import structlog

from cistate.adapters.postgres.store import NOTIFY_CHANNEL, Store
from cistate.adapters.rabbitmq.bus import Bus

log = structlog.get_logger("cistate.relay")


class Relay:
    """`held`: the outbox rows an orchestrator of this process is still publishing (it
    renews their lease in the table for the relays of other processes); this relay leaves
    them alone even when their lease has ended, as it may on a loaded machine."""

    def __init__(self, store: Store, bus: Bus, poll_interval: float = 0.5,
                 held: Callable[[], Sequence[int]] | None = None) -> None:
        self.store = store
        self.bus = bus
        self.poll_interval = poll_interval
        self.held = held
        self._wake = asyncio.Event()
        self.published = 0

    async def run_forever(self) -> None:
        listener = await self._listen()
        prune_every, cycles = 7200, 0
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                self._wake.clear()
                try:
                    while await self.publish_due() > 0:
                        pass
                    cycles += 1
                    if cycles % prune_every == 0:
                        await self.store.prune_outbox()
                        await self.store.prune_log_chunks()
                except (OSError, asyncpg.PostgresError, ConnectionError) as exc:
                    log.warning("relay pass failed; will try again", error=str(exc))
                if listener is None or listener.is_closed():
                    listener = await self._listen()
        finally:
            if listener is not None and not listener.is_closed():
                await listener.close()

    async def publish_due(self, limit: int = 500) -> int:
        """Publish one batch of due rows; returns how many."""
        skip = self.held() if self.held is not None else ()
        async with self.store.due_outbox(limit, skip) as rows:
            await asyncio.gather(*(
                self.bus.publish(row.routing_key, row.body, row.message_id) for row in rows))
        self.published += len(rows)
        return len(rows)

    async def _listen(self) -> asyncpg.Connection | None:
        try:
            conn = await asyncpg.connect(self.store.dsn)
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("cannot LISTEN for outbox rows; polling only", error=str(exc))
            return None
        return conn

    def _notified(self, *_: Any) -> None:
        self._wake.set()
