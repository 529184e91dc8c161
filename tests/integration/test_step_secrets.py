"""Declared secrets reach the step that names them, masked in everything that leaves the
worker; scopes keep them from other repositories; `network: none` cuts the step off.

Real `cistate serve` (in this process) on real RabbitMQ and PostgreSQL; the steps run in the
real step sandbox (bubblewrap). The worker reads secrets from its environment
(`CISTATE_SECRET_<NAME>`) or from `CISTATE_SECRETS_DIR`, set here for each test.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from cistate.adapters.postgres.store import Store
from tests.integration.conftest import Producer, Serve, wait_for_run

pytestmark = pytest.mark.integration

# URL-encoding, JSON-escaping and base64 each change this value: every form is tried
TOKEN = 'tok/3n+Q="a\\b&c9-zeta'
KEY = "file-secret-7Hq2-lambda"
UNDECLARED = "undeclared-secret-9x-omega"

SECRETS = r"""
name: secrets
steps:
  - name: show
    uses: script
    secrets: [PROBE_TOKEN, {name: PROBE_KEY, as: file}]
    run: |
      printf 'plain=%s\n' "$PROBE_TOKEN"
      printf 'b64=%s\n' "$(printf %s "$PROBE_TOKEN" | base64)"
      printf 'echo-b64=%s\n' "$(printf '%s\n' "$PROBE_TOKEN" | base64)"
      python3 -c 'import os, urllib.parse; print("url=" + urllib.parse.quote(os.environ["PROBE_TOKEN"], safe=""))'
      python3 -c 'import json, os; print("json=" + json.dumps({"token": os.environ["PROBE_TOKEN"]}))'
      printf 'split='; printf %s "$PROBE_TOKEN" | head -c 9; sleep 0.5; printf %s "$PROBE_TOKEN" | tail -c +10; echo
      echo "file=$(cat "$PROBE_KEY_FILE")"
      echo "file-path=$PROBE_KEY_FILE"
      echo "undeclared=${PROBE_UNDECLARED:-absent}"
      env | sort | od -An -tx1 | tr -d ' \n'; echo
      printf '%s\n' "$PROBE_TOKEN" >&2
      exit 4
"""


def hexed(value: str) -> str:
    return value.encode().hex()


def forms(value: str) -> list[str]:
    return [value, base64.b64encode(value.encode()).decode().rstrip("="),
            quote(value, safe=""), json.dumps(value)[1:-1]]


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CISTATE_SECRET_PROBE_TOKEN", TOKEN)
    monkeypatch.setenv("CISTATE_SECRET_PROBE_KEY", KEY)
    monkeypatch.setenv("CISTATE_SECRET_PROBE_UNDECLARED", UNDECLARED)
    yield


def everything_stored(run: Any, events: list[Any], log: str) -> str:
    return json.dumps([[e.data for e in events], run.steps["show"].error, log], default=str)


async def test_declared_secrets_are_masked_in_every_form_and_undeclared_ones_are_absent(
        serve: Serve, producer: Producer, store: Store, secret_env: None) -> None:
    await serve(SECRETS)
    run_id = await producer.push()
    run = await wait_for_run(store, run_id)

    assert run.status == "failed"  # the script exits 4: its error carries the output tail
    [(_, log)] = await store.step_log(run_id, "show")
    lines = dict(line.split("=", 1) for line in log.splitlines() if "=" in line
                 and line.split("=", 1)[0] in {"plain", "b64", "echo-b64", "url", "json",
                                               "split", "file", "undeclared"})
    assert lines["plain"] == "***"
    assert lines["b64"].startswith("***") and lines["echo-b64"].startswith("***")
    assert lines["url"] == "***"
    assert lines["json"] == '{"token": "***"}'
    assert lines["split"] == "***", "a value split across two writes is still masked"
    assert lines["file"] == "***"
    assert lines["undeclared"] == "absent", "an undeclared secret is not in the environment"

    stored = everything_stored(run, await store.events(run_id), log)
    for value in (TOKEN, KEY, UNDECLARED):
        for form in forms(value):
            assert form not in stored, f"{form!r} of a secret left the worker"
    # the step's whole environment, hex-encoded so that masking cannot hide a leak
    assert hexed("PROBE_UNDECLARED") not in log and hexed(UNDECLARED) not in log
    assert hexed("PROBE_TOKEN=") in log, "the declared secret is in the environment"
    error = run.steps["show"].error
    assert error is not None and error["exit_code"] == 4
    assert "***" in error["output_tail"] and TOKEN not in error["output_tail"]
    file_path = next(line for line in log.splitlines() if line.startswith("file-path="))
    assert not Path(file_path.split("=", 1)[1]).exists(), "secret files go with the attempt"


SCOPED = """
name: scoped
steps:
  - name: publish
    uses: script
    secrets: [PROBE_TOKEN]
    run: echo "this must not run"
