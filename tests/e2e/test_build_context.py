"""End to end: an image build uses the repo's build context only as the repo has it. A symbolic
link that leads out of the checkout (committed, or made by the repo's own build script) fails
the build step, naming it, before buildah runs; real git daemon, npm and docker-registry.
"""

from __future__ import annotations

from typing import Any

import pytest

import handlers
from handlers.base import StepFailed
from tests.e2e.conftest import Env, Requests, log_text

pytestmark = pytest.mark.e2e

APP = "hello-app"


async def build_fails(make_request: Requests, handler_env: Env, repo: Any, sha: str
                      ) -> tuple[StepFailed, str]:
    setup = await handlers.load("setup")(make_request(repo, sha, "setup"))
    request = make_request(repo, sha, "build", inputs={"setup": setup},
                           settings={"build_args": {"BASE_IMAGE": handler_env.base_image}})
    with pytest.raises(StepFailed) as info:
        await handlers.load("build")(request)
    return info.value, log_text(request)


async def test_a_committed_link_out_of_the_checkout_fails_the_build_before_buildah(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    repo = make_repo()
    sha = repo.commit(message="links out of the repo",
                      links={"assets/passwd": "/etc/passwd", "assets/up": "../../.."})
    failed, log = await build_fails(make_request, handler_env, repo, sha)
    assert failed.retryable is False
    assert "assets/passwd (a link to '/etc/passwd')" in failed.message
    assert "assets/up (a link to '../../..')" in failed.message
    # no build read the context (the base image may have been pulled meanwhile: a pull
    # sees no checkout)
    assert " bud " not in log and " push " not in log
    assert handler_env.registry.digest(f"{handler_env.namespace}/{APP}", sha[:7]) is None


async def test_a_link_the_build_script_makes_fails_the_build_before_buildah(
    make_repo: Any, make_request: Requests, handler_env: Env
) -> None:
    """npm run build is the repo's code: what it leaves in the context is checked too."""
    repo = make_repo()
    build_js = (repo.work / "build.js").read_text()
    sha = repo.commit(
        {"build.js": build_js + "\nrequire('fs').symlinkSync('/etc/shadow', 'dist/shadow');\n"},
        "the build links a host file into dist/",
    )
    failed, log = await build_fails(make_request, handler_env, repo, sha)
    assert failed.retryable is False
    assert "dist/shadow (a link to '/etc/shadow')" in failed.message
    assert "npm run build" in log and " bud " not in log and " push " not in log
    assert handler_env.registry.digest(f"{handler_env.namespace}/{APP}", sha[:7]) is None
