"""The `cistate` command: its commands are declared in `parser()` (argparse, at the end of
this file), each a function of the options it takes."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import uuid
from collections.abc import Callable, Collection, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from cistate import SOURCE_ROOT

if TYPE_CHECKING:
    import asyncpg
    from rich.table import Table as RichTable

    from cistate.adapters.postgres.store import RunCheck, Store, VerifyReport
    from cistate.config import Settings
    from cistate.domain.messages import ControlAction
    from cistate.domain.state import RunState
    from cistate.environment import Urls
    from cistate.service.orchestrator import Orchestrator, Outcome

# Every module loads in the command that uses it, and the parser is the standard library's:
# `cistate --help` loads no third-party module; `runs list` and `runs show` the store's reads
# (asyncpg; postgres/reads.py) but not the store, no pydantic, no machine and none of the
# service's (aiohttp, aio-pika, handlers), and rich only on a terminal (output.py).
# tests/unit/test_cli_imports.py holds the line; bench/cli.py measures it.

T = TypeVar("T")
SCHEMA_DIR = SOURCE_ROOT / "schema"


class Exit(Exception):
    """Ends the command with `code`; `main` turns it into the process's exit status. An
    Exception, not SystemExit, so that it leaves a coroutine the way any error does."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def echo(text: str = "", *, err: bool = False, nl: bool = True) -> None:
    """A line on stdout (or stderr), flushed: what is printed keeps its order with the
    other stream's."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n" if nl else text)
    stream.flush()


def fail(message: str, code: int = 1) -> NoReturn:
    echo(f"cistate: {message}", err=True)
    raise Exit(code)


def fail_lines(lines: list[str], code: int) -> NoReturn:
    """Every problem on its own line, so that a person can fix them all in one go."""
    for line in lines:
        echo(f"cistate: {line}", err=True)
    raise Exit(code)


def settings() -> Settings:
    from pydantic import ValidationError

    from cistate.config import Settings

    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "CISTATE_" + str(err["loc"][0]).upper() if err["loc"] else "CISTATE_*"
        fail(f"bad configuration: {name}: {err['msg']}", 2)


def urls() -> Urls | Settings:
    """The database and RabbitMQ URLs, for the commands that need nothing else: read
    without pydantic when the environment surely is valid (cistate.environment.urls), else
    validated by Settings as for every other command."""
    from cistate.environment import urls as quick

    found = quick()
    return found if found is not None else settings()


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The exception classes `names` of `module` if it is loaded: an exception cannot be
    one of them if their module was never imported (and importing it just to look would
    cost every command the start-up this file saves)."""
    found = sys.modules.get(module)
    return tuple(getattr(found, name) for name in names) if found is not None else ()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning the errors a person can fix into one clear line."""
    import asyncio

    from cistate.environment import ConfigError

    try:
        return asyncio.run(coro)
    except Exception as exc:
        if isinstance(exc, (ConfigError, *_loaded("cistate.domain.pipeline", "PipelineError"))):
            fail_lines(str(exc).splitlines(), 2)
        postgres = _loaded("asyncpg", "PostgresError", "InterfaceError")
        if isinstance(exc, (OSError, *postgres)):
            fail(f"{_what_failed(exc, postgres)}: {exc}")
        raise


def _what_failed(exc: BaseException, postgres: tuple[type[BaseException], ...]) -> str:
    from cistate.environment import redact

    s = urls()
    if isinstance(exc, postgres):
        return f"PostgreSQL at {redact(s.database_url)}"
    return (f"cannot connect (PostgreSQL {redact(s.database_url)}, "
            f"RabbitMQ {redact(s.rabbitmq_url)})")


def configure_logging(fmt: str, level: str = "info") -> None:
    import logging

    import structlog

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), renderer],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
    )


def print_json(value: Any) -> None:
    echo(json.dumps(value, indent=2, default=str))


def parse_run_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        fail(f"{raw!r} is not a run id (a UUID, as `cistate runs list` shows)", 2)


# -- db


def db_upgrade() -> None:
    """Create the database if needed and apply migrations; safe to run twice."""
    from cistate.adapters.postgres.store import connect

    s = settings()

    async def go() -> list[str]:
        await _ensure_database(s.database_url)
        store = await connect(s.database_url, min_size=1, max_size=1)
        try:
            return await store.migrate()
        finally:
            await store.close()

    applied = run_async(go())
    echo(f"applied: {', '.join(applied)}" if applied else "database is up to date")


async def _ensure_database(dsn: str) -> None:
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        parts = urlsplit(dsn)
        name = parts.path.lstrip("/")
        admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
        try:
            await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), "")}"')
        except asyncpg.DuplicateDatabaseError:
            pass
        finally:
            await admin.close()
        return
    await conn.close()


# -- serve


def serve(role: list[str] | None, step: list[str] | None) -> None:
    """Run the API, the orchestrator and workers (or the roles given)."""
    import contextlib

    from cistate import bootstrap as wiring
    from cistate.environment import ROLES

    s = settings()
    roles = role or list(ROLES)
    unknown = set(roles) - set(ROLES)
    if unknown:
        fail(f"unknown role(s) {', '.join(sorted(unknown))}; use {', '.join(ROLES)}", 2)
    configure_logging(s.log_format, s.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        run_async(wiring.serve(s, roles, steps=step))


def check(step: list[str] | None) -> None:
    """Check the configuration without starting anything: the pipeline, the settings of every
    enabled step and the secrets they declare (exit 2 with one line per problem)."""
    from cistate import bootstrap as wiring
    from cistate.domain.pipeline import PipelineError

    s = settings()
    try:
        problems = wiring.worker_problems(s, step)
    except PipelineError as exc:
        fail_lines(str(exc).splitlines(), 2)
    if problems:
        fail_lines(problems, 2)
    pipeline = wiring.load_pipeline(s.pipeline)
    checked = [x for x in pipeline.steps if x.enabled and (not step or x.name in step)]
    echo(f"ok: pipeline {pipeline.name!r}, {len(checked)} enabled steps checked")


def quickstart(extra: list[str]) -> None:
    """The default pipeline from a `git push` to the QA GitOps commit, on this machine alone:
    starts local stand-ins (registry, git server, chart repository, GitOps repo,
    kube-apiserver), a sample app, and cistate; Ctrl-C stops everything it started.
    Options go to scripts/quickstart.py (--dir DIR, --without-kube)."""
    script = SOURCE_ROOT / "scripts" / "quickstart.py"
    if not script.is_file():
        fail(f"the quickstart runs from a checkout of cistate ({script} is missing)", 2)
    # the quickstart replaces this process, so that Ctrl-C reaches it alone
    os.execv(sys.executable, [sys.executable, str(script), *extra])  # noqa: S606


# -- push


def push(repo: str, ref: str, commit: str, delivery_id: str | None, pusher: str | None,
         as_json: bool) -> None:
    """Publish a push event on the bus, as any producer would."""
    from pydantic import ValidationError

    from cistate.domain.events import run_id_for
    from cistate.domain.messages import Push, message_uuid
    from cistate.environment import redact

    s = settings()
    try:
        body = Push(repo=repo, ref=ref, commit=commit, pusher=pusher, provider="cli")
    except ValidationError as exc:
        fail("; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors()), 2)
    message_id = delivery_id or str(uuid.uuid4())
    import aiormq.exceptions

    from cistate.adapters.rabbitmq.bus import Bus, TopologyMissing, Unroutable

    async def go() -> None:
        bus = Bus(s.rabbitmq_url, s.bus_prefix)
        try:
            # A producer's broker user may publish pushes and nothing else: no declaring.
            await bus.connect(declare=False)
            await bus.publish("push", body.model_dump(mode="json", exclude_none=True),
                              message_id, mandatory=True)
        except (TopologyMissing, Unroutable) as exc:
            fail(f"push not published: {exc}")
        except aiormq.exceptions.ChannelAccessRefused as exc:
            fail(f"push not published: RabbitMQ ({redact(s.rabbitmq_url)}) refused it: {exc}; "
                 f"the URL's user needs write on exchange {s.bus_prefix!r} and topic write on "
                 "routing key push (scripts/rabbitmq-users.sh makes cistate-producer)")
        finally:
            await bus.close()

    run_async(go())
    run_id = str(run_id_for(message_uuid(message_id)))
    if body.is_deletion or body.branch is None:
        why = "a branch deletion" if body.is_deletion else "not a branch push"
        if as_json:
            print_json({"delivery_id": message_id, "run_id": None, "ignored": why})
        else:
            echo(f"published push {message_id}; it is {why}, so it opens no run")
        return
    if as_json:
        print_json({"delivery_id": message_id, "run_id": run_id})
    else:
        echo(f"published push {message_id}; its run will be {run_id}")


# -- runs


def _with_store(fn: Callable[[Any], Coroutine[Any, Any, T]], connections: int = 2) -> T:
    from cistate.adapters.postgres.store import connect

    dsn = urls().database_url

    async def go() -> T:
        store = await connect(dsn, min_size=1, max_size=connections)
        try:
            return await fn(store)
        finally:
            await store.close()

    return run_async(go())


def _reading(fn: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]]) -> T:
    """`fn` on a connection of the reads module: for runs list and runs show, which load
    neither the store's module nor a pool."""
    from cistate.adapters.postgres import reads

    dsn = urls().database_url

    async def go() -> T:
        async with reads.connection(dsn) as conn:
            return await fn(conn)

    return run_async(go())


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def runs_list(state: str | None, repo: str | None, ref: str | None, commit: str | None,
              step: str | None, since: datetime | None, until: datetime | None, limit: int,
              as_json: bool) -> None:
    """Runs, newest first."""
    from cistate.adapters.postgres import reads

    query = reads.RunQuery(state=state, repo=repo, ref=ref, commit=commit, step=step,
                           since=_utc(since), until=_utc(until), limit=limit)
    runs = _reading(lambda conn: reads.list_runs(conn, query))
    if as_json:
        print_json([r.to_json(with_steps=False) for r in runs])
        return
    from cistate.adapters.cli.output import Table, show

    table = Table("id", "state", "step", "repo", "ref", "commit", "created")
    for r in runs:
        table.add_row(str(r.id), _styled(r.status), r.step or "", r.repo, r.ref, r.commit[:12],
                      _time(r.created_at))
    show(table)


