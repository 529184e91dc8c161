"""Wiring: settings -> pipeline, store, bus -> the roles a process runs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import structlog
from aiohttp import web
from pydantic import ValidationError

import handlers
from cistate.adapters.postgres.store import Store, connect
from cistate.adapters.rabbitmq.bus import Bus
from cistate.adapters.rabbitmq.signing import Signer, load_key
from cistate.config import ConfigError, NotifySettings, RepoSettings, Settings
from cistate.domain import pipeline as p
from cistate.domain.run import HANDLER_QUEUE_MARK
from cistate.service.deciders import Deciders
from cistate.service.livelog import LiveLogs
from cistate.service.notifier import Notifier
from cistate.service.orchestrator import Orchestrator
from cistate.service.relay import Relay
from cistate.service.worker import Worker
from handlers import checks
from handlers.sandbox import SandboxSettings
from handlers.secrets import SecretSource, load_scopes

log = structlog.get_logger("cistate")



def load_default(known_handlers: Iterable[str] | p.HandlerInputs) -> p.Pipeline:
    """The packaged pipeline (cistate/pipelines/nodejs.yaml)."""
    path = resources.files("cistate") / "pipelines" / f"{p.DEFAULT_PIPELINE}.yaml"
    return p.parse(path.read_text(encoding="utf-8"), f"<packaged {p.DEFAULT_PIPELINE}.yaml>",
                   known_handlers)


def load_pipeline(path: Path | None) -> p.Pipeline:
    if path is None:
        return load_default(handlers.inputs())
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise p.PipelineError(f"{path}: cannot read pipeline file: {exc.strerror}") from None
    return p.parse(text, str(path), handlers.inputs())


def load_catalog(settings: Settings) -> p.Catalog:
    """The deployment's pipelines: CISTATE_PIPELINE (or the packaged one), the files of the
    CISTATE_PIPELINES directory by name, and CISTATE_REPO_PIPELINES."""
    found: list[p.Pipeline] = []
    if settings.pipelines is not None:
        if not settings.pipelines.is_dir():
            raise p.PipelineError(f"{settings.pipelines}: CISTATE_PIPELINES is not a directory")
        files = sorted(f for f in settings.pipelines.iterdir()
                       if f.suffix in (".yaml", ".yml") and f.is_file())
        if not files:
            raise p.PipelineError(f"{settings.pipelines}: CISTATE_PIPELINES has no *.yaml file")
        found = [load_pipeline(f) for f in files]
    return p.Catalog(load_pipeline(settings.pipeline), tuple(found),
                     tuple(settings.repo_pipelines))


def served_steps(catalog: p.Catalog, repo_pipelines: bool) -> tuple[str, ...]:
    """The step queues a worker serves by default: every step of the deployment's pipelines,
    and a queue per handler they use (step.@<uses>: the steps of runs pinned to an older
    pipeline); every handler's when repositories bring their own pipelines."""
    used = sorted(handlers.names()) if repo_pipelines else catalog.handlers
    return (*catalog.step_names, *(f"{HANDLER_QUEUE_MARK}{name}" for name in used))


def served_handlers(catalog: p.Catalog, steps: Iterable[str]) -> tuple[str, ...]:
    """The handlers behind the step queues a worker serves: what it imports before taking
    work, so that no step's own time pays for loading a client library."""
    used: dict[str, None] = {}
    for step in steps:
        if step.startswith(HANDLER_QUEUE_MARK):
            used[step.removeprefix(HANDLER_QUEUE_MARK)] = None
        else:
            used.update((uses, None) for name, uses in sorted(catalog.served) if name == step)
    return tuple(used)


@dataclass
class App:
    settings: Settings
    pipeline: p.Pipeline  # the default one
    catalog: p.Catalog
    store: Store
    bus: Bus | None
    orchestrator: Orchestrator
    worker: Worker | None = None  # when this process runs the worker role
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def signer_for(settings: Settings, create: bool = False) -> Signer:
    """The bus key's signer (ValueError saying what to set when there is no key)."""
    key, source = load_key(settings.bus_key, settings.bus_key_file, settings.workdir, create)
    if create and source.endswith("(made now)"):
        log.info("made a bus key; give the same key to cistate's roles on other machines "
                 "(CISTATE_BUS_KEY_FILE)", key_file=source.removesuffix(" (made now)"))
    return Signer(key)


@asynccontextmanager
async def open_app(settings: Settings, with_bus: bool = True,
                   orchestrating: bool = True) -> AsyncIterator[App]:
    """`orchestrating`: this process runs the orchestrator role, whose broker user may declare
    cistate's exchanges and queues and publish every command: it declares them, and publishes
    what it decides right after commit. Otherwise (api, worker) it waits for an orchestrator
    to declare the exchanges, and leaves the commands that operator requests and webhooks
    decide here to the orchestrator's relay (woken by NOTIFY): this process's broker user may
    not publish them."""
    catalog = load_catalog(settings)
    signer = signer_for(settings, create=True)
    store = await connect(settings.database_url)
    bus: Bus | None = None
    try:
        if with_bus:
            bus = Bus(settings.rabbitmq_url, settings.bus_prefix, signer)
            await bus.connect(declare=orchestrating, wait=True)
            if orchestrating:
                await bus.declare_all(served_steps(catalog, bool(catalog.repo_files)))
        orchestrator = Orchestrator(store, deciders_for(settings, catalog, signer),
                                    bus if orchestrating else None, RepoSettings().policy)
        yield App(settings, catalog.default, catalog, store, bus, orchestrator)
    finally:
        if bus is not None:
            await bus.close()
        await store.close()


