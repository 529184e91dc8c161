"""The worker's bare mirror of each repository, which steps check out from.

A checkout fetches from the repository only when the mirror lacks the commit; otherwise a step's
tree is a fresh `git init` whose `objects/info/alternates` names the mirror's objects, so a
checkout is a local operation. The tree borrows objects, never hard links to them: the step
sandbox chowns the workspace to its user, and a link would hand it the mirror's files too.
In the sandbox the mirror's objects are bound read-only at the same path (`objects_of`,
`Sandbox.read_only_binds`): a step's git can read them and never write them.

`<workdir>/mirrors/<sha256(url)[:32]>.git`, bare. One fetch at a time per mirror: an
asyncio.Lock within a worker, `flock` on `<mirror>.lock` between workers sharing the workdir.

Crash safety. Fetches keep every pack whole (`fetch.unpackLimit=1`): git moves a pack into
place only once it is complete, so an object is in the mirror only with everything it points
to. Each fetched commit is pinned by a ref (`refs/cistate/<sha>`) and `gc.auto=0`: nothing a
step tree borrows is ever pruned. A fetch writes MARKER first and removes it after; a worker
killed mid-fetch leaves it, and whoever takes the lock next removes stale `*.lock` and
temporary pack files and checks the mirror (`git fsck --connectivity-only`). A mirror that
fails that check, whose ref tips are missing, or that is no git directory at all is deleted
and fetched again.

Bounded with the worker's caches (handlers.cache: `cistate cache list|prune`, and
CISTATE_CACHE_MAX, counted in one total with them, least recently used first). A checkout
touches `<mirror>/cistate-last-used` (the mirror's last use) and, from before it looks at the
mirror until the attempt's workspace is removed, holds a shared `flock` on `<mirror>.use`
(`borrowed`, kept in `StepRequest.holds`): its tree's `alternates` names the mirror's objects
all that time. `remove` takes the mirror's lock (no fetch is under way or starts) and the
exclusive `flock` on `<mirror>.use`, both without waiting, and skips a mirror that is busy;
it renames the mirror into `<mirrors>/.trash/` first and deletes it after, so a remover
killed halfway leaves no half of a mirror where a checkout would look (`sweep` empties the
trash). A removed mirror is fetched again by the next checkout of its repo. The kernel drops
a killed worker's flocks: nothing it held keeps a mirror from being removed. The lock files
beside the mirrors are never deleted (a lock on a deleted file would lock nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from handlers import process
from handlers.base import StepFailed

MIRRORS_DIR = "mirrors"
MARKER = "cistate-fetch-in-progress"
STAMP = "cistate-last-used"  # its mtime: the mirror's last use by a checkout
TRASH = ".trash"  # in the mirrors folder: mirrors being removed
PIN_PREFIX = "refs/cistate/"
REPACK_OVER = 32  # packs: one per fetch, merged into one beyond this many
_GIT = ("git", "-c", "protocol.ext.allow=never", "-c", "protocol.fd.allow=never")
_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
_LOCK_POLL = (0.01, 0.2)  # first and longest wait between tries of another worker's flock

T = TypeVar("T")

_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def path_for(root: Path, url: str) -> Path:
    """The mirror of `url` under the worker's mirrors folder. The name is a hash of the URL
    without its credentials: a token that rotates (a git host's app tokens last an hour)
    keeps its repo's mirror, and the name shows nothing of the URL."""
    key = _without_credentials(url)
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.git"


def _without_credentials(url: str) -> str:
    """`scheme://user:token@host/path` as `scheme://host/path`; scp-style `git@host:path`
    keeps its user (it names the account, not a secret), and so does a URL without scheme."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def objects_of(mirror: Path) -> Path:
    return mirror / "objects"


@contextlib.asynccontextmanager
async def locked(mirror: Path) -> AsyncIterator[None]:
    """Hold the mirror for this worker (asyncio.Lock) and for the others sharing the folder
    (flock). The flock is tried without blocking and waited for here: a cancelled step leaves
    no thread behind that would take the lock later and keep it."""
    lock = _locks.setdefault(asyncio.get_running_loop(), {}).setdefault(mirror, asyncio.Lock())
    async with lock:
        mirror.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(f"{mirror}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            wait = _LOCK_POLL[0]
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, _LOCK_POLL[1])
            yield
        finally:
            os.close(fd)  # releases the flock


@contextlib.contextmanager
def borrowed(mirror: Path) -> Iterator[None]:
    """Hold the mirror against removal while a step's tree borrows its objects: a shared
    flock on `<mirror>.use`. Taken under the mirror's lock (`locked`): `remove` takes both, so
    none is between its check and its rename."""
    fd = os.open(f"{mirror}.use", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # only a remover holds it exclusively, and only with the mirror's lock
        raise StepFailed(f"the worker's mirror {mirror} is being removed; the step is "
                         "retried") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


def touch(mirror: Path) -> None:
    """A checkout used the mirror now."""
    with contextlib.suppress(OSError):
        (mirror / STAMP).touch()


def last_used(mirror: Path) -> float:
    """When a checkout last used the mirror (the mirror's own mtime before any did)."""
    for path in (mirror / STAMP, mirror):
        with contextlib.suppress(OSError):
            return path.stat().st_mtime
    return 0.0


def mirrors(root: Path) -> list[Path]:
    """The mirrors in the worker's mirrors folder (not those being removed)."""
    if not root.is_dir():
        return []
    return sorted(path for path in root.glob("*.git")
                  if path.is_dir() and not path.is_symlink())


def url_of(mirror: Path) -> str:
    """The repo's URL as the mirror's config has it (with the credentials of its last fetch:
    redact it before showing it); empty when it has none."""
    done = subprocess.run(
        ["git", "config", "--file", str(mirror / "config"), "--get", "remote.origin.url"],
        cwd=mirror.parent, env={**process.tool_env(), **_ENV}, capture_output=True,
        text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def remove(mirror: Path) -> bool:
    """Remove the mirror unless it is busy: a fetch holds its lock, or a step's tree borrows
    from it (`borrowed`); both flocks are tried without waiting. Renamed aside (into the
    mirrors folder's trash) first, then deleted. Whether it was removed."""
    if not mirror.is_dir():
        return False
    gone = mirror.parent / TRASH / f"{mirror.name}-{uuid.uuid4().hex[:8]}"
    try:
        fetch = os.open(f"{mirror}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fetch, fcntl.LOCK_EX | fcntl.LOCK_NB)
        use = os.open(f"{mirror}.use", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            gone.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(mirror, gone)
        finally:
            os.close(use)
    except OSError:  # busy (BlockingIOError), or removed by another meanwhile
        return False
    finally:
        os.close(fetch)
    shutil.rmtree(gone, ignore_errors=True)
    return True


def sweep(root: Path) -> None:
    """Delete what a remover killed halfway left in the trash (never a mirror in use: it was
    renamed there under both locks)."""
    trash = root / TRASH
    if trash.is_dir():
        for child in trash.iterdir():
            shutil.rmtree(child, ignore_errors=True)


async def call(operation: Callable[..., T], *args: Any) -> T:
    """Run a blocking operation on a mirror in a thread. A caller cancelled meanwhile waits for
    it to end before it goes on cancelling: the mirror's lock is never let go while a thread
    still changes the mirror."""
    job = asyncio.ensure_future(asyncio.to_thread(operation, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        while not job.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([job])
        raise


def ready(mirror: Path, url: str) -> str | None:
    """Make the mirror usable (under its lock): a missing one is made, one left by a fetch
    that never finished is cleaned and checked, a broken one is made again. Returns why it
    was made again, None when it was usable (or new)."""
    if not mirror.exists():
        _create(mirror, url)
        return None
    if not _is_repo(mirror):
        rebuild(mirror, url)
        return "it was not a git repository"
    _set_origin(mirror, url)
    if (mirror / MARKER).exists():
        _remove_leftovers(mirror)
        if not connected(mirror):
            rebuild(mirror, url)
            return "a fetch was interrupted and left it broken"
        (mirror / MARKER).unlink()
    return None


def rebuild(mirror: Path, url: str) -> None:
    shutil.rmtree(mirror, ignore_errors=True)
    if mirror.exists() or mirror.is_symlink():
        mirror.unlink()  # a file or a link in its place
    _create(mirror, url)


def resolve(mirror: Path, sha: str) -> str | None:
    """The full sha of commit `sha` if the mirror has it."""
    done = _git(mirror, "rev-parse", "--verify", "--quiet", "--end-of-options",
                f"{sha}^{{commit}}")
    return done.stdout.strip() if done.returncode == 0 else None


def tips_present(mirror: Path) -> bool:
    """Whether every ref points at an object the mirror has (cheap: one lookup per ref); a
    pack deleted under it is found here before a fetch trusts its refs."""
    refs = _git(mirror, "for-each-ref", "--format=%(objectname)")
    if refs.returncode != 0:
        return False
    if not refs.stdout.strip():
        return True
    check = _git(mirror, "cat-file", "--batch-check", stdin=refs.stdout)
    return check.returncode == 0 and " missing" not in check.stdout


def connected(mirror: Path) -> bool:
    """Whether everything the mirror's refs reach is there."""
    return _git(mirror, "fsck", "--connectivity-only", "--no-dangling").returncode == 0


def begin_fetch(mirror: Path) -> None:
    (mirror / MARKER).write_bytes(b"")


def end_fetch(mirror: Path, full: str | None) -> None:
    """After git fetched (or failed to, by itself): pin the commit, merge packs now and then,
    and remove the marker."""
    if full is not None:
        _git(mirror, "update-ref", f"{PIN_PREFIX}{full}", full, check=True)
        packs = list((mirror / "objects" / "pack").glob("*.pack"))
        if len(packs) > REPACK_OVER:
            _git(mirror, "repack", "-a", "-d", "-q", check=True)
            _git(mirror, "pack-refs", "--all", check=True)
    (mirror / MARKER).unlink(missing_ok=True)


def _create(mirror: Path, url: str) -> None:
    import git as gitpython  # here: the worker imports this module, and GitPython is big

    mirror.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # shared=0644: the objects are readable by the sandbox user, whatever the worker's umask;
    # on the host the mirrors folder is the worker's alone (0700), and a step reaches only the
    # objects of its own repo's mirror, through the sandbox's read-only bind
    with gitpython.Repo.init(mirror, bare=True, shared="0644") as repo, \
            repo.config_writer() as config:
        # written as config, not passed to a command: the URL never meets an argv parser
        config.set_value('remote "origin"', "url", url)
        config.set_value('remote "origin"', "fetch", "+refs/heads/*:refs/heads/*")
        config.set_value("gc", "auto", "0")
        config.set_value("fetch", "unpackLimit", "1")
        config.set_value("transfer", "unpackLimit", "1")
        config.set_value("core", "logAllRefUpdates", "false")


def _set_origin(mirror: Path, url: str) -> None:
    """The URL this fetch uses: the same repo's URL may come with other credentials than the
    mirror was made with (a rotated token). Written as config, never on a command line."""
    import git as gitpython

    with gitpython.Repo(mirror) as repo:
        with repo.config_reader() as config:
            current = config.get_value('remote "origin"', "url", default="")
        if current != url:
            with repo.config_writer() as writer:
                writer.set_value('remote "origin"', "url", url)


def _is_repo(mirror: Path) -> bool:
    if not mirror.is_dir() or mirror.is_symlink() or not (mirror / "objects").is_dir():
        return False
    done = _git(mirror, "rev-parse", "--is-bare-repository")
    return done.returncode == 0 and done.stdout.strip() == "true"


def _remove_leftovers(mirror: Path) -> None:
    """What a killed git leaves: lock files (which would refuse every later ref update) and
    temporary packs and objects."""
    for folder, _dirs, files in os.walk(mirror):
        for name in files:
            if name.endswith(".lock") or name.startswith(("tmp_pack_", "tmp_idx_", "tmp_rev_",
                                                          "tmp_obj_")):
                Path(folder, name).unlink(missing_ok=True)


def _git(mirror: Path, *args: str, stdin: str | None = None,
         check: bool = False) -> subprocess.CompletedProcess[str]:
    """A local git command on the mirror, named by --git-dir: a broken mirror is never taken
    for some repository above it."""
    done = subprocess.run(
        [*_GIT, f"--git-dir={mirror}", *args], cwd=mirror.parent,
        env={**process.tool_env(), **_ENV}, input=stdin, capture_output=True, text=True,
        check=False)
    if check and done.returncode != 0:
        raise StepFailed(f"git {args[0]} in the worker's mirror {mirror} failed: "
                         f"{done.stderr.strip()}", exit_code=done.returncode,
                         output_tail=done.stderr)
    return done