def runs_show(run: str, at: int | None, as_json: bool) -> None:
    """One run and its steps (now, or --at an earlier event)."""
    from cistate.adapters.postgres import reads

    run_id = parse_run_id(run)

    async def load(conn: asyncpg.Connection
                   ) -> tuple[RunState | None, list[dict[str, Any]]]:
        found = await reads.load(conn, run_id)
        return found, (await reads.waits_of(conn, found) if found is not None else [])

    async def load_at(st: Store) -> tuple[RunState | None, list[dict[str, Any]]]:
        return await st.state_at(run_id, at), []  # a fold of its events up to SEQ

    state, waits = _with_store(load_at) if at else _reading(load)
    if state is None:
        fail(f"no run {run_id}")
    if as_json:
        print_json({**state.to_json(), "waiting_for": waits})
        return
    from cistate.adapters.cli.output import Table, line, show

    line(f"run [bold]{state.id}[/]  {_styled(state.status)}  "
         f"{state.repo} {state.ref} {state.commit[:12]}  (version {state.version})")
    pinned = (f" (pinned {state.pipeline_sha256[:12]})" if state.pipeline_sha256
              else " (not pinned: recorded before runs pinned their pipeline)")
    line(f"pipeline {state.pipeline}{pinned}", highlight=False)

    table = Table("step", "state", "attempts", "outputs / error", "started", "finished",
                  "waiting / queued / running")
    for step in state.steps.values():
        detail = (step.error or {}).get("message", "") if step.error else (
            ", ".join(f"{k}={v}" for k, v in step.outputs.items()))
        table.add_row(step.name, _styled(step.state), str(step.attempts), detail[:80],
                      _time(step.started_at), _time(step.finished_at), _timing(step.timing))
    show(table)
    for key, notice in state.notices.items():
        if notice["kind"] != "status":
            continue
        why = f": {notice['reason']}" if notice.get("reason") else ""
        line(f"status {key}: {notice['state']} ({notice['description']}), "
             f"{notice['delivery']}{why}", highlight=False)
    for wait in waits:
        holder = wait["holder_run_id"] or "nobody (its turn is on the way)"
        place = f", place {wait['position']} in its queue" if wait["position"] else ""
        line(f"waits for {wait['kind']} {wait['name']!r}: held by run {holder}{place}",
             highlight=False)


