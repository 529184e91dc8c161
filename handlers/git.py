"""Git for the handlers: validate push data, check out a run's commit, read and push tags.

Every handler that needs the source calls `checkout(request)`: steps are stateless and may
run on different machines, so each one gets the commit itself; a worker keeps a mirror of each
repo (`handlers.mirror`) and fetches from the repo only when the mirror lacks the commit.

GitPython holds the repository model (init, remote config, commits, tags, checkout); the git
commands that talk to the remote (fetch, push) run through `handlers.process`, so their output
lands in the step log and cancelling the step stops them. Push data (repo URL, ref, commit)
is validated first and then only ever passed as a config value or an argv element, never
through a shell; the `ext::` transport, which runs commands, is refused.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import git

from cistate.config import RepoSettings
from handlers import cache, mirror, process
from handlers.base import StepFailed, StepRequest

SOURCE_DIR = "source"
REMOTE = "origin"
GIT = ("git", "-c", "protocol.ext.allow=never", "-c", "protocol.fd.allow=never")
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}

_SHA = re.compile(r"[0-9a-f]{4,64}")
_FULL_SHA_LENGTHS = (40, 64)
# git check-ref-format: no control characters, space, ~ ^ : ? * [ \ anywhere
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
# phrases of git's errors that no retry can fix
_PERMANENT = (
    "does not appear to be a git repository",
    "repository not found",
    "not found",
    "no such file or directory",
    "no such repository",
    "access denied or repository not exported",
    "authentication failed",
    "permission denied",
    "unsupported protocol",
    "not allowed",  # transport 'ext' not allowed
)


# ------------------------------------------------------------------ push data --


def validate_request(request: StepRequest) -> None:
    """Refuse a malformed push (repo URL, ref, commit) before anything runs."""
    validate_repo_url(request.repo)
    validate_ref(request.ref)
    validate_commit(request.commit)


def validate_commit(commit: str) -> str:
    """A commit sha (full, or abbreviated to at least 4 hex digits), lower-cased."""
    sha = commit.strip().lower()
    if not _SHA.fullmatch(sha):
        raise StepFailed(
            f"commit {commit!r} is not a git commit sha (4 to 64 hex digits); "
            "the push event is malformed, nothing was run",
            retryable=False,
        )
    return sha


def validate_ref(ref: str) -> str:
    """A ref name by git's own rules (`git check-ref-format`), and not an option."""
    problem = _ref_problem(ref)
    if problem:
        raise StepFailed(
            f"ref {ref!r} is not a valid git ref name ({problem}); "
            "the push event is malformed, nothing was run",
            retryable=False,
        )
    return ref


def _ref_problem(ref: str) -> str:
    if not ref:
        return "it is empty"
    if ref.startswith("-"):
        return "it starts with '-'"
    if _REF_FORBIDDEN.search(ref):
        return "it has a space, a control character or one of ~ ^ : ? * [ \\"
    if ".." in ref or "@{" in ref or "//" in ref:
        return "it has '..', '@{' or '//'"
    if ref == "@" or ref.endswith(("/", ".")):
        return "it is '@' or ends with '/' or '.'"
    if any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/")):
        return "a component starts with '.' or ends with '.lock'"
    return ""


def branch_of(ref: str) -> str:
    """`refs/heads/feature/x` -> `feature/x`; a short name is already a branch."""
    validate_ref(ref)
    for prefix in ("refs/heads/", "refs/remotes/origin/"):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    if ref.startswith("refs/"):
        raise StepFailed(
            f"ref {ref!r} is not a branch; cistate runs pipelines for branch pushes only",
            retryable=False,
        )
    return ref


def validate_repo_url(url: str) -> str:
    """The push's repo URL, if this worker may clone it (cistate.domain.repos: remote URLs, local
    paths only when the deployment allows them); the orchestrator checked it too."""
    problem = RepoSettings().policy.problem(url)
    if problem is not None:
        raise StepFailed(f"{problem}; the push event is refused, nothing was run",
                         retryable=False)
    return url


def repo_basename(url: str) -> str:
    """`https://host/org/My_Repo.git/` -> `My_Repo`; `git@host:org/app.git` -> `app`."""
    tail = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail.removesuffix(".git")


def redact(url: str) -> str:
    """A URL without the user:password part, to name the repo in messages."""
    return re.sub(r"(?<=://)[^/@]+@", "", url)


def parse_version(tag: str) -> tuple[int, int, int] | None:
    match = _VERSION.fullmatch(tag)
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


# -------------------------------------------------------------------- checkout --


