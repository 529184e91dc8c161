"""Step processes as the step log shows them: command lines quoted as a shell would read
them, secrets masked there too, long lines and split output kept whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from handlers import process
from handlers.base import StepLog, identity_env
from handlers.masking import Masker
from handlers.sandbox import Sandbox, SandboxSettings

pytestmark = pytest.mark.integration


def attempt(tmp_path: Path) -> Sandbox:
    box = Sandbox(SandboxSettings(), tmp_path / "worker" / "a-1",
                  identity=identity_env("r", "repo", "ref", "c", "s", 1),
                  hidden=(tmp_path / "worker",))
    box.prepare()
    return box


async def test_command_lines_are_quoted_as_a_shell_would_and_secrets_masked(
        tmp_path: Path) -> None:
    log = StepLog(masker=Masker(["s3cret-in-argv"]))
    await process.run(["git", "commit", "-q", "-m", "Updates ledger-api to 0.0.1",
                       "--allow-empty", "--dry-run"], cwd=tmp_path, log=log, check=False)
    box = attempt(tmp_path)
    await process.run_sandboxed(["printf", "%s\\n", "it's s3cret-in-argv"], sandbox=box,
                                cwd=box.work, log=log)
    lines = log.text().splitlines()
    assert "$ git commit -q -m 'Updates ledger-api to 0.0.1' --allow-empty --dry-run" in lines
    assert "$ printf '%s\\n' 'it'\"'\"'s ***'" in lines
    assert "it's ***" in lines
    assert "s3cret-in-argv" not in log.text()


async def test_a_line_longer_than_the_read_buffer_is_kept(tmp_path: Path) -> None:
    log = StepLog()
    box = attempt(tmp_path)
    done = await process.run_sandboxed(
        ["python3", "-c", "print('x' * 300_000); print('end')"], sandbox=box, cwd=box.work,
        log=log)
    assert done.exit_code == 0 and done.tail.endswith("end")
    assert "x" * 300_000 in log.text()