def runs_events(run: str, as_json: bool) -> None:
    """The run's events, in order."""
    run_id = parse_run_id(run)
    events = _with_store(lambda st: st.events(run_id))
    if not events:
        fail(f"no run {run_id}")
    if as_json:
        print_json([e.to_json() for e in events])
        return
    from cistate.adapters.cli.output import Table, show

    table = Table("seq", "type", "step", "attempt", "actor", "recorded")
    for e in events:
        table.add_row(str(e.seq), e.type, str(e.data.get("step", "")),
                      str(e.data.get("attempt", "")), str(e.meta.get("actor", "")),
                      _time(e.recorded_at))
    show(table)


def runs_logs(run: str, step: str, follow_: bool) -> None:
    """The full output of a step (every attempt)."""
    run_id = parse_run_id(run)
    if follow_:
        raise Exit(_follow(run_id, step))
    logs = _with_store(lambda st: st.step_log(run_id, step))
    if not logs:
        fail(f"no log for step {step!r} of run {run_id}")
    for attempt, text in logs:
        echo(f"--- attempt {attempt} ---")
        echo(text, nl=False)


def _timing(timing: dict[str, float] | None) -> str:
    if not timing:
        return ""
    return " / ".join(f"{timing[key]:.2f}s" if key in timing else "-"
                      for key in ("waiting", "queued", "running"))


