"""Two orchestrators share the runs (real PostgreSQL): each decides on its cached copy of a
run, and a decision that stores nothing must not be made on a copy the other has moved past
(found by the lock contention test: a grant or a retry timer dropped as "stale" stranded the
run). Here the two are Orchestrator objects in one process, each with its own cache."""

from __future__ import annotations

import uuid

import pytest

from cistate.adapters.postgres.store import Store
from cistate.domain import pipeline as p
from cistate.domain import run as r
from cistate.domain.messages import Control, Push, StepError, StepResult
from cistate.service.orchestrator import Orchestrator

pytestmark = pytest.mark.integration

FLAKY = p.parse("""
name: flaky
steps:
  - {name: deploy, uses: noop, retries: 1, backoff: {initial: 1s, jitter: 0}}
""", "flaky.yaml", {"noop"})


async def test_a_timer_reaching_the_orchestrator_with_a_stale_copy_is_not_dropped(
        store: Store) -> None:
    first, second = (Orchestrator(store, r.Decider(FLAKY)) for _ in range(2))
    push = Push(repo="https://git.example.com/acme/app.git", ref="refs/heads/main",
                commit="c" * 40)
    opened = await first.submit(push, uuid.uuid4())
    run_id = opened.run_id
    assert opened.state is not None and opened.state.steps["deploy"].state == "running"
    # the other orchestrator records the failure: a retry is due in a second
    failed = StepResult(run_id=run_id, step="deploy", attempt=1, status="failed",
                        error=StepError(message="flaky", retryable=True))
    recorded = await second.submit(failed, uuid.uuid4(), actor="handler:w1")
    assert recorded.state is not None and recorded.state.steps["deploy"].state == "retrying"
    # the retry timer reaches the first, whose cached copy still has attempt 1 running
    due = Control(run_id=run_id, action="retry_due", step="deploy", attempt=2)
    outcome = await first.submit(due, uuid.uuid4())
    assert outcome.status == "recorded", outcome.detail
    stored = await store.load(run_id)
    assert stored is not None
    assert (stored.steps["deploy"].state, stored.steps["deploy"].attempts) == ("running", 2)
