"""The `cistate` command as an operator uses it: real processes, real database and broker."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cistate.adapters.postgres.store import Store
from cistate.config import Settings
from tests.conftest import settings_env
from tests.integration.conftest import Serve, wait_for_run

pytestmark = pytest.mark.integration

PIPELINE = """
name: cli
steps:
  - name: hello
    uses: script
    run: echo "hello $CISTATE_COMMIT"
"""


def cistate(settings: Settings, *args: str, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "cistate", *args], capture_output=True, text=True,
        env={**settings_env(settings), **(env or {})}, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"cistate {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


async def test_push_then_list_show_events_logs_as_json(serve: Serve, store: Store) -> None:
    settings = await serve(PIPELINE)
    commit = "d4" * 20
    pushed = json.loads(cistate(settings, "push", "--repo", "https://git.example.com/a.git",
                                "--ref", "refs/heads/main", "--commit", commit,
                                "--json").stdout)
    run = await wait_for_run(store, uuid.UUID(pushed["run_id"]))
    assert run.status == "succeeded"

    listed = json.loads(cistate(settings, "runs", "list", "--json").stdout)
    assert [r["id"] for r in listed] == [pushed["run_id"]]
    assert listed[0]["commit"] == commit
    assert json.loads(cistate(settings, "runs", "list", "--state", "failed",
                              "--json").stdout) == []

    shown = json.loads(cistate(settings, "runs", "show", pushed["run_id"], "--json").stdout)
    assert shown["state"] == "succeeded"
    assert shown["steps"][0]["name"] == "hello"
    assert shown["steps"][0]["attempts"] == 1

    events = json.loads(cistate(settings, "runs", "events", pushed["run_id"], "--json").stdout)
    assert [e["type"] for e in events] == ["run.requested", "step.started", "step.succeeded",
                                           "run.succeeded"]
    assert {"position", "seq", "type", "data", "meta", "recorded_at"} <= set(events[0])

    logs = cistate(settings, "runs", "logs", pushed["run_id"], "hello").stdout
    assert f"hello {commit}" in logs

    table = cistate(settings, "runs", "show", pushed["run_id"]).stdout
    assert "hello" in table and "succeeded" in table


async def test_same_delivery_id_from_the_cli_opens_one_run(serve: Serve, store: Store) -> None:
    settings = await serve(PIPELINE)
    args = ("push", "--repo", "https://git.example.com/a.git", "--ref", "main",
            "--commit", "e5" * 20, "--delivery-id", "github-delivery-42", "--json")
    first = json.loads(cistate(settings, *args).stdout)
    second = json.loads(cistate(settings, *args).stdout)
    assert first["run_id"] == second["run_id"]
    await wait_for_run(store, uuid.UUID(first["run_id"]))
    assert len(await store.list_runs()) == 1


def test_bad_configuration_is_one_clear_line(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(PIPELINE)
    for env, expected in [
        ({"CISTATE_LISTEN": "nonsense"}, "CISTATE_LISTEN"),
        ({"CISTATE_DATABASE_URL": "mysql://x"}, "CISTATE_DATABASE_URL"),
        ({"CISTATE_WORKER_CONCURRENCY": "zero"}, "CISTATE_WORKER_CONCURRENCY"),
    ]:
        done = cistate(settings, "runs", "list", env=env, check=False)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("cistate: bad configuration: " + expected)
        assert "Traceback" not in done.stderr


def test_unreachable_database_is_one_clear_line_without_password(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(PIPELINE)
    done = cistate(settings, "runs", "list", check=False,
                   env={"CISTATE_DATABASE_URL": "postgresql://u:s3cret@127.0.0.1:1/x"})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "s3cret" not in done.stderr
    assert done.stderr.startswith("cistate: ")


def test_bad_pipeline_stops_serve_naming_file_step_and_field(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings("""
name: typo
steps:
  - name: build
    uses: script
    run: make
    retires: 2
""")
    done = cistate(settings, "serve", check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert str(settings.pipeline) in done.stderr
    assert "'build'" in done.stderr and "retires" in done.stderr and "unknown field" in done.stderr

    unknown = make_settings("""
name: unknown
steps:
  - name: ship
    uses: teleport
""")
    done = cistate(unknown, "serve", check=False)
    assert done.returncode == 2
    assert "'ship'" in done.stderr and "teleport" in done.stderr


def test_db_upgrade_creates_the_database_and_is_safe_twice(
        make_settings: Callable[..., Settings]) -> None:
    name = f"cistate_cli_{uuid.uuid4().hex[:8]}"
    base = make_settings(PIPELINE)
    settings = base.model_copy(update={
        "database_url": base.database_url.rsplit("/", 1)[0] + "/" + name})
    try:
        first = cistate(settings, "db", "upgrade")
        assert "applied: 001_events.sql" in first.stdout
        second = cistate(settings, "db", "upgrade")
        assert "up to date" in second.stdout
    finally:
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c",
                        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
                       capture_output=True, check=False)


def test_graph_draws_the_steps_and_their_needs_as_mermaid(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings("""
name: g
steps:
  - {name: unit-tests, uses: script, run: "true"}
  - {name: lint, uses: noop, needs: []}
  - {name: publish, uses: noop, needs: [unit-tests, lint], when: {branches: [main]}}
finally:
  - {name: report, uses: noop}
""")
    lines = cistate(settings, "graph").stdout.splitlines()
    assert lines[0] == "flowchart TD"
    assert '    s_unit_tests["unit-tests"]' in lines
    assert "    s_unit_tests --> s_publish" in lines and "    s_lint --> s_publish" in lines
    assert "    s_publish -.-> s_report" in lines
    machines = cistate(settings, "graph", "--machines").stdout
    assert "stateDiagram-v2" in machines
    assert "    running --> cancelled: finish" in machines  # the run's
    assert "    running --> retrying: fail" in machines  # a step's


def test_push_with_a_bad_commit_is_refused_before_publishing(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(PIPELINE)
    done = cistate(settings, "push", "--repo", "r", "--ref", "main", "--commit", "$(reboot)",
                   check=False)
    assert done.returncode == 2
    assert "--commit" in done.stderr
