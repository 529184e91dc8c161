"""`uses: health`: `GET <app url>/health` until it answers 200, with bounded retries and backoff.

Like the Cloud-Native Toolkit's `health-check` task. The app's URL is `with: url` (the
`health_url` setting) when given, else `<health_protocol>://<host>` where host is the first
rule's host of the app's Ingress (named after setup's `app_name`, in deploy's `namespace`);
`health_port` adds a port for an ingress that does not listen on the protocol's default.
Each request has `health_timeout` seconds; up to `health_attempts` requests are made, with a
delay doubling from `health_backoff` up to `health_backoff_max` between them.

Outputs:
- `url`: the URL that answered
- `status`: its HTTP status (200)
- `latency_ms`: how long that answer took, in milliseconds
- `attempts`: how many requests it took
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from handlers.base import StepFailed, StepRequest
from handlers.cd_settings import DeliverySettings, for_request
from handlers.kube import Cluster


async def app_url(request: StepRequest, settings: DeliverySettings) -> str:
    if settings.health_url:
        return settings.health_url
    app_name = str(request.output_of("setup", "app_name"))
    namespace = str(request.inputs.get("deploy", {}).get("namespace") or settings.dev_namespace)
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
    port = f":{settings.health_port}" if settings.health_port else ""
    return f"{settings.health_protocol}://{host}{port}"


async def run(request: StepRequest) -> dict[str, Any]:
    settings = for_request(request)
    url = (await app_url(request, settings)).rstrip("/") + settings.health_path
    timeout = aiohttp.ClientTimeout(total=settings.health_timeout)
    last = ""
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for attempt in range(1, settings.health_attempts + 1):
            started = time.monotonic()
            try:
                async with session.get(url, allow_redirects=True) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = "timed out" if isinstance(exc, TimeoutError) else f"{exc}"
            else:
                latency_ms = round((time.monotonic() - started) * 1000, 1)
                if status == 200:
                    request.log.line(f"GET {url}: 200 in {latency_ms} ms (attempt {attempt})")
                    return {
                        "url": url,
                        "status": status,
                        "latency_ms": latency_ms,
                        "attempts": attempt,
                    }
                last = f"HTTP {status}"
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
