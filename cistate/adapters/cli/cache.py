"""`cistate cache list|prune`: the worker's caches (handlers.cache) under `<workdir>/cache`
and its repo mirrors (handlers.mirror) under `<workdir>/mirrors`.

Plain functions that return what to print; the command line's parser calls them. Run them
where the worker runs, with its CISTATE_WORKDIR.
"""

from __future__ import annotations

import json
from pathlib import Path


def cache_root(workdir: Path) -> Path:
    return workdir / "cache"


def list_caches(workdir: Path, *, as_json: bool = False) -> str:
    """Every entry and mirror: id, kind, key, repo (a mirror's without credentials), branch,
    size and last use, least recent last."""
    from handlers import cache

    found = sorted(cache.entries(cache_root(workdir)), key=lambda e: e.last_used,
                   reverse=True)
    rows = [entry.as_json() for entry in found]
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return f"no caches in {cache_root(workdir)}"
    header = ("key", "kind", "repo", "branch", "size", "last used")
    lines = [(_shown_key(row), row["kind"], row["repo"], row["branch"] or "-",
              cache.format_size(row["size"]), f"{cache.since(entry.last_used)} ago")
             for entry, row in zip(found, rows, strict=True)]
    total = sum(row["size"] for row in rows)
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True))
            .rstrip() for line in [header, *lines]]
    limit = cache.CacheSettings().cache_max
    text.append(f"{len(rows)} entries, {cache.format_size(total)} of "
                f"{cache.format_size(limit)} (CISTATE_CACHE_MAX)")
    return "\n".join(text)


def prune(workdir: Path, *, max_size: str | None = None, everything: bool = False) -> str:
    """Drop entries: least recently used first down to `max_size` (default
    CISTATE_CACHE_MAX), or all of them (`everything`); entries in use are kept. A ValueError
    for a size that is not one."""
    from handlers import cache

    root = cache_root(workdir)
    if everything:
        dropped = cache.prune(root, limit=None)
    else:
        limit = (cache.parse_size(max_size) if max_size is not None
                 else cache.CacheSettings().cache_max)
        dropped = cache.prune(root, limit=limit)
    left = cache.entries(root)
    lines = [f"removed {entry.kind} {_shown_key(entry.as_json())} ({entry.repo})"
             for entry in dropped]
    lines.append(f"removed {len(dropped)} entries; {len(left)} left, "
                 f"{cache.format_size(sum(e.size() for e in left))}")
    return "\n".join(lines)


def _shown_key(row: dict[str, object]) -> str:
    """node_modules entries by their content key; npm and buildah ones (one per repo) by id;
    mirrors by the hash their folder is named by."""
    return str(row["key"] or row["id"])[:12]
