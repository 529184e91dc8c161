"""`uses: test`: install the dependencies and run the project's tests.

Like the Cloud-Native Toolkit's nodejs `test` task: `npm ci` when a lock file exists
(package-lock.json or npm-shrinkwrap.json), else `npm install`; then `CI=true npm test`.
A failing install is retryable (registries and networks fail); failing tests are not: the
same commit fails the same way.

Outputs: `install`: the install command it ran (`npm ci` or `npm install`), or `cache` when
node_modules came from the worker's cache (handlers.node_modules) and npm did not run.
"""

from __future__ import annotations

from typing import Any

from handlers import git, npm
from handlers.base import StepFailed, StepRequest
from handlers.settings import for_request

warm_up = npm.warm_up  # at the worker's start (handlers.warm_up_of)


async def run(request: StepRequest) -> dict[str, Any]:
    git.validate_request(request)
    settings = for_request(request)
    source = await git.checkout(request)
    package = npm.package_json(source, required_by=request.step)
    assert package is not None
    if not npm.has_script(package, "test"):
        raise StepFailed(
            "package.json defines no `test` script; add one (this step runs `npm test`)",
            retryable=False,
        )
    installed = await npm.install(request, source, settings.npm_command)
    try:
        await npm.run(
            request,
            source,
            settings.npm_command,
            ["test"],
            what="npm test",
            retryable=False,
            env={"CI": "true"},
        )
    except StepFailed as failed:
        raise failed.reworded(
            f"the tests of commit {request.commit[:12]} failed (npm test exited with code "
            f"{failed.exit_code}); see the output tail"
        ) from None
    return {"install": installed}
