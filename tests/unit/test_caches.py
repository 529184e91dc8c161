"""The worker's cache store (handlers.cache) and what node_modules it refuses, on tmp folders."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from handlers import cache
from handlers.node_modules import Refused, admit, refusal

pytestmark = pytest.mark.unit


def put(root: Path, name: str, size: int, used: float) -> cache.Entry:
    def fill(data: Path) -> None:
        data.mkdir()
        (data / "blob").write_bytes(os.urandom(size))

    entry = cache.store(root, "node_modules", name, {"key": name, "repo": "r", "branch": "main"},
                        fill, immutable=True)
    assert entry is not None
    os.utime(entry.path / "last-used", (used, used))
    return entry


@pytest.mark.parametrize(("text", "size"), [
    ("5G", 5 * 2**30), ("512M", 512 * 2**20), ("100k", 100 * 1024), ("2GiB", 2 * 2**30),
    ("1048576", 2**20), ("1.5G", int(1.5 * 2**30)), ("3 MB", 3 * 2**20)])
def test_a_size_is_bytes_or_a_number_with_a_binary_unit(text: str, size: int) -> None:
    assert cache.parse_size(text) == size


def test_cache_max_reads_the_environment_and_refuses_nonsense(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache.CacheSettings().cache_max == 5 * 2**30
    monkeypatch.setenv("CISTATE_CACHE_MAX", "2G")
    assert cache.CacheSettings().cache_max == 2 * 2**30
    monkeypatch.setenv("CISTATE_CACHE_MAX", "lots")
    with pytest.raises(ValueError, match="is not a size"):
        cache.CacheSettings()


def test_eviction_drops_the_least_recently_used_until_under_the_limit(tmp_path: Path) -> None:
    now = time.time()
    for age, name in enumerate(["newest", "newer", "older", "oldest"]):
        put(tmp_path, name, 100_000, now - 100 * age)
    size = {e.key: e.size() for e in cache.entries(tmp_path)}
    assert all(e.fixed_size == cache.disk_usage(e.data) for e in cache.entries(tmp_path))
    limit = size["newest"] + size["newer"] + 10
    dropped = cache.evict(tmp_path, limit)
    assert [e.key for e in dropped] == ["oldest", "older"]
    assert sorted(e.key for e in cache.entries(tmp_path)) == ["newer", "newest"]
    assert sum(e.size() for e in cache.entries(tmp_path)) <= limit
    assert not list((tmp_path / cache.TRASH).iterdir()), "the trash is emptied"


def test_a_use_makes_an_entry_recent_and_an_entry_in_use_is_not_evicted(
        tmp_path: Path) -> None:
    now = time.time()
    old = put(tmp_path, "old", 50_000, now - 1000)
    put(tmp_path, "new", 50_000, now - 10)
    with cache.using(old) as present:
        assert present and old.last_used >= now
        assert cache.prune(tmp_path, limit=None) != []  # "new" goes, "old" is in use
        assert [e.key for e in cache.entries(tmp_path)] == ["old"]
    assert [e.key for e in cache.prune(tmp_path, limit=None)] == ["old"]
    with cache.using(old) as present:
        assert not present, "an evicted entry is a miss"


def test_an_entry_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    def broken(data: Path) -> None:
        data.mkdir()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.store(tmp_path, "node_modules", "x", {"key": "x"}, broken)
    assert cache.entries(tmp_path) == []
    assert not [p for p in (tmp_path / "node_modules").iterdir()], "no temporary left"
    put(tmp_path, "x", 10, time.time())
    assert cache.store(tmp_path, "node_modules", "x", {"key": "x"},
                       lambda data: data.mkdir()) is None, "the first one stays"


def tree(tmp_path: Path) -> Path:
    top = tmp_path / "node_modules"
    (top / "pkg" / "bin").mkdir(parents=True)
    (top / "pkg" / "bin" / "cli.js").write_text("#!/usr/bin/env node\n")
    (top / ".bin").mkdir()
    os.symlink("../pkg/bin/cli.js", top / ".bin" / "cli")
    return top


def test_a_tree_whose_links_stay_inside_is_cached(tmp_path: Path) -> None:
    assert refusal(tree(tmp_path)) is None


@pytest.mark.parametrize("make", [
    lambda top: os.symlink("/etc", top / "pkg" / "etc"),
    lambda top: os.symlink("../../outside", top / "pkg" / "up"),
    # lexically inside, but `deep/sub` is a link to node_modules itself: `..` climbs from there
    lambda top: ((top / "deep").mkdir(), os.symlink("..", top / "deep" / "sub"),
                 os.symlink("deep/sub/../..", top / "sneaky")),
    lambda top: os.mkfifo(top / "pkg" / "pipe"),
])
def test_a_tree_with_a_link_out_of_it_or_a_special_file_is_refused(
        tmp_path: Path, make: object) -> None:
    top = tree(tmp_path)
    make(top)  # type: ignore[operator]
    assert refusal(top) is not None


def test_a_linked_node_modules_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "node_modules")
    assert refusal(tmp_path / "node_modules") == "node_modules is a symbolic link"


def test_admitting_a_tree_checks_and_seals_it_in_one_walk_and_counts_its_size(
        tmp_path: Path) -> None:
    top = tree(tmp_path)
    (top / "pkg" / "index.js").write_text("module.exports = 1\n")
    os.link(top / "pkg" / "index.js", top / "pkg" / "main.js")  # both names inside
    os.chmod(top / "pkg" / "index.js", 0o664)
    os.lchown(top / "pkg", 4242, 4242)
    assert admit(top) == cache.disk_usage(top)
    for path in [top / "pkg", top / "pkg" / "index.js", top / ".bin" / "cli"]:
        assert os.lstat(path).st_uid == os.getuid()
    assert (top / "pkg" / "main.js").stat().st_mode & 0o777 == 0o444
    assert (top / "pkg" / "bin" / "cli.js").stat().st_mode & 0o222 == 0


def test_a_tree_with_a_file_also_linked_from_outside_is_refused_and_that_file_untouched(
        tmp_path: Path) -> None:
    top = tree(tmp_path)
    outside = tmp_path / "package.json"  # the checkout's, or a file of npm's download cache
    outside.write_text("{}")
    os.chmod(outside, 0o664)
    os.chown(outside, 4242, 4242)
    os.link(outside, top / "pkg" / "package.json")
    with pytest.raises(Refused, match=r"pkg/package\.json is a hard link to a file outside"):
        admit(top)
    assert refusal(top) is None, "the copy path copies it: nothing outside is changed"
    assert outside.stat().st_uid == 4242 and outside.stat().st_mode & 0o777 == 0o664


def test_what_fill_moved_in_is_handed_back_when_the_entry_is_not_stored(tmp_path: Path) -> None:
    handed: list[str] = []

    def reclaim(data: Path) -> None:
        handed.append((data / "blob").read_text())
        os.rename(data, tmp_path / "back")

    def filled(data: Path) -> None:
        data.mkdir()
        (data / "blob").write_text("mine")

    # another writer's entry (no meta.json yet) is in the way of the rename
    (tmp_path / "node_modules" / "x").mkdir(parents=True)
    (tmp_path / "node_modules" / "x" / "data").mkdir()
    assert cache.store(tmp_path, "node_modules", "x", {"key": "x"}, filled,
                       reclaim=reclaim) is None
    assert handed == ["mine"] and (tmp_path / "back" / "blob").read_text() == "mine"

    def broken(data: Path) -> None:
        filled(data)
        raise OSError("refused")

    os.rename(tmp_path / "back", tmp_path / "gone")
    with pytest.raises(OSError, match="refused"):
        cache.store(tmp_path, "node_modules", "y", {"key": "y"}, broken, reclaim=reclaim)
    assert handed == ["mine", "mine"] and (tmp_path / "back").is_dir()
    assert sorted(p.name for p in (tmp_path / "node_modules").iterdir()) == ["x"], (
        "no temporary left")
    stored = cache.store(tmp_path, "node_modules", "z", {"key": "z"}, filled, reclaim=reclaim)
    assert stored is not None and handed == ["mine", "mine"], "stored: nothing handed back"


def test_cache_list_and_prune_show_and_trim_the_entries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from cistate.adapters.cli.main import main

    def cistate(*argv: str) -> tuple[int, str]:
        try:
            main(list(argv))
            code = 0
        except SystemExit as exited:
            code = int(exited.code or 0)
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    root = tmp_path / "cache"
    now = time.time()
    put(root, "a" * 64, 200_000, now - 7200)
    put(root, "b" * 64, 200_000, now - 60)
    monkeypatch.setenv("CISTATE_WORKDIR", str(tmp_path))
    code, shown = cistate("cache", "list")
    assert code == 0, shown
    lines = shown.splitlines()
    assert lines[0].split() == ["key", "kind", "repo", "branch", "size", "last", "used"]
    assert lines[1].split()[:4] == ["b" * 12, "node_modules", "r", "main"]
    assert lines[1].endswith("1m ago") and lines[2].endswith("2h ago")
    assert lines[3].startswith("2 entries, ") and "(CISTATE_CACHE_MAX)" in lines[3]
    listed = json.loads(cistate("cache", "list", "--json")[1])
    assert [(e["key"], e["kind"], e["branch"]) for e in listed] == [
        ("b" * 64, "node_modules", "main"), ("a" * 64, "node_modules", "main")]
    assert all(e["size"] > 200_000 for e in listed)
    assert listed[0]["last_used"].endswith("+00:00")  # ISO 8601, UTC

    code, bad = cistate("cache", "prune", "--max", "lots")
    assert code == 2 and "is not a size" in bad
    code, trimmed = cistate("cache", "prune", "--max", "300K")
    assert code == 0
    assert trimmed.splitlines()[0] == f"removed node_modules {'a' * 12} (r)"
    assert [e.key for e in cache.entries(root)] == ["b" * 64]
    assert "removed 1 entries; 0 left" in cistate("cache", "prune", "--all")[1]
    assert "no caches in" in cistate("cache", "list")[1]


def test_eviction_sweeps_what_a_killed_worker_left_behind(tmp_path: Path) -> None:
    put(tmp_path, "kept", 10, time.time())
    old = tmp_path / "node_modules" / ".tmp-killed"
    (old / "data").mkdir(parents=True)
    os.utime(old, (time.time() - 2 * cache.STALE_SECONDS,) * 2)
    fresh = tmp_path / "buildah" / ".tmp-writing"
    fresh.mkdir(parents=True)
    (tmp_path / cache.TRASH / "half-removed" / "data").mkdir(parents=True)
    cache.evict(tmp_path, 10**9)
    assert not old.exists() and fresh.exists(), "a write in progress is left alone"
    assert not list((tmp_path / cache.TRASH).iterdir())
    assert [e.key for e in cache.entries(tmp_path)] == ["kept"]
