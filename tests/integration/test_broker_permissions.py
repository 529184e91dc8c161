"""Least privilege on the broker, on real RabbitMQ: the users that scripts/rabbitmq-users.sh
makes (and compose.yaml's definitions, which must say the same) let each role do its work and
nothing more. Every refusal is checked as the broker's own ACCESS_REFUSED for that user and
that exchange, queue or routing key, so a wider permission fails the test."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import aio_pika
import aiohttp
import aiormq.exceptions
import pytest
import yaml
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from cistate.adapters.postgres.store import Store
from cistate.adapters.rabbitmq.bus import Bus
from cistate.adapters.rabbitmq.signing import Signer
from cistate.config import Settings
from tests.conftest import AMQP_BASE, SESSION, settings_env, wait_until
from tests.integration.conftest import wait_for_run
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rabbitmq-users.sh"
ROLES = ("producer", "api", "orchestrator", "worker")
PASSWORD_VARIABLES = {role: f"CISTATE_RABBITMQ_{role.upper()}_PASSWORD" for role in ROLES}
TOKEN = "broker-permissions-token"
PIPELINE = """
name: perms
steps:
  - name: hello
    uses: script
    run: echo "hello $CISTATE_COMMIT"
"""


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "--quiet", *args], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def rabbitmqctl_all(commands: list[list[str]]) -> None:
    """Several rabbitmqctl calls side by side (each takes a second or two)."""
    running = [subprocess.Popen(["rabbitmqctl", "--quiet", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for args in commands]
    failed = [f"{' '.join(args)}: {proc.communicate(timeout=60)[1].strip()}"
              for args, proc in zip(commands, running, strict=True)
              if proc.wait(timeout=60) != 0]
    assert not failed, failed


@dataclass(frozen=True)
class Users:
    vhost: str
    prefix: str  # CISTATE_BUS_PREFIX the permissions are for
    user_prefix: str
    passwords: dict[str, str]

    def name(self, role: str) -> str:
        return f"{self.user_prefix}{role}"

    def url(self, role: str) -> str:
        base = urlsplit(AMQP_BASE)
        return (f"amqp://{quote(self.name(role), safe='')}:{quote(self.passwords[role], safe='')}"
                f"@{base.hostname}:{base.port or 5672}/{quote(self.vhost, safe='')}")


def run_script(vhost: str, prefix: str, user_prefix: str,
               passwords: dict[str, str]) -> str:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CISTATE_RABBITMQ_USER_PREFIX": user_prefix,
           **{PASSWORD_VARIABLES[role]: password for role, password in passwords.items()}}
    done = subprocess.run(["bash", str(SCRIPT), vhost, prefix], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def users(vhost: str) -> Iterator[Users]:
    """The script's four users on the session's vhost, for a prefix of this module's own.
    The producer's password is the one the script makes and prints; the others are given."""
    prefix = f"perm{uuid.uuid4().hex[:8]}"
    user_prefix = f"cistate-t{SESSION}-"
    given = {role: f"{role}-{uuid.uuid4().hex}" for role in ("api", "orchestrator", "worker")}
    out = run_script(vhost, prefix, user_prefix, given)
    made = re.search(rf"^{re.escape(user_prefix)}producer: created; password \(shown once\): "
                     r"(\S+)$", out, re.MULTILINE)
    assert made, f"the script did not print the producer's new password:\n{out}"
    try:
        yield Users(vhost, prefix, user_prefix, {**given, "producer": made.group(1)})
    finally:
        rabbitmqctl_all([["delete_user", f"{user_prefix}{role}"] for role in ROLES])


async def declare_topology(amqp_url: str, prefix: str, steps: list[str]) -> None:
    """cistate's exchanges and queues, declared as the orchestrator does (here as guest)."""
    bus = Bus(amqp_url, prefix, Signer(b"declaring-only-0123456789"))
    await bus.connect()
    try:
        await bus.declare_all(steps)
    finally:
        await bus.close()


async def delete_topology(amqp_url: str, prefix: str, steps: list[str]) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for queue in ("orchestrator", "dead", *(f"step.{step}" for step in steps)):
            await channel.queue_delete(f"{prefix}.{queue}")
        for exchange in (prefix, f"{prefix}.dead"):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


@pytest.fixture
async def topology(amqp_url: str, users: Users) -> None:
    await declare_topology(amqp_url, users.prefix, ["x"])


# -- what each role may not do, and may

Operation = Callable[[AbstractChannel, str], Awaitable[object]]


def publish(exchange: str, routing_key: str) -> Operation:
    async def operation(channel: AbstractChannel, prefix: str) -> object:
        target = await channel.get_exchange(exchange.format(p=prefix), ensure=False)
        return await target.publish(aio_pika.Message(b"{}", message_id=str(uuid.uuid4())),
                                    routing_key)
    return operation


