"""HTTP API (aiohttp): health, metrics, runs, events, logs, operator actions, live stream,
webhooks.

Every call but /health, webhooks and the web UI's pages and assets (cistate.adapters.http.
pages: the page logs in itself) needs `Authorization: Bearer <token>`
(CISTATE_API_TOKEN): reads a token of scope `read` or more, operator calls `operate` or more;
the token's name becomes the actor of the events they cause. CISTATE_API_READ_AUTH=0 opens
reads for a local setup. Webhooks are authenticated by their host's signature instead.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import uuid
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from cistate.adapters.http import pages, webhooks
from cistate.adapters.postgres.store import EventQuery, RunQuery, Store
from cistate.adapters.rabbitmq.bus import Bus
from cistate.config import ApiToken, NotifySettings, Settings
from cistate.domain.messages import Control, ControlAction, message_uuid
from cistate.domain.notices import auth_headers, repo_path
from cistate.domain.resource import TRUST_GATE
from cistate.domain.run import RunState, StepState
from cistate.domain.status import RUN_STATES, TERMINAL
from cistate.service import livelog
from cistate.service.metrics import CONTENT_TYPE, Counts, exposition
from cistate.service.orchestrator import Orchestrator, Outcome, Unprocessable
from cistate.service.worker import Worker


class App(Protocol):
    """What the API serves from: the process's settings and the parts bootstrap made."""

    @property
    def settings(self) -> Settings: ...
    @property
    def store(self) -> Store: ...
    @property
    def bus(self) -> Bus | None: ...
    @property
    def orchestrator(self) -> Orchestrator: ...
    @property
    def worker(self) -> Worker | None: ...


APP_KEY: web.AppKey[App] = web.AppKey("cistate", App)
ACTOR_KEY: web.RequestKey[str] = web.RequestKey("cistate.actor", str)
HOLDER_KEY: web.RequestKey[ApiToken] = web.RequestKey("cistate.holder", ApiToken)
WHOAMI = "/api/v1/whoami"
MAX_BODY = 1 << 20
STREAM_POLL_SECONDS = 0.25
MAX_SEQ = 2**31 - 1  # events.seq is an integer
MAX_POSITION = 2**63 - 1  # events.position is a bigint


