"""Small shared pieces of the handlers: the private credentials file, reworded failures."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from handlers.base import StepFailed
from handlers.settings import docker_auth, private_docker_config

pytestmark = pytest.mark.unit


def test_the_credentials_file_is_ours_alone_and_gone_afterwards() -> None:
    with private_docker_config({"registry.example.com": docker_auth("ci", "s3cret")}) as path:
        assert path is not None
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        entry = json.loads(path.read_text())["auths"]["registry.example.com"]
        assert base64.b64decode(entry["auth"]) == b"ci:s3cret"
    assert not path.exists() and not path.parent.exists()


def test_no_credentials_no_file() -> None:
    with private_docker_config({}) as path:
        assert path is None


def test_a_reworded_failure_keeps_the_exit_code_and_output() -> None:
    tool = StepFailed("npm exited 1", exit_code=1, output_tail="1 failing", retryable=True)
    told = tool.reworded("the tests of commit abc failed")
    assert (told.message, told.exit_code, told.output_tail, told.retryable) == (
        "the tests of commit abc failed", 1, "1 failing", False)