def _follow(run_id: uuid.UUID, step: str) -> int:
    from cistate.service.livelog import ENDED, Piece, StepNotFound, exit_status, follow

    async def go(st: Store) -> int:
        state = await st.load(run_id)
        current = state.steps.get(step) if state is not None else None
        if state is None or current is None:
            fail(f"no step {step!r} in run {run_id}" if state else f"no run {run_id}")
        if current.state in ENDED:  # over already: its stored log, and how it ended
            for attempt, text in await st.step_log(run_id, step):
                echo(f"--- attempt {attempt} ---")
                echo(text, nl=False)
            return _ended(step, current.state, exit_status(current.state, current.error))
        try:
            async for item in follow(st, run_id, step):
                if isinstance(item, Piece):
                    sys.stdout.write(item.header + item.chunk.text)
                    sys.stdout.flush()
                else:
                    return _ended(step, item.state, item.exit_status)
        except StepNotFound as exc:
            fail(str(exc))
        return 1

    return _with_store(go)


def _ended(step: str, state: str, code: int) -> int:
    echo(f"--- step {step} {state}" + (f" (exit status {code})" if code else "") + " ---",
               err=True)
    return code


def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


def _operate(run: str, action: Callable[[Orchestrator, uuid.UUID], Coroutine[Any, Any, Outcome]],
             as_json: bool, done: str) -> None:
    from cistate import bootstrap as wiring
    from cistate.adapters.postgres.store import connect
    from cistate.service.orchestrator import Orchestrator

    run_id = parse_run_id(run)
    s = settings()

    async def go() -> Outcome:
        deciders = wiring.deciders_for(s)  # each run is decided with its pinned pipeline
        store = await connect(s.database_url, min_size=1, max_size=2)
        try:
            # No bus here: the outbox rows this writes are published by a running relay.
            return await action(Orchestrator(store, deciders, bus=None), run_id)
        finally:
            await store.close()

    outcome = run_async(go())
    if outcome.status in ("not_found", "rejected", "ignored"):
        fail(f"run {run_id}: {outcome.detail}")
    assert outcome.state is not None
    if as_json:
        print_json(outcome.state.to_json())
    else:
        echo(done.format(id=outcome.state.id, step=outcome.state.step or "",
                               state=outcome.state.status))


def runs_retry(run: str, from_step: str | None, reason: str | None, as_json: bool) -> None:
    """Continue a failed or cancelled run from the failed step (or --from a named one)."""
    _operate(run, lambda o, rid: o.control(rid, "retry", _actor(), reason=reason,
                                           step=from_step),
             as_json, "run {id} retried: step {step} is running again")


def runs_cancel(run: str, reason: str | None, as_json: bool) -> None:
    """Cancel a run: its running step is stopped; the run ends cancelled."""
    _operate(run, lambda o, rid: o.control(rid, "cancel", _actor(), reason=reason),
             as_json, "run {id} {state}")


def runs_approve(run: str, step: str, reason: str | None, as_json: bool) -> None:
    """Approve an approval step that holds the run (you must be one of its approvers)."""
    _decide(run, step, "approve", reason, as_json)


def runs_reject(run: str, step: str, reason: str | None, as_json: bool) -> None:
    """Reject an approval step that holds the run: the step fails, and so does the run."""
    _decide(run, step, "reject", reason, as_json)


def _decide(run: str, step: str, action: ControlAction, reason: str | None,
            as_json: bool) -> None:
    _operate(run, lambda o, rid: o.control(rid, action, _actor(), reason=reason, step=step),
             as_json, "run {id} {state}: step " + step + f" {action}d")


def runs_rerun(run: str, as_json: bool) -> None:
    """Start a new run for the same push."""
    _operate(run, lambda o, rid: o.rerun(rid, _actor()), as_json,
             "new run {id} ({state}) for the same push")


def runs_watch(run: str, interval: float) -> None:
    """Show the run's steps live until it ends; exit 0 if it succeeded, 1 if not."""
    import asyncio

    from rich.live import Live

    from cistate.adapters.cli.output import console
    from cistate.adapters.postgres.store import connect
    from cistate.domain.status import TERMINAL

    run_id = parse_run_id(run)
    s = settings()

    async def go() -> RunState:
        store = await connect(s.database_url, min_size=1, max_size=1)
        try:
            state = await store.load(run_id)
            if state is None:
                fail(f"no run {run_id}")
            with Live(_run_table(state), console=console(), auto_refresh=False) as live:
                while state.status not in TERMINAL:
                    await asyncio.sleep(interval)
                    state = await store.load(run_id) or state
                    live.update(_run_table(state), refresh=True)
            return state
        finally:
            await store.close()

    final = run_async(go())
    raise Exit(0 if final.status == "succeeded" else 1)