def make_app(app: App) -> web.Application:
    web_app = web.Application(middlewares=[_errors, _auth], client_max_size=MAX_BODY)
    web_app[APP_KEY] = app
    web_app.add_routes([
        web.get("/health", health),
        web.get("/metrics", metrics),
        web.get(WHOAMI, whoami),
        web.get("/api/v1/runs", list_runs),
        web.get("/api/v1/runs/{id}", show_run),
        web.get("/api/v1/runs/{id}/events", run_events),
        web.get("/api/v1/runs/{id}/steps/{step}/log", step_log),
        web.get("/api/v1/runs/{id}/stream", stream),
        web.get("/api/v1/runs/{id}/verify", verify_run),
        web.post("/api/v1/runs/{id}/retry", retry),
        web.post("/api/v1/runs/{id}/cancel", cancel),
        web.post("/api/v1/runs/{id}/steps/{step}/{decision}", approval),
        web.post("/api/v1/runs/{id}/rerun", rerun),
        web.get("/api/v1/events", list_events),
        web.post("/api/v1/webhooks/{provider}", webhook),
        *pages.routes(),
    ])
    return web_app


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        if "\x00" in request.path or any("\x00" in k or "\x00" in v
                                          for k, v in request.query.items()):
            raise ApiError(400, "the path and the query must not contain NUL characters")
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return web.json_response({"error": exc.message, **exc.extra}, status=exc.status,
                                 headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    settings = request.app[APP_KEY].settings
    public = (request.path == "/health" or request.path.startswith("/api/v1/webhooks/")
              or pages.is_public(request.path))
    needed = "read" if request.method in ("GET", "HEAD") else "operate"
    # whoami checks a token it is given even when reads are open: the UI's login asks it
    given_to_whoami = request.path == WHOAMI and "Authorization" in request.headers
    if not public and (needed != "read" or settings.api_read_auth or given_to_whoami):
        tokens = settings.api_tokens
        if not tokens:
            raise ApiError(503, "this API has no tokens: set CISTATE_API_TOKEN "
                                "(NAME:TOKEN[:read|operate|admin]) to allow this call")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # as bytes: a token with non-ASCII text is just wrong (401), never an error
        given_bytes = given.encode("utf-8", "replace")
        holder = next((t for token, t in tokens.items() if scheme.lower() == "bearer"
                       and hmac.compare_digest(token.encode(), given_bytes)), None)
        if holder is None:
            raise ApiError(401, "missing or unknown bearer token")
        if not holder.allows(needed):
            raise ApiError(403, f"token {holder.name!r} has scope {holder.scope!r}; this "
                                f"call needs {needed!r}")
        request[ACTOR_KEY] = f"api:{holder.name}"
        request[HOLDER_KEY] = holder
    response: web.StreamResponse = await handler(request)
    return response


# -- reads


async def health(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    checks: dict[str, str] = {}
    try:
        await app.store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"failing: {type(exc).__name__}"
    try:
        if app.bus is None:
            raise ConnectionError("no broker configured")
        await app.bus.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"failing: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ok" if ok else "failing", **checks},
                             status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: this process's counts, and the store's state now."""
    app = request.app[APP_KEY]
    counts = Counts(messages=app.orchestrator.outcomes)
    if app.worker is not None:
        counts.step_attempts = app.worker.attempts
    if app.bus is not None:
        counts.ack_frames = app.bus.acker.frames_sent
        counts.deliveries_finished = app.bus.acker.finished
    body = exposition(counts, await app.store.gauges())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def whoami(request: web.Request) -> web.Response:
    """The bearer token's name and scope (what the UI shows and enables buttons by); without
    a token, where reads are open, an anonymous reader."""
    holder = request.get(HOLDER_KEY)
    reads_open = not request.app[APP_KEY].settings.api_read_auth
    if holder is None:
        return web.json_response({"name": None, "scope": "read", "reads_open": reads_open})
    return web.json_response({"name": holder.name, "scope": holder.scope,
                              "reads_open": reads_open})


async def list_runs(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    q = request.query
    state = q.get("state")
    if state is not None and state not in RUN_STATES:
        raise ApiError(400, f"state must be one of {', '.join(RUN_STATES)}")
    limit = _limit(request, 50)
    runs = await app.store.list_runs(RunQuery(
        state=state, repo=q.get("repo"), ref=q.get("ref"), commit=q.get("commit"),
        step=q.get("step"), since=_time(request, "since"), until=_time(request, "until"),
        before=_run_cursor(q.get("cursor")), pipeline=q.get("pipeline"), limit=limit))
    next_cursor = None
    if len(runs) == limit and runs[-1].created_at is not None:
        raw = f"{runs[-1].created_at.isoformat()}|{runs[-1].id}"
        next_cursor = base64.urlsafe_b64encode(raw.encode()).decode()
    return web.json_response({"runs": [run.to_json(with_steps=False) for run in runs],
                              "next_cursor": next_cursor})


async def show_run(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    run_id = _run_id(request)
    at = request.query.get("at")
    if at is not None:
        if not _digits(at) or not 1 <= int(at) <= MAX_SEQ:
            raise ApiError(400, f"at must be an event seq (a whole number from 1 to {MAX_SEQ})")
        state = await app.store.state_at(run_id, int(at))
    else:
        state = await app.store.load(run_id)
    if state is None:
        raise ApiError(404, f"no run {run_id}")
    body = state.to_json()
    # what it waits for now: the holder of each group or lock its claims wait for
    body["waiting_for"] = await app.store.waits_of(state) if at is None else []
    return web.json_response(body)


async def run_events(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    run_id = _run_id(request)
    events = await app.store.events(run_id)
    if not events:
        raise ApiError(404, f"no run {run_id}")
    return web.json_response({"events": [e.to_json() for e in events]})


async def verify_run(request: web.Request) -> web.Response:
    """The run's events checked against their hash chain: 200 whatever the verdict (`ok`,
    and each problem by seq)."""
    app = request.app[APP_KEY]
    run_id = _run_id(request)
    check = await app.store.verify_run(run_id)
    if check is None:
        raise ApiError(404, f"no run {run_id}")
    return web.json_response(check.to_json())


async def list_events(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    q = request.query
    run_id = None
    if "run_id" in q:
        try:
            run_id = uuid.UUID(q["run_id"])
        except ValueError:
            raise ApiError(400, "run_id must be a UUID") from None
    cursor = q.get("cursor")
    if cursor is not None and (not _digits(cursor) or int(cursor) > MAX_POSITION):
        raise ApiError(400, "cursor must be the next_cursor of a previous page")
    limit = _limit(request, 100)
    events = await app.store.audit(EventQuery(
        run_id=run_id, repo=q.get("repo"), ref=q.get("ref"), commit=q.get("commit"),
        type=q.get("type"), step=q.get("step"), actor=q.get("actor"),
        since=_time(request, "since"), until=_time(request, "until"),
        before=int(cursor) if cursor else None, limit=limit))
    next_cursor = str(events[-1].position) if len(events) == limit else None
    return web.json_response({"events": [e.to_json() for e in events],
                              "next_cursor": next_cursor})


async def step_log(request: web.Request) -> web.StreamResponse:
    app = request.app[APP_KEY]
    run_id = _run_id(request)
    step = request.match_info["step"]
    if request.query.get("follow") in ("1", "true"):
        return await _follow_log(request, app, run_id, step)
    logs = await app.store.step_log(run_id, step)
    if not logs:
        raise ApiError(404, f"no log for step {step!r} of run {run_id}")
    text = "".join(f"--- attempt {attempt} ---\n{body}" for attempt, body in logs)
    return web.Response(text=text, content_type="text/plain")


async def _follow_log(request: web.Request, app: App, run_id: uuid.UUID,
                      step: str) -> web.StreamResponse:
    """Server-sent events: a `log` event per piece of the step's output as it comes
    ({"text", "attempt", "execution", "seq", "final"}; an execution's first piece begins
    with its header line), then `end` with how it ended ({"state", "exit_status"}). Each
    `log` event has an `id:`; a client that reconnects with it as `Last-Event-ID` reads on
    from the piece after it. A step that ended before the client came gets its stored log,
    one event per attempt (ids `s<attempt>`)."""
    state = await app.store.load(run_id)
    if state is None or step not in state.steps:
        raise ApiError(404, f"no step {step!r} in run {run_id}" if state
                       else f"no run {run_id}")
    resume = _last_event_id(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        await _stream_log(response, app, run_id, step, state.steps[step], resume)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return response  # the follower went away
    await response.write_eof()
    return response


def _last_event_id(request: web.Request) -> tuple[str, int] | None:
    """Where a reconnecting client left off: ("live", piece id) or ("stored", attempt)."""
    value = request.headers.get("Last-Event-ID", "").strip()
    if not value:
        return None
    stored = value.startswith("s")
    number = value.removeprefix("s")
    if not number.isdecimal() or len(number) > 18:
        raise ApiError(400, f"Last-Event-ID must be the id of an event of this stream, not "
                            f"{value[:40]!r}")
    return ("stored" if stored else "live"), int(number)


async def _stream_log(response: web.StreamResponse, app: App, run_id: uuid.UUID, step: str,
                      current: StepState, resume: tuple[str, int] | None) -> None:
    if (current.state in livelog.ENDED and resume is None) or \
            (resume is not None and resume[0] == "stored"):
        # over already: the stored log, then the end
        after = resume[1] if resume is not None else 0
        for attempt, text in await app.store.step_log(run_id, step):
            if attempt > after:
                await _sse(response, "log", {
                    "text": livelog.header(attempt, False) + text, "attempt": attempt,
                    "execution": None, "seq": None, "final": True}, f"s{attempt}")
        await _sse(response, "end", {"state": current.state, "exit_status":
                                     livelog.exit_status(current.state, current.error)})
        return
    async for item in livelog.follow(app.store, run_id, step,
                                     after=resume[1] if resume is not None else 0):
        if isinstance(item, livelog.Piece):
            chunk = item.chunk
            await _sse(response, "log", {
                "text": item.header + chunk.text, "attempt": chunk.attempt,
                "execution": str(chunk.execution), "seq": chunk.seq, "final": chunk.final},
                str(chunk.id))
        else:
            await _sse(response, "end", {"state": item.state,
                                         "exit_status": item.exit_status})


async def _sse(response: web.StreamResponse, event: str, data: dict[str, Any],
               event_id: str | None = None) -> None:
    head = f"id: {event_id}\n" if event_id is not None else ""
    await response.write(f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode())


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the run's events as they are recorded, until the run ends."""
    app = request.app[APP_KEY]
    run_id = _run_id(request)
    state = await app.store.load(run_id)
    if state is None:
        raise ApiError(404, f"no run {run_id}")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    seen = 0
    while True:
        events = await app.store.events(run_id, after_seq=seen)
        for event in events:
            await response.write(
                f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(event.to_json())}\n\n"
                .encode())
            seen = event.seq
        state = await app.store.load(run_id)
        if state is not None and state.status in TERMINAL \
                and state.version <= seen:
            await response.write(f"event: end\ndata: {json.dumps(state.to_json())}\n\n".encode())
            break
        await asyncio.sleep(STREAM_POLL_SECONDS)
    await response.write_eof()
    return response


