"""End to end: scripts/quickstart.py as a person runs it, from its start to Ctrl-C.

The quickstart runs as a subprocess with a directory of its own and this test's database,
RabbitMQ vhost and bus prefix (CISTATE_DATABASE_URL, CISTATE_RABBITMQ_URL, CISTATE_BUS_PREFIX),
and an API port of its own (CISTATE_LISTEN). The test waits for the `git push` command it
prints, runs exactly that command, waits until the GitOps repo's qa branch has the commit
"Updates hello-app to 0.0.1" (the run went from push to the QA GitOps commit), sends SIGINT
and checks that the quickstart exited 0 and that none of the processes it started (the pids
it printed, and every descendant seen before SIGINT) is still running.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scripts" / "quickstart.py"
STEPS = ("setup", "test", "build", "deploy", "health", "tag-release", "img-release",
         "helm-release", "gitops")
PARTS = ("image registry", "base image", "git server", "chart repository", "GitOps repo",
         "Kubernetes API", "kubelet", "pod")
READY_TIMEOUT = 240.0  # the first start builds the busybox base image; the machine is shared
RUN_TIMEOUT = 150.0


def start_time(pid: int) -> int | None:
    """When the process started (/proc/PID/stat field 22), None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def printed_pids(text: str) -> list[int]:
    """Every pid the quickstart printed: "(pid N)", "pids N, M", "(buildah run, pid N)"."""
    pids = [int(n) for n in re.findall(r"\bpid (\d+)", text)]
    for group in re.findall(r"\bpids ((?:\d+, )*\d+)", text):
        pids += [int(n) for n in group.split(", ")]
    return pids


class Output:
    """The quickstart's stdout and stderr, read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def until(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        assert self.proc.stdout is not None
        compiled = re.compile(pattern)
        for line in self.lines:
            if found := compiled.search(line):
                return found
        try:
            async with asyncio.timeout(timeout):
                while raw := await self.proc.stdout.readline():
                    line = raw.decode(errors="replace").rstrip("\n")
                    self.lines.append(line)
                    if found := compiled.search(line):
                        return found
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout:.0f} s; the quickstart printed:\n"
                                 f"{self.text[-6000:]}") from None
        raise AssertionError(f"the quickstart exited ({await self.proc.wait()}) before "
                             f"{what}; it printed:\n{self.text[-6000:]}")

    async def rest(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))


def gitops_head(directory: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(directory / "git" / "repos" / "gitops.git"), "log", "-1",
         "--format=%s", "qa"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


async def test_the_quickstart_runs_a_pushed_commit_to_the_qa_gitops_commit_and_ctrl_c_stops_all(
    database_url: str, amqp_url: str, bus_prefix: str, tmp_path: Path,
) -> None:
    directory = tmp_path / "quickstart"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CISTATE_")}
    if "CISTATE_CACHE" in os.environ:  # where the built kube-apiserver is
        env["CISTATE_CACHE"] = os.environ["CISTATE_CACHE"]
    env |= {
        "CISTATE_QUICKSTART_DIR": str(directory),
        "CISTATE_DATABASE_URL": database_url,
        "CISTATE_RABBITMQ_URL": amqp_url,
        "CISTATE_BUS_PREFIX": bus_prefix,
        "CISTATE_LISTEN": f"127.0.0.1:{free_port()}",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(QUICKSTART), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = Output(proc)
    try:
        push = await out.until(r"^    (git -C \S+ push origin main)$", READY_TIMEOUT,
                               "`git push` command")
        for name in PARTS:  # each part, said to be a local stand-in, and what replaces it
            assert re.search(rf"^  {re.escape(name)} +\S.*\n +local stand-in: .+\n"
                             r" +a real setup uses: ", out.text, re.M), (name, out.text)

        pushed = subprocess.run(shlex.split(push[1]), capture_output=True, text=True,
                                timeout=120)
        assert pushed.returncode == 0, pushed.stderr
        assert "published push" in pushed.stderr, "the hook's `cistate push` answers the pusher"

        await out.until(r"GitOps commit \w+ on branch qa .*\"Updates hello-app to 0\.0\.1\"",
                        RUN_TIMEOUT, "GitOps commit")
        await out.until(r"^Waiting for the next push", 30, "the end of the run's report")
        assert gitops_head(directory) == "Updates hello-app to 0.0.1"
        for step in STEPS:
            assert re.search(rf"^  {re.escape(step)} +succeeded in ", out.text, re.M), step
        assert re.search(r"^  qa-sync +skipped: ", out.text, re.M)
        assert re.search(r"^run \S+ succeeded in ", out.text, re.M)
        assert "cistate runs show " in out.text and "/api/v1/runs/" in out.text

        started = {pid: start_time(pid) for pid in
                   {*printed_pids(out.text), *descendants(proc.pid)}}
        started = {pid: at for pid, at in started.items() if at is not None}
        assert len(started) >= 8, f"the quickstart's processes: {sorted(started)}"
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(90):
            await out.rest()
            code = await proc.wait()
    finally:
        if proc.returncode is None:  # the test failed: still let it stop what it started
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(90):
                    await out.rest()
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert code == 0, out.text[-4000:]
    assert "SIGINT: stopping everything" in out.text
    assert re.search(r"quickstart: stopped; none of the \d+ processes it started is running$",
                     out.text, re.M), out.text[-3000:]
    left = {pid for pid, at in started.items() if start_time(pid) == at}
    assert not left, "still running: " + "; ".join(
        Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        for pid in left)
