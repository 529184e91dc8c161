"""A worker imports the handlers of the queues it serves before it takes work, so that a
step's time is its own work, not a client library's first import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

import handlers
from cistate.bootstrap import served_handlers, served_steps
from cistate.domain import pipeline as p
from cistate.service.worker import Worker
from handlers.base import Handler
from handlers.sandbox import SandboxSettings

pytestmark = pytest.mark.unit

SHOP = """
name: shop
steps:
  - {name: prepare, uses: setup}
  - {name: image, uses: build}
  - {name: dev, uses: deploy}
"""


def test_step_queues_are_served_by_the_handlers_their_steps_use() -> None:
    catalog = p.Catalog(p.parse(SHOP, "pipelines/shop.yaml", handlers.inputs()))
    assert served_handlers(catalog, ["image", "dev"]) == ("build", "deploy")
    # a queue per handler: the steps of runs pinned to an older pipeline
    assert served_handlers(catalog, ["@script", "prepare"]) == ("script", "setup")
    assert served_handlers(catalog, ["nobody"]) == ()
    assert served_handlers(catalog, served_steps(catalog, False)) == (
        "setup", "build", "deploy")


def test_a_handler_that_does_not_load_leaves_the_worker_serving(tmp_path: Path) -> None:
    loaded: list[str] = []

    def load(name: str) -> Handler:
        if name == "broken":
            raise ImportError("No module named 'kubernetes_asyncio'")
        loaded.append(name)
        return handlers.load("noop")

    worker = Worker(None, tmp_path, load)  # type: ignore[arg-type]  # no bus: not started
    with structlog.testing.capture_logs() as logs:
        worker.preload(["noop", "broken", "script"])
    assert loaded == ["noop", "script"]
    assert [(e["uses"], e["reason"]) for e in logs] == [
        ("broken", "No module named 'kubernetes_asyncio'")]


def test_the_deploy_handler_is_imported_before_its_first_step(tmp_path: Path) -> None:
    # a fresh interpreter: this one has imported kubernetes_asyncio already
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import handlers
        from cistate.service.worker import Worker
        assert "kubernetes_asyncio" not in sys.modules, "imported before the preload"
        Worker(None, Path({str(tmp_path)!r}), handlers.load).preload(["deploy"])
        assert "kubernetes_asyncio" in sys.modules, "not imported by the preload"
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


async def test_a_warm_up_that_fails_is_logged_and_the_next_one_runs(tmp_path: Path) -> None:
    ran: list[Path] = []

    async def broken(workdir: Path, sandbox: SandboxSettings) -> None:
        raise OSError("buildah: not found")

    async def fine(workdir: Path, sandbox: SandboxSettings) -> None:
        ran.append(workdir)

    worker = Worker(None, tmp_path, handlers.load)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        await worker.warm_up([broken, fine])
    assert ran == [tmp_path]
    assert [e["reason"] for e in logs] == ["buildah: not found"]


def test_the_build_and_test_handlers_warm_up_and_noop_does_not() -> None:
    assert handlers.warm_up_of("build") is not None
    assert handlers.warm_up_of("test") is not None
    assert handlers.warm_up_of("noop") is None