async def leave(message: AbstractIncomingMessage) -> None:
    """A consumer that takes nothing: the message goes back when the connection closes."""


def consume(queue: str) -> Operation:
    async def operation(channel: AbstractChannel, prefix: str) -> object:
        found = await channel.get_queue(queue.format(p=prefix))  # passive: needs no right
        return await found.consume(leave)
    return operation


def bind(queue: str, routing_key: str) -> Operation:
    async def operation(channel: AbstractChannel, prefix: str) -> object:
        found = await channel.get_queue(queue.format(p=prefix))
        return await found.bind(prefix, routing_key)
    return operation


def declare_exchange(exchange: str) -> Operation:
    async def operation(channel: AbstractChannel, prefix: str) -> object:
        return await channel.declare_exchange(exchange.format(p=prefix),
                                              aio_pika.ExchangeType.TOPIC, durable=True)
    return operation


def declare_queue(queue: str, **kwargs: object) -> Operation:
    async def operation(channel: AbstractChannel, prefix: str) -> object:
        return await channel.declare_queue(queue.format(p=prefix), **kwargs)  # type: ignore[arg-type]
    return operation


def step_queue(step: str) -> Operation:
    async def operation(channel: AbstractChannel, prefix: str) -> object:
        bus = Bus("amqp://unused", prefix)  # only for the queue's arguments, as the worker's
        return await bus.declare_step(step, channel=channel)
    return operation


TOPIC = "access to topic '{key}' in exchange '{p}'"
QUEUE = "access to queue '{name}'"
EXCHANGE = "access to exchange '{name}'"

REFUSED: list[tuple[str, str, Operation, str]] = [
    ("producer", "publish step.x.result", publish("{p}", "step.x.result"),
     TOPIC.format(key="step.x.result", p="{p}")),
    ("producer", "publish step.x.run", publish("{p}", "step.x.run"),
     TOPIC.format(key="step.x.run", p="{p}")),
    ("producer", "publish control", publish("{p}", "control"),
     TOPIC.format(key="control", p="{p}")),
    ("producer", "read a command", consume("{p}.step.x"), QUEUE.format(name="{p}.step.x")),
    ("producer", "read pushes and results", consume("{p}.orchestrator"),
     QUEUE.format(name="{p}.orchestrator")),
    ("producer", "declare the exchange", declare_exchange("{p}"),
     EXCHANGE.format(name="{p}")),
    ("producer", "dead-letter", publish("{p}.dead", "push"), EXCHANGE.format(name="{p}.dead")),
    ("worker", "publish step.x.run", publish("{p}", "step.x.run"),
     TOPIC.format(key="step.x.run", p="{p}")),
    ("worker", "publish control", publish("{p}", "control"),
     TOPIC.format(key="control", p="{p}")),
    ("worker", "publish push", publish("{p}", "push"), TOPIC.format(key="push", p="{p}")),
    ("worker", "publish cancel", publish("{p}", "cancel"), TOPIC.format(key="cancel", p="{p}")),
    ("worker", "read pushes and results", consume("{p}.orchestrator"),
     QUEUE.format(name="{p}.orchestrator")),
    ("worker", "bind its queue to results", bind("{p}.step.x", "step.*.result"),
     TOPIC.format(key="step.*.result", p="{p}")),
    ("worker", "bind its queue to everything", bind("{p}.step.x", "#"),
     TOPIC.format(key="#", p="{p}")),
    ("worker", "declare the exchange", declare_exchange("{p}"), EXCHANGE.format(name="{p}")),
    ("worker", "declare the orchestrator's queue", declare_queue("{p}.orchestrator"),
     QUEUE.format(name="{p}.orchestrator")),
    ("api", "publish step.x.run", publish("{p}", "step.x.run"),
     TOPIC.format(key="step.x.run", p="{p}")),
    ("api", "publish step.x.result", publish("{p}", "step.x.result"),
     TOPIC.format(key="step.x.result", p="{p}")),
    ("api", "publish cancel", publish("{p}", "cancel"), TOPIC.format(key="cancel", p="{p}")),
    ("api", "read a command", consume("{p}.step.x"), QUEUE.format(name="{p}.step.x")),
    ("api", "declare the exchange", declare_exchange("{p}"), EXCHANGE.format(name="{p}")),
    ("orchestrator", "declare another prefix's exchange", declare_exchange("other{p}"),
     EXCHANGE.format(name="other{p}")),
]

