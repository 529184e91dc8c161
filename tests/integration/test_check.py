"""Step settings are checked before a worker starts: `cistate check` and `cistate serve`
name every problem with its variable and step and exit 2 (real processes, real PostgreSQL
and RabbitMQ)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cistate.config import Settings
from tests.conftest import settings_env

pytestmark = pytest.mark.integration

BAD = {"CISTATE_HEALTH_PORT": "abc", "CISTATE_ROLLOUT_TIMEOUT": "-5"}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello.yaml"


def cistate(settings: Settings, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in settings_env(settings).items() if k != "CISTATE_PIPELINE"}
    if settings.pipeline is not None:
        full["CISTATE_PIPELINE"] = str(settings.pipeline)
    return subprocess.run([sys.executable, "-m", "cistate", *args],
                          env={**full, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def test_check_names_each_problem_with_its_variable_and_step(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()  # the packaged default pipeline
    done = cistate(settings, "check", env=BAD)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert any(line.startswith("cistate: steps 'setup', 'build', 'img-release': "
                               "CISTATE_REGISTRY is not set") for line in lines), lines
    assert any("CISTATE_HEALTH_PORT" in line and "'deploy'" in line for line in lines), lines
    assert any("CISTATE_ROLLOUT_TIMEOUT" in line and "greater than 0" in line
               for line in lines), lines
    assert "Traceback" not in done.stderr


def test_check_passes_a_configured_pipeline(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(EXAMPLE.read_text())
    done = cistate(settings, "check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: pipeline")


def test_a_step_naming_a_secret_the_worker_lacks_is_found_at_check(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings("""
name: with-secret
steps:
  - {name: publish, uses: script, run: "true", secrets: [NPM_TOKEN]}
""")
    done = cistate(settings, "check")
    assert done.returncode == 2
    assert "step 'publish': secret NPM_TOKEN is not on this worker" in done.stderr
    assert cistate(settings, "check", env={"CISTATE_SECRET_NPM_TOKEN": "npm-token-1234"}
                   ).returncode == 0


def test_a_worker_with_bad_settings_refuses_to_start_but_one_for_other_steps_does_not(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    done = cistate(settings, "serve", "--role", "worker", env=BAD)
    assert done.returncode == 2
    assert "CISTATE_HEALTH_PORT" in done.stderr and "'deploy'" in done.stderr
    # a worker for other steps only is not stopped by the delivery steps' settings
    only_tests = cistate(settings, "check", "--step", "test", env=BAD)
    assert only_tests.returncode == 0, only_tests.stderr
