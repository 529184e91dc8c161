"""`uses: setup`: check out the pushed commit and derive the names later steps use.

Like the Cloud-Native Toolkit's `setup` task: the app name is package.json's `name` (without
an npm scope), else the repo's basename, made lower-case with `_` -> `-` and anything else
that is not a letter, digit or `-` turned into `-`, so that it is valid as an image repository
and as a Kubernetes name (an RFC 1035 label: at most 63 characters, starts with a letter).
`with: app_name` overrides it (normalised the same way).

Outputs:
- `sha`: the full commit sha; `short_sha`: its first `short_sha_length` (7) characters
- `app_name`
- `image_url`: `<registry>/<app_name>:<short_sha>` (registry = `host[:port]/namespace`)
- `release_image_repo`: `<release registry>/<app_name>` (img-release adds `:<version>`)
- `branch`: the pushed branch, `refs/heads/` removed
"""

from __future__ import annotations

import re
from typing import Any

from handlers import git, npm
from handlers.base import StepFailed, StepRequest
from handlers.registry import ImageRef, split_registry
from handlers.settings import for_request

MAX_NAME = 63


def normalise_app_name(raw: str) -> str:
    name = raw.rsplit("/", 1)[-1].lower().replace("_", "-")  # "@scope/x" -> "x"
    name = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")
    if name and not name[0].isalpha():
        name = f"app-{name}"
    return name[:MAX_NAME].rstrip("-")


def app_name_for(override: str, package: dict[str, Any] | None, repo_url: str) -> str:
    if override:
        if not (name := normalise_app_name(override)):
            raise StepFailed(
                f"`with: app_name` {override!r} has no letter or digit to make a name of",
                retryable=False,
            )
        return name
    package_name = package.get("name") if package else None
    for raw in (package_name, git.repo_basename(repo_url)):
        if isinstance(raw, str) and (name := normalise_app_name(raw)):
            return name
    raise StepFailed(
        f"cannot derive an app name from package.json or the repo URL {git.redact(repo_url)}; "
        "set `app_name:` in the setup step's `with:`",
        retryable=False,
    )


async def run(request: StepRequest) -> dict[str, Any]:
    git.validate_request(request)
    settings = for_request(request)
    branch = git.branch_of(request.ref)
    registry = settings.push_registry
    release_registry = settings.effective_release_registry
    split_registry(registry)
    split_registry(release_registry)

    source = await git.checkout(request)
    sha = await git.head_sha(source)
    short_sha = sha[: settings.short_sha_length]
    app_name = app_name_for(settings.app_name, npm.package_json(source), request.repo)
    image_url = f"{registry}/{app_name}:{short_sha}"
    release_image_repo = f"{release_registry}/{app_name}"
    ImageRef.parse(image_url)
    ImageRef.parse(f"{release_image_repo}:0.0.0")
    request.log.line(f"app {app_name}: image {image_url}, releases to {release_image_repo}")
    return {
        "sha": sha,
        "short_sha": short_sha,
        "app_name": app_name,
        "image_url": image_url,
        "release_image_repo": release_image_repo,
        "branch": branch,
    }