# -- operator actions


async def retry(request: web.Request) -> web.Response:
    body = await _json_body(request)
    run_id, reason, step = _run_id(request), _str(body, "reason"), _str(body, "from_step")
    _check_control(run_id, "retry", request[ACTOR_KEY], reason, step)
    outcome = await request.app[APP_KEY].orchestrator.control(
        run_id, "retry", request[ACTOR_KEY], reason=reason, step=step)
    return _answer(outcome, 202)


async def cancel(request: web.Request) -> web.Response:
    body = await _json_body(request)
    run_id, reason = _run_id(request), _str(body, "reason")
    _check_control(run_id, "cancel", request[ACTOR_KEY], reason, None)
    outcome = await request.app[APP_KEY].orchestrator.control(
        run_id, "cancel", request[ACTOR_KEY], reason=reason)
    return _answer(outcome, 202)


async def approval(request: web.Request) -> web.Response:
    """An approval step's decision (approve or reject); the token's name must be one of its
    approvers."""
    decision = request.match_info["decision"]
    if decision not in ("approve", "reject"):
        raise ApiError(404, f"no such decision {decision!r}: approve or reject")
    action: ControlAction = "approve" if decision == "approve" else "reject"
    body = await _json_body(request)
    run_id, reason, step = _run_id(request), _str(body, "reason"), request.match_info["step"]
    _check_control(run_id, action, request[ACTOR_KEY], reason, step)
    outcome = await request.app[APP_KEY].orchestrator.control(
        run_id, action, request[ACTOR_KEY], reason=reason, step=step)
    return _answer(outcome, 200)


