"""Webhooks from git hosts (GitHub, GitLab, Gitea) turned into `Push` messages. Pure: no I/O.

The HTTP route (`POST /api/v1/webhooks/{provider}`) reads the body and calls::

    check_size(request.content_length)           # 413 before reading, on Content-Length
    body = <read at most MAX_BODY_BYTES + 1 bytes>
    outcome = handle(provider, request.headers, body, settings.webhook_secret)

`handle` checks the body size again, verifies the host's signature over the raw bytes, and
returns a `WebhookOutcome`: `push` is the Push to submit with `delivery_id` as its message id,
or None with `ignored` saying why no run opens. Anything wrong raises `WebhookError` with the
HTTP status and a reason to send back; such a request creates nothing.

Checks run in this order, so an unauthenticated caller learns nothing past "401":

===========================================================  ======
unknown provider (not github, gitlab, gitea)                  404
CISTATE_WEBHOOK_SECRET not set (None or empty)                503
body over MAX_BODY_BYTES                                      413
signature/token missing, malformed or wrong                   401
delivery id header missing or unusable                        400
event header missing, or an event this module does not know   400
body not JSON, or not a JSON object                           400
a field missing, of the wrong type, or invalid for Push       422
===========================================================  ======

An unset secret never means "accept unsigned": every webhook is refused with 503 (the
server is not configured; the host's secret is not at fault), as the API does without tokens.

Hosts, as they document them:

- GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, `X-GitHub-Event`,
  `X-GitHub-Delivery` (one GUID per event, kept by redeliveries).
- GitLab: `X-Gitlab-Token` is the secret itself (compared in constant time), `X-Gitlab-Event`.
  Delivery id: `Idempotency-Key` ("consistent across webhook retries", GitLab 17.4+), else
  `X-Gitlab-Event-UUID`, else `X-Gitlab-Webhook-UUID`. Only the first survives a retry or a
  "Resend request"; the other two are minted per request, so on GitLab before 17.4 a resent
  webhook gets a new id and can open a second run.
- Gitea: `X-Gitea-Signature: <hex HMAC-SHA256 of the body>` (no prefix; empty when the hook
  has no secret), `X-Gitea-Event`, `X-Gitea-Delivery`. Gitea's "Replay" re-sends the payload
  as a new task with a new UUID, so a replayed Gitea delivery can open a second run.
  The hook's content type must be application/json: with a form body Gitea signs the JSON,
  not the bytes sent, and the signature cannot match.

Events: GitHub/Gitea `push` and GitLab `Push Hook` are read, and so are pull requests
(GitHub/Gitea `pull_request`, GitLab `Merge Request Hook`: a run on the head, or the
request's runs cancelled when it closes) and comments (GitHub/Gitea `issue_comment`, GitLab
`Note Hook`: `/retest [STEP]`, `/cancel`, `/ok-to-test`, acted on by the route for trusted
users only); GitHub `ping`, GitHub/Gitea `create` and `delete`, and GitLab `Tag Push Hook` are
acknowledged and ignored (the route answers 202 with the reason); any other event is a 400
that tells the admin which events to subscribe the hook to.

A push opens a run only for a branch (`refs/heads/...`) that still exists. Tag pushes, other
refs and branch deletions (GitHub `deleted: true`, or `after` all zeros) are ignored.

Push fields: GitHub `repository.clone_url`, `ref`, `after`, `before`, `pusher.name`;
GitLab `project.git_http_url` (else `repository.git_http_url`), `ref`, `checkout_sha` (else
`after`), `before`, `user_username` (else `user_name`); Gitea `repository.clone_url`, `ref`,
`after`, `before`, `pusher.login` (else `pusher.username`). `provider` is the host's name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from cistate.domain.messages import Push

MAX_BODY_BYTES: Final = 1 << 20
"""Largest body accepted (1 MiB); the caller checks Content-Length with `check_size` too."""

PROVIDERS: Final = ("github", "gitlab", "gitea")
ENV_VAR: Final = "CISTATE_WEBHOOK_SECRET"

_DELIVERY_ID = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII: an AMQP message id
_HEX = re.compile(r"^[0-9a-fA-F]+$")


class WebhookError(Exception):
    """A webhook refused: answer `status` with `reason`; nothing was created."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"WebhookError({self.status}, {self.reason!r})"


