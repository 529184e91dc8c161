"""The worker's caches, keyed by content, under `<workdir>/cache/` (hidden from every step).

One folder per entry, `<root>/<kind>/<id>/`, holding `meta.json` (kind, key, repo, branch),
`last-used` (its mtime is the entry's last use: least recently used goes first), `lock` and
`data/` (the cached thing itself). Kinds:

- `npm`: npm's download cache of one repository (`npm_config_cache`), bound writable into the
  sandbox of that repository's installs. Per repository: a hostile repo's install scripts
  could otherwise plant index entries another repo's install reads.
- `node_modules`: the tree `npm ci` installed, for one key (repo, lock file, package.json,
  .npmrc, npm and node versions) on one branch; see handlers.node_modules.
- `buildah`: one repository's image store (per buildah executable and storage driver), so
  that `buildah bud --layers` reuses its layers.
- `mirror`: the worker's bare mirror of one repository, which checkouts borrow objects from
  (handlers.mirror). Not under `<root>` but beside it, in `<workdir>/mirrors/`, and not made
  here: listed, counted in the total and evicted like the others. In use while a step's tree
  borrows from it or a fetch fills it (`mirror.borrowed`, `mirror.locked`); removed by
  `mirror.remove`, and fetched again by the next checkout of its repo.

Entries are written whole or not at all: filled in a temporary folder and renamed into place.
A reader holds a shared lock on the entry while it copies from it (or a build uses it);
eviction takes the exclusive lock without waiting, and skips an entry that is in use.
Pull requests from forks (`StepRequest.untrusted`) read entries but never write one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from handlers import mirror

KINDS = ("npm", "node_modules", "buildah")  # entries of the cache folder
MIRROR = "mirror"  # the repo mirrors beside it (handlers.mirror)
TRASH = ".trash"
STALE_SECONDS = 3600.0  # a temporary folder this old is a killed worker's
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> Any:
    """`5G`, `512M`, `100k`, `2GiB`, `1048576`: a number of bytes (binary units)."""
    if isinstance(value, str):
        found = _SIZE.match(value)
        if found is None:
            raise ValueError(f"{value!r} is not a size: give bytes, or a number with K, M, G "
                             "or T (5G, 512M)")
        return int(float(found.group(1)) * _UNITS[found.group(2).lower()])
    return value


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit.lower()]:
            return f"{size / _UNITS[unit.lower()]:.1f}{unit}"
    return f"{size}B"


ByteCount = Annotated[int, BeforeValidator(parse_size)]


class CacheSettings(BaseSettings):
    """The worker's caches (the environment only)."""

    model_config = SettingsConfigDict(env_prefix="CISTATE_", extra="ignore",
                                      use_attribute_docstrings=True)

    cache_max: ByteCount = Field(default="5G", ge=0, validate_default=True)
    """The most the worker's caches (npm downloads, node_modules, image layers, repo mirrors)
    may take on disk, in bytes or with K/M/G/T; least recently used entries go first after
    each write or fetch
    """


def digest(*parts: str | bytes) -> str:
    """sha256 of the parts, each length-prefixed (no two lists of parts give one digest)."""
    hashed = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        hashed.update(len(data).to_bytes(8, "big"))
        hashed.update(data)
    return hashed.hexdigest()


