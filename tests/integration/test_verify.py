"""Tamper evidence end to end: a real run through the service, its events then changed in
PostgreSQL by someone holding the database URL (their own connection, plain SQL), and
`cistate audit verify`, `GET /api/v1/runs/{id}/verify` and `cistate projections rebuild`
finding each change by run and seq."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import aiohttp
import asyncpg
import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.conftest import settings_env
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

# run.requested + step.started a, step.succeeded a + step.started b, step.succeeded b +
# run.succeeded: 6 events, decided two at a time (the store chains them within a decision)
PIPELINE = """
name: chained
steps:
  - {name: a, uses: noop}
  - {name: b, uses: noop}
"""
EVENTS = 6
MISMATCH, MISSING = "hash mismatch", "missing"

# what the attacker runs ($1 is the run), what verify names (seq, kind of problem), and
# whether the rebuild sees it (a deleted last event shows only against the runs row, which
# the rebuild is there to repair, so it cannot take the row's word for it)
TAMPERING: dict[str, tuple[list[str], list[tuple[int, str]], bool]] = {
    "edited data": (
        ["""UPDATE events SET data = jsonb_set(data, '{outputs}', '{"image": "evil:latest"}')
            WHERE run_id = $1 AND seq = 3"""],
        [(3, MISMATCH)], True),
    "deleted event": (
        ["DELETE FROM events WHERE run_id = $1 AND seq = 3"],
        [(3, MISSING), (4, MISMATCH)], True),
    "swapped seqs": (
        ["UPDATE events SET seq = -2 WHERE run_id = $1 AND seq = 2",
         "UPDATE events SET seq = 2 WHERE run_id = $1 AND seq = 4",
         "UPDATE events SET seq = 4 WHERE run_id = $1 AND seq = -2"],
        [(2, MISMATCH), (3, MISMATCH), (4, MISMATCH), (5, MISMATCH)], True),
    "deleted last event": (
        [f"DELETE FROM events WHERE run_id = $1 AND seq = {EVENTS}"],
        [(EVENTS, MISSING)], False),
    "inserted event": (
        [f"""INSERT INTO events (run_id, seq, type, data, meta, message_id, recorded_at, hash)
             SELECT run_id, {EVENTS + 1}, 'run.retried', '{{"from_step": "a"}}', meta,
                    gen_random_uuid(), recorded_at, sha256('forged')
             FROM events WHERE run_id = $1 AND seq = {EVENTS}"""],
        [(EVENTS + 1, MISMATCH)], True),
}


def cistate(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cistate", *args], capture_output=True,
                          text=True, env=settings_env(settings), timeout=60)


async def verify_over_http(settings: Settings, run_id: uuid.UUID) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://{settings.listen}/api/v1/runs/{run_id}/verify") as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, object] = await resp.json()
        return answer


def kinds(problems: object) -> list[tuple[int, str]]:
    assert isinstance(problems, list)
    return [(p["seq"], p["problem"].split(":")[0]) for p in problems]


async def two_runs(serve: Serve, producer: Producer, store: Store) -> tuple[Settings, uuid.UUID,
                                                                             uuid.UUID]:
    settings = await serve(PIPELINE)
    runs = [await producer.push(), await producer.push()]
    for run_id in runs:
        assert (await wait_for_run(store, run_id)).status == "succeeded"
        assert len(await store.events(run_id)) == EVENTS
    return settings, runs[0], runs[1]


async def test_untouched_runs_verify_clean(serve: Serve, producer: Producer,
                                           store: Store) -> None:
    settings, first, second = await two_runs(serve, producer, store)

    done = cistate(settings, "audit", "verify")
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"2 runs, {2 * EVENTS} events verified\n", "")
    one = cistate(settings, "audit", "verify", str(first), "--json")
    assert one.returncode == 0
    assert json.loads(one.stdout) == {"run_id": str(first), "ok": True, "events": EVENTS,
                                      "problems": []}
    assert await verify_over_http(settings, second) == {
        "run_id": str(second), "ok": True, "events": EVENTS, "problems": []}
    assert cistate(settings, "projections", "rebuild").returncode == 0
    listed = cistate(settings, "audit", "--run", str(first), "--json")  # the events, as before
    assert [e["seq"] for e in json.loads(listed.stdout)] == list(range(EVENTS, 0, -1))
    unknown = cistate(settings, "audit", "verify", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "no run" in unknown.stderr


@pytest.mark.parametrize("tampering", list(TAMPERING))
async def test_a_change_in_the_database_is_named_by_run_and_seq(
        serve: Serve, producer: Producer, store: Store, tampering: str) -> None:
    statements, expected, rebuild_sees_it = TAMPERING[tampering]
    settings, victim, bystander = await two_runs(serve, producer, store)
    row_before = await store.load(victim)
    attacker = await asyncpg.connect(settings.database_url)
    try:
        for statement in statements:
            await attacker.execute(statement, victim)
    finally:
        await attacker.close()

    done = cistate(settings, "audit", "verify")
    assert done.returncode == 1, done.stdout + done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        f"run {victim} seq {seq}" for seq, _ in expected]
    assert "1 of 2 runs" in done.stderr and "Traceback" not in done.stderr
    report = json.loads(cistate(settings, "audit", "verify", "--json").stdout)
    assert report["runs"] == 2 and report["ok"] is False
    assert [check["run_id"] for check in report["broken"]] == [str(victim)]
    assert kinds(report["broken"][0]["problems"]) == expected

    one = cistate(settings, "audit", "verify", str(victim), "--json")
    assert one.returncode == 1 and kinds(json.loads(one.stdout)["problems"]) == expected
    assert cistate(settings, "audit", "verify", str(bystander)).returncode == 0
    answer = await verify_over_http(settings, victim)
    assert answer["ok"] is False and kinds(answer["problems"]) == expected
    assert (await verify_over_http(settings, bystander))["ok"] is True

    rebuilt = cistate(settings, "projections", "rebuild")
    if rebuild_sees_it:
        assert rebuilt.returncode == 1, rebuilt.stdout + rebuilt.stderr
        assert f"did not fold run {victim} (its row was left as it is): broken hash chain" \
            in rebuilt.stderr
        assert str(bystander) not in rebuilt.stderr
        assert await store.load(victim) == row_before
    else:
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