@dataclass(frozen=True)
class PullRequestRef:
    """A pull (merge) request of a repository, and the ref its runs are recorded with."""

    repo: str
    number: int
    ref: str


@dataclass(frozen=True)
class Command:
    """A comment command on a pull request: `/retest [STEP]`, `/cancel`, `/ok-to-test`."""

    pull_request: PullRequestRef
    user: str
    name: str  # retest | cancel | ok-to-test
    step: str | None = None


@dataclass(frozen=True)
class WebhookOutcome:
    """What a verified delivery asks for: a Push to submit, a pull request closed (its
    running runs are cancelled), a comment command, or why there is none of them."""

    push: Push | None
    delivery_id: str
    ignored: str | None
    provider: str
    event: str
    closed: PullRequestRef | None = None
    command: Command | None = None


def check_size(length: int | None) -> None:
    """Raise 413 when a body of `length` bytes (None: not announced) is over MAX_BODY_BYTES."""
    if length is not None and length > MAX_BODY_BYTES:
        raise WebhookError(413, f"body of {length} bytes is over the limit of "
                                f"{MAX_BODY_BYTES} bytes")


def handle(
    provider: str, headers: Mapping[str, str], body: bytes, secret: str | None,
) -> WebhookOutcome:
    """Verify one delivery and map it onto a Push; raise WebhookError when it is refused."""
    host = _HOSTS.get(provider)
    if host is None:
        raise WebhookError(404, f"unknown webhook provider {provider!r}: use one of "
                                f"{', '.join(PROVIDERS)}")
    if not secret:
        raise WebhookError(503, f"webhooks are disabled: {ENV_VAR} is not set")
    check_size(len(body))
    lowered = {name.lower(): value for name, value in headers.items()}
    host.verify(lowered, body, secret)
    delivery_id = _delivery_id(host, lowered)
    event = _header(lowered, host.event_header)
    if event is None:
        raise WebhookError(400, f"missing {host.event_header} header")
    key = event.casefold()
    if key in host.acknowledged:
        return WebhookOutcome(None, delivery_id, host.acknowledged[key], host.name, event)
    if key == host.pr_event.casefold():
        return _pr_outcome(host, _json_object(body), delivery_id, event)
    if key == host.comment_event.casefold():
        return _comment_outcome(host, _json_object(body), delivery_id, event)
    if key != host.push_event.casefold():
        raise WebhookError(400, f"unsupported {host.event_header} {event!r}: subscribe this "
                                f"webhook to push, pull request and comment events only")
    return _push_outcome(host, _json_object(body), delivery_id, event)


# --- verification ----------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name.lower())
    if value is None or not value.strip():
        return None
    return value.strip()


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _hmac_hex(secret: str, body: bytes) -> str:
    return hmac.new(_bytes(secret), body, hashlib.sha256).hexdigest()


def _check_hex_signature(header: str, given: str | None, expected: str) -> None:
    if not given or not _HEX.match(given):
        raise WebhookError(401, f"malformed {header}: expected the hex HMAC-SHA256 of the body")
    if not hmac.compare_digest(_bytes(given.lower()), _bytes(expected)):
        raise WebhookError(401, f"{header} does not match the body: check that the webhook's "
                                f"secret is {ENV_VAR}")


def _verify_github(headers: Mapping[str, str], body: bytes, secret: str) -> None:
    name = "X-Hub-Signature-256"
    value = _header(headers, name)
    if value is None:
        raise WebhookError(401, f"missing {name} header: set the webhook's secret to "
                                f"{ENV_VAR}")
    scheme, _, digest = value.partition("=")
    if scheme.strip().lower() != "sha256":
        raise WebhookError(401, f"malformed {name}: expected sha256=<hex>")
    _check_hex_signature(name, digest.strip(), _hmac_hex(secret, body))


