"""npm for the handlers: read package.json, install dependencies, run scripts.

npm runs the repo's lifecycle scripts (install hooks, `test`, `build`), so every npm command
goes through the step sandbox.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from handlers import process
from handlers.base import StepFailed, StepRequest

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
    """`npm ci` when a lock file exists, else `npm install`. Returns the command it ran."""
    command = "ci" if any((source / name).is_file() for name in LOCK_FILES) else "install"
    await run(request, source, npm, [command], what=f"npm {command}", retryable=True)
    return f"npm {command}"


async def run(
    request: StepRequest,
    source: Path,
    npm: str,
    args: list[str],
    *,
    what: str,
    retryable: bool,
    env: dict[str, str] | None = None,
) -> process.Completed:
    return await process.run_sandboxed(
        [*shlex.split(npm), *args],
        sandbox=request.sandbox,
        cwd=source,
        log=request.log,
        env={**NPM_ENV, **(env or {})},
        what=what,
        retryable=retryable,
    )