async def rerun(request: web.Request) -> web.Response:
    outcome = await request.app[APP_KEY].orchestrator.rerun(_run_id(request),
                                                            request[ACTOR_KEY])
    return _answer(outcome, 201)


def _check_control(run_id: uuid.UUID, action: ControlAction, actor: str, reason: str | None,
                   step: str | None) -> None:
    """400 for what the Control message would refuse (a 500 if left to the orchestrator)."""
    try:
        Control(run_id=run_id, action=action, reason=reason, step=step)
    except ValidationError as exc:
        names = {"step": "from_step"}
        raise ApiError(400, "; ".join(
            f"{names.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'body'}: {e['msg']}"
            for e in exc.errors())) from None


def _answer(outcome: Outcome, success: int) -> web.Response:
    if outcome.status == "not_found":
        raise ApiError(404, outcome.detail or "no such run")
    if outcome.status in ("rejected", "ignored"):
        raise ApiError(409, outcome.detail or "not allowed in the run's state",
                       run=outcome.state.to_json() if outcome.state else None)
    assert outcome.state is not None
    return web.json_response(outcome.state.to_json(), status=success)


# -- producers


async def webhook(request: web.Request) -> web.Response:
    """A git host's push webhook: verified, then submitted like a push from the bus."""
    app = request.app[APP_KEY]
    provider = request.match_info["provider"]
    try:
        webhooks.check_size(request.content_length)
        body = await _read_at_most(request, webhooks.MAX_BODY_BYTES + 1)
        received = webhooks.handle(provider, request.headers, body, app.settings.webhook_secret)
    except webhooks.WebhookError as exc:
        raise ApiError(exc.status, exc.reason) from None
    if received.closed is not None:
        cancelled = await _cancel_pull_request(app, received.closed, provider)
        return web.json_response({"status": "accepted", "cancelled": cancelled}, status=202)
    if received.command is not None:
        return await _comment_command(app, received.command, provider)
    if received.push is None:
        return web.json_response({"status": "ignored", "reason": received.ignored}, status=202)
    try:
        outcome = await app.orchestrator.submit(
            received.push, message_uuid(received.delivery_id), actor=f"webhook:{provider}")
    except Unprocessable as exc:  # e.g. a repo URL this deployment does not clone
        raise ApiError(422, str(exc)) from None
    if outcome.status == "ignored" and outcome.state is None:
        return web.json_response({"status": "ignored", "reason": outcome.detail}, status=202)
    return web.json_response({"status": "accepted", "run_id": str(outcome.run_id),
                              "duplicate": outcome.status != "recorded"}, status=202)