def audit(run: str | None, repo: str | None, ref: str | None, commit: str | None,
          type_: str | None, step: str | None, actor: str | None, since: datetime | None,
          until: datetime | None, before: int | None, limit: int, as_json: bool) -> None:
    """Events across all runs, newest first, filtered (or a command below)."""
    from cistate.adapters.postgres.store import EventQuery

    query = EventQuery(
        run_id=parse_run_id(run) if run else None, repo=repo, ref=ref, commit=commit,
        type=type_, step=step, actor=actor, since=_utc(since), until=_utc(until),
        before=before, limit=limit)
    events = _with_store(lambda st: st.audit(query))
    if as_json:
        print_json([e.to_json() for e in events])
        return
    from cistate.adapters.cli.output import Table, line, show

    table = Table("position", "run", "seq", "type", "step", "actor", "recorded", "detail")
    for e in events:
        detail = e.data.get("reason") or (e.data.get("error") or {}).get("message", "")
        table.add_row(str(e.position), str(e.run_id)[:8], str(e.seq), e.type,
                      str(e.data.get("step", "")), str(e.meta.get("actor", "")),
                      _time(e.recorded_at), str(detail or "")[:60])
    show(table)
    if len(events) == limit:
        line(f"more: --before {events[-1].position}")


def audit_verify(run: str | None, as_json: bool) -> None:
    """Check every run's (or one run's) events against their hash chain and name each
    edited, deleted, inserted or moved event by run and seq. Exits 1 if there is one."""
    if run is None:
        report: VerifyReport = _with_store(lambda st: st.verify())
        runs, events, broken = report.runs, report.events, report.broken
        if as_json:
            print_json({"runs": runs, "events": events, "ok": not broken,
                        "broken": [check.to_json() for check in broken]})
    else:
        run_id = parse_run_id(run)
        check: RunCheck | None = _with_store(lambda st: st.verify_run(run_id))
        if check is None:
            fail(f"no run {run_id}")
        runs, events, broken = 1, check.events, [] if check.ok else [check]
        if as_json:
            print_json(check.to_json())
    if not as_json:
        for bad in broken:
            for problem in bad.problems:
                echo(f"run {bad.run_id} seq {problem.seq}: {problem.problem}")
    if broken:
        fail(f"{len(broken)} of {runs} runs ({events} events) do not hold their hash chain: "
             "their events were changed in the database, not by cistate; see the lines above "
             "(or --json) for each one")
    if not as_json:
        echo(f"{runs} runs, {events} events verified")


def projections_rebuild(as_json: bool) -> None:
    """Refold every run from its events into the runs projection; report rows that differed.
    Exits 1 if some run's events could not be folded, or break their hash chain (those rows
    are left as they are)."""
    # two id ranges side by side, each a reader and a writer connection
    report = _with_store(lambda st: st.rebuild_projections(parts=2), connections=4)
    if as_json:
        print_json({"runs": report.runs, "events": report.events,
                    "differed": [str(r) for r in report.differed],
                    "unfoldable": [{"run_id": str(run_id), "error": error}
                                   for run_id, error in report.unfoldable],
                    "broken": [{"run_id": str(run_id), "problem": problem}
                               for run_id, problem in report.broken],
                    "resources": report.resources,
                    "resources_differed": report.resources_differed})
    else:
        echo(f"refolded {report.runs} runs from {report.events} events; "
                   f"{len(report.differed)} row(s) differed and were rewritten")
        for run_id in report.differed:
            echo(f"  {run_id}")
        echo(f"refolded {report.resources} concurrency groups and locks; "
                   f"{len(report.resources_differed)} row(s) differed and were rewritten")
        for name in report.resources_differed:
            echo(f"  {name}")
        for run_id, error in report.unfoldable:
            echo(f"cannot fold run {run_id} (its row was left as it is): {error}",
                       err=True)
        for run_id, problem in report.broken:
            echo(f"did not fold run {run_id} (its row was left as it is): {problem}; "
                       f"`cistate audit verify {run_id}` names each event", err=True)
    if report.unfoldable or report.broken:
        raise Exit(1)


def _run_table(state: RunState) -> RichTable:
    from rich.table import Table

    table = Table("step", "state", "attempts", "detail",
                  title=f"run {state.id} — {state.status}")
    for step in state.steps.values():
        detail = (step.error or {}).get("message", "") if step.error else ""
        table.add_row(step.name, _styled(step.state), str(step.attempts), detail[:80])
    return table


# -- caches (cistate.adapters.cli.cache)

