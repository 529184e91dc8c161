"""`uses: health`: `GET <app url>/health` until it answers 200, with bounded retries and backoff.

Like the Cloud-Native Toolkit's `health-check` task. The app's URL is `with: url` (the
`health_url` setting) when given, else `<health_protocol>://<host>` where host is the first
rule's host of the app's Ingress (named after setup's `app_name`, in deploy's `namespace`,
else in `dev_namespace` rendered for the run as deploy renders it);
`health_port` adds a port for an ingress that does not listen on the protocol's default.
Each request has `health_timeout` seconds; up to `health_attempts` requests are made, with a
delay doubling from `health_backoff` up to `health_backoff_max` between them. The defaults
(15 attempts, 0.1 s doubling to 10 s) start fast, so an app that is up right after its rollout
is seen within a tenth of a second, and still give a slow one about 80 s.

Only the app is asked: the worker's network reaches more than the app does (its database, its
broker), and the chart, the Ingress and the app's answers are the pushed repo's. So the
request goes to that URL's host and port alone, whatever `health_path` says; a redirect is
followed only to the same scheme, host and port, at most `MAX_REDIRECTS` times in a row (more
counts as an unhealthy answer); a redirect anywhere else fails the step at once, without
retries, and is never followed. Of an answer other than 200 only its status and the first
`SHOWN` characters of its body reach the log, the error and the events, as printable text;
of a server that does not speak HTTP, only that it does not.

Outputs:
- `url`: the URL that answered (after redirects within the app)
- `status`: its HTTP status (200)
- `latency_ms`: how long that answer took, redirects included, in milliseconds
- `attempts`: how many requests it took
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
from yarl import URL

from handlers.base import StepFailed, StepRequest
from handlers.cd_settings import DeliverySettings, for_request
from handlers.kube import Cluster

MAX_REDIRECTS = 5
SHOWN = 200  # characters of an answer's body, or of a server's error, that are shown
_READ = 4 * SHOWN  # bytes of a failing answer's body read: enough for SHOWN characters
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SPACE = re.compile(r"\s+")
# the parts of a host name (an Ingress host is one, checked by the API server)
_HOST = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


async def app_url(request: StepRequest, settings: DeliverySettings) -> URL:
    """The app's health URL: the configured URL or the Ingress host, with `health_path`."""
    if settings.health_url:
        base = URL(settings.health_url)
    else:
        base = URL.build(scheme=settings.health_protocol,
                         host=await _ingress_host(request, settings),
                         port=settings.health_port)
    # the path goes into the path: whatever it holds, the host stays the app's
    return base.with_path(base.path.rstrip("/") + settings.health_path)


def deployed_namespace(request: StepRequest, settings: DeliverySettings) -> str:
    """Where the app is: deploy's `namespace` output, else `dev_namespace` rendered for the
    run as deploy renders it (a template like `dev-${branch}` names the branch's own)."""
    deployed = request.outputs_from("deploy").get("namespace")
    return str(deployed) if deployed else settings.namespace_for(request)


async def _ingress_host(request: StepRequest, settings: DeliverySettings) -> str:
    app_name = str(request.output_of("setup", "app_name"))
    namespace = deployed_namespace(request, settings)
    async with Cluster.connect(settings, request.log) as cluster:
        ingress = await cluster.get("networking.k8s.io/v1", "Ingress", app_name, namespace)
    rules = ((ingress or {}).get("spec") or {}).get("rules") or []
    host = next((rule.get("host") for rule in rules if rule.get("host")), None)
    if not host:
        problem = "has no Ingress" if ingress is None else "has an Ingress without a host"
        raise StepFailed(
            f"app {app_name} {problem} in namespace {namespace}, so there is no URL to check; "
            "give one with `with: url:` or add an Ingress with a host to the chart",
            retryable=False,
        )
    if not _HOST.fullmatch(str(host)):
        raise StepFailed(
            f"the Ingress of app {app_name} in namespace {namespace} has host "
            f"{printable(str(host))!r}, which is not one host name to ask (a wildcard?); give "
            "the URL with `with: url:`",
            retryable=False,
        )
    return str(host)


def printable(raw: bytes | str, limit: int = SHOWN) -> str:
    """At most `limit` characters of `raw` as one line of text: whitespace runs become one
    space, anything else that is not printable (control characters, bytes that are not
    UTF-8) becomes `?`."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = _SPACE.sub(" ", text[: limit * 2])
    shown = "".join(c if c.isprintable() and c != "\ufffd" else "?" for c in text)
    return shown[:limit].strip()


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port


async def _read_some(response: aiohttp.ClientResponse) -> bytes:
    """The first `_READ` bytes of the body, the rest left unread (a huge body stays unread)."""
    data = b""
    while len(data) < _READ:
        chunk = await response.content.read(_READ - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def _ask(session: aiohttp.ClientSession, url: URL) -> tuple[int | None, str, URL]:
    """One health check: (status, what was wrong, the URL that answered), redirects followed
    within the app's own scheme, host and port."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(current, allow_redirects=False) as response:
            status = response.status
            if status == 200:
                return status, "", current
            if status not in _REDIRECTS:
                body = printable(await _read_some(response))
                return status, f"HTTP {status}: {body}" if body else f"HTTP {status}", current
            location = response.headers.get("Location", "")
        try:
            target = current.join(URL(location))
        except ValueError:
            target = URL()
        if _origin(target) != _origin(url):
            raise StepFailed(
                f"the app's health endpoint {url} redirects to {printable(location)}, which is "
                f"not the app ({url.origin()}); cistate asks only the app and follows "
                "redirects only to its own host and port: point `with: url` (or the chart's "
                "Ingress) at the endpoint itself",
                retryable=False,
            )
        current = target
    return None, f"more than {MAX_REDIRECTS} redirects", current


def _problem(exc: aiohttp.ClientError | TimeoutError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientResponseError):
        # the parser's message quotes what the server sent: say no more than this
        return "not an HTTP answer (is the URL the app's?)"
    return printable(f"{type(exc).__name__}: {exc}")


async def run(request: StepRequest) -> dict[str, Any]:
    settings = for_request(request)
    url = await app_url(request, settings)
    timeout = aiohttp.ClientTimeout(total=settings.health_timeout)
    last = ""
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for attempt in range(1, settings.health_attempts + 1):
            started = time.monotonic()
            try:
                status, last, answered = await _ask(session, url)
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = _problem(exc)
            else:
                latency_ms = round((time.monotonic() - started) * 1000, 1)
                if status == 200:
                    request.log.line(f"GET {answered}: 200 in {latency_ms} ms (attempt {attempt})")
                    return {
                        "url": str(answered),
                        "status": status,
                        "latency_ms": latency_ms,
                        "attempts": attempt,
                    }
            if attempt < settings.health_attempts:
                delay = min(
                    settings.health_backoff * 2 ** (attempt - 1), settings.health_backoff_max
                )
                request.log.line(
                    f"GET {url}: {last}; attempt {attempt + 1} of {settings.health_attempts} "
                    f"in {delay:.2f}s"
                )
                await asyncio.sleep(delay)
    raise StepFailed(
        f"the app's health endpoint {url} did not answer 200 in {settings.health_attempts} "
        f"attempts (last: {last}); check the app's pods and logs",
        retryable=True,
    )
