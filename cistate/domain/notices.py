"""What the world outside is told about a run: commit statuses for the git host, and
notifications for the deployment's webhook receivers.

A decision that changes what a run looks like from outside (it starts, a step ends, it ends,
an approval waits for a person) sends a `Notice` through the outbox, like any command; the
notifier (cistate.service.notifier) delivers it to the host or the receivers, in order, and
reports back (`NoticeResult`), which the run records as an event. This module decides which
notices a decision sends and what each host's API is asked; it does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

# A commit status's state as cistate names it; each host has its own names (HOST_STATES).
StatusState = Literal["pending", "success", "failure", "error"]
PROVIDERS = ("github", "gitlab", "gitea")
DESCRIPTION_CHARS = 140  # GitHub's limit; the others take as much

HOST_STATES: dict[str, dict[str, str]] = {
    "github": {"pending": "pending", "success": "success", "failure": "failure",
               "error": "error"},
    "gitea": {"pending": "pending", "success": "success", "failure": "failure",
              "error": "error"},
    # GitLab: a running pipeline is `running`, a cancelled one `canceled`
    "gitlab": {"pending": "running", "success": "success", "failure": "failed",
               "error": "canceled"},
}


@dataclass(frozen=True)
class NoticePolicy:
    """What a deployment tells the world (cistate.config.NotifySettings): commit statuses
    (when some git host's token is set), one per step too, and webhook notifications (when
    receivers are configured). Off by default: nothing is sent, nothing is recorded."""

    statuses: bool = False
    per_step: bool = False
    webhooks: bool = False

    @property
    def any(self) -> bool:
        return self.statuses or self.webhooks


QUIET = NoticePolicy()  # nothing told: the default


def run_status(machine_state: str) -> StatusState:
    """A run's commit status: pending until it ends, then by how it ended."""
    return {"succeeded": "success", "failed": "failure", "cancelled": "error"}.get(
        machine_state, "pending")  # type: ignore[return-value]


def step_status(step_state: str) -> StatusState | None:
    """A step's commit status (CISTATE_STATUS_PER_STEP), or None while it has not started."""
    states: dict[str, StatusState] = {
        "running": "pending", "waiting": "pending", "retrying": "pending",
        "succeeded": "success", "skipped": "success", "failed": "failure",
        "timed_out": "failure", "cancelled": "error"}
    return states.get(step_state)


def describe(state: StatusState, failed_step: str | None, error: str | None,
             waiting_for: str | None = None) -> str:
    """The status's description: what a developer looking at the commit needs first."""
    if state == "pending":
        text = f"waiting for {waiting_for}" if waiting_for else "running"
    elif state == "success":
        text = "succeeded"
    elif state == "error":
        text = "cancelled" + (f" at {failed_step}" if failed_step else "")
    else:
        first_line = (error or "").strip().splitlines()[0] if (error or "").strip() else ""
        text = f"{failed_step} failed" + (f": {first_line}" if first_line else "")
    return text if len(text) <= DESCRIPTION_CHARS else text[:DESCRIPTION_CHARS - 1] + "…"


def provider_of(repo: str, provider: str | None, hosts: dict[str, str]) -> str | None:
    """Which git host a repository is on: the push's provider (a webhook names it), else the
    host whose URL's hostname is the repository's (`hosts`: provider -> web or API URL)."""
    if provider in PROVIDERS:
        return provider
    hostname = (urlsplit(repo).hostname or _scp_host(repo)).lower()
    for name, url in hosts.items():
        host = (urlsplit(url).hostname or "").lower()
        if host and (host == hostname or host == f"api.{hostname}"):
            return name
    return None


def _scp_host(repo: str) -> str:
    """The host of an scp-like address (`git@host:owner/name`), else ''."""
    if "@" in repo and ":" in repo.split("@", 1)[1] and "://" not in repo:
        return repo.split("@", 1)[1].split(":", 1)[0]
    return ""


def repo_path(repo: str) -> str | None:
    """`owner/name` (GitLab: `group/subgroup/name`) of a clone URL (`https://host/o/n.git`,
    `ssh://git@host/o/n.git`, `git@host:o/n.git`), or None when it names no host (a path)."""
    parts = urlsplit(repo)
    if parts.hostname:
        path = parts.path
    elif _scp_host(repo):  # scp-like: git@host:owner/name
        path = repo.split("@", 1)[1].split(":", 1)[1]
    else:
        return None
    path = path.strip("/").removesuffix(".git")
    return path if "/" in path else None


@dataclass(frozen=True)
class HostRequest:
    """One call to a git host's status API (its token is added by the notifier, never here:
    this is what may be recorded)."""

    method: str
    url: str
    json: dict[str, Any]


def status_request(provider: str, api_url: str, repo: str, commit: str, state: StatusState,
                   context: str, description: str, target_url: str | None
                   ) -> HostRequest | None:
    """The documented status call of each host, or None when the repo URL has no path:
    GitHub `POST {api}/repos/{owner}/{repo}/statuses/{sha}`, Gitea
    `POST {url}/api/v1/repos/{owner}/{repo}/statuses/{sha}`, GitLab
    `POST {url}/api/v4/projects/{url-encoded path}/statuses/{sha}`."""
    path = repo_path(repo)
    if path is None or (provider != "gitlab" and path.count("/") != 1):
        return None  # GitHub and Gitea repositories are owner/name, no deeper
    base = api_url.rstrip("/")
    host_state = HOST_STATES[provider][state]
    if provider == "gitlab":
        body: dict[str, Any] = {"state": host_state, "name": context,
                                "description": description}
        if target_url:
            body["target_url"] = target_url
        return HostRequest("POST", f"{base}/api/v4/projects/{quote(path, safe='')}/statuses/"
                                   f"{commit}", body)
    body = {"state": host_state, "context": context, "description": description}
    if target_url:
        body["target_url"] = target_url
    owner_repo = "/".join(quote(part, safe="") for part in path.split("/"))
    prefix = base if provider == "github" else f"{base}/api/v1"
    return HostRequest("POST", f"{prefix}/repos/{owner_repo}/statuses/{commit}", body)


def auth_headers(provider: str, token: str) -> dict[str, str]:
    """Each host's documented token header."""
    if provider == "github":
        return {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28"}
    if provider == "gitlab":
        return {"PRIVATE-TOKEN": token}
    return {"Authorization": f"token {token}"}