async def _pull_request_runs(app: App, pull: webhooks.PullRequestRef) -> list[RunState]:
    return await app.store.list_runs(RunQuery(repo=pull.repo, ref=pull.ref, limit=200))


async def _cancel_pull_request(app: App, pull: webhooks.PullRequestRef,
                               provider: str) -> list[str]:
    """A pull request closed (or merged): its runs that have not ended are cancelled."""
    cancelled = []
    for run in await _pull_request_runs(app, pull):
        if run.status in TERMINAL:
            continue
        outcome = await app.orchestrator.control(
            run.id, "cancel", f"{provider}:pull-request",
            reason=f"pull request #{pull.number} was closed")
        if outcome.status == "recorded":
            cancelled.append(str(run.id))
    return cancelled


async def _may_write(provider: str, repo: str, user: str) -> bool:
    """On GitHub, a collaborator with write permission may run commands too: GitHub's
    `GET /repos/{owner}/{repo}/collaborators/{username}/permission` says (admin, maintain or
    write). Anything but such an answer (no token, an error, a timeout) means no."""
    settings = NotifySettings()
    token = settings.token("github")
    path = repo_path(repo)
    if provider != "github" or not token or path is None or path.count("/") != 1:
        return False
    url = (f"{settings.github_api_url.rstrip('/')}/repos/{path}/collaborators/"
           f"{quote(user, safe='')}/permission")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                http.get(url, headers=auth_headers("github", token)) as response:
            if response.status != 200:
                return False
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return isinstance(body, dict) and body.get("permission") in ("admin", "maintain", "write")


