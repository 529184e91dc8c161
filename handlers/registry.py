"""An OCI distribution (registry v2 API) client on aiohttp: manifests, blobs, mounts, tags.

Auth: anonymous; basic; and the bearer-token challenge flow (a 401 with
`WWW-Authenticate: Bearer realm=...,service=...` sends the client to the realm for a token
scoped to the repositories it touches, with the basic credentials when it has some).
Credentials go in headers only, never in a URL, a message or the log.

A registry that does not answer (connection refused or reset, timeout, 5xx, 429) is retried
with bounded exponential backoff inside the client; when the attempts run out the step fails
as retryable, naming the registry. A registry that refuses the credentials (401/403 after
the challenge) fails the step as not retryable: another attempt would be refused the same.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from handlers.base import StepFailed, StepLog
from handlers.settings import Credentials, HandlerSettings

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CHUNK = 1 << 20

_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


# ------------------------------------------------------------------ references --


@dataclass(frozen=True)
class ImageRef:
    """`host[:port]/repo/path[:tag][@sha256:...]`."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        rest, _, digest = text.partition("@")
        host, slash, path = rest.partition("/")
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, tag = path.rpartition(":")
        ref = cls(host, path, tag or None, digest or None)
        if not slash or not ref.valid():
            raise StepFailed(
                f"{text!r} is not an image reference of the form "
                "host[:port]/repository[:tag][@sha256:digest]",
                retryable=False,
            )
        return ref

    def valid(self) -> bool:
        return bool(
            _HOST.fullmatch(self.host)
            and self.repository
            and all(_PATH_COMPONENT.fullmatch(p) for p in self.repository.split("/"))
            and (self.tag is None or _TAG.fullmatch(self.tag))
            and (self.digest is None or _DIGEST.fullmatch(self.digest))
        )

    @property
    def reference(self) -> str:
        """What the API's /manifests/<reference> wants: the digest if known, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def split_registry(registry: str) -> tuple[str, str]:
    """`host[:port]/namespace` -> (host, namespace)."""
    host, _, namespace = registry.partition("/")
    if not _HOST.fullmatch(host) or not all(
        _PATH_COMPONENT.fullmatch(p) for p in namespace.split("/") if namespace
    ):
        raise StepFailed(
            f"registry {registry!r} is not of the form host[:port]/namespace "
            "(lower-case namespace); fix CISTATE_REGISTRY or the step's `registry:`",
            retryable=False,
        )
    return host, namespace


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------- manifests --


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Manifest:
    media_type: str
    body: bytes  # the exact bytes: re-serialising would change the digest
    digest: str

    def document(self) -> dict[str, Any]:
        parsed = json.loads(self.body)
        if not isinstance(parsed, dict):
            raise StepFailed(f"manifest {self.digest} is not a JSON object", retryable=False)
        return parsed

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def children(self) -> list[Blob]:
        """The manifests an index lists."""
        return [_blob(entry) for entry in self.document().get("manifests", [])]

    def blobs(self) -> list[Blob]:
        """The config and layers an image manifest refers to."""
        doc = self.document()
        found = [_blob(doc["config"])] if "config" in doc else []
        return found + [_blob(entry) for entry in doc.get("layers", [])]


def _blob(entry: Mapping[str, Any]) -> Blob:
    return Blob(str(entry["digest"]), int(entry.get("size", -1)), str(entry.get("mediaType", "")))


# ---------------------------------------------------------------------- client --


class _Unavailable(Exception):
    """The registry did not answer this time; another attempt may do better."""


@dataclass
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def error_text(self) -> str:
        try:
            errors = json.loads(self.body).get("errors", [])
            return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError):
            return self.body[:200].decode("utf-8", errors="replace")


class RegistryClient:
    """One registry host. Use as `async with RegistryClient.for_host(...) as client:`."""

    def __init__(
        self,
        host: str,
        *,
        log: StepLog,
        credentials: Credentials | None = None,
        insecure: bool = False,
        retries: int = 4,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.base = URL(f"{'http' if insecure else 'https'}://{host}")
        self.log = log
        self._credentials = credentials
        self._retries = retries
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._basic: str | None = None  # set once the registry asked for basic auth
        self._tokens: dict[tuple[str, ...], str] = {}

    @classmethod
    def for_host(cls, settings: HandlerSettings, host: str, log: StepLog) -> RegistryClient:
        return cls(
            host,
            log=log,
            credentials=settings.credentials_for(host),
            insecure=settings.registry_insecure,
            retries=settings.registry_retries,
            backoff=settings.registry_backoff,
            backoff_max=settings.registry_backoff_max,
            timeout=settings.registry_timeout,
        )

    async def __aenter__(self) -> RegistryClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- API --------------------------------------------------------------------

    async def manifest(self, repository: str, reference: str) -> Manifest | None:
        reply = await self._send(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            scopes=(_scope(repository, "pull"),),
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
            ok=(200, 404),
        )
        if reply.status == 404:
            return None
        digest = digest_of(reply.body)
        claimed = reply.headers.get("Docker-Content-Digest")
        if (claimed and claimed != digest) or (
            reference.startswith("sha256:") and reference != digest
        ):
            raise StepFailed(
                f"registry {self.host} sent manifest {repository}:{reference} whose bytes do "
                f"not match its digest ({digest}); the registry or a proxy corrupts data",
                retryable=True,
            )
        media_type = reply.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in MANIFEST_TYPES:
            media_type = str(json.loads(reply.body).get("mediaType", media_type))
        return Manifest(media_type, reply.body, digest)

    async def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest `reference` resolves to, None when the registry has no such manifest."""
        found = await self.manifest(repository, reference)
        return found.digest if found else None

    async def put_manifest(self, repository: str, reference: str, manifest: Manifest) -> str:
        reply = await self._send(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            scopes=(_scope(repository, "pull", "push"),),
            headers={"Content-Type": manifest.media_type},
            data=manifest.body,
            ok=(201,),
        )
        return reply.headers.get("Docker-Content-Digest", manifest.digest)

    async def tags(self, repository: str) -> list[str]:
        reply = await self._send(
            "GET",
            f"/v2/{repository}/tags/list",
            scopes=(_scope(repository, "pull"),),
            ok=(200, 404),
        )
        if reply.status == 404:
            return []
        return list(json.loads(reply.body).get("tags") or [])

    async def blob_exists(self, repository: str, digest: str) -> bool:
        reply = await self._send(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            scopes=(_scope(repository, "pull"),),
            ok=(200, 404),
        )
        return reply.status == 200

    async def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Cross-repository mount; False when the registry would rather have an upload."""
        reply = await self._send(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            params={"mount": digest, "from": from_repository},
            scopes=(_scope(repository, "pull", "push"), _scope(from_repository, "pull")),
            headers={"Content-Length": "0"},
            ok=(201, 202),
        )
        if reply.status == 201:
            return True
        # 202: it opened an upload session instead; close it so nothing is left half-done
        location = reply.headers.get("Location")
        if location:
            with suppress(StepFailed):
                await self._send(
                    "DELETE",
                    self._location(location),
                    scopes=(_scope(repository, "pull", "push"),),
                    ok=(204, 404),
                )
        return False

    async def blob_bytes(self, repository: str, digest: str) -> bytes:
        """A small blob (an image config) in memory, checked against its digest."""
        reply = await self._send(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            scopes=(_scope(repository, "pull"),),
            ok=(200,),
        )
        if digest_of(reply.body) != digest:
            raise StepFailed(
                f"registry {self.host} sent blob {digest} of {repository} with other content",
                retryable=True,
            )
        return reply.body

    async def download_blob(self, repository: str, blob: Blob, dest: Path) -> None:
        await self._send(
            "GET",
            f"/v2/{repository}/blobs/{blob.digest}",
            scopes=(_scope(repository, "pull"),),
            ok=(200,),
            sink=dest,
        )
        got = await asyncio.to_thread(_file_digest, dest)
        if got != blob.digest:
            raise StepFailed(
                f"registry {self.host} sent blob {blob.digest} of {repository} with digest "
                f"{got}; the data was corrupted on the way",
                retryable=True,
            )

    async def upload_blob(self, repository: str, blob: Blob, source: Path) -> None:
        scopes = (_scope(repository, "pull", "push"),)
        start = await self._send(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            scopes=scopes,
            headers={"Content-Length": "0"},
            ok=(202,),
        )
        location = start.headers.get("Location")
        if not location:
            raise StepFailed(
                f"registry {self.host} opened an upload without a Location header",
                retryable=True,
            )
        url = self._location(location).update_query(digest=blob.digest)
        size = (await asyncio.to_thread(source.stat)).st_size
        await self._send(
            "PUT",
            url,
            scopes=scopes,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            },
            data=source,
            ok=(201,),
        )

    # -- transport --------------------------------------------------------------

    def _location(self, location: str) -> URL:
        url = URL(location)
        return url if url.is_absolute() else self.base.join(url)

    async def _send(
        self,
        method: str,
        target: str | URL,
        *,
        scopes: tuple[str, ...],
        ok: Sequence[int],
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        data: bytes | Path | None = None,
        sink: Path | None = None,
    ) -> _Reply:
        url = target if isinstance(target, URL) else self.base.with_path(target)
        if params:
            url = url.update_query(params)
        what = f"{method} {url.path}"
        last = ""
        for attempt in range(1, self._retries + 1):
            try:
                reply = await self._authorized(method, url, scopes, headers, data, sink)
            except _Unavailable as exc:
                last = str(exc)
            else:
                if reply.status in ok:
                    return reply
                if reply.status >= 500 or reply.status == 429:
                    last = f"HTTP {reply.status} {reply.error_text()}".strip()
                else:
                    raise self._refused(reply, what, scopes)
            if attempt < self._retries:
                delay = min(self._backoff * 2 ** (attempt - 1), self._backoff_max)
                self.log.line(
                    f"registry {self.host}: {what} failed ({last}); "
                    f"attempt {attempt + 1} of {self._retries} in {delay:.2f}s"
                )
                await asyncio.sleep(delay)
        raise StepFailed(
            f"registry {self.host} is not answering ({last}) after {self._retries} attempts; "
            "check that it is up and reachable from the worker",
            retryable=True,
        )

    def _refused(self, reply: _Reply, what: str, scopes: tuple[str, ...]) -> StepFailed:
        if reply.status in (401, 403):
            return self._auth_refused(scopes, reply.status)
        return StepFailed(
            f"registry {self.host} answered {what} with HTTP {reply.status}: "
            f"{reply.error_text() or 'no details'}",
            retryable=False,
        )

    def _auth_refused(self, scopes: tuple[str, ...], status: int) -> StepFailed:
        access = ", ".join(scopes) or "the API"
        if self._credentials is None:
            return StepFailed(
                f"registry {self.host} wants credentials for {access} (HTTP {status}) and the "
                "worker has none: set CISTATE_REGISTRY_USERNAME and CISTATE_REGISTRY_PASSWORD, "
                "or CISTATE_REGISTRY_AUTH_FILE (a docker config.json)",
                retryable=False,
            )
        return StepFailed(
            f"registry {self.host} refused the credentials of user "
            f"{self._credentials.username!r} for {access} (HTTP {status}); check the "
            "password or token and that the user may push there",
            retryable=False,
        )

    async def _authorized(
        self,
        method: str,
        url: URL,
        scopes: tuple[str, ...],
        headers: Mapping[str, str] | None,
        data: bytes | Path | None,
        sink: Path | None,
    ) -> _Reply:
        """One request, answering an auth challenge once."""
        reply = await self._request(method, url, scopes, headers, data, sink)
        if reply.status != 401:
            return reply
        challenge = reply.headers.get("WWW-Authenticate", "")
        scheme, _, _ = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self._credentials is None or self._basic is not None:
                raise self._auth_refused(scopes, 401)
            self._basic = _basic(self._credentials)
        elif scheme.lower() == "bearer":
            if scopes in self._tokens:  # a token we already had was refused
                del self._tokens[scopes]
            self._tokens[scopes] = await self._token(challenge, scopes)
        else:
            raise self._auth_refused(scopes, 401)
        reply = await self._request(method, url, scopes, headers, data, sink)
        if reply.status == 401:
            raise self._auth_refused(scopes, 401)
        return reply

    async def _token(self, challenge: str, scopes: tuple[str, ...]) -> str:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm")
        if not realm:
            raise StepFailed(
                f"registry {self.host} asked for a bearer token without naming a realm",
                retryable=False,
            )
        query: list[tuple[str, str]] = []
        if "service" in params:
            query.append(("service", params["service"]))
        query.extend(("scope", scope) for scope in scopes)
        headers = {}
        if self._credentials is not None:
            headers["Authorization"] = _basic(self._credentials)
        session = self._require_session()
        try:
            async with session.get(URL(realm).update_query(query), headers=headers) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Unavailable(f"token service {URL(realm).host}: {_describe(exc)}") from None
        if status in (401, 403):
            raise self._auth_refused(scopes, status)
        if status >= 500 or status == 429:
            raise _Unavailable(f"token service answered HTTP {status}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if status != 200 or not isinstance(token, str) or not token:
            raise StepFailed(
                f"the token service of registry {self.host} answered HTTP {status} without a token",
                retryable=False,
            )
        return token

    async def _request(
        self,
        method: str,
        url: URL,
        scopes: tuple[str, ...],
        headers: Mapping[str, str] | None,
        data: bytes | Path | None,
        sink: Path | None,
    ) -> _Reply:
        session = self._require_session()
        send = dict(headers or {})
        if scopes in self._tokens:
            send["Authorization"] = f"Bearer {self._tokens[scopes]}"
        elif self._basic is not None:
            send["Authorization"] = self._basic
        try:
            if isinstance(data, Path):
                with data.open("rb") as body:
                    return await self._exchange(session, method, url, send, body, sink)
            return await self._exchange(session, method, url, send, data, sink)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Unavailable(_describe(exc)) from None

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        data: Any,
        sink: Path | None,
    ) -> _Reply:
        async with session.request(method, url, headers=headers, data=data) as resp:
            if sink is not None and resp.status == 200:
                await _stream_to(resp, sink)
                body = b""
            else:
                body = await resp.read()
            return _Reply(resp.status, resp.headers, body)

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use RegistryClient as `async with` to open its session")
        return self._session


def _scope(repository: str, *actions: str) -> str:
    return f"repository:{repository}:{','.join(actions)}"


def _basic(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        return f"cannot connect: {os.strerror(errno) if errno else exc.os_error}"
    return f"{type(exc).__name__}: {exc}"


async def _stream_to(resp: aiohttp.ClientResponse, dest: Path) -> None:
    with dest.open("wb") as out:
        async for chunk in resp.content.iter_chunked(CHUNK):
            out.write(chunk)


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


# --------------------------------------------------------------------- copying --


@dataclass
class CopyReport:
    present: int = 0
    mounted: int = 0
    copied: int = 0


async def copy_image(
    source: RegistryClient,
    src: ImageRef,
    dest: RegistryClient,
    dst: ImageRef,
    *,
    scratch: Path,
) -> tuple[str, CopyReport]:
    """Copy image `src` (by digest or tag) to `dst` (a tag): blobs first, then the manifest(s).

    Blobs the destination already has are skipped; on the same registry they are mounted
    from the source repository; otherwise they go through `scratch` (a private directory).
    Returns the manifest digest, which is the source's: the manifest bytes are copied as is.
    """
    top = await source.manifest(src.repository, src.reference)
    if top is None:
        raise StepFailed(
            f"image {src} is not in registry {src.host} (was it deleted?); run the build "
            "step again",
            retryable=False,
        )
    report = CopyReport()
    same_registry = source.host == dest.host
    for manifest in await _manifest_tree(source, src.repository, top):
        for blob in manifest.blobs():
            await _copy_blob(source, src, dest, dst, blob, same_registry, scratch, report)
        if manifest is not top:
            await dest.put_manifest(dst.repository, manifest.digest, manifest)
    digest = await dest.put_manifest(dst.repository, dst.tag or top.digest, top)
    if digest != top.digest:
        raise StepFailed(
            f"registry {dest.host} stored {dst} with digest {digest}, not {top.digest}; "
            "it rewrote the manifest",
            retryable=False,
        )
    return digest, report


async def _manifest_tree(client: RegistryClient, repository: str, top: Manifest) -> list[Manifest]:
    """The manifest, and for an index every manifest it lists (children before the index)."""
    if not top.is_index:
        return [top]
    found: list[Manifest] = []
    for child in top.children():
        manifest = await client.manifest(repository, child.digest)
        if manifest is None:
            raise StepFailed(
                f"registry {client.host} lists {child.digest} in the index of {repository} "
                "but does not have it",
                retryable=False,
            )
        found.extend(await _manifest_tree(client, repository, manifest))
    return [*found, top]


async def _copy_blob(
    source: RegistryClient,
    src: ImageRef,
    dest: RegistryClient,
    dst: ImageRef,
    blob: Blob,
    same_registry: bool,
    scratch: Path,
    report: CopyReport,
) -> None:
    short = blob.digest[:19]
    if await dest.blob_exists(dst.repository, blob.digest):
        report.present += 1
        dest.log.line(f"blob {short} already in {dst.name}")
        return
    if same_registry and await dest.mount_blob(dst.repository, blob.digest, src.repository):
        report.mounted += 1
        dest.log.line(f"blob {short} mounted from {src.repository} into {dst.repository}")
        return
    path = scratch / blob.digest.replace(":", "-")
    try:
        await source.download_blob(src.repository, blob, path)
        await dest.upload_blob(dst.repository, blob, path)
    finally:
        path.unlink(missing_ok=True)
    report.copied += 1
    dest.log.line(f"blob {short} copied from {src.name} to {dst.name}")
