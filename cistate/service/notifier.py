"""The notifier: delivers the notices runs send (cistate.domain.notices) to git hosts (commit
statuses) and to the deployment's webhook receivers, and reports each outcome to the run.

It consumes `<prefix>.notify` (routing key `notice`, signed by cistate). A notice stays
unacknowledged until it is delivered or given up, so a notifier killed mid-delivery leaves it
to the broker to hand to another. Each try:

- 2xx: delivered;
- 4xx: failed for good (the host refused it: a bad token, an unknown repo or commit), with
  the host's reason; the run is not affected;
- 5xx, a timeout or a network error: failed, retried after a pause that doubles
  (CISTATE_NOTIFY_BACKOFF, CISTATE_NOTIFY_ATTEMPTS tries in all).

Commit statuses of one target (host, repository, commit, context) go out in the order of the
runs' pushes and, within a run, of its decisions: the notice_targets row of the target names
the newest notice seen, and is locked while a notice of it is delivered; an older notice is
superseded, never sent, so a newer state is never overwritten by an older one, whichever
notifier process holds which notice.

Every outcome is an event of the run (notice.delivered, notice.failed, notice.superseded),
decided like any message of the run. Tokens go in request headers only: never in an event, a
log line or an error message.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from cistate.adapters.postgres.store import Store
from cistate.adapters.rabbitmq.bus import Bus
from cistate.adapters.rabbitmq.signing import BadSignature
from cistate.config import NotifySettings
from cistate.domain import notices as nt
from cistate.domain.events import derived_id, loads
from cistate.domain.messages import Notice, NoticeResult, message_uuid
from cistate.service.orchestrator import Orchestrator

log = structlog.get_logger("cistate.notifier")

REQUEST_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 300.0
REASON_CHARS = 300  # of a host's answer, in an event
SIGNATURE_HEADER = "X-Cistate-Signature"

_TARGET_SQL = """
INSERT INTO notice_targets (target, order_at, seq, notice, state)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (target) DO UPDATE SET order_at = EXCLUDED.order_at, seq = EXCLUDED.seq,
  notice = EXCLUDED.notice, state = EXCLUDED.state, updated_at = now()