async def _comment_command(app: App, command: webhooks.Command,
                           provider: str) -> web.Response:
    """`/retest [STEP]`, `/cancel`, `/ok-to-test` from a user of CISTATE_TRUSTED_USERS; the
    commenter is the actor of what it does. Anyone else's is acknowledged and does nothing."""
    def answer(status: str, reason: str | None = None, **extra: Any) -> web.Response:
        body = {"status": status, **({"reason": reason} if reason else {}), **extra}
        return web.json_response(body, status=202)

    if (command.user not in app.settings.trusted_users
            and not await _may_write(provider, command.pull_request.repo, command.user)):
        return answer("ignored", f"{command.user} may not run /{command.name}: not one of "
                                 "CISTATE_TRUSTED_USERS"
                                 + (" nor a collaborator with write permission"
                                    if provider == "github" else ""))
    actor = f"{provider}:{command.user}"
    runs = await _pull_request_runs(app, command.pull_request)  # newest first
    number = command.pull_request.number
    if command.name == "retest":
        ended = [run for run in runs if run.status in ("failed", "cancelled")]
        if not ended or (runs and runs[0].status not in ("failed", "cancelled")):
            return answer("ignored", f"pull request #{number}'s latest run did not fail")
        outcome = await app.orchestrator.control(ended[0].id, "retry", actor,
                                                 reason="/retest", step=command.step)
        acted = [outcome]
    elif command.name == "cancel":
        acted = [await app.orchestrator.control(run.id, "cancel", actor, reason="/cancel")
                 for run in runs if run.status not in TERMINAL]
    else:
        acted = [await app.orchestrator.control(run.id, "ok_to_test", actor,
                                                reason="/ok-to-test")
                 for run in runs if run.hold_state(TRUST_GATE) == "waiting"]
    done = [str(o.run_id) for o in acted if o.status == "recorded"]
    refused = [o.detail for o in acted if o.status != "recorded"]
    if not done:
        return answer("ignored", "; ".join(d for d in refused if d)
                      or f"no run of pull request #{number} to /{command.name}")
    return answer("accepted", None, runs=done)


# -- parsing


def _run_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise ApiError(400, f"{request.match_info['id']!r} is not a run id (a UUID)") from None


def _digits(raw: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses."""
    return raw.isascii() and raw.isdigit()


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit", str(default))
    if not _digits(raw) or not 1 <= int(raw) <= 1000:
        raise ApiError(400, "limit must be a whole number from 1 to 1000")
    return int(raw)


def _time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an ISO 8601 time, e.g. 2026-11-01T00:00:00Z"
                       ) from None
    if value.tzinfo is None:
        raise ApiError(400, f"{name} needs a time zone (e.g. a trailing Z)")
    try:
        value.astimezone(UTC)  # what the database driver does; years 0 and 10000 do not exist
    except OverflowError:
        raise ApiError(400, f"{name} is out of range") from None
    return value


def _run_cursor(raw: str | None) -> tuple[datetime, uuid.UUID] | None:
    if raw is None:
        return None
    try:
        when, _, ident = base64.urlsafe_b64decode(raw.encode()).decode().partition("|")
        created_at = datetime.fromisoformat(when)
        if created_at.tzinfo is None:  # every next_cursor has one
            raise ValueError(when)
        created_at.astimezone(UTC)  # OverflowError for years 0 and 10000
        return created_at, uuid.UUID(ident)
    except (ValueError, OverflowError):
        raise ApiError(400, "cursor must be the next_cursor of a previous page") from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        # JSON is UTF-8 (RFC 8259): the bytes are parsed as sent, whatever charset is claimed
        # (request.json() decodes with it, and an unknown one raised LookupError: a 500).
        body = json.loads(await request.read())
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise ApiError(400, "body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string")
    if value is not None and ("\x00" in value or not _utf8(value)):
        # The database refuses both in JSON: a 500 when the event is stored.
        raise ApiError(400, f"{key} must be UTF-8 text without NUL characters")
    return value


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from "\ud800" in the JSON
        return False
    return True


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    """The body up to `limit` bytes. StreamReader.read(n) returns one chunk of at most n
    bytes, not n bytes: reading once cut longer bodies short and failed their signature."""
    body = bytearray()
    while len(body) < limit:
        chunk = await request.content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)