"""


async def test_a_secret_outside_its_repo_scope_fails_the_step_before_anything_runs(
        serve: Serve, producer: Producer, store: Store, secret_env: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISTATE_SECRET_SCOPES",
                       json.dumps({"PROBE_TOKEN": ["https://git.example.com/trusted/*"]}))
    await serve(SCOPED)
    allowed = await producer.push(repo="https://git.example.com/trusted/app.git")
    refused = await producer.push(repo="https://git.example.com/forked/app.git")

    assert (await wait_for_run(store, allowed)).status == "succeeded"
    run = await wait_for_run(store, refused)
    assert run.status == "failed"
    error = run.steps["publish"].error
    assert error is not None and not error["retryable"]
    assert "PROBE_TOKEN" in error["message"]
    assert "https://git.example.com/forked/app.git may not use" in error["message"]
    assert "https://git.example.com/trusted/*" in error["message"]
    [(_, log)] = await store.step_log(refused, "publish")
    assert "this must not run" not in log


MISSING = """
name: missing
steps:
  - name: publish
    uses: script
    secrets: [NOT_ON_THIS_WORKER]
    run: echo "this must not run"
"""


async def test_a_missing_or_too_short_secret_fails_naming_it(
        serve: Serve, producer: Producer, store: Store, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Secrets the worker had at start (its check passed) and lost since: the step fails
    before anything runs, naming the secret and where it must be."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "SHORT").write_text("long-enough-at-start\n")
    monkeypatch.setenv("CISTATE_SECRETS_DIR", str(secrets_dir))
    monkeypatch.setenv("CISTATE_SECRET_NOT_ON_THIS_WORKER", "there-at-start-1234")
    await serve(MISSING + """
  - name: short
    uses: script
    secrets: [SHORT]
    run: echo never
""")
    monkeypatch.delenv("CISTATE_SECRET_NOT_ON_THIS_WORKER")
    (secrets_dir / "SHORT").write_text("abc\n")
    run = await wait_for_run(store, await producer.push())
    error = run.steps["publish"].error
    assert run.status == "failed" and error is not None
    assert "NOT_ON_THIS_WORKER" in error["message"]
    assert str(secrets_dir) in error["message"]
    assert "CISTATE_SECRET_NOT_ON_THIS_WORKER" in error["message"]
    [(_, log)] = await store.step_log(run.id, "publish")
    assert "this must not run" not in log


async def test_a_worker_missing_a_declared_secret_does_not_start(
        serve: Serve, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cistate.config import ConfigError

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "SHORT").write_text("abc")
    monkeypatch.setenv("CISTATE_SECRETS_DIR", str(tmp_path / "secrets"))
    with pytest.raises(ConfigError) as refused:
        await serve(MISSING + """
  - {name: short, uses: script, secrets: [SHORT], run: echo never}