async def checkout(request: StepRequest) -> Path:
    """Check out request.commit of request.repo into `<workdir>/source` (detached HEAD).

    Idempotent: an existing checkout in the workdir is replaced. Returns the checkout's path.
    """
    validate_request(request)
    url = request.repo
    sha = validate_commit(request.commit)
    path = request.workdir / SOURCE_DIR
    try:
        full, how = await _fetch_commit(request, path, url, sha)
    except BaseException:
        # Leave no half-made checkout behind (a failed or cancelled fetch); synchronous, so
        # a second cancellation cannot interrupt the cleanup.
        shutil.rmtree(path, ignore_errors=True)
        raise
    request.log.line(f"checked out {full} of repo {redact(url)} into {path}{how}")
    return path


async def fetch(request: StepRequest) -> tuple[Path, str]:
    """Fetch request.commit of request.repo into `<workdir>/source` without checking any of
    it out (nothing of the pushed tree is written to disk); returns the path and full sha."""
    validate_request(request)
    sha = validate_commit(request.commit)
    path = request.workdir / SOURCE_DIR
    try:
        full, _ = await _fetch_commit(request, path, request.repo, sha, detach=False)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, full


def read_file(path: Path, commit: str, name: str, max_bytes: int) -> tuple[str, bytes] | None:
    """The blob id and bytes of the file `name` in `commit`'s tree, None if there is none;
    StepFailed when it is not a regular file (a symlink is never followed) or too big."""
    with git.Repo(path) as repo:
        tree = repo.commit(commit).tree
        try:
            entry = tree / name
        except KeyError:
            return None
        regular = (git.objects.Blob.file_mode, git.objects.Blob.executable_mode)
        if entry.type != "blob" or entry.mode not in regular:
            kind = "a symlink" if entry.mode == git.objects.Blob.link_mode else f"a {entry.type}"
            raise StepFailed(f"{name} is {kind} in commit {commit[:12]}; it must be a regular "
                             "file", retryable=False)
        if entry.size > max_bytes:
            raise StepFailed(f"{name} is {entry.size} bytes in commit {commit[:12]}; at most "
                             f"{max_bytes} are read", retryable=False)
        return str(entry.hexsha), bytes(entry.data_stream.read())


async def _fetch_commit(request: StepRequest, path: Path, url: str, sha: str,
                        detach: bool = True) -> tuple[str, str]:
    """The full sha, and how it was got (for the log line), of `sha` in a fresh repo at path:
    borrowed from the worker's mirror of the repo when the worker keeps mirrors, else
    fetched from the repo into it."""
    if request.mirrors is not None:
        return await _borrow_from_mirror(request, path, url, sha, detach)
    await asyncio.to_thread(init_repo, path, url)
    full = await _fetch_into(request, path, url, sha)
    if detach:
        await asyncio.to_thread(_detach, path, full)
    return full, ""


async def _borrow_from_mirror(request: StepRequest, path: Path, url: str, sha: str,
                              detach: bool) -> tuple[str, str]:
    assert request.mirrors is not None
    mirror_dir = mirror.path_for(request.mirrors, url)
    where = f"repo {redact(url)}"
    held = fetched = False
    for last in (False, True):
        async with mirror.locked(mirror_dir):
            if not held:
                # from before the mirror is looked at until the attempt's workspace is gone:
                # the tree borrows its objects all that time, no prune may remove it
                request.holds.enter_context(mirror.borrowed(mirror_dir))
                held = True
            rebuilt = await mirror.call(mirror.ready, mirror_dir, url)
            if rebuilt:
                request.log.line(f"made the worker's mirror of {where} again: {rebuilt}")
            full = await mirror.call(mirror.resolve, mirror_dir, sha)
            if full is None:
                full = await _fetch_into_mirror(request, mirror_dir, url, sha)
                fetched = True
                request.log.line(f"fetched {full} of {where} into the worker's mirror")
        try:
            await asyncio.to_thread(_init_borrowing, path, url, mirror.objects_of(mirror_dir),
                                    full, detach)
            await asyncio.to_thread(mirror.touch, mirror_dir)
            if fetched and request.cache_root is not None:
                await _trim_caches(request, request.cache_root)
            return full, " from the worker's mirror"
        except (git.GitError, git.BadName, git.BadObject, ValueError) as exc:
            failed = StepFailed(f"cannot check out {full} of {where} from the worker's mirror: "
                                f"{type(exc).__name__}: {exc}")
            if last:
                raise failed from exc
            async with mirror.locked(mirror_dir):
                if await mirror.call(mirror.resolve, mirror_dir, full) is not None:
                    # still there: the mirror lost objects, or this is no fault of the mirror
                    if await mirror.call(mirror.connected, mirror_dir):
                        raise failed from exc
                    await mirror.call(mirror.rebuild, mirror_dir, url)
                    request.log.line(f"made the worker's mirror of {where} again: a checkout "
                                     "from it failed and it is broken")
                # else another worker made the mirror again under us: fetch once more
    raise AssertionError("unreachable")


