"""End to end: the worker's caches (handlers.cache) with real npm, the real npm registry, a
real git daemon and the real step sandbox.

The app is tests/fixtures/bench-app (express + jest + supertest, 395 packages in its lock
file). Steps are called as the worker calls them, with the worker's cache folder under the
folder the sandbox hides (`<workdir>/cache`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import handlers
from cistate.adapters.cli.cache import list_caches
from handlers import build as build_module
from handlers import buildah as buildah_module
from handlers import cache, node_modules, process
from handlers.base import StepFailed, StepLog, StepRequest, identity_env
from handlers.sandbox import Sandbox, SandboxSettings
from tests.e2e.conftest import ROOT, SAMPLE_APP, Env, GitRepo

pytestmark = pytest.mark.e2e

BENCH_APP = ROOT / "tests" / "fixtures" / "bench-app"
# nothing listens: an npm that fetches anything through it fails (a proxy, not
# npm_config_registry: the step's npm_config_* is part of the node_modules key)
DEAD_PROXY = {"https_proxy": "http://127.0.0.1:9/", "HTTPS_PROXY": "http://127.0.0.1:9/"}


@dataclass
class Worker:
    """Builds StepRequests as the worker does, all with one worker folder and its caches."""

    folder: Path
    logs: list[StepLog] = field(default_factory=list)
    requests: list[StepRequest] = field(default_factory=list)

    @property
    def cache_root(self) -> Path:
        return self.folder / "cache"

    def request(self, repo: GitRepo, commit: str, step: str = "test", *,
                ref: str = "refs/heads/main", untrusted: bool = False,
                env: Mapping[str, str] | None = None,
                settings: Mapping[str, Any] | None = None,
                inputs: Mapping[str, dict[str, Any]] | None = None) -> StepRequest:
        n = len(self.logs) + 1
        log = StepLog(self.folder.parent / "logs" / f"{n:02d}-{step}.log")
        self.logs.append(log)
        run_id = str(uuid.uuid4())
        sandbox = Sandbox(
            settings=SandboxSettings(),
            attempt=self.folder / "runs" / run_id / f"{step}-1",
            identity=identity_env(run_id, repo.url, ref, commit, step, 1),
            step_env=dict(env or {}),
            hidden=(self.folder,),
        )
        sandbox.prepare()
        self.requests.append(StepRequest(
            run_id=run_id, repo=repo.url, ref=ref, commit=commit, step=step, attempt=1,
            settings=dict(settings or {}), script=None, inputs=dict(inputs or {}),
            workdir=sandbox.work, log=log,
            sandbox=sandbox, cache_root=self.cache_root, untrusted=untrusted))
        return self.requests[-1]

    async def run(self, repo: GitRepo, commit: str, step: str = "test",
                  **kwargs: Any) -> tuple[dict[str, Any], str]:
        request = self.request(repo, commit, step, **kwargs)
        outputs = await handlers.load(step)(request)
        assert request.log.path is not None
        return outputs, request.log.path.read_text(encoding="utf-8")

    def entries(self, kind: str) -> list[cache.Entry]:
        return [e for e in cache.entries(self.cache_root) if e.kind == kind]


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:
    for key in list(os.environ):
        if key.startswith("CISTATE_"):
            monkeypatch.delenv(key)
    found = Worker(tmp_path / "worker")
    yield found
    for log in found.logs:
        log.close()


@pytest.fixture
def handler_worker(handler_env: Env, tmp_path: Path) -> Iterator[Worker]:
    """A worker with the registry's settings (handler_env), for the build step."""
    found = Worker(tmp_path / "worker")
    yield found
    for log in found.logs:
        log.close()