""")
    lines = str(refused.value).splitlines()
    assert any("step 'publish': secret NOT_ON_THIS_WORKER is not on this worker" in line
               for line in lines), lines
    assert any("step 'short': secret SHORT is shorter than 4" in line for line in lines), lines


@pytest.fixture
def mounted_secrets() -> Iterator[Path]:
    """A secrets folder laid out as a Kubernetes Secret volume is by default: a folder others
    may enter, files others may read (mode 0644), outside /tmp."""
    folder = Path("/var/lib") / f"cistate-test-secrets-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_secrets_dir_values_are_used_masked_and_hidden_from_the_step(
        serve: Serve, producer: Producer, store: Store, monkeypatch: pytest.MonkeyPatch,
        mounted_secrets: Path) -> None:
    (mounted_secrets / "DIR_TOKEN").write_text("from-the-directory-42\n")  # as `echo >` does
    (mounted_secrets / "OTHER_TOKEN").write_text("another-teams-token-17\n")
    for path in mounted_secrets.iterdir():
        path.chmod(0o644)
    monkeypatch.setenv("CISTATE_SECRETS_DIR", str(mounted_secrets))
    await serve(f"""
name: from-dir
steps:
  - name: use
    uses: script
    secrets: [DIR_TOKEN]
    run: |
      test "$DIR_TOKEN" = from-the-directory-42 && echo "value=$DIR_TOKEN"
      ls -a {mounted_secrets} | sed 's/^/listing:/'
      cat {mounted_secrets}/OTHER_TOKEN | od -An -tx1 | tr -d ' \\n'; echo
""")
    run = await wait_for_run(store, await producer.push())
    [(_, log)] = await store.step_log(run.id, "use")
    assert run.status == "succeeded", log
    assert "value=***" in log and "from-the-directory-42" not in log
    assert "listing:DIR_TOKEN" not in log and "listing:OTHER_TOKEN" not in log, (
        "the secrets directory is hidden from the step")
    assert b"another-teams-token-17".hex() not in log


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


NETWORK = """
name: network
steps:
  - name: online
    uses: script
    run: python3 -c 'import socket; socket.create_connection(("127.0.0.1", {port}), 5); print("connected")'
  - name: offline
    uses: script
    network: none
    run: python3 -c 'import socket; socket.create_connection(("127.0.0.1", {port}), 5); print("connected")'
"""


async def test_network_none_gives_the_step_no_network(
        serve: Serve, producer: Producer, store: Store, listener: int) -> None:
    await serve(NETWORK.format(port=listener))
    run = await wait_for_run(store, await producer.push())

    [(_, online)] = await store.step_log(run.id, "online")
    assert run.steps["online"].state == "succeeded" and "connected" in online.splitlines()
    assert run.status == "failed" and run.steps["offline"].state == "failed"
    [(_, offline)] = await store.step_log(run.id, "offline")
    assert "connected" not in offline.splitlines()
    assert "ConnectionRefusedError" in offline or "Network is unreachable" in offline, offline


async def test_unsandboxed_steps_are_said_once_at_start(
        serve: Serve, producer: Producer, store: Store, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CISTATE_SANDBOX", "none")
    await serve("""
name: trusted
steps:
  - name: who
    uses: script
    run: id -u
""")
    run = await wait_for_run(store, await producer.push())
    [(_, log)] = await store.step_log(run.id, "who")
    assert run.status == "succeeded"
    assert "\n0\n" in f"\n{log}", "without the sandbox the step runs as the worker's user"
    said = capsys.readouterr()
    assert (said.out + said.err).count("steps run unsandboxed") == 1


async def test_a_sandbox_that_cannot_start_fails_the_step_and_runs_nothing(
        serve: Serve, producer: Producer, store: Store, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    marker = tmp_path / f"ran-{uuid.uuid4().hex}"
    monkeypatch.setenv("CISTATE_SANDBOX_BWRAP", str(tmp_path / "no-such-bwrap"))
    await serve(f"""
name: broken-sandbox
steps:
  - name: touch
    uses: script
    run: touch {marker}
""")
    run = await wait_for_run(store, await producer.push())
    error = run.steps["touch"].error
    assert run.status == "failed" and error is not None and not error["retryable"]
    assert "the step sandbox could not start" in error["message"]
    assert "no-such-bwrap" in error["message"]
    assert not marker.exists(), "nothing ran unsandboxed"
