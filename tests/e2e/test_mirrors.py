"""End to end: the worker's repo mirrors (handlers.mirror) against a real git daemon, real git
and bubblewrap. Connections to the repo are counted through a TCP proxy in front of it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest

from cistate.domain.messages import StepCommand
from cistate.service.worker import Worker
from handlers import cache, mirror, process
from handlers import git as git_client
from handlers.base import StepRequest
from tests.conftest import wait_until
from tests.e2e.conftest import GitRepo, GitServer, Requests, git, log_text
from tests.tcpproxy import TcpProxy
from tests.unit.test_caches import put as put_entry  # a node_modules entry of a size

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]  # the checkout of cistate, for a subprocess


@pytest.fixture
async def proxy(git_server: GitServer) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the git daemon: `proxied(repo)` is the repo's URL through it."""
    port = int(git_server.url.rsplit(":", 1)[1])
    tcp = await TcpProxy("127.0.0.1", port).start()
    yield tcp
    await tcp.close()


def proxied(proxy: TcpProxy, repo: GitRepo) -> str:
    return f"git://127.0.0.1:{proxy.port}/{repo.name}.git"


async def checkout(make_request: Requests, url: str, sha: str,
                   step: str = "setup") -> StepRequest:
    request = make_request(url, sha, step)
    await git_client.checkout(request)
    return request


def source(request: StepRequest) -> Path:
    return request.workdir / git_client.SOURCE_DIR


def mirror_of(make_request: Requests, url: str) -> Path:
    return mirror.path_for(make_request.mirrors, url)