def cache_list(as_json: bool) -> None:
    """Every cache entry and repo mirror of this machine's worker (CISTATE_WORKDIR), most
    recently used first."""
    from cistate.adapters.cli.cache import list_caches

    echo(list_caches(settings().workdir, as_json=as_json))


def cache_prune(max_size: str | None, everything: bool) -> None:
    """Remove least recently used cache entries and repo mirrors (those in use stay)."""
    from cistate.adapters.cli.cache import prune

    try:
        echo(prune(settings().workdir, max_size=max_size, everything=everything))
    except ValueError as exc:
        fail(str(exc), 2)


# -- graph and schemas


def graph(run: str | None, machines: bool) -> None:
    """The pipeline's steps and their needs as a Mermaid flowchart (finally steps dotted
    after the last steps); with RUN, the pipeline that run pinned, each step in its state."""
    from cistate import bootstrap as wiring
    from cistate.domain import graph as step_graph
    from cistate.domain.pipeline import PipelineError
    from cistate.environment import ConfigError

    s = settings()
    try:
        pipeline = wiring.load_pipeline(s.pipeline)
        deciders = wiring.deciders_for(s) if run is not None else None
    except (PipelineError, ConfigError, ValueError) as exc:
        fail(str(exc), 2)
    if machines:
        from cistate.domain.machine import RunMachine, StepMachine

        echo(f"%% a run\n{RunMachine(pipeline).mermaid()}\n"
                   f"%% each step of it\n{StepMachine(pipeline).mermaid()}", nl=False)
        return
    states: dict[str, str] | None = None
    if run is not None:
        run_id = parse_run_id(run)
        assert deciders is not None

        async def pinned(st: Any) -> tuple[Any, Any]:
            found = await st.load(run_id)
            return found, (await deciders.for_run(found, st) if found is not None else None)

        state, decider = _with_store(pinned)
        if state is None:
            fail(f"no run {run_id}")
        pipeline = decider.pipeline
        states = {name: step.state for name, step in state.steps.items()}
    echo(step_graph.mermaid(pipeline.graph, states), nl=False)


def schema_export(directory: Path) -> None:
    """Write the JSON Schemas of bus messages (schema/<name>.schema.json)."""
    for name, text in message_schemas().items():
        (directory / f"{name}.schema.json").write_text(text, encoding="utf-8")
        echo(f"wrote {directory / f'{name}.schema.json'}")


def message_schemas() -> dict[str, str]:
    from cistate.domain.messages import MESSAGE_MODELS

    return {
        name: json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True) + "\n"
        for name, model in MESSAGE_MODELS.items()
    }


def _styled(state: str) -> str:
    colour = {"succeeded": "green", "failed": "red", "running": "cyan", "cancelled": "yellow",
              "timed_out": "red", "retrying": "yellow"}.get(state)
    return f"[{colour}]{state}[/]" if colour else state


def _time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


# -- the command line: every command is declared here