ALLOWED: list[tuple[str, str, Operation]] = [
    ("producer", "publish push", publish("{p}", "push")),
    ("api", "publish push", publish("{p}", "push")),
    ("api", "publish control", publish("{p}", "control")),
    ("worker", "publish step.x.result", publish("{p}", "step.x.result")),
    ("worker", "dead-letter a command", publish("{p}.dead", "step.x.run")),
    ("worker", "declare its step queue", step_queue("x")),
    ("worker", "read its commands", consume("{p}.step.x")),
    ("worker", "declare its cancel queue", declare_queue("{p}.cancel.host.example-1",
                                                         exclusive=True, auto_delete=True)),
    ("orchestrator", "publish step.x.run", publish("{p}", "step.x.run")),
    ("orchestrator", "publish cancel", publish("{p}", "cancel")),
    ("orchestrator", "read pushes and results", consume("{p}.orchestrator")),
]


@pytest.mark.parametrize(("role", "what", "operation", "refusal"), REFUSED,
                         ids=[f"{role} may not {what}" for role, what, _, _ in REFUSED])
async def test_the_broker_refuses_what_a_role_may_not_do(
        users: Users, topology: None, role: str, what: str, operation: Operation,
        refusal: str) -> None:
    connection = await aio_pika.connect(users.url(role))
    try:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
            await operation(channel, users.prefix)
    finally:
        await connection.close()
    expected = (f"ACCESS_REFUSED - {refusal.format(p=users.prefix)} in vhost '{users.vhost}' "
                f"refused for user '{users.name(role)}'")
    assert expected in str(refused.value)


@pytest.mark.parametrize(("role", "what", "operation"), ALLOWED,
                         ids=[f"{role} may {what}" for role, what, _ in ALLOWED])
async def test_each_role_may_do_its_own_work(users: Users, topology: None, role: str,
                                             what: str, operation: Operation) -> None:
    connection = await aio_pika.connect(users.url(role))
    try:
        channel = await connection.channel(publisher_confirms=True)
        await operation(channel, users.prefix)
    finally:
        await connection.close()


# -- cistate itself on these users


async def test_a_producers_push_runs_on_the_orchestrator_and_worker_users(
        users: Users, make_settings: Callable[..., Settings], store: Store, amqp_url: str,
        tmp_path: Path) -> None:
    await delete_topology(amqp_url, users.prefix, ["hello"])
    base = make_settings(PIPELINE, bus_prefix=users.prefix, api_token=f"ops:{TOKEN}")

    def as_role(role: str) -> Settings:
        return base.model_copy(update={"rabbitmq_url": users.url(role)})

    # Each process also runs the api role (ServeProcess adds it, as the chart does); the
    # worker starts first and waits, declaring nothing it may not.
    worker = ServeProcess(as_role("worker"), ("worker",), tmp_path / "worker.log")
    worker_ready = asyncio.create_task(worker.start())
    processes = [worker]
    try:
        async def worker_waits() -> bool:
            assert not worker_ready.done() or worker_ready.result() is None
            return (tmp_path / "worker.log").exists() and (
                "waiting for the orchestrator to declare the exchanges" in worker.log())

        await wait_until(worker_waits, timeout=30, what="the worker to wait for the exchanges")
        processes.append(await ServeProcess(as_role("orchestrator"), ("orchestrator",),
                                            tmp_path / "orchestrator.log").start())
        await worker_ready
        api = await ServeProcess(as_role("api"), ("api",), tmp_path / "api.log").start()
        processes.append(api)

        pushed = subprocess.run(
            [sys.executable, "-m", "cistate", "push", "--repo",
             "https://git.example.com/team/app.git", "--ref", "refs/heads/main",
             "--commit", "c0" * 20, "--json"],
            env=settings_env(as_role("producer")), capture_output=True, text=True, timeout=60)
        assert pushed.returncode == 0, pushed.stderr
        run = await wait_for_run(store, uuid.UUID(json.loads(pushed.stdout)["run_id"]))
        assert run.status == "succeeded", run.to_json()

        # An operator request to an api-only process, whose user may not publish commands:
        # the orchestrator's relay publishes them.
        async with aiohttp.ClientSession() as http, http.post(
                f"http://{api.settings.listen}/api/v1/runs/{run.id}/rerun",
                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 201, await resp.text()
            rerun_id = uuid.UUID((await resp.json())["id"])
        rerun = await wait_for_run(store, rerun_id)
        assert rerun.status == "succeeded", rerun.to_json()
    finally:
        worker_ready.cancel()
        for process in processes:
            process.stop()
    for process in processes:
        assert "ACCESS_REFUSED" not in process.log(), process.log()[-3000:]


def push(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cistate", "push", "--repo",
         "https://git.example.com/team/app.git", "--ref", "refs/heads/main", "--commit",
         "d1" * 20], env=settings_env(settings), capture_output=True, text=True, timeout=60)


