"""An HTTP Helm chart repository in the Artifactory style: files under a base URL, `PUT` to
upload, `GET` to read, and an `index.yaml` that lists every chart version.

Like the Cloud-Native Toolkit's helm-release task, the `.tgz` is uploaded next to the index
and the index is merged with the one the repository has. Unlike it, the merge is safe under
concurrency: the index is read with its `ETag` and written back with `If-Match` (or
`If-None-Match: *` when there is none yet); a `412` means another release wrote it in
between, so it is read, merged and written again. Two releases published at once therefore
both end up in the index.

A version is immutable: when the repository already has `<name>-<version>.tgz`, its
content (the files in the archive; helm stamps each package with a new time) must equal
ours, else publishing fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from datetime import UTC, datetime
from typing import Any

import aiohttp
import yaml

from handlers.base import StepFailed, StepLog
from handlers.helm import dump_yaml

INDEX = "index.yaml"


def chart_files(tgz: bytes) -> dict[str, bytes]:
    """The files of a packaged chart, by path: what "the same content" means."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile():
                extracted = archive.extractfile(member)
                if extracted is not None:
                    files[member.name] = extracted.read()
    return files


def packaged_metadata(tgz: bytes) -> dict[str, Any]:
    """The Chart.yaml inside a packaged chart: what `helm repo index` lists (the version and
    appVersion `helm package` wrote, not those of the chart in the repo)."""
    for path, data in chart_files(tgz).items():
        parts = path.split("/")
        if len(parts) == 2 and parts[1] == "Chart.yaml":
            loaded = yaml.safe_load(data)
            if isinstance(loaded, dict):
                return loaded
    raise StepFailed("the packaged chart has no <name>/Chart.yaml", retryable=False)


def index_entry(meta: dict[str, Any], url: str, tgz: bytes) -> dict[str, Any]:
    entry = dict(meta)
    entry.update(
        {
            "urls": [url],
            "created": datetime.now(UTC).isoformat(),
            "digest": hashlib.sha256(tgz).hexdigest(),
        }
    )
    return entry


def merge_index(index: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Add `entry` to `index` (replacing an entry of the same version whose digest differs);
    False when the index already has it."""
    index.setdefault("apiVersion", "v1")
    versions = index.setdefault("entries", {}).setdefault(entry["name"], [])
    for i, existing in enumerate(versions):
        if existing.get("version") == entry["version"]:
            if existing.get("digest") == entry["digest"] and existing.get("urls") == entry["urls"]:
                return False
            versions[i] = entry
            break
    else:
        versions.insert(0, entry)
    index["generated"] = datetime.now(UTC).isoformat()
    return True


class ChartRepo:
    def __init__(
        self,
        base_url: str,
        *,
        username: str,
        password: str,
        attempts: int,
        timeout: float,
        log: StepLog,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.attempts = attempts
        self.log = log
        self._auth = aiohttp.BasicAuth(username, password) if username else None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    async def _request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        name: str,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str | None, bytes]:
        try:
            async with session.request(
                method, self.url(name), data=data, headers=headers, auth=self._auth
            ) as response:
                return response.status, response.headers.get("ETag"), await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise StepFailed(
                f"the chart repository {self.base} is unreachable ({method} {name}: {why}); "
                "check that it is up and reachable from the worker",
                retryable=True,
            ) from None

    def _refused(self, method: str, name: str, status: int, body: bytes) -> StepFailed:
        if status in (401, 403):
            return StepFailed(
                f"the chart repository {self.base} refused {method} {name} (HTTP {status}); "
                "check CISTATE_CHART_REPO_USERNAME / CISTATE_CHART_REPO_PASSWORD",
                retryable=False,
            )
        text = body.decode("utf-8", errors="replace").strip()[:500]
        return StepFailed(
            f"the chart repository {self.base} answered {method} {name} with HTTP {status}"
            f"{': ' + text if text else ''}",
            retryable=status >= 500 or status == 429,
        )

    async def publish(self, tgz: bytes, filename: str, meta: dict[str, Any]) -> str:
        """Upload the package and list it in the index; the package's URL."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            stored = await self._upload(session, tgz, filename, meta)
            entry = index_entry(meta, self.url(filename), stored)
            await self._index(session, entry)
        return self.url(filename)

    async def _upload(
        self, session: aiohttp.ClientSession, tgz: bytes, filename: str, meta: dict[str, Any]
    ) -> bytes:
        """The package as the repository has it: ours, or an equal one already there."""
        for _ in range(2):
            status, _, body = await self._request(session, "GET", filename)
            if status == 200:
                if chart_files(body) != chart_files(tgz):
                    raise StepFailed(
                        f"chart {meta['name']} version {meta['version']} is already in "
                        f"{self.base} with other content; a released version is never "
                        "replaced: release another version",
                        retryable=False,
                    )
                self.log.line(f"{self.url(filename)} is already published with this content")
                return body
            if status != 404:
                raise self._refused("GET", filename, status, body)
            status, _, body = await self._request(
                session, "PUT", filename, data=tgz, headers={"If-None-Match": "*"}
            )
            if status in (200, 201, 204):
                self.log.line(f"uploaded {self.url(filename)}")
                return tgz
            if status != 412:  # 412: another run uploaded it first; compare with theirs
                raise self._refused("PUT", filename, status, body)
        raise StepFailed(f"{self.url(filename)} kept changing while uploading", retryable=True)

    async def _index(self, session: aiohttp.ClientSession, entry: dict[str, Any]) -> None:
        for attempt in range(1, self.attempts + 1):
            status, etag, body = await self._request(session, "GET", INDEX)
            if status == 200:
                try:
                    index = yaml.safe_load(body) or {}
                except yaml.YAMLError as exc:
                    raise StepFailed(
                        f"{self.url(INDEX)} is not valid YAML ({exc}); fix or remove it",
                        retryable=False,
                    ) from None
                condition = {"If-Match": etag} if etag else {}
            elif status == 404:
                index, condition = {}, {"If-None-Match": "*"}
            else:
                raise self._refused("GET", INDEX, status, body)
            if not isinstance(index, dict):
                raise StepFailed(f"{self.url(INDEX)} is not a chart index", retryable=False)
            if not merge_index(index, entry):
                self.log.line(f"{self.url(INDEX)} already lists {entry['name']} {entry['version']}")
                return
            data = dump_yaml(index).encode()
            status, _, body = await self._request(
                session, "PUT", INDEX, data=data, headers=condition
            )
            if status in (200, 201, 204):
                self.log.line(f"listed {entry['name']} {entry['version']} in {self.url(INDEX)}")
                return
            if status != 412:
                raise self._refused("PUT", INDEX, status, body)
            self.log.line(
                f"{self.url(INDEX)} changed while we merged (attempt {attempt} of "
                f"{self.attempts}); merging again"
            )
            await asyncio.sleep(0.05 * attempt)
        raise StepFailed(
            f"{self.url(INDEX)} changed under us {self.attempts} times in a row",
            retryable=True,
        )
