"""`uses: tag-release`: give a release branch's commit the next `X.Y.Z` tag in the code repo.

Like the Cloud-Native Toolkit's `tag-release` task (release-it `patch`): fetch the repo's
tags; when the commit already carries an `X.Y.Z` tag, that is its version (the highest, if it
has several); else tag it with the patch bump of the repo's highest `X.Y.Z` tag (`0.0.1` when
there is none) as an annotated tag, and push the tag.

Concurrency: the push is the claim. When another run pushed the same tag name first, the push
is rejected; the step fetches the tags again and either finds that tag on its own commit
(the same commit released twice: reused) or bumps past it and tries again, up to
`tag_attempts` times. Two runs racing for the next version therefore end with distinct tags.

Only branches matching `release_branches` (default `main`, `master`; fnmatch patterns,
CISTATE_RELEASE_BRANCHES=main,release/*) are released.

Outputs:
- released: `{"tag": "X.Y.Z"}`
- not a release branch: `{"tag": null, "skipped_reason": "..."}` (later release steps skip too)
"""

from __future__ import annotations

from typing import Any

from handlers import git
from handlers.base import StepFailed, StepRequest
from handlers.settings import for_request


def next_version(versions: list[tuple[int, int, int]]) -> str:
    if not versions:
        return "0.0.1"
    major, minor, patch = max(versions)
    return f"{major}.{minor}.{patch + 1}"


async def run(request: StepRequest) -> dict[str, Any]:
    git.validate_request(request)
    settings = for_request(request)
    branch = git.branch_of(request.ref)
    if not settings.is_release_branch(branch):
        reason = (
            f"branch {branch!r} is not a release branch "
            f"({', '.join(settings.release_branches) or 'none configured'})"
        )
        request.log.line(f"not tagging: {reason}")
        return {"tag": None, "skipped_reason": reason}

    source = await git.checkout(request)
    sha = await git.head_sha(source)
    tags = await git.fetch_tags(request, source)
    for attempt in range(1, settings.tag_attempts + 1):
        own = sorted((tag.version, tag.name) for tag in tags if tag.commit == sha and tag.version)
        if own:
            name = own[-1][1]
            request.log.line(f"commit {sha} is already tagged {name}")
            return {"tag": name}
        name = next_version([tag.version for tag in tags if tag.version])
        await git.create_tag(
            source,
            name,
            sha,
            f"Release {name}",
            user=settings.git_user_name,
            email=settings.git_user_email,
        )
        push = await git.push_tag(request, source, name)
        if push.pushed:
            request.log.line(f"tagged {sha} {name} and pushed the tag")
            return {"tag": name}
        tags = await git.fetch_tags(request, source)
        if name not in {tag.name for tag in tags}:
            raise StepFailed(
                f"repo {git.redact(request.repo)} refused tag {name} (a server hook, a "
                "protected tag rule or permissions); allow the worker to push tags",
                exit_code=push.exit_code,
                output_tail=push.tail,
                retryable=False,
            )
        request.log.line(
            f"tag {name} was pushed by another run first (attempt {attempt} of "
            f"{settings.tag_attempts}); trying again with the tags as they are now"
        )
    raise StepFailed(
        f"could not claim a release tag for {sha} in {git.redact(request.repo)}: other runs "
        f"took each next version {settings.tag_attempts} times in a row",
        retryable=True,
    )
