"""`uses: script`: run the step's `run:` text with /bin/sh in the step's working directory.

The script text comes from the pipeline file (written by the pipeline's owner); data from the
push (repo, ref, commit) reaches it only as environment variables, never spliced into it.
It runs in the step sandbox: it works on the repo's files, and so is the repo's code.
"""

from __future__ import annotations

from typing import Any

from handlers import process
from handlers.base import StepFailed, StepRequest


async def run(request: StepRequest) -> dict[str, Any]:
    if not request.script:
        raise StepFailed(f"step {request.step!r} uses script but has no `run:`", retryable=False)
    done = await process.run_sandboxed(
        ["/bin/sh", "-c", request.script],
        sandbox=request.sandbox,
        cwd=request.workdir,
        log=request.log,
        what=f"script of step {request.step!r}",
        retryable=bool(request.settings.get("retry_on_failure", True)),
    )
    return {"exit_code": done.exit_code}
