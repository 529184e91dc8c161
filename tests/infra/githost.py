"""A STAND-IN for the GitHub, GitLab and Gitea REST APIs (none of the three can run on this
machine), and for the webhook receivers cistate notifies. An aiohttp server that implements,
with their documented paths, fields, auth headers, state names and error codes, the commit
status endpoints of the three hosts, and records every request it answered:

- GitHub  `POST /repos/{owner}/{repo}/statuses/{sha}`, `Authorization: Bearer <token>` (or
  `token <token>`); states pending, success, failure, error; 201 with the status, 401
  `{"message": "Bad credentials"}`, 422 for a bad state
  (docs.github.com/en/rest/commits/statuses);
- GitLab  `POST /api/v4/projects/{id}/statuses/{sha}` (id: the URL-encoded path),
  `PRIVATE-TOKEN: <token>`; states pending, running, success, failed, canceled, skipped;
  `name` is the context; 201, 401 `{"message": "401 Unauthorized"}`, 400 for a bad state
  (docs.gitlab.com/api/commits, "Set the pipeline status of a commit");
- Gitea   `POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`, `Authorization: token <token>`;
  states pending, success, error, failure, warning; 201, 401, 422
  (gitea.com/api/swagger, repoCreateStatus);
- receivers: `POST /hooks/{name}`, any JSON, answered 200.

`script(path_suffix, [502, 502, 502])` makes the next requests whose path ends so be
answered with those codes first (then as usual); `delay` slows every answer.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.conftest import free_port

STATES = {
    "github": {"pending", "success", "failure", "error"},
    "gitlab": {"pending", "running", "success", "failed", "canceled", "skipped"},
    "gitea": {"pending", "success", "error", "failure", "warning"},
}


@dataclass
class Received:
    provider: str  # github | gitlab | gitea | receiver
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the stand-in answered

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


@dataclass
class GitHostStandIn:
    tokens: dict[str, str]  # provider -> the token it accepts
    delay: float = 0.0
    permissions: dict[str, str] = field(default_factory=dict)  # GitHub: user -> permission
    received: list[Received] = field(default_factory=list)
    _scripts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    _runner: web.AppRunner | None = None
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, path_suffix: str, codes: list[int]) -> None:
        self._scripts[path_suffix].extend(codes)

    def delivered(self, provider: str | None = None) -> list[Received]:
        """The requests answered 2xx (of one provider), in the order they were answered."""
        return [r for r in self.received if 200 <= r.status < 300
                and (provider is None or r.provider == provider)]

    async def __aenter__(self) -> GitHostStandIn:
        app = web.Application()
        app.router.add_post("/repos/{owner}/{repo}/statuses/{sha}", self._github)
        app.router.add_post("/api/v4/projects/{id}/statuses/{sha}", self._gitlab)
        app.router.add_post("/api/v1/repos/{owner}/{repo}/statuses/{sha}", self._gitea)
        app.router.add_post("/hooks/{name}", self._receiver)
        app.router.add_get("/repos/{owner}/{repo}/collaborators/{user}/permission",
                           self._permission)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- the hosts

    async def _answer(self, provider: str, request: web.Request,
                      check: Any) -> web.Response:
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        status, answer = self._scripted(request.path)
        if status is None:
            status, answer = check(request, body)
        self.received.append(Received(provider, request.raw_path, dict(request.headers), body,
                                      status))
        return web.json_response(answer, status=status)

    def _scripted(self, path: str) -> tuple[int | None, dict[str, Any]]:
        for suffix, codes in self._scripts.items():
            if path.endswith(suffix) and codes:
                code = codes.pop(0)
                return code, {"message": f"scripted {code}"}
        return None, {}

    def _status(self, provider: str, body: bytes, context_field: str,
                bad_state: int) -> tuple[int, dict[str, Any]]:
        try:
            fields = json.loads(body)
        except ValueError:
            return 400, {"message": "Problems parsing JSON"}
        if fields.get("state") not in STATES[provider]:
            return bad_state, {"message": f"invalid state {fields.get('state')!r}"}
        return 201, {"id": len(self.received) + 1, "state": fields["state"],
                     "context": fields.get(context_field), "target_url": fields.get(
                         "target_url"), "description": fields.get("description")}

    async def _github(self, request: web.Request) -> web.Response:
        def check(request: web.Request, body: bytes) -> tuple[int, dict[str, Any]]:
            auth = request.headers.get("Authorization", "")
            if auth not in (f"Bearer {self.tokens.get('github')}",
                            f"token {self.tokens.get('github')}"):
                return 401, {"message": "Bad credentials",
                             "documentation_url": "https://docs.github.com/rest"}
            return self._status("github", body, "context", 422)
        return await self._answer("github", request, check)

    async def _gitlab(self, request: web.Request) -> web.Response:
        def check(request: web.Request, body: bytes) -> tuple[int, dict[str, Any]]:
            if request.headers.get("PRIVATE-TOKEN") != self.tokens.get("gitlab"):
                return 401, {"message": "401 Unauthorized"}
            if "/" not in unquote(request.match_info["id"]):
                return 404, {"message": "404 Project Not Found"}
            return self._status("gitlab", body, "name", 400)
        return await self._answer("gitlab", request, check)

    async def _gitea(self, request: web.Request) -> web.Response:
        def check(request: web.Request, body: bytes) -> tuple[int, dict[str, Any]]:
            if request.headers.get("Authorization") != f"token {self.tokens.get('gitea')}":
                return 401, {"message": "token is required"}
            return self._status("gitea", body, "context", 422)
        return await self._answer("gitea", request, check)

    async def _permission(self, request: web.Request) -> web.Response:
        # GitHub: GET /repos/{owner}/{repo}/collaborators/{username}/permission ->
        # {"permission": admin | write | read | none, "user": {...}}; 404 for a non-user
        def check(request: web.Request, body: bytes) -> tuple[int, dict[str, Any]]:
            if request.headers.get("Authorization") != f"Bearer {self.tokens.get('github')}":
                return 401, {"message": "Bad credentials"}
            user = request.match_info["user"]
            if user not in self.permissions:
                return 404, {"message": "Not Found"}
            return 200, {"permission": self.permissions[user], "user": {"login": user}}
        return await self._answer("github", request, check)

    async def _receiver(self, request: web.Request) -> web.Response:
        def check(request: web.Request, body: bytes) -> tuple[int, dict[str, Any]]:
            return 200, {"ok": True}
        return await self._answer("receiver", request, check)