async def _trim_caches(request: StepRequest, root: Path) -> None:
    """The mirror grew: trim the caches and mirrors (the step's own is held) to their bound.
    A failure is the step's log's, not the step's: the checkout is done."""
    try:
        await asyncio.to_thread(cache.evict, root, cache.CacheSettings().cache_max)
    except (OSError, ValueError) as exc:
        request.log.line(f"could not trim the worker's caches: {type(exc).__name__}: {exc}")


async def _fetch_into_mirror(request: StepRequest, mirror_dir: Path, url: str,
                             sha: str) -> str:
    """Fetch `sha` from the repo into its mirror (under the mirror's lock); a mirror whose refs
    lead to objects it lost is made again first, one that a failed fetch shows to be broken
    is made again and fetched into once more."""
    where = f"repo {redact(url)}"
    if not await mirror.call(mirror.tips_present, mirror_dir):
        await mirror.call(mirror.rebuild, mirror_dir, url)
        request.log.line(f"made the worker's mirror of {where} again: objects its refs "
                         "point at are missing")
    for last in (False, True):
        await mirror.call(mirror.begin_fetch, mirror_dir)
        try:
            full = await _fetch_into(request, mirror_dir, url, sha)
        except StepFailed:
            broken = not await mirror.call(mirror.connected, mirror_dir)
            if not broken or last:
                await mirror.call(mirror.end_fetch, mirror_dir, None)
                raise
            await mirror.call(mirror.rebuild, mirror_dir, url)
            request.log.line(f"made the worker's mirror of {where} again: a fetch into it "
                             "failed and it is broken")
            continue
        # a cancelled or killed fetch leaves the marker: whoever comes next checks the mirror
        await mirror.call(mirror.end_fetch, mirror_dir, full)
        return full
    raise AssertionError("unreachable")


async def _fetch_into(request: StepRequest, path: Path, url: str, sha: str) -> str:
    """Fetch commit `sha` from the repo (remote `origin` of the repo at path); its full sha."""
    where = f"repo {redact(url)}"
    if len(sha) in _FULL_SHA_LENGTHS:
        done = await run_git(request, path, "fetch", "--no-tags", REMOTE, sha, check=False)
        fetched = done.exit_code == 0
    else:
        fetched = False
    if not fetched:
        # The server may refuse wants by sha (uploadpack.allowReachableSHA1InWant off), or
        # the sha is abbreviated: fetch the branches and look for it among them.
        done = await run_git(request, path, "fetch", "--no-tags", REMOTE, check=False)
        if done.exit_code != 0:
            raise _unreachable(where, done)
    full = await asyncio.to_thread(_resolve_commit, path, sha)
    if full is None:
        raise StepFailed(
            f"commit {sha} is not in {where} (was it force-pushed away, or pushed to "
            "another repo?); nothing to build",
            retryable=False,
        )
    return full


