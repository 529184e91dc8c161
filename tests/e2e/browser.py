"""A real headless Chromium (Debian's) driven by playwright-core through a small Node driver
(tests/browser/driver.mjs): one JSON command a line. Installed by scripts/browser.sh."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "browser" / "driver.mjs"
ARTEFACTS = Path(os.environ.get("CISTATE_ARTEFACTS", "/tmp/cistate-artefacts")) / "ui"


def install() -> str:
    """scripts/browser.sh (apt-get install chromium, npm ci of playwright-core): the path of
    the Chromium it installed. Fails the test when it cannot."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "browser.sh")], capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"scripts/browser.sh failed ({done.returncode}):\n{done.stderr[-3000:]}",
                    pytrace=False)
    return done.stdout.strip().splitlines()[-1]


class BrowserError(AssertionError):
    pass


class Browser:
    def __init__(self, chromium: str, profile: Path) -> None:
        self.chromium = chromium
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self.ids = itertools.count(1)

    async def start(self) -> Browser:
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            "node", str(DRIVER), str(self.profile), self.chromium,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=1 << 24)
        return self

    async def call(self, op: str, deadline: float = 60, **args: Any) -> Any:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        ident = next(self.ids)
        self.proc.stdin.write((json.dumps({"id": ident, "op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), deadline)
        if not line:
            err = (await self.proc.stderr.read()).decode() if self.proc.stderr else ""
            raise BrowserError(f"the browser driver exited during {op}: {err[-3000:]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise BrowserError(f"{op} {args}: {answer['error']}")
        return answer["value"]

    async def goto(self, url: str) -> None:
        await self.call("goto", url=url)

    async def eval(self, expr: str, arg: Any = None) -> Any:
        return await self.call("eval", expr=expr, arg=arg)

    async def wait_for(self, expr: str, arg: Any = None, timeout: float = 30) -> Any:
        """Wait until the page function `expr` (called with arg) returns something truthy."""
        return await self.call("waitFn", deadline=timeout + 10, expr=expr, arg=arg,
                               timeout=timeout * 1000)

    async def screenshot(self, name: str) -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        await self.call("screenshot", path=str(path))
        return path

    async def login(self, base_url: str, token: str, path: str = "/") -> None:
        await self.goto(base_url + path)
        await self.call("wait", selector="#token")
        await self.call("fill", selector="#token", value=token)
        await self.call("click", selector="#login")

    async def close(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(BrowserError, TimeoutError, ConnectionError):
            await self.call("close", deadline=10)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