def deciders_for(settings: Settings, catalog: p.Catalog | None = None,
                 signer: Signer | None = None) -> Deciders:
    """Who decides each run: the pipeline it pinned (CLI actions, the orchestrator)."""
    signer = signer or signer_for(settings)
    # every process that decides tells the outside the same (the deployment's settings)
    return Deciders(catalog or load_catalog(settings), signer.attempt_token,
                    handlers.inputs(), NotifySettings().policy)


def worker_problems(settings: Settings, steps: Iterable[str] | None = None) -> list[str]:
    """What stops a worker from running the steps it would serve, one line each: their
    settings (handlers.checks), the secrets they declare, the sandbox's own settings."""
    catalog = load_catalog(settings)
    known = served_steps(catalog, bool(catalog.repo_files))
    served = set(steps or known)
    by_handler = {f"{HANDLER_QUEUE_MARK}{name}" for name in handlers.names()}
    unknown = sorted(served - set(known) - by_handler)
    found = [f"--step {name}: no pipeline of the deployment has such a step (steps: "
             f"{', '.join(catalog.step_names)}; @<handler> serves a repository's steps)"
             for name in unknown]
    try:
        sandbox = SandboxSettings()
        scopes = load_scopes(sandbox.secret_scopes, sandbox.secret_scopes_file)
    except (ValidationError, ValueError, OSError) as exc:
        return [*found, f"sandbox settings: {_one_line(exc)}"]
    secrets = SecretSource(sandbox.secrets_dir, os.environ, scopes)
    steps_of = {s.name: s for pipeline in catalog.all for s in pipeline.steps}
    return found + checks.problems((s for name, s in steps_of.items() if name in served),
                                   secrets)


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"CISTATE_{str(e['loc'][0]).upper() if e['loc'] else '?'}: "
                         f"{e['msg']}" for e in exc.errors())
    return str(exc)


async def serve(settings: Settings, roles: Iterable[str], steps: Iterable[str] | None = None,
                ready: asyncio.Event | None = None) -> None:
    """Run the given roles until cancelled."""
    roles = set(roles)
    if "worker" in roles:
        problems = worker_problems(settings, steps)
        if problems:
            raise ConfigError("\n".join(problems))
    async with open_app(settings, orchestrating="orchestrator" in roles) as app:
        assert app.bus is not None
        background: list[asyncio.Task[None]] = []
        closing: list[Callable[[], Awaitable[None]]] = []
        runner: web.AppRunner | None = None
        try:
            if "orchestrator" in roles:
                channel = await app.bus.consumer_channel(prefetch=64)
                queue = await app.bus.declare_orchestrator(channel=channel)
                await queue.consume(app.orchestrator.on_message, no_ack=False)
                relay = Relay(app.store, app.bus, held=app.orchestrator.held)
                background.append(asyncio.create_task(relay.run_forever()))
                background.append(asyncio.create_task(app.orchestrator.flush_sent_forever()))
                background.append(asyncio.create_task(
                    app.orchestrator.renew_leases_forever()))
                live_logs = LiveLogs(app.store, app.bus, app.orchestrator.deciders.tokens)
                await live_logs.start()
                notify = NotifySettings()
                if notify.policy.any:  # commit statuses or notifications to deliver
                    notifier = Notifier(app.store, app.bus, app.orchestrator, notify)
                    await notifier.start()
                    closing.append(notifier.close)
            if "worker" in roles:
                worker = Worker(app.bus, settings.workdir, handlers.load,
                                settings.worker_concurrency)
                queues = steps or served_steps(app.catalog, bool(app.catalog.repo_files))
                uses = served_handlers(app.catalog, queues)
                worker.preload(uses)
                await worker.start(queues)
                warm_ups = dict.fromkeys(w for w in map(handlers.warm_up_of, uses) if w)
                background.append(asyncio.create_task(worker.warm_up(warm_ups)))
                app.worker = worker
            if "api" in roles:
                from cistate.adapters.http.api import make_app

                runner = web.AppRunner(make_app(app), access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, settings.listen_host, settings.listen_port)
                await site.start()
            log.info("serving", roles=sorted(roles), pipeline=app.pipeline.name,
                     listen=settings.listen if "api" in roles else None)
            # Start-up objects (modules, pipeline, machine) live as long as the process: keep
            # them out of the cyclic GC's full collections, which otherwise show as p99 spikes.
            gc.freeze()
            if ready is not None:
                ready.set()
            await asyncio.Event().wait()
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await app.orchestrator.flush_sent()
            for close in closing:
                await close()
            if runner is not None:
                await runner.cleanup()