def executables(names: list[str], path: str) -> tuple[str, ...] | None:
    """Which files the executables are (real path, mtime, size), as found on `path`: part of
    a key that must change when a tool is upgraded. None when one is missing."""
    stamp = []
    for name in names:
        found = shutil.which(name, path=path)
        if found is None:
            return None
        real = os.path.realpath(found)
        info = os.stat(real)
        stamp.append(f"{real}:{info.st_mtime_ns}:{info.st_size}")
    return tuple(stamp)


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str
    key: str
    repo: str
    branch: str
    fixed_size: int | None = None  # of an entry never written after it is stored

    @property
    def data(self) -> Path:
        return self.path if self.kind == MIRROR else self.path / "data"

    @property
    def last_used(self) -> float:
        if self.kind == MIRROR:
            return mirror.last_used(self.path)
        try:
            return (self.path / "last-used").stat().st_mtime
        except OSError:
            return 0.0

    def size(self) -> int:
        return self.fixed_size if self.fixed_size is not None else disk_usage(self.path)

    def touch(self) -> None:
        if self.kind == MIRROR:
            mirror.touch(self.path)
            return
        with contextlib.suppress(OSError):
            (self.path / "last-used").touch()

    def as_json(self) -> dict[str, Any]:
        used = datetime.fromtimestamp(self.last_used, UTC).isoformat()
        return {"id": self.path.name, "kind": self.kind, "key": self.key, "repo": self.repo,
                "branch": self.branch, "size": self.size(), "last_used": used}


def disk_usage(path: Path) -> int:
    """Bytes on disk below `path` (links are not followed)."""
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def read(root: Path, kind: str, entry_id: str) -> Entry | None:
    """The entry, if it is there (whole: written entries always have their meta.json)."""
    path = root / kind / entry_id
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = meta.get("size")
    return Entry(path, kind, str(meta.get("key", "")), str(meta.get("repo", "")),
                 str(meta.get("branch", "")), size if isinstance(size, int) else None)


def mirrors_of(root: Path) -> Path:
    """The worker's repo mirrors: `<workdir>/mirrors`, beside its caches (`<workdir>/cache`)."""
    return root.parent / mirror.MIRRORS_DIR


def mirror_entries(root: Path, *, repos: bool = True) -> list[Entry]:
    """The repo mirrors beside the caches at `root`, each with its repo's URL shown without
    credentials (`repos`; else left empty, for `with_repo` to fill in when needed)."""
    found = [Entry(path, MIRROR, path.name.removesuffix(".git"), "", "")
             for path in mirror.mirrors(mirrors_of(root))]
    return [with_repo(entry) for entry in found] if repos else found


def with_repo(entry: Entry) -> Entry:
    """A mirror's entry with its repo's URL, without credentials, read from the mirror's
    config (a git process: what eviction does only for the mirrors it drops)."""
    if entry.kind != MIRROR or entry.repo:
        return entry
    from handlers.git import redact  # here: GitPython is big, and most caches have no mirror

    return dataclasses.replace(entry, repo=redact(mirror.url_of(entry.path)))


def entries(root: Path, *, repos: bool = True) -> list[Entry]:
    """Every entry of the caches at `root`, and the repo mirrors beside them (their repos'
    URLs only with `repos`)."""
    found = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            entry = read(root, kind, child.name) if not child.name.startswith(".") else None
            if entry is not None:
                found.append(entry)
    return [*found, *mirror_entries(root, repos=repos)]


@contextlib.contextmanager
def using(entry: Entry) -> Iterator[bool]:
    """Hold `entry` against eviction while the block reads it; False when it was evicted
    before the lock was had (a miss). Counts as a use (its `last-used` is touched). Not for
    mirrors: a checkout holds those (`mirror.borrowed`)."""
    if entry.kind == MIRROR:
        raise ValueError("a repo mirror is held by mirror.borrowed, not cache.using")
    try:
        fd = os.open(entry.path / "lock", os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        present = (entry.path / "meta.json").is_file()  # not renamed away meanwhile
        if present:
            entry.touch()
        yield present
    finally:
        os.close(fd)


def store(root: Path, kind: str, entry_id: str, meta: dict[str, str],
          fill: Callable[[Path], int | None], *, immutable: bool = False,
          reclaim: Callable[[Path], None] | None = None) -> Entry | None:
    """Write a new entry: `fill(data)` makes its data in a temporary folder, which is then
    renamed into place. None when one with this id is there already (the same content, by
    its key: the first one stays); when `fill` raises, nothing is left behind. The size of
    an `immutable` entry is counted once, here, not at every eviction (`fill` may return
    it, counted as `disk_usage` does, when it walked the data anyway).

    `reclaim(data)` is called when `fill` made data that is not stored after all (`fill`
    raised, or writing the entry failed, or another writer was first), before the temporary
    folder is removed: a `fill` that moved something in rather than copying it gets the
    chance to take it back."""
    folder = root / kind
    if read(root, kind, entry_id) is not None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".tmp-{uuid.uuid4().hex}"
    temporary.mkdir(mode=0o700)
    stored = False
    try:
        counted = fill(temporary / "data")
        size = None
        if immutable:
            size = counted if counted is not None else disk_usage(temporary / "data")
        _write_meta(temporary, kind, meta, size)
        try:
            os.rename(temporary, folder / entry_id)
        except OSError:  # another writer was first
            return None
        stored = True
    finally:
        try:
            if not stored and reclaim is not None and os.path.lexists(temporary / "data"):
                reclaim(temporary / "data")
        finally:
            if temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)
    return read(root, kind, entry_id)