async def test_cistate_push_declares_nothing_and_says_why_a_push_was_not_published(
        users: Users, make_settings: Callable[..., Settings], amqp_url: str) -> None:
    producer = make_settings(bus_prefix=users.prefix, rabbitmq_url=users.url("producer"))
    await delete_topology(amqp_url, users.prefix, ["x"])
    done = push(producer)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"push not published: exchange '{users.prefix}' is not on the broker"
            in done.stderr), done.stderr
    assert "start `cistate serve --role orchestrator`" in done.stderr

    # the exchanges, but no queue bound for push: the broker would drop it
    bus = Bus(amqp_url, users.prefix)
    await bus.connect()
    await bus.close()
    done = push(producer)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "push not published: no queue on the broker" in done.stderr, done.stderr

    # a user that may not publish pushes
    await declare_topology(amqp_url, users.prefix, [])
    done = push(producer.model_copy(update={"rabbitmq_url": users.url("worker")}))
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"ACCESS_REFUSED - access to topic 'push' in exchange '{users.prefix}'"
            in done.stderr), done.stderr
    assert push(producer).returncode == 0


# -- the script and compose.yaml


def permissions(vhost: str) -> dict[str, tuple[str, ...]]:
    """user -> (configure, write, read) and user@exchange -> (write, read) on the broker."""
    found: dict[str, tuple[str, ...]] = {}
    for line in rabbitmqctl("list_permissions", "--no-table-headers", "-p", vhost).splitlines():
        user, *rights = line.split("\t")
        found[user] = tuple(rights)
    for line in rabbitmqctl("list_topic_permissions", "--no-table-headers", "-p",
                            vhost).splitlines():
        user, exchange, *rights = line.split("\t")
        found[f"{user}@{exchange}"] = tuple(rights)
    return found


async def test_the_script_run_again_keeps_passwords_and_permissions(users: Users) -> None:
    before = permissions(users.vhost)
    out = run_script(users.vhost, users.prefix, users.user_prefix, {})
    assert out.count("exists; password unchanged") == 4, out
    assert permissions(users.vhost) == before
    assert before[users.name("producer")] == ("^$", f"^{users.prefix}$", "^$")
    for role in ROLES:  # every password still the one it was
        connection = await aio_pika.connect(users.url(role))
        await connection.close()


def interpolate(text: str) -> str:
    """What Docker Compose makes of `${NAME:-default}` (unset NAME) and `$$`."""
    done = re.sub(r"\$\$|\$\{[A-Z0-9_]+:-([^}]*)\}",
                  lambda m: "$" if m.group(0) == "$$" else m.group(1), text)
    assert "${" not in done, f"a variable without a default: {done}"
    return done


def test_compose_gives_each_role_its_user_with_the_scripts_permissions(users: Users) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    definitions = json.loads(interpolate(compose["configs"]["rabbitmq-definitions"]["content"]))
    passwords = {u["name"]: u["password"] for u in definitions["users"]}
    for role in ("api", "orchestrator", "worker"):
        service = compose["services"][role]
        assert service["command"] == ["cistate", "serve", "--role", role]
        url = urlsplit(interpolate(service["environment"]["CISTATE_RABBITMQ_URL"]))
        assert (url.username, url.password) == (f"cistate-{role}", passwords[f"cistate-{role}"])
    assert "guest" not in json.dumps(compose)

    # Imported on the real broker (renamed: users are per broker), it sets the very
    # permissions the script set for the same prefix.
    vhost = f"{users.vhost}-compose"
    renamed = json.loads(json.dumps(definitions).replace('"cistate-', f'"{users.user_prefix}c-'))
    for entry in renamed["permissions"] + renamed["topic_permissions"]:
        entry["vhost"] = vhost
        for field in ("configure", "write", "read", "exchange"):
            if field in entry:
                entry[field] = entry[field].replace("cistate", users.prefix)
    renamed["vhosts"] = [{"name": vhost}]
    imported = Path(f"/tmp/cistate-definitions-{uuid.uuid4().hex}.json")
    imported.write_text(json.dumps(renamed))
    imported.chmod(0o644)
    try:
        rabbitmqctl("import_definitions", str(imported))

        def compose_users() -> dict[str, tuple[str, ...]] | None:
            found = permissions(vhost)
            return found if len(found) == 8 else None  # admin, 4 users, 3 topic entries

        found = compose_users()
        for _ in range(20):  # the import is asynchronous
            if found is not None:
                break
            time.sleep(0.5)
            found = compose_users()
        assert found is not None, permissions(vhost)
        script = permissions(users.vhost)
        for role in ROLES:
            ours, theirs = f"{users.user_prefix}c-{role}", users.name(role)
            assert found[ours] == script[theirs], role
            topic = f"@{users.prefix}"  # none for the orchestrator in either
            assert found.get(ours + topic) == script.get(theirs + topic), role
    finally:
        imported.unlink()
        rabbitmqctl_all([["delete_vhost", vhost],
                         *(["delete_user", u["name"]] for u in renamed["users"])])