def mirror_files(folder: Path) -> dict[str, int]:
    """Every file of a mirror and its size: what a step must not change."""
    return {str(p.relative_to(folder)): p.stat().st_size
            for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------ once per worker --


async def test_a_second_checkout_of_a_commit_does_not_contact_the_repo(
    make_repo: Any, make_request: Requests, proxy: TcpProxy
) -> None:
    repo: GitRepo = make_repo()
    url = proxied(proxy, repo)

    first = await checkout(make_request, url, repo.initial)
    assert proxy.accepted == 1
    assert f"fetched {repo.initial} of repo {url} into the worker's mirror" in log_text(first)

    second = await checkout(make_request, url, repo.initial, "test")
    assert proxy.accepted == 1, "the second checkout is a local operation"
    assert "fetched" not in log_text(second)
    assert (f"checked out {repo.initial} of repo {url} into {source(second)} from the "
            "worker's mirror") in log_text(second)
    assert git(source(second), "rev-parse", "HEAD") == repo.initial
    assert (source(second) / "package.json").read_text() == (
        repo.work / "package.json").read_text()
    assert git(source(second), "config", "remote.origin.url") == url, "origin is the repo"
    assert git(source(second), "status", "--porcelain") == ""

    # even with the repo gone, the commit is still checked out, and read (repo-pipeline)
    hidden = repo.bare.with_name(repo.bare.name + ".away")
    repo.bare.rename(hidden)
    try:
        third = make_request(url, repo.initial, "repo-pipeline")
        path, full = await git_client.fetch(third)
        assert full == repo.initial
        assert git_client.read_file(path, full, "package.json", 1 << 20) is not None
    finally:
        hidden.rename(repo.bare)
    assert proxy.accepted == 1

    # a new commit is fetched again, once
    newer = repo.commit({"NEWS": "second\n"}, "second commit")
    fourth = await checkout(make_request, url, newer)
    assert proxy.accepted == 2
    assert (source(fourth) / "NEWS").read_text() == "second\n"
    await checkout(make_request, url, newer[:10], "build")
    assert proxy.accepted == 2, "an abbreviated sha the mirror has needs no fetch either"


async def test_a_checkout_borrows_objects_and_never_links_to_the_mirror(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    request = await checkout(make_request, repo.url, repo.initial)
    objects = mirror.objects_of(mirror_of(make_request, repo.url))
    alternates = source(request) / ".git" / "objects" / "info" / "alternates"
    assert alternates.read_text().strip() == str(objects)
    own = [p for p in (source(request) / ".git" / "objects").rglob("*") if p.is_file()]
    assert [p.name for p in own] == ["alternates"], "no object is copied into the step's tree"
    assert all(p.stat().st_nlink == 1 for p in objects.rglob("*") if p.is_file()), (
        "no hard link: the sandbox chowns the step's tree")
    config = (mirror_of(make_request, repo.url) / "config").read_text()
    assert "unpackLimit = 1" in config and "auto = 0" in config
    loose = [p for p in objects.iterdir() if len(p.name) == 2]
    assert loose == [], "a fetch keeps its pack whole: no loose object a kill could cut short"


def test_a_rotated_token_keeps_the_mirror_and_the_next_fetch_uses_the_new_one(
        tmp_path: Path) -> None:
    old = "https://x-access-token:ghs_old@git.example.com/acme/app.git"
    new = "https://x-access-token:ghs_new@git.example.com/acme/app.git"
    folder = mirror.path_for(tmp_path, old)
    assert folder == mirror.path_for(tmp_path, new), "one repo, one mirror"
    assert "ghs_" not in folder.name and "example" not in folder.name
    assert folder != mirror.path_for(tmp_path, "https://git.example.com/acme/other.git")
    assert folder != mirror.path_for(tmp_path, "https://git.example.com/acme/app")
    # scp style: the user names the account, so it stays part of the repo's identity
    assert (mirror.path_for(tmp_path, "git@github.com:acme/app.git")
            != mirror.path_for(tmp_path, "deploy@github.com:acme/app.git"))
    assert mirror.ready(folder, old) is None  # made
    assert mirror.ready(folder, new) is None  # still usable: not made again
    assert git(folder, "config", "remote.origin.url") == new, "a fetch now sends the new token"


async def test_a_standalone_checkout_is_whole_without_the_mirror(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    newer = repo.commit({"NEWS": "x\n"}, "newer")
    request = await checkout(make_request, repo.url, newer, "build")
    await git_client.standalone(request, source(request))
    folder = mirror_of(make_request, repo.url)
    folder.rename(folder.with_name("away"))  # as an image build sees it: no mirror
    assert not (source(request) / ".git" / "objects" / "info" / "alternates").exists()
    assert git(source(request), "log", "--format=%H") == f"{newer}\n{repo.initial}"
    git(source(request), "fsck", "--no-dangling")
    assert git(source(request), "status", "--porcelain") == ""


async def test_many_fetches_are_merged_into_one_pack_and_every_commit_stays(
    make_repo: Any, make_request: Requests, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror, "REPACK_OVER", 2)
    repo: GitRepo = make_repo()
    commits = [repo.initial]
    for n in range(5):
        # each on a branch of its own, force-pushed away by the next: only the pin keeps it
        commits.append(repo.commit({"N": f"{n}\n"}, f"commit {n}", branch="moving",
                                   base=repo.initial))
        await checkout(make_request, repo.url, commits[-1], f"s{n}")
    folder = mirror_of(make_request, repo.url)
    assert len(list((folder / "objects" / "pack").glob("*.pack"))) <= 3
    assert mirror.connected(folder)
    for n, sha in enumerate(commits):
        assert mirror.resolve(folder, sha) == sha
        request = await checkout(make_request, repo.url, sha, f"again-{n}")
        assert git(source(request), "rev-parse", "HEAD") == sha
        assert "fetched" not in log_text(request)


async def test_concurrent_checkouts_get_their_own_trees_and_fetch_each_commit_once(
    make_repo: Any, make_request: Requests, proxy: TcpProxy
) -> None:
    repo: GitRepo = make_repo()
    url = proxied(proxy, repo)
    commits = [repo.commit({"WHICH": f"{n}\n"}, f"commit {n}", branch=f"b{n}",
                           base=repo.initial) for n in range(8)]

    async def one(n: int, sha: str) -> StepRequest:
        return await checkout(make_request, url, sha, f"s{n}")

    requests = await asyncio.gather(*(one(n, sha) for n, sha in enumerate(commits * 2)))

    for n, request in enumerate(requests):
        assert git(source(request), "rev-parse", "HEAD") == commits[n % 8]
        assert (source(request) / "WHICH").read_text() == f"{n % 8}\n"
    fetched = [line for request in requests for line in log_text(request).splitlines()
               if "into the worker's mirror" in line and line.startswith("fetched")]
    assert sorted(fetched) == sorted(
        f"fetched {sha} of repo {url} into the worker's mirror" for sha in commits), (
        "each missing commit is fetched once, whichever step wanted it first")
    assert proxy.accepted == 8

    await asyncio.gather(*(one(n, sha) for n, sha in enumerate(commits)))
    assert proxy.accepted == 8


async def test_a_step_tree_is_independent_of_the_others_and_of_the_mirror(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    one = await checkout(make_request, repo.url, repo.initial)
    other = await checkout(make_request, repo.url, repo.initial, "test")
    folder = mirror_of(make_request, repo.url)
    before = mirror_files(folder)

    (source(one) / "package.json").write_text("{}\n")
    (source(one) / "made-by-one").write_text("one\n")
    git(source(one), "add", "-A")
    git(source(one), "commit", "-q", "-m", "a step's own commit")
    made = git(source(one), "rev-parse", "HEAD")
    git(source(one), "tag", "mine")
    git(source(one), "repack", "-a", "-d", "-q")
    git(source(one), "gc", "-q", "--prune=now")

    assert git(source(other), "rev-parse", "HEAD") == repo.initial
    assert git(source(other), "status", "--porcelain") == ""
    assert not (source(other) / "made-by-one").exists()
    assert git(source(other), "tag") == ""
    assert mirror_files(folder) == before, "the mirror is unchanged"
    assert mirror.resolve(folder, made) is None
    third = await checkout(make_request, repo.url, repo.initial, "build")
    assert git(source(third), "status", "--porcelain") == ""


async def test_a_sandboxed_step_reads_the_mirror_and_cannot_write_it(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    other: GitRepo = make_repo()
    await checkout(make_request, other.url, other.initial)  # another repo's mirror
    request = await checkout(make_request, repo.url, repo.initial)
    folder = mirror_of(make_request, repo.url)
    pack = next((folder / "objects" / "pack").glob("*.pack"))
    before = mirror_files(folder)
    probe = f"""
attempt() {{
  name=$1; shift
  if "$@" 2>/dev/null; then echo "$name=ok"; else echo "$name=refused"; fi
}}
seen() {{ if [ -e "$2" ]; then echo "$1=seen"; else echo "$1=hidden"; fi; }}
cd source
echo "head=$(git rev-parse HEAD)"
echo "readme=$(git cat-file -t HEAD:package.json)"
attempt new-object touch {folder}/objects/probe
attempt pack-write sh -c 'echo x >> "$1"' - {pack}
attempt pack-rm rm -f {pack}
seen config {folder}/config
seen other {mirror_of(make_request, other.url)}
echo change > package.json
git -c user.name=step -c user.email=step@example.com commit -qam "step commit" && echo "commit=ok"
git gc -q --prune=now && echo "gc=ok"
echo "uid=$(id -u)"
"""
    done = await process.run_sandboxed(["/bin/sh", "-c", probe], sandbox=request.sandbox,
                                       cwd=request.workdir, log=request.log, what="probe")
    assert done.exit_code == 0
    expected = {
        "head": repo.initial, "readme": "blob", "new-object": "refused",
        "pack-write": "refused", "pack-rm": "refused", "config": "hidden",
        "other": "hidden", "commit": "ok", "gc": "ok", "uid": "65534"}
    found = dict(line.split("=", 1) for line in done.tail.splitlines()
                 if line.split("=", 1)[0] in expected)
    assert found == expected
    assert mirror_files(folder) == before
    assert mirror.connected(folder)
    again = await checkout(make_request, repo.url, repo.initial, "test")
    assert git(source(again), "status", "--porcelain") == ""


async def test_a_sandboxed_step_reads_the_mirror_of_a_worker_with_a_strict_umask(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    previous = os.umask(0o077)
    try:
        request = await checkout(make_request, repo.url, repo.initial)
    finally:
        os.umask(previous)
    done = await process.run_sandboxed(
        ["git", "-C", "source", "cat-file", "-t", "HEAD:package.json"], sandbox=request.sandbox,
        cwd=request.workdir, log=request.log, what="git", check=False)
    assert done.tail.splitlines()[-1] == "blob", done.tail
    assert make_request.mirrors.stat().st_mode & 0o777 == 0o700, "the host's others read none"


async def test_the_worker_keeps_mirrors_in_its_workdir_and_binds_a_steps_own_read_only(
    make_repo: Any, tmp_path: Path
) -> None:
    repo: GitRepo = make_repo()
    workdir = tmp_path / "worker"
    folder = mirror.path_for(workdir / mirror.MIRRORS_DIR, repo.url)

    async def step(request: StepRequest) -> dict[str, Any]:
        await git_client.checkout(request)
        done = await process.run_sandboxed(
            ["/bin/sh", "-c", 'git -C source rev-parse HEAD; touch "$MIRROR/objects/x" '
             '2>/dev/null && echo wrote || echo refused'],
            sandbox=request.sandbox, cwd=request.workdir, log=request.log,
            env={"MIRROR": str(folder)})
        return {"seen": done.tail.splitlines()[-2:]}

    worker = Worker(cast(Any, None), workdir, lambda name: step)
    command = StepCommand(run_id=uuid.uuid4(), step="probe", attempt=1, uses="setup",
                          repo=repo.url, ref="refs/heads/main", commit=repo.initial)
    first = await worker.execute(command)
    second = await worker.execute(command.model_copy(update={"step": "again"}))

    for result in (first, second):
        assert result.status == "succeeded", result.error
        assert result.outputs == {"seen": [repo.initial, "refused"]}
    assert "into the worker's mirror" in (first.log or "")
    assert "fetched" not in (second.log or "") and "from the worker's mirror" in (second.log or "")
    assert mirror.connected(folder)
    assert not (workdir / "runs").exists() or not any((workdir / "runs").iterdir()), (
        "the steps' trees are gone, the mirror stays")


# ---------------------------------------------------------------- crashes --

CHECKOUT = """
import asyncio, sys
from pathlib import Path
from handlers import git
from handlers.base import StepLog, StepRequest
from handlers.sandbox import Sandbox, SandboxSettings
url, sha, mirrors, attempt = sys.argv[1:]
sandbox = Sandbox(settings=SandboxSettings(sandbox="none"), attempt=Path(attempt), identity={})
sandbox.prepare()
request = StepRequest(run_id="r", repo=url, ref="refs/heads/main", commit=sha, step="setup",
                      attempt=1, settings={}, script=None, inputs={}, workdir=sandbox.work,
                      log=StepLog(), sandbox=sandbox, mirrors=Path(mirrors))
asyncio.run(git.checkout(request))
"""


def git_processes_in(folder: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"git") and cwd.is_relative_to(folder):
            found.append(int(entry.name))
    return found


async def test_a_checkout_after_a_kill_9_mid_fetch_cleans_the_mirror_and_succeeds(
    make_repo: Any, make_request: Requests, proxy: TcpProxy, tmp_path: Path
) -> None:
    repo: GitRepo = make_repo()
    big = repo.commit({"blob.bin": os.urandom(3 << 20).hex()}, "a big file")
    url = proxied(proxy, repo)
    folder = mirror_of(make_request, url)
    proxy.rate = 256 * 1024
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHECKOUT, url, big, str(make_request.mirrors),
        str(tmp_path / "killed"), env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True)

    async def mid_fetch() -> bool:
        return (folder / mirror.MARKER).exists() and proxy.forwarded > 500_000

    await wait_until(mid_fetch, timeout=30, what="the fetch to be under way")
    # the worker and the git it started die at once, as in a machine's crash
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in git_processes_in(make_request.mirrors):
        with contextlib.suppress(ProcessLookupError):  # gone with a group killed before
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    await worker.wait()
    await proxy.cut()
    stale_pin = folder / "refs" / "cistate" / f"{big}.lock"  # a ref update that never ended
    stale_pin.parent.mkdir(parents=True, exist_ok=True)
    stale_pin.write_text(big)
    assert (folder / mirror.MARKER).exists()
    assert list((folder / "objects" / "pack").glob("tmp_pack_*")), "killed mid-pack"
    assert mirror.resolve(folder, big) is None

    proxy.rate = None
    request = await checkout(make_request, url, big)

    assert (source(request) / "blob.bin").read_text() == (repo.work / "blob.bin").read_text()
    assert not (folder / mirror.MARKER).exists()
    assert not stale_pin.exists()
    assert not list(folder.rglob("tmp_*")), "no temporary pack is left"
    assert mirror.connected(folder)
    assert "made the worker's mirror" not in log_text(request), "cleaned, not made again"


async def test_a_checkout_cancelled_mid_fetch_leaves_the_mirror_to_be_checked_and_used(
    make_repo: Any, make_request: Requests, proxy: TcpProxy
) -> None:
    repo: GitRepo = make_repo()
    big = repo.commit({"blob.bin": os.urandom(2 << 20).hex()}, "a big file")
    url = proxied(proxy, repo)
    folder = mirror_of(make_request, url)
    proxy.rate = 256 * 1024
    step = asyncio.create_task(checkout(make_request, url, big))

    async def mid_fetch() -> bool:
        return proxy.forwarded > 300_000

    await wait_until(mid_fetch, timeout=30, what="the fetch to be under way")
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    assert git_processes_in(make_request.mirrors) == [], "cancelling stops the fetch"
    assert (folder / mirror.MARKER).exists()

    proxy.rate = None
    waiting = asyncio.create_task(checkout(make_request, url, repo.initial, "test"))
    request = await asyncio.wait_for(waiting, 30)
    assert git(source(request), "rev-parse", "HEAD") == repo.initial
    assert not (folder / mirror.MARKER).exists()
    request = await checkout(make_request, url, big, "build")
    assert (source(request) / "blob.bin").read_text() == (repo.work / "blob.bin").read_text()


async def test_a_broken_mirror_is_made_again(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    await checkout(make_request, repo.url, repo.initial)
    folder = mirror_of(make_request, repo.url)

    for pack in (folder / "objects" / "pack").iterdir():
        pack.unlink()  # lost objects
    request = await checkout(make_request, repo.url, repo.initial, "test")
    assert git(source(request), "rev-parse", "HEAD") == repo.initial
    assert "made the worker's mirror of repo" in log_text(request)
    assert mirror.connected(folder)

    newer = repo.commit({"NEWS": "x\n"}, "newer")
    pack = next((folder / "objects" / "pack").glob("*.pack"))
    pack.write_bytes(b"\0" * pack.stat().st_size)  # a pack gone bad in place
    request = await checkout(make_request, repo.url, newer, "build")
    assert (source(request) / "NEWS").read_text() == "x\n"
    assert "made the worker's mirror of repo" in log_text(request)
    request = await checkout(make_request, repo.url, repo.initial, "build")
    assert git(source(request), "rev-parse", "HEAD") == repo.initial

    # the commit is there, its tree is not (a pack of the commit alone): found at checkout
    only_commit = subprocess.run(
        ["git", "pack-objects", "-q", str(folder / "objects" / "pack" / "pack")], cwd=folder,
        input=f"{newer}\n", capture_output=True, text=True, check=True).stdout.strip()
    for pack in (folder / "objects" / "pack").iterdir():
        if only_commit not in pack.name:
            pack.unlink()
    git(folder, "update-ref", "-d", f"refs/cistate/{repo.initial}")  # its tip is gone too
    assert mirror.resolve(folder, newer) == newer and mirror.tips_present(folder)
    request = await checkout(make_request, repo.url, newer, "tree-lost")
    assert (source(request) / "NEWS").read_text() == "x\n"
    assert "a checkout from it failed and it is broken" in log_text(request)
    assert mirror.connected(folder)

    for broken in ("file", "empty", "marker-and-garbage"):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        if broken == "file":
            folder.write_text("not a repository")
        else:
            folder.mkdir()
        if broken == "marker-and-garbage":
            (folder / mirror.MARKER).touch()
            (folder / "objects").mkdir()
        request = await checkout(make_request, repo.url, newer, f"after-{broken}")
        assert (source(request) / "NEWS").read_text() == "x\n", broken
        assert "made the worker's mirror of repo" in log_text(request), broken
        assert mirror.connected(folder)


async def test_a_checkout_waits_for_another_worker_holding_the_mirror(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    folder = mirror_of(make_request, repo.url)
    folder.parent.mkdir(parents=True, exist_ok=True)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(1.5)", f"{folder}.lock",
        stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None
    assert await holder.stdout.readline() == b"held\n"
    started = asyncio.get_running_loop().time()
    await checkout(make_request, repo.url, repo.initial)
    waited = asyncio.get_running_loop().time() - started
    await holder.wait()
    assert waited > 1.0, "it waited for the other worker's fetch"


def test_the_mirrors_git_gets_none_of_the_workers_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISTATE_DATABASE_URL", "postgresql://cistate:db-secret@db/cistate")
    monkeypatch.setenv("CISTATE_BUS_KEY", "bus-key-secret")
    folder = mirror.path_for(tmp_path, "https://git.example.com/acme/app.git")
    assert mirror.ready(folder, "https://git.example.com/acme/app.git") is None
    # an alias that prints the environment git runs its commands with
    done = mirror._git(folder, "-c", "alias.dump-env=!env", "dump-env", check=True)
    assert "PATH=" in done.stdout
    assert "CISTATE_" not in done.stdout and "secret" not in done.stdout


# ------------------------------------------- bounded with the caches (handlers.cache) --


class SmartHttp:
    """git's own smart HTTP server (`git http-backend`, run as CGI) over the git server's repos,
    asking for Basic credentials as a git host does: a repo URL with a token in it."""

    def __init__(self, repos: Path, user: str, token: str) -> None:
        self.repos, self.expected = repos, base64.b64encode(f"{user}:{token}".encode()).decode()
        self.authorized = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.serve(self)

            do_POST = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, repo: GitRepo, credentials: str) -> str:
        return f"http://{credentials}127.0.0.1:{self.server.server_port}/{repo.name}.git"

    def serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.headers.get("Authorization") != f"Basic {self.expected}":
            handler.send_response(401)
            handler.send_header("WWW-Authenticate", 'Basic realm="git"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        self.authorized += 1
        path, _, query = handler.path.partition("?")
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.repos),
               "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "QUERY_STRING": query,
               "REQUEST_METHOD": handler.command, "REMOTE_USER": "x", "REMOTE_ADDR": "127.0.0.1",
               "CONTENT_TYPE": handler.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)),
               "HTTP_CONTENT_ENCODING": handler.headers.get("Content-Encoding", ""),
               "GIT_PROTOCOL": handler.headers.get("Git-Protocol", "")}
        out = subprocess.run(["git", "http-backend"], input=body, env=env,
                             capture_output=True, check=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        headers = [line.split(":", 1) for line in head.decode().splitlines() if ":" in line]
        status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
        handler.send_response(status)
        for key, value in headers:
            if key.lower() != "status":
                handler.send_header(key, value.strip())
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def smart_http(git_server: GitServer) -> Iterator[SmartHttp]:
    server = SmartHttp(git_server.repos, "x-access-token", "ghs_s3cr3t")
    yield server
    server.close()


def cistate_cli(workdir: Path, *args: str, **env: str) -> str:
    """The real command line, as an operator runs it on the worker's machine."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CISTATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "cistate", *args], cwd=ROOT, capture_output=True, text=True,
        env={**clean, "PYTHONPATH": str(ROOT), "CISTATE_WORKDIR": str(workdir), **env},
        timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def listed(workdir: Path, **env: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(cistate_cli(workdir, "cache", "list", "--json",
                                                        **env))
    return rows


def let_go(request: StepRequest) -> None:
    """What the worker does when the attempt ends: its tree deleted, then its holds let go."""
    shutil.rmtree(request.workdir)
    request.holds.close()


async def test_cache_list_shows_a_mirror_with_its_repo_without_credentials_and_its_size(
    make_repo: Any, make_request: Requests, smart_http: SmartHttp
) -> None:
    repo: GitRepo = make_repo()
    url = smart_http.url(repo, "x-access-token:ghs_s3cr3t@")
    request = await checkout(make_request, url, repo.initial)
    assert smart_http.authorized >= 1, "fetched over http with the token"
    folder = mirror_of(make_request, url)
    assert "ghs_s3cr3t" in git(folder, "config", "remote.origin.url"), "the fetch's URL"
    bare = smart_http.url(repo, "")

    rows = listed(make_request.workdir)
    assert [(r["kind"], r["id"], r["repo"], r["branch"]) for r in rows] == [
        ("mirror", folder.name, bare, "")]
    packs = sum(p.stat().st_size for p in (folder / "objects" / "pack").iterdir())
    assert packs <= rows[0]["size"] == cache.disk_usage(folder)
    used = datetime.fromisoformat(rows[0]["last_used"]).timestamp()
    assert abs(used - (folder / mirror.STAMP).stat().st_mtime) < 1
    assert time.time() - used < 60

    text = cistate_cli(make_request.workdir, "cache", "list")
    assert "ghs_s3cr3t" not in text and "x-access-token" not in text
    header, row, total = text.splitlines()
    assert header.split()[:3] == ["key", "kind", "repo"]
    assert row.split()[:3] == [folder.name[:12], "mirror", bare]
    assert row.endswith("s ago") and total.startswith("1 entries, ")

    # a later checkout is a use: the stamp moves
    os.utime(folder / mirror.STAMP, (time.time() - 3600,) * 2)
    await checkout(make_request, url, repo.initial, "test")
    used = datetime.fromisoformat(listed(make_request.workdir)[0]["last_used"]).timestamp()
    assert time.time() - used < 60
    let_go(request)


async def test_prune_removes_an_idle_mirror_and_the_next_checkout_fetches_it_again(
    make_repo: Any, make_request: Requests, proxy: TcpProxy
) -> None:
    repo: GitRepo = make_repo()
    url = proxied(proxy, repo)
    first = await checkout(make_request, url, repo.initial)
    folder = mirror_of(make_request, url)
    let_go(first)
    assert proxy.accepted == 1

    pruned = cistate_cli(make_request.workdir, "cache", "prune", "--all")
    assert pruned.splitlines()[0] == f"removed mirror {folder.name[:12]} ({url})"
    assert "removed 1 entries; 0 left" in pruned
    assert not folder.exists()
    assert list((make_request.mirrors / mirror.TRASH).iterdir()) == [], "deleted, not kept"
    assert listed(make_request.workdir) == []

    again = await checkout(make_request, url, repo.initial, "test")
    assert proxy.accepted == 2, "fetched again"
    assert f"fetched {repo.initial} of repo {url} into the worker's mirror" in log_text(again)
    assert git(source(again), "rev-parse", "HEAD") == repo.initial
    assert git(source(again), "status", "--porcelain") == ""
    assert mirror.connected(folder)


async def test_prune_skips_a_mirror_a_step_tree_borrows_from_and_the_tree_still_reads_it(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    newer = repo.commit({"NEWS": "second\n"}, "second commit")
    request = await checkout(make_request, repo.url, newer)
    folder = mirror_of(make_request, repo.url)

    pruned = cistate_cli(make_request.workdir, "cache", "prune", "--all")
    assert "removed 0 entries; 1 left" in pruned, pruned
    pruned = cistate_cli(make_request.workdir, "cache", "prune", "--max", "0")
    assert "removed 0 entries; 1 left" in pruned, pruned
    assert mirror.connected(folder)
    # the tree still reads every object it borrows, on the host and in the step's sandbox
    assert git(source(request), "log", "--format=%H") == f"{newer}\n{repo.initial}"
    assert git(source(request), "cat-file", "-p", "HEAD:NEWS") == "second"
    git(source(request), "fsck", "--no-dangling")
    done = await process.run_sandboxed(
        ["git", "-C", "source", "cat-file", "-p", f"{repo.initial}:package.json"],
        sandbox=request.sandbox, cwd=request.workdir, log=request.log, what="git")
    assert '"name"' in done.tail

    # a fetch under way (another worker holds the mirror's lock) keeps it too
    let_go(request)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()", f"{folder}.lock",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None and holder.stdin is not None
    assert await holder.stdout.readline() == b"held\n"
    assert "removed 0 entries; 1 left" in cistate_cli(make_request.workdir, "cache", "prune",
                                                      "--all")
    holder.stdin.close()
    await holder.wait()
    assert "removed 1 entries; 0 left" in cistate_cli(make_request.workdir, "cache", "prune",
                                                      "--all")
    assert not folder.exists()


async def test_the_worker_holds_the_mirror_until_the_attempts_tree_is_gone(
    make_repo: Any, tmp_path: Path
) -> None:
    repo: GitRepo = make_repo()
    workdir = tmp_path / "worker"
    folder = mirror.path_for(workdir / mirror.MIRRORS_DIR, repo.url)

    async def step(request: StepRequest) -> dict[str, Any]:
        await git_client.checkout(request)
        pruned = await asyncio.to_thread(cistate_cli, workdir, "cache", "prune", "--all")
        done = await process.run_sandboxed(
            ["git", "-C", "source", "log", "--format=%H"], sandbox=request.sandbox,
            cwd=request.workdir, log=request.log, what="git")
        return {"pruned": pruned.splitlines()[-1], "log": done.tail.splitlines()[-1]}

    worker = Worker(cast(Any, None), workdir, lambda name: step)
    command = StepCommand(run_id=uuid.uuid4(), step="probe", attempt=1, uses="setup",
                          repo=repo.url, ref="refs/heads/main", commit=repo.initial)
    result = await worker.execute(command)
    assert result.status == "succeeded", result.error
    assert result.outputs is not None
    assert result.outputs["log"] == repo.initial, "the tree read its history after the prune"
    assert result.outputs["pruned"].startswith("removed 0 entries; 1 left"), result.outputs
    # the attempt's workspace is gone: nothing holds the mirror any more
    pruned = cistate_cli(workdir, "cache", "prune", "--all")
    assert "removed 1 entries; 0 left" in pruned
    assert not folder.exists()
    again = await worker.execute(command.model_copy(update={"step": "again"}))
    assert again.status == "succeeded", again.error
    assert "into the worker's mirror" in (again.log or ""), "fetched again"




async def test_eviction_by_cache_max_counts_mirrors_with_the_other_caches(
    make_repo: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old: GitRepo = make_repo()
    big_commit = old.commit({"blob.bin": os.urandom(1 << 20).hex()}, "a big file")
    new: GitRepo = make_repo()
    workdir = tmp_path / "worker"
    mirrors = workdir / mirror.MIRRORS_DIR

    async def step(request: StepRequest) -> dict[str, Any]:
        await git_client.checkout(request)
        return {}

    worker = Worker(cast(Any, None), workdir, lambda name: step)

    def command(repo: GitRepo, commit: str) -> StepCommand:
        return StepCommand(run_id=uuid.uuid4(), step="setup", attempt=1, uses="setup",
                           repo=repo.url, ref="refs/heads/main", commit=commit)

    assert (await worker.execute(command(old, big_commit))).status == "succeeded"
    old_mirror = mirror.path_for(mirrors, old.url)
    os.utime(old_mirror / mirror.STAMP, (time.time() - 7200,) * 2)
    entry = put_entry(workdir / "cache", "e" * 64, 100_000, time.time() - 3600)
    big = cache.disk_usage(old_mirror)
    assert big > 1 << 20
    rows = listed(workdir)
    assert [r["kind"] for r in rows] == ["node_modules", "mirror"], "most recent first"
    total = sum(r["size"] for r in rows)
    assert cistate_cli(workdir, "cache", "list").splitlines()[-1].startswith(
        f"2 entries, {cache.format_size(total)} of ")

    # the limit leaves room for the entry and a small mirror, not for the big one: the
    # worker's eviction after its next fetch drops the least recently used, the big mirror
    limit = entry.size() + big // 2
    monkeypatch.setenv("CISTATE_CACHE_MAX", str(limit))
    result = await worker.execute(command(new, new.initial))
    assert result.status == "succeeded", result.error
    new_mirror = mirror.path_for(mirrors, new.url)
    assert not old_mirror.exists() and new_mirror.exists() and entry.path.exists()
    assert sum(e.size() for e in cache.entries(workdir / "cache")) <= limit
    assert [r["kind"] for r in listed(workdir)] == ["mirror", "node_modules"]

    # `cistate cache prune` with CISTATE_CACHE_MAX counts them the same way: the entry, now
    # the least recently used, goes first, then the mirror when the limit is lower still
    small = cache.disk_usage(new_mirror)
    pruned = cistate_cli(workdir, "cache", "prune", CISTATE_CACHE_MAX=str(small + 10))
    assert pruned.splitlines()[0] == f"removed node_modules {'e' * 12} (r)"
    assert [r["kind"] for r in listed(workdir)] == ["mirror"]
    pruned = cistate_cli(workdir, "cache", "prune", CISTATE_CACHE_MAX=str(small - 1))
    assert pruned.splitlines()[0] == f"removed mirror {new_mirror.name[:12]} ({new.url})"
    assert listed(workdir) == []

    # and the next checkout of the evicted repo fetches it again
    result = await worker.execute(command(old, big_commit))
    assert result.status == "succeeded", result.error
    assert "into the worker's mirror" in (result.log or "")
    assert mirror.connected(old_mirror)


REMOVE = """
import sys
from pathlib import Path
from handlers import mirror
print(mirror.remove(Path(sys.argv[1])), flush=True)
"""


async def test_a_remover_killed_halfway_leaves_no_half_mirror_that_a_checkout_trusts(
    make_repo: Any, make_request: Requests
) -> None:
    repo: GitRepo = make_repo()
    folder = mirror_of(make_request, repo.url)
    let_go(await checkout(make_request, repo.url, repo.initial))
    junk = folder / "junk"  # files enough that deleting them takes a while to be killed in
    junk.mkdir()
    for n in range(30_000):
        (junk / str(n)).write_bytes(b"x")
    remover = subprocess.Popen([sys.executable, "-c", REMOVE, str(folder)],
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while folder.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        remover.kill()  # renamed aside, being deleted
    finally:
        remover.wait()
    assert not folder.exists()
    half = list((make_request.mirrors / mirror.TRASH).iterdir())
    assert len(half) == 1 and (half[0] / "junk").exists(), "killed while it deleted"

    # where checkouts look there is nothing: the next one makes the mirror anew and fetches
    again = await checkout(make_request, repo.url, repo.initial, "test")
    assert f"fetched {repo.initial} of repo {repo.url} into the worker's mirror" in log_text(
        again)
    assert "made the worker's mirror" not in log_text(again)
    assert mirror.connected(folder) and not (folder / "junk").exists()
    assert git(source(again), "rev-parse", "HEAD") == repo.initial
    # and the next prune (or eviction) empties the trash; the mirror in use stays
    assert "removed 0 entries; 1 left" in cistate_cli(make_request.workdir, "cache", "prune",
                                                      "--all")
    assert list((make_request.mirrors / mirror.TRASH).iterdir()) == []
    assert mirror.connected(folder)
