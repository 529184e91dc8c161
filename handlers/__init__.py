"""Step handlers: one module per side effect. `uses: <name>` in a pipeline names one of these.

Modules are imported on first use so that a worker for one step does not load every client
library, and so that the core can validate pipelines against the registry alone: the names,
and what each handler reads of the steps before it (`Entry.inputs`).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cistate.domain.pipeline import Input
from handlers.base import Handler

if TYPE_CHECKING:
    from handlers.sandbox import SandboxSettings

WarmUp = Callable[[Path, "SandboxSettings"], Awaitable[None]]


@dataclass(frozen=True)
class Entry:
    """A handler as the registry knows it, without importing it."""

    module: str  # whose `run` coroutine implements it
    # what it reads of earlier steps' outputs (request.output_of / outputs_from), by the
    # handler that makes them: a pipeline names the step (or it is found upstream), never
    # the handler. tests/unit/test_handler_inputs.py checks these against each module.
    inputs: tuple[Input, ...] = ()


# name in `uses:` -> the handler
REGISTRY: dict[str, Entry] = {
    "noop": Entry("handlers.noop"),
    "script": Entry("handlers.script"),
    "setup": Entry("handlers.setup"),
    "test": Entry("handlers.test"),
    "build": Entry("handlers.build", (Input("setup", ("image_url",)),)),
    "tag-release": Entry("handlers.tag_release"),
    "img-release": Entry("handlers.img_release", (
        Input("setup", ("release_image_repo", "app_name")),
        Input("build", ("image_url", "image_digest")),
        Input("tag-release", ("tag",)))),
    "deploy": Entry("handlers.deploy", (
        Input("setup", ("app_name", "image_url", "branch", "short_sha")),
        Input("build", ("image_url",), optional=True))),  # else setup's image_url
    # setup's app name finds the Ingress when `url` is not given; deploy's namespace, else
    # the dev namespace rendered again
    "health": Entry("handlers.health", (
        Input("setup", ("app_name", "branch", "short_sha"), optional=True),
        Input("deploy", ("namespace",), optional=True))),
    "helm-release": Entry("handlers.helm_release", (
        Input("setup", ("app_name", "release_image_repo")),
        Input("tag-release", ("tag",)),
        # it may run beside img-release (both after tag-release): then setup's
        # release_image_repo at the tag names the image img-release releases
        Input("img-release", ("release_image_url",), optional=True))),
    "gitops": Entry("handlers.gitops", (
        Input("setup", ("app_name",)),
        Input("helm-release", ("chart_name", "chart_version", "chart_repo")))),
    "qa-sync": Entry("handlers.qa_sync", (
        Input("gitops", ("commit",)),
        Input("setup", ("app_name",), optional=True))),  # unless `argocd_app` names it
    "repo-pipeline": Entry("handlers.repo_pipeline"),  # the built-in step reading a repo's pipeline
}


# Handlers that touch no files: the worker gives them no workspace on disk.
NO_WORKSPACE = frozenset({"noop"})


def names() -> frozenset[str]:
    return frozenset(REGISTRY)


def inputs() -> dict[str, tuple[Input, ...]]:
    """What each handler reads, by name: what pipeline.parse checks and resolves a file's
    steps against."""
    return {name: entry.inputs for name, entry in REGISTRY.items()}


def warm_up_of(name: str) -> WarmUp | None:
    """The handler module's `warm_up(workdir, sandbox_settings)`: what a worker does once,
    in the background, at its start, so that its first step does not (tool versions, the
    image store's driver); None when it has none."""
    module = importlib.import_module(REGISTRY[name].module)
    warm_up: WarmUp | None = getattr(module, "warm_up", None)
    return warm_up


def load(name: str) -> Handler:
    try:
        module_name = REGISTRY[name].module
    except KeyError:
        raise LookupError(
            f"no handler named {name!r}; known handlers: {', '.join(sorted(REGISTRY))}"
        ) from None
    handler: Handler = importlib.import_module(module_name).run
    return handler