def _verify_gitlab(headers: Mapping[str, str], body: bytes, secret: str) -> None:
    name = "X-Gitlab-Token"
    value = headers.get(name.lower())
    if not value:
        raise WebhookError(401, f"missing {name} header: set the webhook's secret token to "
                                f"{ENV_VAR}")
    # Hash both sides so that neither the content nor the length of the secret leaks.
    given = hashlib.sha256(_bytes(value)).digest()
    expected = hashlib.sha256(_bytes(secret)).digest()
    if not hmac.compare_digest(given, expected):
        raise WebhookError(401, f"{name} is wrong: set the webhook's secret token to "
                                f"{ENV_VAR}")


def _verify_gitea(headers: Mapping[str, str], body: bytes, secret: str) -> None:
    name = "X-Gitea-Signature"
    if name.lower() not in headers:
        raise WebhookError(401, f"missing {name} header")
    value = _header(headers, name)
    if value is None:  # Gitea sends the header empty when the hook has no secret
        raise WebhookError(401, f"{name} is empty: set the webhook's secret to {ENV_VAR}")
    _check_hex_signature(name, value, _hmac_hex(secret, body))


def _delivery_id(host: _Host, headers: Mapping[str, str]) -> str:
    for name in host.delivery_headers:
        value = _header(headers, name)
        if value is None:
            continue
        if not _DELIVERY_ID.match(value):
            raise WebhookError(400, f"unusable {name} header: expected at most 255 visible "
                                    f"ASCII characters")
        return value
    raise WebhookError(400, f"missing {' or '.join(host.delivery_headers)} header: the "
                            f"delivery id is what recognises a redelivered webhook")


# --- payload -----------------------------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ...
        hint = ""
        if body.lstrip().startswith(b"payload="):
            hint = " (the webhook sends a form: set its content type to application/json)"
        raise WebhookError(400, f"body is not valid JSON{hint}: {exc}") from None
    if not isinstance(payload, dict):
        raise WebhookError(400, f"body must be a JSON object, not {type(payload).__name__}")
    return payload


_MISSING: Final = object()


def _lookup(payload: Mapping[str, Any], path: str) -> Any:
    node: Any = payload
    for part in path.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return _MISSING
        node = node[part]
    return node


