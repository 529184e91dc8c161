"""`uses: repo-pipeline`: the built-in first step of a run whose repository may bring its own
pipeline (CISTATE_REPO_PIPELINES): read `.cistate/pipeline.yaml` at the pushed commit.

Reading it is a side effect (a git fetch), so it happens here, in a worker, never in the
orchestrator's decision; the orchestrator parses what this step read (pure) and pins it.
The file is read from the commit's tree, never checked out: a symlink in its place is
refused, not followed, and nothing of the pushed tree reaches the disk.

Outputs: `found` (false: the repository has none, and the deployment's pipeline runs),
`path`, `blob` (the file's git object id) and `text` (the file; the orchestrator records
the parsed spec instead).
"""

from __future__ import annotations

import asyncio
from typing import Any

from cistate.domain.pipeline import REPO_PIPELINE_FILE
from handlers import git
from handlers.base import StepFailed, StepRequest

MAX_BYTES = 48 * 1024  # within a result's outputs (64 KiB as JSON)


async def run(request: StepRequest) -> dict[str, Any]:
    path, commit = await git.fetch(request)
    found = await asyncio.to_thread(git.read_file, path, commit, REPO_PIPELINE_FILE, MAX_BYTES)
    if found is None:
        request.log.line(f"no {REPO_PIPELINE_FILE} in commit {commit[:12]}: the deployment's "
                         "pipeline runs")
        return {"found": False, "path": REPO_PIPELINE_FILE}
    blob, data = found
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StepFailed(f"{REPO_PIPELINE_FILE} in commit {commit[:12]} is not UTF-8 text "
                         f"(byte {exc.start})", retryable=False) from None
    if "\x00" in text:
        raise StepFailed(f"{REPO_PIPELINE_FILE} in commit {commit[:12]} holds a NUL byte",
                         retryable=False)
    request.log.line(f"read {REPO_PIPELINE_FILE} ({len(data)} bytes, blob {blob[:12]}) of "
                     f"commit {commit[:12]}")
    return {"found": True, "path": REPO_PIPELINE_FILE, "blob": blob, "text": text}
