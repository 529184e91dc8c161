"""HTTP API (aiohttp): health, runs, events, step logs."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from cistate.app import App

APP_KEY: web.AppKey[App] = web.AppKey("cistate", App)


def make_app(app: App) -> web.Application:
    web_app = web.Application(middlewares=[_errors])
    web_app[APP_KEY] = app
    web_app.add_routes([
        web.get("/health", health),
        web.get("/api/v1/runs", list_runs),
        web.get("/api/v1/runs/{id}", show_run),
        web.get("/api/v1/runs/{id}/events", run_events),
        web.get("/api/v1/runs/{id}/steps/{step}/log", step_log),
    ])
    return web_app


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        return web.json_response({"error": exc.message}, status=exc.status)


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


def _run_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise ApiError(400, f"{request.match_info['id']!r} is not a run id (a UUID)") from None


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ApiError(400, "limit must be a whole number from 1 to 1000")
    return int(raw)


async def list_runs(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    runs = await app.store.list_runs(
        state=request.query.get("state"), repo=request.query.get("repo"), limit=_limit(request))
    return web.json_response({"runs": [run.to_json(with_steps=False) for run in runs]})


async def show_run(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    run_id = _run_id(request)
    state = await app.store.load(run_id)
    if state is None:
        raise ApiError(404, f"no run {run_id}")
    return web.json_response(state.to_json())


async def run_events(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    run_id = _run_id(request)
    events = await app.store.events(run_id)
    if not events:
        raise ApiError(404, f"no run {run_id}")
    return web.json_response({"events": [e.to_json() for e in events]})


async def step_log(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    run_id = _run_id(request)
    step = request.match_info["step"]
    logs = await app.store.step_log(run_id, step)
    if not logs:
        raise ApiError(404, f"no log for step {step!r} of run {run_id}")
    text = "".join(f"--- attempt {attempt} ---\n{body}" for attempt, body in logs)
    return web.Response(text=text, content_type="text/plain")
