"""GET /metrics against the real service: what Prometheus would scrape after real runs."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cistate.adapters.postgres.store import Store
from tests.conftest import wait_until
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

PIPELINE = """
name: m
steps:
  - {name: fetch, uses: noop}
  - name: check
    uses: script
    run: "exit 3"
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_this_process_work_and_read_the_store(
        serve: Serve, producer: Producer, store: Store) -> None:
    settings = await serve(PIPELINE)
    runs = [await producer.push() for _ in range(3)]
    for run_id in runs:
        assert (await wait_for_run(store, run_id)).status == "failed"
    await producer.publish("push", b"not json", "bad-1")  # dead-lettered

    async with aiohttp.ClientSession() as http:
        async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            async with http.get(f"http://{settings.listen}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                got = samples(await resp.text())
            # counts move just after the store does (an ack, a confirm): wait for the last.
            # Live-log pieces are deliveries too, so the total alone can be reached before
            # the bad message is handled: wait for its dead letter as well.
            settled = (got.get(("cistate_deliveries_finished_total", ()), 0) >= 16
                       and ("cistate_messages_total", (("outcome", "dead_lettered"),)) in got)
            return got if settled else None

        got = await wait_until(scrape, timeout=10, what="every delivery counted")

    assert got[("cistate_runs", (("state", "failed"),))] == 3
    assert got[("cistate_runs", (("state", "running"),))] == 0
    # a push and two results per run
    assert got[("cistate_messages_total", (("outcome", "recorded"),))] == 9
    assert got[("cistate_messages_total", (("outcome", "dead_lettered"),))] == 1
    assert got[("cistate_step_attempts_total", (("status", "succeeded"), ("step", "fetch")))] \
        == 3
    assert got[("cistate_step_attempts_total", (("status", "failed"), ("step", "check")))] == 3
    assert got[("cistate_outbox_due_messages", ())] == 0
    assert got[("cistate_outbox_oldest_due_seconds", ())] == 0
    # 9 + 1 orchestrator messages and 6 commands were acked (a command the relay published
    # again after a stall would add a duplicate); batching may use fewer frames
    finished = got[("cistate_deliveries_finished_total", ())]
    assert finished >= 16
    assert 1 <= got[("cistate_ack_frames_total", ())] <= finished


async def test_metrics_need_a_token_when_reads_do(serve: Serve) -> None:
    settings = await serve(PIPELINE, api_token="prom:scrape-token", api_read_auth=True)
    async with aiohttp.ClientSession() as http:
        url = f"http://{settings.listen}/metrics"
        async with http.get(url) as resp:
            assert resp.status == 401
        async with http.get(url, headers={"Authorization": "Bearer scrape-token"}) as resp:
            assert resp.status == 200
            assert "cistate_runs" in await resp.text()
