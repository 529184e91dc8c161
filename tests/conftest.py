"""Fixtures shared by every tier.

Each test module gets its own RabbitMQ vhost, each session a migrated template database; each
integration test gets a fresh database cloned from the template and its own bus prefix, so
tests never see each other's runs or messages, and parallel sessions never collide.

A vhost per module, not per session: the broker keeps every durable queue until its vhost
goes, and RabbitMQ 3.10 counts the queues' files against a limit derived from its open-files
ulimit (1024 here: 927 handles). A whole session's queues used them all up, after which the
broker accepted connections but never finished opening one (seen as `cistate serve did not
get ready` late in the session). Deleting each module's vhost gives them back.
A component that is not there fails the test loudly: nothing is skipped silently.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from cistate.adapters.postgres.store import Store, connect
from cistate.config import Settings

PG_ADMIN = os.environ.get("CISTATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("CISTATE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
SESSION = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"


def _pg_url(dbname: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + dbname


async def _admin(statement: str) -> None:
    """One statement on the server's admin database (CREATE/DROP DATABASE)."""
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    name = f"cistate-test-{SESSION}-{uuid.uuid4().hex[:6]}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    _rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="module")
def amqp_url(vhost: str) -> str:
    return f"{AMQP_BASE}/{quote(vhost, safe='')}"


@pytest.fixture(scope="session")
async def template_db() -> AsyncIterator[str]:
    name = f"cistate_tpl_{SESSION}"
    await _admin(f'CREATE DATABASE "{name}"')
    store = await connect(_pg_url(name), min_size=1, max_size=1)
    try:
        await store.migrate()
    finally:
        await store.close()
    yield name
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(template_db: str) -> AsyncIterator[str]:
    name = f"cistate_t_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield _pg_url(name)
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    s = await connect(database_url, min_size=1, max_size=4)
    yield s
    await s.close()


@pytest.fixture
def bus_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_settings(database_url: str, amqp_url: str, bus_prefix: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings for this test; write the pipeline YAML given (if any) to a file."""

    def make(pipeline_yaml: str | None = None, **overrides: object) -> Settings:
        pipeline: Path | None = None
        if pipeline_yaml is not None:
            pipeline = tmp_path / "pipeline.yaml"
            pipeline.write_text(pipeline_yaml)
        values: dict[str, object] = {
            "database_url": database_url,
            "rabbitmq_url": amqp_url,
            "bus_prefix": bus_prefix,
            "pipeline": pipeline,
            "workdir": tmp_path / "work",
            "listen": f"127.0.0.1:{free_port()}",
            # reads open, as scripts/run.sh has them; tests of read auth close them
            "api_read_auth": False,
            **overrides,
        }
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def visible_dir() -> Iterator[Path]:
    """A folder that sandboxed steps can see (read-only, like the rest of the host): outside
    /tmp, of which every sandbox has its own, and open to other users. Tests put files there
    that a step should find (an operator's fix, a marker)."""
    folder = Path("/var/lib") / f"cistate-test-{SESSION}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def host_pids(*argv: str) -> list[int]:
    """Host pids of the processes whose command line is exactly argv (a sandboxed step's
    processes have other pids inside its own PID namespace)."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == wanted:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a `cistate` subprocess these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CISTATE_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"CISTATE_{name.upper()}"] = str(value)
    return env


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = ""):  # type: ignore[no-untyped-def]
    """Poll an async predicate until it returns something truthy, or fail saying what."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)