def ensure(root: Path, kind: str, entry_id: str, meta: dict[str, str]) -> Entry:
    """The entry, made empty (its `data/` a folder) when it is not there yet."""
    entry = read(root, kind, entry_id)
    if entry is not None:
        return entry
    store(root, kind, entry_id, meta, lambda data: data.mkdir())
    entry = read(root, kind, entry_id)
    if entry is None:
        raise OSError(f"cannot make the cache entry {root / kind / entry_id}")
    return entry


def _write_meta(folder: Path, kind: str, meta: dict[str, str], size: int | None) -> None:
    (folder / "lock").touch()
    (folder / "last-used").touch()
    sized = {"size": size} if size is not None else {}
    (folder / "meta.json").write_text(json.dumps({"kind": kind, **meta, **sized}),
                                      encoding="utf-8")


def evict(root: Path, limit: int) -> list[Entry]:
    """Drop least recently used entries until the caches take at most `limit` bytes; an
    entry in use is skipped. The entries dropped. Leftovers of a worker killed while it
    wrote or removed an entry go first."""
    sweep(root)
    # after every write: no git process per mirror to read a URL nobody is shown
    found = [(entry.last_used, entry, entry.size()) for entry in entries(root, repos=False)]
    total = sum(size for _, _, size in found)
    dropped = []
    for _, entry, size in sorted(found, key=lambda item: item[0]):
        if total <= limit:
            break
        shown = with_repo(entry)  # read before the mirror (and its config) is gone
        if remove(root, entry):
            total -= size
            dropped.append(shown)
    return dropped


def sweep(root: Path, *, stale: float = STALE_SECONDS) -> None:
    """Remove what a killed worker left: the trash (and the mirrors'), and temporary folders
    older than `stale` seconds (a write in progress takes seconds)."""
    mirror.sweep(mirrors_of(root))
    trash = root / TRASH
    if trash.is_dir():
        for child in trash.iterdir():
            shutil.rmtree(child, ignore_errors=True)
    cutoff = time.time() - stale
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for child in folder.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if child.stat().st_mtime < cutoff:
                    shutil.rmtree(child, ignore_errors=True)


def remove(root: Path, entry: Entry) -> bool:
    """Remove one entry unless it is in use; whether it was removed."""
    if entry.kind == MIRROR:
        return mirror.remove(entry.path)
    try:
        fd = os.open(entry.path / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        trash = root / TRASH
        trash.mkdir(parents=True, exist_ok=True)
        gone = trash / f"{entry.path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry.path, gone)
        except OSError:
            return False
    finally:
        os.close(fd)
    shutil.rmtree(gone, ignore_errors=True)
    return True


def prune(root: Path, *, limit: int | None) -> list[Entry]:
    """`cistate cache prune`: down to `limit` bytes, or every entry not in use (None)."""
    if limit is not None:
        return evict(root, limit)
    sweep(root)
    return [entry for entry in entries(root) if remove(root, entry)]


def since(timestamp: float) -> str:
    """How long ago, for a person: `12s`, `5m`, `3h`, `2d`."""
    seconds = max(time.time() - timestamp, 0)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"
