"""`uses: qa-sync`: wait until Argo CD has synced the QA environment to the GitOps commit.

Off in the default pipeline (one line of YAML turns it on). Polls Argo CD's REST API,
`GET <argocd_url>/api/v1/applications/<application>` with the bearer token
CISTATE_ARGOCD_TOKEN (environment only), every `argocd_interval` seconds until the
Application reports sync status `Synced` at gitops's `commit` and health `Healthy`.
Health `Degraded` at that commit fails the step at once; `argocd_timeout` seconds without
success fails it too, saying what Argo CD last reported. The application defaults to
setup's `app_name` (`with: application` names another).

Outputs:
- `application`, `revision` (the synced GitOps commit), `sync_status`, `health_status`
- skipped (gitops made no commit): the four are null, with `skipped_reason`
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp

from handlers.base import StepFailed, StepRequest
from handlers.cd_settings import for_request

REQUEST_TIMEOUT = 15.0


def at_commit(app: dict[str, Any], commit: str) -> bool:
    return str(((app.get("status") or {}).get("sync") or {}).get("revision") or "") == commit


def judge(app: dict[str, Any], commit: str) -> tuple[bool, str, str, str]:
    """(done?, what it reports, sync status, health status) of an Application at `commit`."""
    status = app.get("status") or {}
    sync = status.get("sync") or {}
    sync_status = str(sync.get("status") or "Unknown")
    revision = str(sync.get("revision") or "")
    health = str((status.get("health") or {}).get("status") or "Unknown")
    report = f"sync {sync_status} at {revision[:12] or 'no revision'}, health {health}"
    done = at_commit(app, commit) and sync_status == "Synced" and health == "Healthy"
    return done, report, sync_status, health


async def run(request: StepRequest) -> dict[str, Any]:
    settings = for_request(request)
    commit = request.output_of("gitops", "commit")
    if not commit:
        reason = request.outputs_from("gitops").get("skipped_reason") or "no GitOps commit"
        request.log.line(f"not waiting for Argo CD: {reason}")
        return {
            "application": None,
            "revision": None,
            "sync_status": None,
            "health_status": None,
            "skipped_reason": reason,
        }
    if not settings.argocd_url:
        raise StepFailed(
            "no Argo CD is configured: set CISTATE_ARGOCD_URL (and CISTATE_ARGOCD_TOKEN) on "
            "the worker",
            retryable=False,
        )
    name = settings.argocd_app or str(request.output_of("setup", "app_name"))
    url = f"{settings.argocd_url}/api/v1/applications/{quote(name, safe='')}"
    headers = {"Accept": "application/json"}
    if settings.argocd_token.get_secret_value():
        headers["Authorization"] = f"Bearer {settings.argocd_token.get_secret_value()}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.argocd_timeout
    last = "no answer yet"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(ssl=False) if settings.argocd_insecure else None
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        while True:
            reported = await _read(session, url, headers, name)
            if isinstance(reported, dict):
                done, report, sync_status, health = judge(reported, str(commit))
                if done:
                    request.log.line(f"Argo CD application {name}: {report}")
                    return {
                        "application": name,
                        "revision": str(commit),
                        "sync_status": sync_status,
                        "health_status": health,
                    }
                if health == "Degraded" and at_commit(reported, str(commit)):
                    raise StepFailed(
                        f"Argo CD application {name} is Degraded at GitOps commit "
                        f"{str(commit)[:12]} ({report}); see the application's resources in "
                        "Argo CD",
                        retryable=False,
                    )
            else:
                report = reported
            if report != last:
                request.log.line(f"Argo CD application {name}: {report}")
                last = report
            if loop.time() >= deadline:
                raise StepFailed(
                    f"Argo CD application {name} did not become Synced and Healthy at GitOps "
                    f"commit {str(commit)[:12]} within {settings.argocd_timeout:g}s "
                    f"(last: {last})",
                    retryable=True,
                )
            await asyncio.sleep(min(settings.argocd_interval, max(deadline - loop.time(), 0.01)))


async def _read(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], name: str
) -> dict[str, Any] | str:
    """The Application, or what went wrong as text (worth waiting on)."""
    try:
        async with session.get(url, headers=headers) as response:
            status = response.status
            body = await response.json(content_type=None) if status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"Argo CD unreachable ({type(exc).__name__})"
    if status in (401, 403):
        raise StepFailed(
            f"Argo CD refused to show application {name} (HTTP {status}); check "
            "CISTATE_ARGOCD_TOKEN and the token's project permissions",
            retryable=False,
        )
    if status == 404:
        return "application not found (yet)"
    if status != 200 or not isinstance(body, dict):
        return f"HTTP {status}"
    return body