@dataclass
class _Reader:
    """Reads fields out of a payload, remembering where each Push field came from."""

    payload: Mapping[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def optional(self, target: str, *paths: str) -> str | None:
        for path in paths:
            value = _lookup(self.payload, path)
            if value is _MISSING:
                continue
            self.sources[target] = path
            if not isinstance(value, str):
                raise WebhookError(422, f"field {path!r} must be a string, "
                                        f"not {type(value).__name__}")
            return value
        return None

    def required(self, target: str, *paths: str) -> str:
        value = self.optional(target, *paths)
        if not value:
            raise WebhookError(422, f"missing field {' or '.join(repr(p) for p in paths)}")
        return value

    def flag(self, path: str) -> bool:
        return _lookup(self.payload, path) is True


@dataclass(frozen=True)
class _Fields:
    repo: tuple[str, ...]
    commit: tuple[str, ...]
    pusher: tuple[str, ...]
    deleted_flag: str | None = None  # a boolean the host sets on a branch deletion


def _push_outcome(
    host: _Host, payload: dict[str, Any], delivery_id: str, event: str,
) -> WebhookOutcome:
    def ignored(reason: str) -> WebhookOutcome:
        return WebhookOutcome(None, delivery_id, reason, host.name, event)

    read = _Reader(payload)
    ref = read.required("ref", "ref")
    if ref.startswith("refs/tags/"):
        return ignored(f"tag push {ref}: tags open no run")
    if not ref.startswith("refs/heads/"):
        return ignored(f"{ref} is not a branch: only branch pushes open runs")
    after = read.optional("after", "after")
    deleted = host.fields.deleted_flag is not None and read.flag(host.fields.deleted_flag)
    if deleted or (after and set(after) == {"0"}):
        return ignored(f"branch deletion {ref}: a deleted branch opens no run")
    values = {
        "repo": read.required("repo", *host.fields.repo),
        "ref": ref,
        "commit": read.required("commit", *host.fields.commit),
        "before": read.optional("before", "before"),
        "pusher": read.optional("pusher", *host.fields.pusher),
        "provider": host.name,
    }
    try:
        push = Push.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            target = str(error["loc"][0]) if error["loc"] else "?"
            source = read.sources.get(target, target)
            problems.append(f"field {source!r} ({target}): {error['msg']}")
        raise WebhookError(422, "; ".join(problems)) from None
    return WebhookOutcome(push, delivery_id, None, host.name, event)


def _int(payload: Mapping[str, Any], *paths: str) -> int:
    for path in paths:
        value = _lookup(payload, path)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise WebhookError(422, f"missing field {' or '.join(repr(p) for p in paths)} (a "
                            "positive number)")


def pr_ref(provider: str, number: int) -> str:
    """The ref a pull request's head is fetched from: GitHub and Gitea refs/pull/<n>/head,
    GitLab refs/merge-requests/<iid>/head."""
    if provider == "gitlab":
        return f"refs/merge-requests/{number}/head"
    return f"refs/pull/{number}/head"


_OPENING = {"opened", "synchronize", "synchronized", "reopened", "open", "update", "reopen"}
_CLOSING = {"closed", "close", "merge", "merged"}


def _pr_outcome(host: _Host, payload: dict[str, Any], delivery_id: str,
                event: str) -> WebhookOutcome:
    """GitHub/Gitea `pull_request` (opened, synchronize(d), reopened, closed) and GitLab
    `Merge Request Hook` (open, update, reopen, close, merge): a run on the head commit, or
    the request's runs cancelled when it closes."""
    read = _Reader(payload)
    gitlab = host.name == "gitlab"
    action = read.required("action", "object_attributes.action" if gitlab else "action")
    number = _int(payload, "object_attributes.iid") if gitlab else _int(
        payload, "number", "pull_request.number")
    repo = read.required("repo", "object_attributes.target.git_http_url",
                         "project.git_http_url") if gitlab else read.required(
        "repo", "pull_request.base.repo.clone_url", "repository.clone_url")
    ref = pr_ref(host.name, number)
    if action in _CLOSING:
        return WebhookOutcome(None, delivery_id, None, host.name, event,
                              closed=PullRequestRef(repo, number, ref))
    if action not in _OPENING:
        return WebhookOutcome(None, delivery_id, f"pull request action {action!r} opens no "
                              "run", host.name, event)
    if gitlab:
        head_repo = read.required("head_repo", "object_attributes.source.git_http_url")
        values = {"commit": read.required("commit", "object_attributes.last_commit.id"),
                  "base": read.required("base", "object_attributes.target_branch"),
                  "author": read.optional("author", "user.username")}
        fork = _lookup(payload, "object_attributes.source_project_id") != _lookup(
            payload, "object_attributes.target_project_id")
    else:
        head_repo = read.required("head_repo", "pull_request.head.repo.clone_url")
        values = {"commit": read.required("commit", "pull_request.head.sha"),
                  "base": read.required("base", "pull_request.base.ref"),
                  "author": read.optional("author", "pull_request.user.login")}
        fork = head_repo != repo
    try:
        push = Push.model_validate({
            "repo": repo, "ref": ref, "commit": values["commit"], "provider": host.name,
            "pusher": values["author"],
            "pr": {"number": number, "base": values["base"], "head_repo": head_repo,
                   "author": values["author"], "fork": fork}})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        raise WebhookError(422, problems) from None
    return WebhookOutcome(push, delivery_id, None, host.name, event)


_COMMAND = re.compile(r"^/(retest|cancel|ok-to-test)(?:[ \t]+([a-z][a-z0-9-]{0,62}))?[ \t]*$")


def _comment_outcome(host: _Host, payload: dict[str, Any], delivery_id: str,
                     event: str) -> WebhookOutcome:
    """A comment on a pull request (GitHub/Gitea `issue_comment` created on an issue that is
    a pull request; GitLab `Note Hook` on a merge request) whose first line is a command."""
    def ignored(reason: str) -> WebhookOutcome:
        return WebhookOutcome(None, delivery_id, reason, host.name, event)

    read = _Reader(payload)
    gitlab = host.name == "gitlab"
    if gitlab:
        if _lookup(payload, "object_attributes.noteable_type") != "MergeRequest":
            return ignored("a comment on something else than a merge request")
        number = _int(payload, "merge_request.iid")
        repo = read.required("repo", "project.git_http_url")
        text = read.required("comment", "object_attributes.note")
        user = read.required("user", "user.username")
    else:
        if _lookup(payload, "action") != "created":
            return ignored("only new comments are read")
        if _lookup(payload, "issue.pull_request") is _MISSING and _lookup(
                payload, "is_pull") is not True:
            return ignored("a comment on an issue, not on a pull request")
        number = _int(payload, "issue.number")
        repo = read.required("repo", "repository.clone_url")
        text = read.required("comment", "comment.body")
        user = read.required("user", "comment.user.login", "sender.login")
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _COMMAND.match(first)
    if match is None:
        return ignored("not a command (/retest [STEP], /cancel, /ok-to-test)")
    name, step = match.group(1), match.group(2)
    if step is not None and name != "retest":
        return ignored(f"/{name} takes no step")
    pull = PullRequestRef(repo, number, pr_ref(host.name, number))
    return WebhookOutcome(None, delivery_id, None, host.name, event,
                          command=Command(pull, user, name, step))


# --- hosts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Host:
    name: str
    verify: Callable[[Mapping[str, str], bytes, str], None]
    event_header: str
    push_event: str
    pr_event: str
    comment_event: str
    acknowledged: Mapping[str, str]  # casefolded event -> why it opens no run
    delivery_headers: tuple[str, ...]
    fields: _Fields


_REF_EVENT = "{} event: runs open from push events only"

_HOSTS: Final[Mapping[str, _Host]] = {
    "github": _Host(
        name="github",
        verify=_verify_github,
        event_header="X-GitHub-Event",
        push_event="push",
        pr_event="pull_request",
        comment_event="issue_comment",
        acknowledged={
            "ping": "ping: the webhook is set up; pushes to branches will open runs",
            "create": _REF_EVENT.format("create"),
            "delete": _REF_EVENT.format("delete"),
        },
        delivery_headers=("X-GitHub-Delivery",),
        fields=_Fields(repo=("repository.clone_url",), commit=("after",),
                       pusher=("pusher.name",), deleted_flag="deleted"),
    ),
    "gitlab": _Host(
        name="gitlab",
        verify=_verify_gitlab,
        event_header="X-Gitlab-Event",
        push_event="Push Hook",
        pr_event="Merge Request Hook",
        comment_event="Note Hook",
        acknowledged={"tag push hook": "tag push: tags open no run"},
        delivery_headers=("Idempotency-Key", "X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID"),
        fields=_Fields(repo=("project.git_http_url", "repository.git_http_url"),
                       commit=("checkout_sha", "after"),
                       pusher=("user_username", "user_name")),
    ),
    "gitea": _Host(
        name="gitea",
        verify=_verify_gitea,
        event_header="X-Gitea-Event",
        push_event="push",
        pr_event="pull_request",
        comment_event="issue_comment",
        acknowledged={
            "create": _REF_EVENT.format("create"),
            "delete": _REF_EVENT.format("delete"),
        },
        delivery_headers=("X-Gitea-Delivery",),
        fields=_Fields(repo=("repository.clone_url",), commit=("after",),
                       pusher=("pusher.login", "pusher.username")),
    ),
}