def init_repo(path: Path, url: str) -> None:
    """An empty repo at path (replacing what was there) whose remote is `url`."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    # Every Repo is closed when done with: GitPython keeps `git cat-file` processes per Repo,
    # which would otherwise live on past the step, in a workspace already deleted.
    with git.Repo.init(path) as repo, repo.config_writer() as config:
        # written as config, not passed to a command: the URL never meets an argv parser
        config.set_value(f'remote "{REMOTE}"', "url", url)
        config.set_value(f'remote "{REMOTE}"', "fetch", "+refs/heads/*:refs/remotes/origin/*")
        config.set_value("advice", "detachedHead", "false")


def _init_borrowing(path: Path, url: str, objects: Path, full: str, detach: bool) -> None:
    """A fresh repo at path that reads its objects from the mirror's (alternates, no copy and
    no hard link) and has commit `full`, checked out when `detach`; writes go to its own
    objects folder only."""
    init_repo(path, url)
    alternates = path / ".git" / "objects" / "info" / "alternates"
    alternates.write_text(f"{objects}\n", encoding="utf-8")
    if _resolve_commit(path, full) != full:
        raise ValueError(f"commit {full} cannot be read through the mirror's objects")
    if detach:
        _detach(path, full)


async def standalone(request: StepRequest, path: Path) -> None:
    """Copy what the checkout at path borrows from the mirror into its own objects and stop
    borrowing: a tree that leaves the sandbox's view (an image build's context, whose `.git`
    the Containerfile may COPY and run git in) is then a whole repository, as a fetched one was.
    """
    alternates = path / ".git" / "objects" / "info" / "alternates"
    if not alternates.exists():
        return
    await run_git(request, path, "repack", "-a", "-d", "-q")
    alternates.unlink()


def _resolve_commit(path: Path, sha: str) -> str | None:
    with git.Repo(path) as repo:
        try:
            obj = repo.rev_parse(f"{sha}^{{commit}}")
        except (git.BadName, ValueError, git.GitCommandError):
            return None
        return str(obj.hexsha)


def _detach(path: Path, sha: str) -> None:
    with git.Repo(path) as repo:
        repo.head.reference = repo.commit(sha)
        repo.head.reset(index=True, working_tree=True)


def _unreachable(where: str, done: process.Completed) -> StepFailed:
    tail = done.tail.lower()
    permanent = any(phrase in tail for phrase in _PERMANENT)
    advice = (
        "check the URL and that the worker may read it"
        if permanent
        else "the git server did not answer; it is retried"
    )
    return StepFailed(
        f"cannot fetch from {where}: {advice} (git exited with code {done.exit_code})",
        exit_code=done.exit_code,
        output_tail=done.tail,
        retryable=not permanent,
    )


async def run_git(
    request: StepRequest, path: Path, *args: str, check: bool = True
) -> process.Completed:
    """git with the worker's safe settings, output to the step log, stopped on cancel."""
    return await process.run(
        [*GIT, *args],
        cwd=path,
        log=request.log,
        env=GIT_ENV,
        what=f"git {args[0]}",
        check=check,
        retryable=True,
    )


# ------------------------------------------------------------------------ tags --


@dataclass(frozen=True)
class Tag:
    name: str
    commit: str  # "" for a tag of a tree or blob

    @property
    def version(self) -> tuple[int, int, int] | None:
        return parse_version(self.name)


async def fetch_tags(request: StepRequest, path: Path) -> list[Tag]:
    """The remote's tags, as they are now (local tags that differ are overwritten)."""
    done = await run_git(
        request,
        path,
        "fetch",
        "--no-tags",
        "--force",
        REMOTE,
        "+refs/tags/*:refs/tags/*",
        check=False,
    )
    if done.exit_code != 0:
        raise _unreachable(f"repo {redact(request.repo)}", done)
    return await asyncio.to_thread(_tags, path)


def _tags(path: Path) -> list[Tag]:
    found = []
    with git.Repo(path) as repo:
        for ref in repo.tags:
            try:
                commit = ref.commit.hexsha
            except ValueError:  # a tag of a tree or blob: no commit's, but the name is taken
                commit = ""
            found.append(Tag(ref.name, commit))
    return found


async def create_tag(
    path: Path, name: str, commit: str, message: str, *, user: str, email: str
) -> None:
    """An annotated tag `name` at `commit`, made by `user <email>`."""

    def make() -> None:
        with git.Repo(path) as repo:
            with repo.config_writer() as config:
                config.set_value("user", "name", user)
                config.set_value("user", "email", email)
            if name in repo.tags:
                repo.delete_tag(repo.tags[name])
            repo.create_tag(name, ref=commit, message=message)

    await asyncio.to_thread(make)


@dataclass(frozen=True)
class Push:
    pushed: bool
    exit_code: int
    tail: str


async def push_tag(request: StepRequest, path: Path, name: str) -> Push:
    """Push tag `name`; `pushed` is False when the remote turned it down.

    A tag of that name pushed by someone else first comes back as `[rejected]` (already
    exists) or, when both pushes meet in the server, `[remote rejected]` (cannot lock ref):
    the caller fetches the tags again to tell a race it lost from a refusal.
    """
    refspec = f"refs/tags/{name}:refs/tags/{name}"
    done = await run_git(request, path, "push", "--porcelain", REMOTE, refspec, check=False)
    if done.exit_code == 0:
        return Push(True, 0, done.tail)
    if "[rejected]" in done.tail or "[remote rejected]" in done.tail:
        return Push(False, done.exit_code, done.tail)
    raise _unreachable(f"repo {redact(request.repo)}", done)


async def head_sha(path: Path) -> str:
    """The full sha of the checkout's HEAD."""

    def read() -> str:
        with git.Repo(path) as repo:
            return str(repo.head.commit.hexsha)

    return await asyncio.to_thread(read)