@pytest.fixture(scope="session")
def npm_downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench-app's packages downloaded once per session from the npm registry (an npm cache
    each test's worker starts from); a skip that says so when the registry is unreachable."""
    folder = tmp_path_factory.mktemp("npm-downloads")
    shutil.copytree(BENCH_APP, folder / "app")
    done = subprocess.run(
        ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=folder / "app",
        env={"PATH": os.environ["PATH"], "HOME": str(folder),
             "npm_config_cache": str(folder / "cache")},
        capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        pytest.skip("these tests install bench-app's 395 packages from the npm registry, and "
                    f"npm ci could not: {done.stderr.strip()[-300:]}")
    return folder / "cache"


@pytest.fixture
def bench_repo(make_repo: Callable[..., GitRepo], worker: Worker,
               npm_downloads: Path) -> GitRepo:
    """bench-app on the git server; the worker's npm cache for it already has its packages."""
    repo = make_repo(app=BENCH_APP)
    entry = cache.ensure(worker.cache_root, "npm", cache.digest("npm", repo.url),
                         {"key": "", "repo": repo.url, "branch": ""})
    entry.data.rmdir()
    subprocess.run(["cp", "-a", str(npm_downloads), str(entry.data)], check=True)
    owner = SandboxSettings()
    subprocess.run(["chown", "-R", f"{owner.sandbox_uid}:{owner.sandbox_gid}",
                    str(entry.data)], check=True)
    return repo


async def test_a_second_run_with_the_same_lock_file_restores_node_modules_without_npm(
        worker: Worker, bench_repo: GitRepo) -> None:
    first, first_log = await worker.run(bench_repo, bench_repo.initial)
    assert first == {"install": "npm ci"}
    [entry] = worker.entries("node_modules")
    assert f"cached node_modules as {entry.key[:12]}" in first_log
    assert (entry.data / "express" / "package.json").is_file()
    [downloads] = worker.entries("npm")

    # a new commit, same lock file; a proxy nobody answers: npm must not fetch anything
    sha = bench_repo.commit({"server.js": (BENCH_APP / "server.js").read_text() + "\n"})
    second, second_log = await worker.run(bench_repo, sha, env=DEAD_PROXY)
    assert second == {"install": "cache"}
    assert f"node_modules restored from cache {entry.key[:12]}" in second_log
    assert "$ npm ci" not in second_log and "$ npm test" in second_log
    assert "Tests:" in second_log and "passed" in second_log  # jest ran from the copy

    # the restored files are hard links to the cache's, which the step cannot change
    restored = worker.requests[-1]
    source = restored.workdir / "source" / "node_modules" / "express"
    cached = entry.data / "express" / "package.json"
    assert (source / "package.json").stat().st_ino == cached.stat().st_ino
    before = cached.read_bytes()
    tried = await process.run_sandboxed(
        ["sh", "-c", "echo x >> package.json; chmod u+w package.json; touch -d 2001-01-01 "
         "package.json; echo tried"], sandbox=restored.sandbox, cwd=source, log=restored.log,
        check=False)
    assert "tried" in tried.tail and "Permission denied" in tried.tail
    assert cached.read_bytes() == before and cached.stat().st_mode & 0o222 == 0

    shown = list_caches(worker.folder).splitlines()
    assert [line.split()[:2] for line in shown[1:3]] == [
        [entry.key[:12], "node_modules"], [downloads.path.name[:12], "npm"]]
    assert bench_repo.url in shown[1] and " main " in shown[1]
    assert shown[-1].startswith("2 entries, ")

    # the step's NODE_ENV changes what npm installs (no devDependencies: no jest): another key
    production = worker.request(bench_repo, sha, env={"NODE_ENV": "production"})
    with pytest.raises(StepFailed, match="npm test"):
        await handlers.load("test")(production)
    assert production.log.path is not None
    third_log = production.log.path.read_text(encoding="utf-8")
    assert "restored from cache" not in third_log and "$ npm ci" in third_log
    assert len(worker.entries("node_modules")) == 2
    assert not (worker.entries("node_modules")[0].data / "jest").exists() or not (
        worker.entries("node_modules")[1].data / "jest").exists(), "one tree without jest"


# the repo's tests try to change a file of node_modules before jest runs
TAMPER = """\
const fs = require('fs');
const file = 'node_modules/express/package.json';
for (const [what, change] of [['append', () => fs.appendFileSync(file, ' ')],
                              ['chmod', () => fs.chmodSync(file, 0o644)],
                              ['truncate', () => fs.truncateSync(file, 0)]]) {
  try { change(); console.log(`tamper ${what}: changed`); }
  catch (error) { console.log(`tamper ${what}: ${error.code}`); }
}
"""


def files_of(tree: Path) -> dict[str, os.stat_result]:
    return {os.path.relpath(os.path.join(folder, name), tree): os.lstat(os.path.join(folder, name))
            for folder, _, names in os.walk(tree) for name in names}


async def test_a_cold_install_gives_the_tests_hard_links_to_the_stored_tree_they_cannot_change(
        worker: Worker, bench_repo: GitRepo, npm_downloads: Path) -> None:
    package = json.loads((BENCH_APP / "package.json").read_text())
    package["scripts"]["test"] = "node tamper.js && jest --ci"
    sha = bench_repo.commit({"package.json": json.dumps(package, indent=2) + "\n",
                             "tamper.js": TAMPER})
    outputs, log = await worker.run(bench_repo, sha)
    assert outputs == {"install": "npm ci"}
    [entry] = worker.entries("node_modules")
    assert f"cached node_modules as {entry.key[:12]}" in log
    assert "tamper append: EACCES" in log and "tamper chmod: EPERM" in log
    assert "tamper truncate: EACCES" in log
    assert "Tests:" in log and "passed" in log, "jest ran on the linked tree"

    # the checkout's tree is the stored one: every file a hard link to the entry's, the
    # worker's and read-only; the folders are the step's own
    checkout = worker.requests[-1].workdir / "source" / "node_modules"
    mine, stored = files_of(checkout), files_of(entry.data)
    assert mine.keys() == stored.keys() and len(mine) > 3000
    regular = [name for name, info in mine.items() if stat.S_ISREG(info.st_mode)]
    assert all(mine[name].st_ino == stored[name].st_ino for name in regular)
    assert all(mine[name].st_uid == os.getuid() and mine[name].st_mode & 0o222 == 0
               for name in regular)
    assert (checkout / "express").stat().st_uid == SandboxSettings().sandbox_uid
    assert not [p for p in entry.path.parent.iterdir() if p.name.startswith(".tmp-")]

    # what npm installed is what the next run gets
    installed = npm_downloads.parent / "app" / "node_modules" / "express" / "package.json"
    again = bench_repo.commit({"server.js": (BENCH_APP / "server.js").read_text() + "\n"})
    outputs, log = await worker.run(bench_repo, again, env=DEAD_PROXY)
    assert outputs == {"install": "cache"}
    restored = worker.requests[-1].workdir / "source" / "node_modules" / "express"
    assert (restored / "package.json").read_bytes() == installed.read_bytes()
    assert (entry.data / "express" / "package.json").read_bytes() == installed.read_bytes()


def main_entry_id(key: str) -> str:
    return cache.digest(key, "main")


async def test_a_tree_another_step_stored_first_is_the_one_the_tests_get(
        worker: Worker, bench_repo: GitRepo, tmp_path: Path) -> None:
    # a tree of this key, ready to be stored at once by another writer (from branch feature)
    await worker.run(bench_repo, bench_repo.initial, ref="refs/heads/feature")
    [feature] = worker.entries("node_modules")
    theirs = tmp_path / "theirs"
    subprocess.run(["cp", "-a", str(feature.data), str(theirs)], check=True)
    (theirs / ".stored-first").write_text("the other step's\n")
    size = node_modules.admit(theirs)
    folder = worker.cache_root / "node_modules"
    stored: list[cache.Entry | None] = []
    done = threading.Event()

    def other_writer() -> None:
        # the moment this step's store starts (its temporary folder), another stores the entry
        while not any(p.name.startswith(".tmp-") for p in folder.iterdir()):
            if done.wait(0.001):
                return

        def fill(data: Path) -> int:
            os.rename(theirs, data)
            return size

        stored.append(cache.store(worker.cache_root, "node_modules", main_entry_id(feature.key),
                                  {"key": feature.key, "repo": bench_repo.url, "branch": "main"},
                                  fill, immutable=True))

    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        outputs, log = await worker.run(bench_repo, bench_repo.initial)
    finally:
        done.set()
        thread.join()
    assert outputs == {"install": "npm ci"} and "$ npm ci" in log
    [winner] = stored
    assert winner is not None and winner.path.name == main_entry_id(feature.key)
    assert f"node_modules restored from cache {feature.key[:12]} (stored meanwhile)" in log
    assert "Tests:" in log and "passed" in log
    checkout = worker.requests[-1].workdir / "source" / "node_modules"
    assert (checkout / ".stored-first").stat().st_ino == (
        winner.data / ".stored-first").stat().st_ino
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [feature.path.name, winner.path.name]), "the loser's temporary is gone"


