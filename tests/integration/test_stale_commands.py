"""A step command that reaches a worker after its attempt's deadline is not run (real
RabbitMQ, a real worker): its worker was killed, the broker handed the command to another
once the attempt had timed out, and by then a lock the attempt held may be another run's
(found by the lock contention test: two runs' deploys ran at once)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from cistate.domain.messages import StepCommand
from tests.conftest import wait_until
from tests.integration.conftest import Producer, Serve
from tests.integration.test_metrics import samples

pytestmark = pytest.mark.integration

PIPELINE = """
name: d
steps:
  - {name: deploy, uses: noop}
"""


async def test_a_command_past_its_deadline_is_acked_and_not_run(
        serve: Serve, producer: Producer) -> None:
    settings = await serve(PIPELINE)
    now = datetime.now(UTC)
    for deadline, run in ((now - timedelta(seconds=5), "late"),
                          (now + timedelta(minutes=5), "in-time")):
        command = StepCommand(run_id=uuid.uuid5(uuid.NAMESPACE_URL, run), step="deploy",
                              attempt=1, uses="noop", timeout=30, deadline=deadline,
                              repo="https://git.example.com/a.git", ref="refs/heads/main",
                              commit="ab" * 20)
        await producer.publish("step.deploy.run", command.model_dump_json(by_alias=True)
                               .encode(), str(uuid.uuid4()), signed_by=settings,
                               sender="system")

    async with aiohttp.ClientSession() as http:
        async def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            async with http.get(f"http://{settings.listen}/metrics") as resp:
                got = samples(await resp.text())
            attempts = {labels: value for (name, labels), value in got.items()
                        if name == "cistate_step_attempts_total"}
            return got if sum(attempts.values()) >= 2 else None
        got = await wait_until(counted, 30, what="both commands handled")
    assert got[("cistate_step_attempts_total", (("status", "expired"), ("step", "deploy")))] \
        == 1
    assert got[("cistate_step_attempts_total", (("status", "succeeded"), ("step", "deploy")))] \
        == 1