WHERE (notice_targets.order_at, notice_targets.seq) < (EXCLUDED.order_at, EXCLUDED.seq)
"""


@dataclass(frozen=True)
class Answer:
    """What one try got: an HTTP status (None: no answer) and, when it failed, why."""

    status: int | None
    reason: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def final(self) -> bool:
        """A refusal that trying again cannot change (4xx)."""
        return self.status is not None and 400 <= self.status < 500


class Notifier:
    def __init__(self, store: Store, bus: Bus, orchestrator: Orchestrator,
                 settings: NotifySettings, prefetch: int = 16) -> None:
        self.store = store
        self.bus = bus
        self.orchestrator = orchestrator
        self.settings = settings
        self.prefetch = prefetch
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS))
        channel = await self.bus.consumer_channel(prefetch=self.prefetch)
        queue = await self.bus.declare_notify(channel=channel)
        await queue.consume(self.on_message, no_ack=False)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- the consumer

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            sender = self.bus.verified(message)
            if sender != "system":
                raise BadSignature(f"notices are cistate's own; {sender} may not send one")
            notice = Notice.model_validate(loads(message.body))
            notice_id = message_uuid(message.message_id or "")
        except (BadSignature, ValidationError, ValueError) as exc:
            log.warning("dead-lettered notice", reason=str(exc))
            await self.bus.dead_letter(message, f"not a notice cistate sent: {exc}")
            self.bus.acker.ack(message)
            return
        try:
            await self.deliver(notice, notice_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is away: the broker hands it out again
            log.warning("could not deliver a notice; it will be redelivered",
                        error=f"{type(exc).__name__}: {exc}")
            self.bus.acker.nack(message, requeue=True)
            return
        self.bus.acker.ack(message)

    async def deliver(self, notice: Notice, notice_id: uuid.UUID) -> None:
        if notice.kind == "status":
            await self.deliver_status(notice, notice_id)
            return
        for number, url in enumerate(self.settings.notify_urls, 1):
            await self.deliver_notification(notice, notice_id, number, url)

    # -- commit statuses

    async def deliver_status(self, notice: Notice, notice_id: uuid.UUID) -> None:
        hosts = self.settings.hosts()
        provider = nt.provider_of(notice.repo, notice.provider, hosts)
        if provider is None:
            await self.report(notice, notice_id, "git host", "failed", 1, None,
                              f"no git host with a token for {notice.repo}: set "
                              "CISTATE_GITHUB_TOKEN, CISTATE_GITLAB_URL and _TOKEN or "
                              "CISTATE_GITEA_URL and _TOKEN")
            return
        assert notice.state is not None and notice.context is not None
        request = nt.status_request(provider, hosts[provider], notice.repo, notice.commit,
                                    notice.state, notice.context, notice.description,
                                    self.target_url(notice))
        if request is None:
            await self.report(notice, notice_id, provider, "failed", 1, None,
                              f"{notice.repo} names no owner/repository to post a status to")
            return
        token = self.settings.token(provider)
        assert token is not None
        headers = nt.auth_headers(provider, token)
        target = (f"{provider}:{nt.repo_path(notice.repo)}@{notice.commit}:"
                  f"{notice.context}")

        async def send() -> Answer:
            return await self.post(request.url, headers, json.dumps(request.json).encode(),
                                   token)

        await self.with_retries(notice, notice_id, provider, send, ordered=target)

    def target_url(self, notice: Notice) -> str | None:
        if not self.settings.public_url:
            return None
        return f"{self.settings.public_url.rstrip('/')}/runs/{notice.run_id}"

    # -- notifications

    async def deliver_notification(self, notice: Notice, notice_id: uuid.UUID, number: int,
                                   url: str) -> None:
        body = json.dumps({
            "event": notice.kind, "run_id": str(notice.run_id), "repo": notice.repo,
            "commit": notice.commit, "pipeline": notice.pipeline, "state": notice.run_state,
            "step": notice.step, "description": notice.description,
            "approvers": notice.approvers, "url": self.target_url(notice),
            "notice": str(notice_id),
        }, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if self.settings.notify_secret:
            digest = hmac.new(self.settings.notify_secret.encode(), body,
                              hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        # a receiver is named by its place and host: its URL may carry a key
        target = f"receiver {number} ({urlsplit(url).hostname})"

        async def send() -> Answer:
            return await self.post(url, headers, body, self.settings.notify_secret)

        await self.with_retries(notice, notice_id, target, send, ordered=None)

    # -- delivery

    async def with_retries(self, notice: Notice, notice_id: uuid.UUID, target: str,
                           send: Any, ordered: str | None) -> None:
        """Try until delivered, refused for good, superseded, or out of tries; report each
        failed try and the end."""
        attempts = self.settings.notify_attempts
        for attempt in range(1, attempts + 1):
            if ordered is None:
                answer: Answer | None = await send()
            else:
                answer = await self.send_in_order(notice, notice_id, ordered, send)
            if answer is None:
                await self.report(notice, notice_id, target, "superseded", attempt, None,
                                  "a newer status of this commit and context was sent or "
                                  "is being sent")
                return
            if answer.delivered:
                await self.report(notice, notice_id, target, "delivered", attempt,
                                  answer.status, None)
                return
            last = answer.final or attempt == attempts
            why = answer.reason or f"HTTP {answer.status}"
            if last and not answer.final:
                why += f" (gave up after {attempts} tries)"
            await self.report(notice, notice_id, target, "failed", attempt, answer.status,
                              why, retrying=not last)
            if last:
                return
            pause = min(self.settings.notify_backoff * 2 ** (attempt - 1),
                        MAX_BACKOFF_SECONDS)
            await asyncio.sleep(pause)

    async def send_in_order(self, notice: Notice, notice_id: uuid.UUID, target: str,
                            send: Any) -> Answer | None:
        """Send under the target's row lock, unless a newer notice of it is known (None)."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute(_TARGET_SQL, target, notice.order_at, notice.seq, notice_id,
                               notice.state)
            newest = await conn.fetchval(
                "SELECT notice FROM notice_targets WHERE target = $1 FOR UPDATE", target)
            if newest != notice_id:
                return None
            answer: Answer = await send()
            return answer

    async def post(self, url: str, headers: dict[str, str], body: bytes,
                   secret: str | None) -> Answer:
        assert self._http is not None, "start() first"
        try:
            async with self._http.post(url, data=body, headers={
                    "Content-Type": "application/json", **headers},
                    allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return Answer(response.status)
                text = (await response.text(errors="replace"))[:REASON_CHARS]
                return Answer(response.status,
                              _masked(f"HTTP {response.status}: {text.strip()}", secret))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Answer(None, _masked(f"{type(exc).__name__}: {exc}", secret))

    async def report(self, notice: Notice, notice_id: uuid.UUID, target: str,
                     outcome: Literal["delivered", "failed", "superseded"], attempt: int,
                     status: int | None, reason: str | None, retrying: bool = False) -> None:
        result = NoticeResult(run_id=notice.run_id, notice=notice_id, kind=notice.kind,
                              target=target[:255], outcome=outcome,
                              retrying=retrying, attempt=attempt, http_status=status,
                              reason=reason[:2048] if reason else None,
                              context=notice.context, state=notice.state)
        # one id per try's outcome: a redelivered notice reports nothing twice
        message_id = derived_id(notice_id, target, attempt, outcome)
        outcome_of = await self.orchestrator.submit(result, message_id, actor="system")
        log.info("notice", run_id=str(notice.run_id), kind=notice.kind, target=target,
                 outcome=outcome, attempt=attempt, http_status=status, recorded=outcome_of.status)


def _masked(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text