async def test_a_tree_that_cannot_be_stored_goes_back_to_the_checkout(
        worker: Worker, bench_repo: GitRepo) -> None:
    await worker.run(bench_repo, bench_repo.initial, ref="refs/heads/feature")
    [feature] = worker.entries("node_modules")
    # a folder where main's entry goes that is no entry (no meta.json): the rename fails,
    # and there is no stored tree to take instead
    stray = worker.cache_root / "node_modules" / main_entry_id(feature.key)
    (stray / "data").mkdir(parents=True)
    outputs, log = await worker.run(bench_repo, bench_repo.initial)
    assert outputs == {"install": "npm ci"}
    assert "node_modules not cached: " in log and "Tests:" in log and "passed" in log
    assert [e.branch for e in worker.entries("node_modules")] == ["feature"]
    checkout = worker.requests[-1].workdir / "source" / "node_modules"
    jest = checkout / "jest" / "package.json"
    assert jest.stat().st_nlink == 1 and jest.stat().st_uid == SandboxSettings().sandbox_uid


async def test_a_tree_that_cannot_be_sealed_goes_back_to_the_checkout(
        worker: Worker, make_repo: Callable[..., GitRepo]) -> None:
    repo = make_repo()
    request = worker.request(repo, repo.initial)
    source = request.workdir / "source"
    (source / "node_modules" / "pkg").mkdir(parents=True)
    stuck = source / "node_modules" / "pkg" / "index.js"
    stuck.write_text("module.exports = 1\n")
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i (a file even root cannot chmod) is not supported here")
    try:
        tree = node_modules.Tree(request, source, "k" * 64)
        await tree.save()
        assert stuck.read_text() == "module.exports = 1\n", "back in the checkout"
        assert worker.entries("node_modules") == []
        assert not (worker.cache_root / "node_modules").exists() or not list(
            (worker.cache_root / "node_modules").iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert request.log.path is not None
    assert "node_modules not cached: " in request.log.path.read_text(encoding="utf-8")


async def test_a_changed_lock_file_misses_and_the_least_recently_used_tree_makes_room(
        worker: Worker, bench_repo: GitRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    await worker.run(bench_repo, bench_repo.initial)
    [old] = worker.entries("node_modules")
    [downloads] = worker.entries("npm")
    # room for the npm cache and one tree, not two
    limit = downloads.size() + old.size() * 3 // 2
    monkeypatch.setenv("CISTATE_CACHE_MAX", str(limit))
    lock = (BENCH_APP / "package-lock.json").read_text()
    sha = bench_repo.commit({"package-lock.json": lock.rstrip("\n") + "\n\n"})
    outputs, log = await worker.run(bench_repo, sha)
    assert outputs == {"install": "npm ci"} and "restored from cache" not in log
    [new] = worker.entries("node_modules")
    assert new.key != old.key and f"cached node_modules as {new.key[:12]}" in log
    assert worker.entries("npm") == [downloads], "in use by the install: newer than the old tree"
    assert sum(e.size() for e in cache.entries(worker.cache_root)) <= limit


async def test_a_forks_pull_request_reads_the_caches_and_writes_none(
        worker: Worker, bench_repo: GitRepo) -> None:
    await worker.run(bench_repo, bench_repo.initial)
    before = {(e.kind, e.path.name, e.size()) for e in cache.entries(worker.cache_root)}
    downloads = worker.entries("npm")[0].data

    same, same_log = await worker.run(bench_repo, bench_repo.initial, ref="refs/pull/7/head",
                                      untrusted=True)
    assert same == {"install": "cache"}, same_log  # reads main's entry
    assert "node_modules restored from cache" in same_log

    lock = (BENCH_APP / "package-lock.json").read_text()
    sha = bench_repo.commit({"package-lock.json": lock + " "}, branch="fork-head")
    installed, log = await worker.run(bench_repo, sha, ref="refs/pull/7/head", untrusted=True)
    assert installed == {"install": "npm ci"}
    assert "cached node_modules" not in log
    after = {(e.kind, e.path.name, e.size()) for e in cache.entries(worker.cache_root)}
    assert after == before, "nothing written: no entry, and the npm download cache untouched"
    assert not any(p.name.startswith(".tmp") for p in downloads.parent.parent.iterdir())


async def test_a_branch_reads_main_but_main_never_reads_a_branch(
        worker: Worker, bench_repo: GitRepo) -> None:
    lock = (BENCH_APP / "package-lock.json").read_text()
    sha = bench_repo.commit({"package-lock.json": lock + "\n"}, branch="feature")
    outputs, _ = await worker.run(bench_repo, sha, ref="refs/heads/feature")
    assert outputs == {"install": "npm ci"}
    [feature] = worker.entries("node_modules")
    assert feature.branch == "feature"
    again, _ = await worker.run(bench_repo, sha, ref="refs/heads/feature")
    assert again == {"install": "cache"}
    on_main, log = await worker.run(bench_repo, sha, ref="refs/heads/main")
    assert on_main == {"install": "npm ci"}, "main does not use what a branch installed"
    assert {e.branch for e in worker.entries("node_modules")} == {"feature", "main"}
    # and a branch with main's tree reads main's
    other, log = await worker.run(bench_repo, sha, ref="refs/heads/other")
    assert other == {"install": "cache"} and "(branch main)" in log


def local_package_app(folder: Path) -> Path:
    """The sample app with a dependency on a package of its own folder (`file:`): npm ci
    links node_modules/local-lib to ../local-lib, out of node_modules."""
    shutil.copytree(SAMPLE_APP, folder)
    (folder / "local-lib").mkdir()
    (folder / "local-lib" / "package.json").write_text(
        json.dumps({"name": "local-lib", "version": "1.0.0"}))
    package = json.loads((folder / "package.json").read_text())
    package["dependencies"] = {"local-lib": "file:./local-lib"}
    (folder / "package.json").write_text(json.dumps(package, indent=2))
    subprocess.run(["npm", "install", "--package-lock-only", "--no-audit", "--no-fund"],
                   cwd=folder, check=True, capture_output=True)
    return folder


async def test_a_node_modules_with_a_link_out_of_it_is_not_cached(
        worker: Worker, make_repo: Callable[..., GitRepo], tmp_path: Path) -> None:
    repo = make_repo(app=local_package_app(tmp_path / "linked-app"))
    outputs, log = await worker.run(repo, repo.initial)
    assert outputs == {"install": "npm ci"}
    assert "node_modules not cached: " in log and "local-lib is a link that leads out" in log
    assert worker.entries("node_modules") == []
    # moved into the cache, refused there, moved back: the tests ran on it
    assert "$ npm test" in log and "# pass 1" in log
    checkout = worker.requests[-1].workdir / "source" / "node_modules"
    assert os.readlink(checkout / "local-lib") == "../local-lib"
    assert not list((worker.cache_root / "node_modules").iterdir()), "no temporary left"


async def test_a_checkout_with_a_node_modules_link_is_neither_restored_over_nor_cached(
        worker: Worker, bench_repo: GitRepo, tmp_path: Path) -> None:
    await worker.run(bench_repo, bench_repo.initial)  # main's entry exists
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("the host's\n")
    sha = bench_repo.commit(links={"node_modules": str(outside)})
    request = worker.request(bench_repo, sha)
    with contextlib.suppress(StepFailed):  # whatever npm makes of it, without the cache
        await handlers.load("test")(request)
    assert request.log.path is not None
    log = request.log.path.read_text(encoding="utf-8")
    assert "node_modules not cached: the checkout has one of its own" in log
    assert "restored from cache" not in log
    assert [p.name for p in outside.iterdir()] == ["keep"]
    assert len(worker.entries("node_modules")) == 1


async def build(worker: Worker, env: Env, repo: GitRepo, sha: str,
                **kwargs: Any) -> tuple[dict[str, Any], str]:
    setup, _ = await worker.run(repo, sha, "setup", **kwargs)
    return await worker.run(repo, sha, "build", inputs={"setup": setup},
                            settings={"build_args": {"BASE_IMAGE": env.base_image}}, **kwargs)


async def test_a_second_image_build_of_the_repo_reuses_the_layers_of_the_first(
        handler_worker: Worker, handler_env: Env, make_repo: Callable[..., GitRepo]) -> None:
    repo = make_repo()
    first, first_log = await build(handler_worker, handler_env, repo, repo.initial)
    assert "Using cache" not in first_log
    [store] = handler_worker.entries("buildah")
    assert (store.data / "root").is_dir()
    buildah = cache.executables(["buildah"], SandboxSettings().sandbox_path)
    assert buildah is not None
    # CISTATE_BUILDER_STORAGE_DRIVER=auto: overlay mounts in the builder sandbox here
    # (kernel 6.x, the worker folder on ext4), so layers are not copied in full
    assert "image store: overlay" in first_log, first_log
    assert (store.data / "root" / "overlay").is_dir()
    assert store.key == cache.digest("buildah", "overlay", *buildah), (
        "another storage driver or buildah gets a store of its own")
    sha = repo.commit({"README.md": "a change outside the image\n"})
    second, second_log = await build(handler_worker, handler_env, repo, sha)
    assert second["image_digest"] != first["image_digest"]  # its own revision label
    assert "Using cache" in second_log, second_log
    assert handler_worker.entries("buildah") == [store]

    # a fork's pull request builds in a store of its own: the repo's store is not written
    size = store.size()
    fork = repo.commit({"README.md": "from a fork\n"}, branch="fork-head")
    _, fork_log = await build(handler_worker, handler_env, repo, fork,
                              ref="refs/heads/fork-head", untrusted=True)
    assert "Using cache" not in fork_log
    assert store.size() == size


async def test_a_named_storage_driver_is_used_without_trying_overlay(
        handler_worker: Worker, handler_env: Env, make_repo: Callable[..., GitRepo]) -> None:
    handler_env.set(builder_storage_driver="vfs")
    repo = make_repo()
    outputs, log = await build(handler_worker, handler_env, repo, repo.initial)
    assert outputs["image_digest"].startswith("sha256:")
    assert "image store:" not in log and "info --format" not in log, log
    [store] = handler_worker.entries("buildah")
    assert (store.data / "root" / "vfs").is_dir()
    assert not (store.data / "root" / "overlay").exists()


@pytest.fixture
def overlayfs_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on an overlayfs mount, as a worker's folder is inside many containers: an
    overlay image store cannot live there."""
    layers = tmp_path / "overlayfs"
    for name in ("lower", "upper", "work", "merged"):
        (layers / name).mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={layers / 'lower'},upperdir={layers / 'upper'},workdir={layers / 'work'}",
         str(layers / "merged")], check=True, capture_output=True)
    try:
        yield layers / "merged"
    finally:
        subprocess.run(["umount", "-l", str(layers / "merged")], check=False)


async def test_where_overlay_cannot_mount_the_build_falls_back_to_vfs_and_says_so(
        handler_env: Env, make_repo: Callable[..., GitRepo], overlayfs_folder: Path) -> None:
    on_overlayfs = Worker(overlayfs_folder / "worker")
    try:
        repo = make_repo()
        outputs, log = await build(on_overlayfs, handler_env, repo, repo.initial)
        assert outputs["image_digest"].startswith("sha256:")
        assert "image store: vfs, slower: overlay does not work in the builder sandbox" in log
        assert "CISTATE_BUILDER_STORAGE_DRIVER=vfs" in log  # what to set to skip the check
        [store] = on_overlayfs.entries("buildah")
        buildah = cache.executables(["buildah"], SandboxSettings().sandbox_path)
        assert buildah is not None
        assert store.key == cache.digest("buildah", "vfs", *buildah)
        assert (store.data / "root" / "vfs").is_dir()
    finally:
        for step_log in on_overlayfs.logs:
            step_log.close()


async def test_a_worker_that_warmed_up_builds_without_asking_for_the_driver_again(
        handler_worker: Worker, handler_env: Env, make_repo: Callable[..., GitRepo]) -> None:
    buildah_module._drivers.clear()  # as in a worker that has just started
    await build_module.warm_up(handler_worker.folder, SandboxSettings())
    assert not (handler_worker.folder / "runs" / buildah_module.WARM_UP).exists()
    repo = make_repo()
    outputs, log = await build(handler_worker, handler_env, repo, repo.initial)
    assert outputs["image_digest"].startswith("sha256:")
    assert "image store: overlay" in log, log
    assert "info --format" not in log, "the build asked again what its warm-up found"


async def test_a_dockerfile_the_build_script_makes_gets_its_base_pulled_after_it(
        handler_worker: Worker, handler_env: Env, make_repo: Callable[..., GitRepo]) -> None:
    # the base images of the Dockerfile as pushed come down while `npm run build` runs; one
    # the build script writes is read, and its bases pulled, once the script is done
    repo = make_repo()
    package = json.loads((SAMPLE_APP / "package.json").read_text())
    package["scripts"]["build"] += " && cp Dockerfile.in Dockerfile"
    sha = repo.commit({"Dockerfile.in": (SAMPLE_APP / "Dockerfile").read_text(),
                       "Dockerfile": None, "package.json": json.dumps(package)})
    outputs, log = await build(handler_worker, handler_env, repo, sha)
    assert outputs["image_digest"].startswith("sha256:")
    lines = log.splitlines()
    ran_build = next(i for i, line in enumerate(lines) if "run build" in line)
    pulled = next(i for i, line in enumerate(lines) if " pull --quiet" in line)
    assert ran_build < pulled, "pulled after the script made the Dockerfile"
