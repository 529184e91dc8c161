"""The web UI's pages and assets: built files shipped in the package (ui/dist/, made from
ui/src/ by `bash scripts/ui.sh build`), served by the `api` role.

The pages are public: the login happens in the page, which keeps the token in the browser's
session and sends it as a bearer token with every API call it makes. Each page is the same
HTML shell (the script draws the page the path names); run data is only ever put in the page
as text, and the Content-Security-Policy lets the page load nothing but this service's own
script, style and API, so a hostile repo name or log line cannot run as code.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from aiohttp import web

DIST = Path(__file__).resolve().parent / "ui" / "dist"
ASSET_PREFIX = "/ui/"
# the assets a page may load, by name: nothing else of the package is served
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'none'; object-src 'none'; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new build is picked up at once; the files are small
}
PAGES = ("/", "/runs/{id}", "/audit")  # the paths of the UI's pages, all public


def is_public(path: str) -> bool:
    """Whether a request path is one of the UI's (pages and assets): no bearer token."""
    return (path in ("/", "/audit") or path.startswith(ASSET_PREFIX)
            or (path.startswith("/runs/") and path.count("/") == 2))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", page),
        web.get("/runs/{id}", run_page),
        web.get("/audit", page),
        web.get(ASSET_PREFIX + "{name}", asset),
    ]


def _read(name: str) -> bytes:
    try:
        return (DIST / name).read_bytes()
    except FileNotFoundError:
        raise web.HTTPServiceUnavailable(
            reason=f"the web UI is not built: run `bash scripts/ui.sh build` ({name} is "
                   f"missing from {DIST})") from None


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_read("index.html"), content_type="text/html", charset="utf-8",
                        headers=HEADERS)


async def run_page(request: web.Request) -> web.Response:
    try:
        uuid.UUID(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound(reason=f"{request.match_info['id']!r} is not a run id") from None
    return await page(request)


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound(reason=f"no asset {name!r}")
    return web.Response(body=_read(name), content_type=content_type, charset="utf-8",
                        headers=HEADERS)
