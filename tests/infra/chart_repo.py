"""A small but real HTTP chart repository for tests: a stand-in for Artifactory's generic /
Helm repositories (no Artifactory or ChartMuseum package is installable here).

    python tests/infra/chart_repo.py --root DIR --port PORT [--user NAME:PASSWORD]

Serves the files under DIR at `/<path>`: `GET`/`HEAD` answer with the content and a strong
`ETag` (the sha256 of the content); `PUT` stores the body, honouring `If-Match: "<etag>"` and
`If-None-Match: *` with `412 Precondition Failed` when the file changed (or exists), so a
client can update `index.yaml` with optimistic concurrency. With --user every request needs
that basic-auth user. With --index-delay SECONDS a GET of index.yaml reads the file and then
waits that long before answering, so that tests can make concurrent merges overlap.
Prints `ready <port>` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
from pathlib import Path

from aiohttp import web


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest() + '"'


def make_app(root: Path, user: str | None, index_delay: float = 0.0) -> web.Application:
    lock = asyncio.Lock()  # one PUT at a time: compare-and-set must be atomic

    def locate(request: web.Request) -> Path:
        rel = request.match_info["path"]
        path = (root / rel).resolve()
        if root.resolve() not in path.parents or not rel:
            raise web.HTTPNotFound()
        return path

    @web.middleware
    async def auth(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if user is not None:
            expected = "Basic " + base64.b64encode(user.encode()).decode()
            if request.headers.get("Authorization") != expected:
                raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="charts"'})
        return await handler(request)

    async def get(request: web.Request) -> web.Response:
        path = locate(request)
        if not path.is_file():
            raise web.HTTPNotFound(text=f"{request.path} not found\n")
        data = path.read_bytes()
        if index_delay and path.name == "index.yaml":
            await asyncio.sleep(index_delay)
        body = b"" if request.method == "HEAD" else data
        return web.Response(body=body, headers={"ETag": etag_of(data)})

    async def put(request: web.Request) -> web.Response:
        path = locate(request)
        data = await request.read()
        async with lock:
            current = path.read_bytes() if path.is_file() else None
            if_match = request.headers.get("If-Match")
            if request.headers.get("If-None-Match") == "*" and current is not None:
                raise web.HTTPPreconditionFailed(text=f"{request.path} exists\n")
            if if_match is not None and (current is None or etag_of(current) != if_match):
                raise web.HTTPPreconditionFailed(text=f"{request.path} changed\n")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        status = 201 if current is None else 200
        return web.Response(status=status, headers={"ETag": etag_of(data)})

    app = web.Application(middlewares=[auth], client_max_size=256 << 20)
    app.router.add_route("GET", "/{path:.*}", get)
    app.router.add_route("PUT", "/{path:.*}", put)
    return app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user")
    parser.add_argument("--index-delay", type=float, default=0.0)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    runner = web.AppRunner(make_app(args.root, args.user, args.index_delay))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"ready {args.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
