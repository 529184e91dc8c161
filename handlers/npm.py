"""npm for the handlers: read package.json, install dependencies, run scripts.

npm runs the repo's lifecycle scripts (install hooks, `test`, `build`), so every npm command
goes through the step sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from handlers import cache, node_modules, process
from handlers.base import StepFailed, StepRequest
from handlers.sandbox import SandboxSettings
from handlers.settings import HandlerSettings

LOCK_FILES = ("package-lock.json", "npm-shrinkwrap.json")
# quiet, offline-friendly npm: no update check, no audit or funding requests
NPM_ENV = {
    "npm_config_update_notifier": "false",
    "npm_config_audit": "false",
    "npm_config_fund": "false",
    "npm_config_progress": "false",
}


def package_json(source: Path, *, required_by: str | None = None) -> dict[str, Any] | None:
    """The parsed package.json, None when absent (a StepFailed when `required_by` names a step)."""
    path = source / "package.json"
    if not path.is_file():
        if required_by is None:
            return None
        raise StepFailed(
            f"step {required_by!r} runs npm, but the repo has no package.json at its root; "
            "add one, or use a pipeline made for this kind of project",
            retryable=False,
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StepFailed(
            f"package.json at the root of the repo is not valid JSON ({exc}); fix it",
            retryable=False,
        ) from None
    if not isinstance(data, dict):
        raise StepFailed(
            "package.json at the root of the repo is not a JSON object", retryable=False
        )
    return data


def has_script(package: dict[str, Any], name: str) -> bool:
    scripts = package.get("scripts")
    return isinstance(scripts, dict) and isinstance(scripts.get(name), str)


async def install(request: StepRequest, source: Path, npm: str) -> str:
    """`npm ci` when a lock file exists, else `npm install`. Returns the command it ran, or
    `cache` when node_modules came from the worker's cache instead (handlers.node_modules).

    The install downloads through the repo's npm cache of this worker (a fork's pull request
    gets an empty one of its own); the tree `npm ci` made is cached before anything else of
    the repo runs."""
    command = "ci" if any((source / name).is_file() for name in LOCK_FILES) else "install"
    tree = None
    if command == "ci":
        tree = await node_modules.Tree.of(request, source, npm,
                                          package_json(source) or {})
        if tree is not None and await tree.restore():
            return "cache"
    downloads = await asyncio.to_thread(node_modules.npm_cache, request)
    with contextlib.ExitStack() as held:
        if downloads is not None and not held.enter_context(cache.using(downloads)):
            downloads = None  # evicted just now: this install goes without
        shared = [downloads.data] if downloads is not None else []
        await run(request, source, npm, [command], what=f"npm {command}", retryable=True,
                  env={"npm_config_cache": str(shared[0])} if shared else None, shared=shared)
    if tree is not None:
        await tree.save()
    if request.cache_root is not None and not request.untrusted:  # after each write
        await asyncio.to_thread(cache.evict, request.cache_root, node_modules.limit())
    return f"npm {command}"


async def warm_up(workdir: Path, sandbox_settings: SandboxSettings) -> None:
    """At a worker's start: the npm and node versions (part of a node_modules key), asked
    once so that the first install does not wait for two node processes."""
    await node_modules.tool_versions(HandlerSettings().npm_command,
                                     sandbox_settings.sandbox_path)


async def run(
    request: StepRequest,
    source: Path,
    npm: str,
    args: list[str],
    *,
    what: str,
    retryable: bool,
    env: dict[str, str] | None = None,
    shared: Sequence[Path] = (),
) -> process.Completed:
    return await process.run_sandboxed(
        [*shlex.split(npm), *args],
        sandbox=request.sandbox,
        cwd=source,
        log=request.log,
        env={**NPM_ENV, **(env or {})},
        what=what,
        retryable=retryable,
        shared=shared,
    )
