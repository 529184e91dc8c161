"""Step handlers: one module per side effect. `uses: <name>` in a pipeline names one of these.

Modules are imported on first use so that a worker for one step does not load every client
library, and so that the core can validate pipelines against the names alone.
"""

from __future__ import annotations

import importlib

from handlers.base import Handler

# name in `uses:` -> module whose `run` coroutine implements it
REGISTRY: dict[str, str] = {
    "noop": "handlers.noop",
    "script": "handlers.script",
    "setup": "handlers.setup",
    "test": "handlers.test",
    "build": "handlers.build",
    "tag-release": "handlers.tag_release",
    "img-release": "handlers.img_release",
    "deploy": "handlers.deploy",
    "health": "handlers.health",
    "helm-release": "handlers.helm_release",
    "gitops": "handlers.gitops",
    "qa-sync": "handlers.qa_sync",
    "repo-pipeline": "handlers.repo_pipeline",  # the built-in step reading a repo's pipeline
}


# Handlers that touch no files: the worker gives them no workspace on disk.
NO_WORKSPACE = frozenset({"noop"})


def names() -> frozenset[str]:
    return frozenset(REGISTRY)


def load(name: str) -> Handler:
    try:
        module_name = REGISTRY[name]
    except KeyError:
        raise LookupError(
            f"no handler named {name!r}; known handlers: {', '.join(sorted(REGISTRY))}"
        ) from None
    handler: Handler = importlib.import_module(module_name).run
    return handler
