"""Start real `cistate serve` processes for tests that kill or multiply them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from cistate.config import Settings
from tests.conftest import free_port, settings_env


class ServeProcess:
    def __init__(self, settings: Settings, roles: tuple[str, ...], log_path: Path,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.settings = settings.model_copy(update={"listen": f"127.0.0.1:{free_port()}"})
        self.roles = roles
        self.log_path = log_path
        # more environment for the process, over the settings' (e.g. handler CISTATE_* values)
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> ServeProcess:
        argv = [sys.executable, "-m", "cistate", "serve"]
        for role in (*self.roles, "api"):
            argv += ["--role", role]
        log = self.log_path.open("ab")
        env = {**settings_env(self.settings), **self.extra_env}
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        await self._wait_ready()
        return self

    async def _wait_ready(self, timeout: float = 60) -> None:
        url = f"http://{self.settings.listen}/health"
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"cistate serve exited with {self.proc.returncode}:\n"
                        + self.log_path.read_text()[-3000:])
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError("cistate serve not ready:\n"
                                         + self.log_path.read_text()[-3000:])
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye to the broker or the database."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