def parser(words: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line, each command with the function that runs it. Adding one is a line
    here (a `group` for a new word, a `command` with its options; `moment=True` if it is
    over in a moment, see `_Group.command`) and its function.

    With `words` (the command line's), only the groups and commands named in them get
    their options; the others are listed in the help, and nothing can reach them: building
    every parser took longer than importing argparse (gettext looks for a translation of
    each parser's headings)."""
    top = _parser("cistate", "CI/CD pipelines as event-sourced state machines.")
    cli = _Group(top, words)
    (cli.command("serve", serve)
     .option("--role", action="append", metavar="ROLE",
             help="api, orchestrator or worker (repeatable); default: all")
     .option("--step", action="append", metavar="STEP",
             help="with --role worker: only these steps (repeatable)"))
    cli.command("check", check, moment=True).option(
        "--step", action="append", metavar="STEP",
        help="only these steps, as `serve --role worker --step` would serve")
    cli.command("quickstart", quickstart, extra=True)
    (cli.command("push", push, moment=True)
     .option("--repo", required=True, help="Clone URL of the code repository.")
     .option("--ref", required=True, help="The pushed ref, e.g. refs/heads/main.")
     .option("--commit", required=True, help="The pushed commit sha.")
     .option("--delivery-id", metavar="ID", help="Message id; the same id twice opens one run.")
     .option("--pusher", help="Who pushed.")
     .json())
    (cli.command("graph", graph, moment=True)
     .option("run", nargs="?", metavar="RUN", help="A run: each step shows its state in it.")
     .option("--machines", action="store_true",
             help="Draw the run's and a step's state machines instead."))

    audit_ = cli.group("audit", "Events across all runs, and checks of their hash chains.")
    (audit_.own(audit, moment=True)
     .option("--run", help="Only this run's events.")
     .option("--repo", help=REPO_HELP).option("--ref", help=REF_HELP)
     .option("--commit", help=COMMIT_HELP)
     .option("--type", dest="type_", metavar="TYPE", help="Event type, e.g. run.retried.")
     .option("--step", help="Events of this step.")
     .option("--actor", help="e.g. cli:alice, api:deploy-bot.")
     .option("--since", type=_when, metavar="TIME", help=SINCE_HELP)
     .option("--until", type=_when, metavar="TIME", help=UNTIL_HELP)
     .option("--before", type=int, metavar="POSITION",
             help="Page: events older than this position.")
     .option("--limit", type=_int_in(1, 1000), default=100, metavar="N",
             help="At most N events, 1-1000 [default: 100].")
     .json())
    (audit_.command("verify", audit_verify)
     .option("run", nargs="?", metavar="RUN", help="Only this run (default: every run).")
     .json())

    cli.group("projections", "Read models built from events.").command(
        "rebuild", projections_rebuild).json()
    cli.group("db", "The event store's database.").command("upgrade", db_upgrade)

    runs = cli.group("runs", "Look at runs.")
    (runs.command("list", runs_list, moment=True)
     .option("--state", help="queued, running, succeeded, failed or cancelled")
     .option("--repo", help=REPO_HELP).option("--ref", help=REF_HELP)
     .option("--commit", help=COMMIT_HELP)
     .option("--step", help="The step the run is in or ended in.")
     .option("--since", type=_when, metavar="TIME", help=SINCE_HELP)
     .option("--until", type=_when, metavar="TIME", help=UNTIL_HELP)
     .option("--limit", type=_int_in(1, 1000), default=50, metavar="N",
             help="At most N runs, 1-1000 [default: 50].")
     .json())
    (runs.command("show", runs_show, moment=True).run()
     .option("--at", type=_int_in(1), metavar="SEQ", help="The run as it stood after event SEQ.")
     .json())
    runs.command("events", runs_events, moment=True).run().json()
    (runs.command("logs", runs_logs).run().option("step", metavar="STEP", help="The step.")
     .option("--follow", "-f", dest="follow_", action="store_true",
             help="Print the output as it comes while the step runs; exit, when it ends, with "
                  "its exit status (0: succeeded or skipped)."))
    (runs.command("retry", runs_retry).run()
     .option("--from", dest="from_step", metavar="STEP",
             help="Retry from this step (default: the step that failed).")
     .option("--reason", metavar="TEXT", help=REASON_HELP).json())
    (runs.command("cancel", runs_cancel).run()
     .option("--reason", metavar="TEXT", help=REASON_HELP).json())
    for name, decide in (("approve", runs_approve), ("reject", runs_reject)):
        (runs.command(name, decide).run()
         .option("step", metavar="STEP", help="The approval step that waits.")
         .option("--reason", metavar="TEXT", help=REASON_HELP).json())
    runs.command("rerun", runs_rerun).run().json()
    runs.command("watch", runs_watch).run().option(
        "--interval", type=_float_from(0.1), default=0.5, metavar="SECONDS",
        help="Seconds between looks (at least 0.1) [default: 0.5].")

    cache = cli.group("cache", "The worker's caches (npm, node_modules, image layers) and "
                      "repo mirrors.")
    cache.command("list", cache_list).json()
    (cache.command("prune", cache_prune)
     .option("--max", dest="max_size", metavar="SIZE",
             help="Trim to this size (5G, 512M) [default: CISTATE_CACHE_MAX].")
     .option("--all", dest="everything", action="store_true",
             help="Remove every entry and mirror not in use."))

    cli.group("schema", "Message and API schemas.").command("export", schema_export).option(
        "--directory", type=Path, default=SCHEMA_DIR, metavar="PATH",
        help=f"Where to write [default: {str(SCHEMA_DIR).replace('%', '%%')}].")
    return top


REPO_HELP = "Repo URL, exactly."
REF_HELP = "Ref, e.g. refs/heads/main."
COMMIT_HELP = "Commit sha or a prefix of it."
SINCE_HELP = "From this time (ISO 8601, UTC if no zone): YYYY-MM-DD[THH:MM:SS[+HHMM]]."
UNTIL_HELP = "Before this time."
REASON_HELP = "Why, for the audit log."
WHEN_FORMATS = ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def _parser(prog: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                   formatter_class=_Formatter, **kwargs)


class _Formatter(argparse.HelpFormatter):
    """Help with room for the longer names (`projections`, `--delivery-id ID`) beside
    their text, as wide as the terminal."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=_columns() - 2)


@functools.cache
def _columns() -> int:
    """The terminal's width as argparse would ask shutil.get_terminal_size (COLUMNS, else
    stdout's terminal, else 80), asked once: argparse asks at every option it adds, and
    importing shutil (with bz2 and lzma) costs more than the rest of `--help`."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Command:
    """One command's parser, and the names of the arguments its function takes: the options
    declared on it, passed by name."""

    def __init__(self, parser: argparse.ArgumentParser | None, function: Callable[..., None],
                 moment: bool) -> None:
        self.parser = parser  # None: not on this command line, not built
        self.names: list[str] = []
        if parser is not None:
            parser.set_defaults(_command=function, _names=self.names, _parser=parser,
                                _moment=moment)

    def option(self, *flags: str, **kwargs: Any) -> _Command:
        if self.parser is not None:
            self.names.append(self.parser.add_argument(*flags, **kwargs).dest)
        return self

    def run(self) -> _Command:
        return self.option("run", metavar="RUN", help="A run id (as `cistate runs list` shows).")

    def json(self) -> _Command:
        return self.option("--json", dest="as_json", action="store_true",
                           help="Print machine-readable JSON.")


class _Group:
    """A word that commands follow (`runs`, `db`, ...); alone it prints its help, unless it
    is a command of its own too (`audit`)."""

    def __init__(self, parser: argparse.ArgumentParser | None,
                 words: Collection[str] | None) -> None:
        self.parser = parser  # None: not on this command line, not built
        self.words = words
        self.subparsers = None
        if parser is not None:
            self.subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
            parser.set_defaults(_command=None, _names=[], _parser=parser, _moment=True)

    def own(self, function: Callable[..., None], moment: bool = False) -> _Command:
        """The group run without a command runs `function`."""
        return _Command(self.parser, function, moment)

    def command(self, name: str, function: Callable[..., None], extra: bool = False,
                moment: bool = False) -> _Command:
        """`extra`: the arguments it does not know are passed on to it (as `extra`).
        `moment`: it is over in a moment, its work bounded (a read of at most 1000 rows,
        one message): it runs without the cyclic GC (see `main`)."""
        declared = _Command(self._add(name, function.__doc__ or ""), function, moment)
        if extra and declared.parser is not None:
            declared.parser.set_defaults(_extra=True, extra=[])
            declared.names.append("extra")
        return declared

    def group(self, name: str, description: str) -> _Group:
        return _Group(self._add(name, description), self.words)

    def _add(self, name: str, description: str) -> argparse.ArgumentParser | None:
        """The parser of the command or group `name`, if it is on the command line; else
        it is only listed (a parser with no options: no word on this line leads to it)."""
        if self.subparsers is None:
            return None
        listed = " ".join(description.split()).replace("%", "%%")
        if self.words is not None and name not in self.words:
            self.subparsers.add_parser(name, help=listed, add_help=False)
            return None
        return self.subparsers.add_parser(name, help=listed, description=description,
                                          allow_abbrev=False, formatter_class=_Formatter)


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is not in the range {low}<=x" + (f"<={high}" if high else ""))
        return value

    return parse


def _float_from(low: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not in the range x>={low}")
        return value

    return parse


def _when(raw: str) -> datetime:
    for fmt in WHEN_FORMATS:
        try:
            return datetime.strptime(raw, fmt)  # no zone: UTC, set by _utc
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(
        f"{raw!r} does not match the formats " + ", ".join(f"'{f}'" for f in WHEN_FORMATS))


def main(argv: Sequence[str] | None = None) -> None:
    """The program (the command line in sys.argv), or `argv` run in a process that goes on
    (a test)."""
    if argv is not None:
        _run(argv)
        return
    # As the program, parsing, --help and a command declared a moment run without the
    # cyclic GC: its collections while asyncio and asyncpg import took ~15 ms, and what is
    # frozen out of it is not looked through again as the interpreter exits (~20 ms). Any
    # other command (serve, runs watch, projections rebuild, ...) collects as usual once it
    # is known.
    gc.disable()
    try:
        _run(sys.argv[1:])
    finally:
        if not gc.isenabled():
            gc.freeze()


def _run(argv: Sequence[str]) -> None:
    args, extra = parser(set(argv)).parse_known_args(argv)
    if not args._moment:
        gc.enable()
    command: Callable[..., None] | None = args._command
    if command is None:  # a group alone: what it has
        args._parser.print_help()
        sys.exit(2)
    if extra:
        if not getattr(args, "_extra", False):
            args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra
    try:
        command(**{name: getattr(args, name) for name in args._names})
    except Exit as exc:
        sys.exit(exc.code)
    except KeyboardInterrupt:  # Ctrl-C in `runs watch` or `runs logs -f`: no traceback
        echo("\nAborted!", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
