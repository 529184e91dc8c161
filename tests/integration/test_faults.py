"""The short fault suite (bench/faults.py is the long one): runs under load while cistate
processes are SIGKILLed and restarted and the connections to RabbitMQ and PostgreSQL are cut.
Afterwards every run has succeeded with a clean history, and nothing is left dead-lettered."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.integration.conftest import Producer, wait_for_run
from tests.integration.processes import ServeProcess
from tests.integration.test_processes import assert_clean_history
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

PIPELINE = """
name: faults
steps:
  - {name: fetch, uses: noop, retries: 3, backoff: {initial: 0.2}}
  - {name: work, uses: script, run: "sleep 0.2; echo worked", retries: 3, backoff: {initial: 0.2}}
  - {name: publish, uses: noop, retries: 3, backoff: {initial: 0.2}}
"""
STEPS = ["fetch", "work", "publish"]


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2
                                     else host))


@pytest.fixture
async def proxies() -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    pg = await TcpProxy("127.0.0.1", 5432).start()
    amqp = await TcpProxy("127.0.0.1", 5672).start()
    yield pg, amqp
    await pg.close()
    await amqp.close()


async def test_runs_survive_kills_and_connection_cuts(
        make_settings: Callable[..., Settings], producer: Producer, store: Store,
        proxies: tuple[TcpProxy, TcpProxy], tmp_path: Path, amqp_url: str,
        bus_prefix: str) -> None:
    pg, amqp = proxies
    base = make_settings(PIPELINE, worker_concurrency=8)
    settings = base.model_copy(update={
        "database_url": _through(base.database_url, pg.port),
        "rabbitmq_url": _through(base.rabbitmq_url, amqp.port),
    })
    roles = [("orchestrator",), ("orchestrator",), ("worker",), ("worker",)]
    procs = [await ServeProcess(settings, r, tmp_path / f"p{i}-0.log").start()
             for i, r in enumerate(roles)]
    rng = random.Random(7)
    kills = 0
    try:
        run_ids = await asyncio.gather(*(producer.push() for _ in range(30)))
        for round_ in range(1, 7):
            await asyncio.sleep(0.7)
            victim = rng.randrange(len(procs))
            procs[victim].kill()
            kills += 1
            procs[victim] = await ServeProcess(
                settings, roles[victim], tmp_path / f"p{victim}-{round_}.log").start()
            if round_ == 2:
                await amqp.cut(down_for=1.0)
            if round_ == 4:
                await pg.cut(down_for=1.0)
        for run_id in run_ids:
            run = await wait_for_run(store, run_id, timeout=120)
            assert run.status == "succeeded", (run_id, run.status, run.step)
            assert_clean_history(await store.events(run_id), STEPS)
    finally:
        for proc in procs:
            proc.stop()
    assert kills == 6 and amqp.cuts == 1 and pg.cuts == 1

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        dead = await channel.declare_queue(f"{bus_prefix}.dead", passive=True)
        assert dead.declaration_result.message_count == 0, "messages were dead-lettered"
    finally:
        await connection.close()
