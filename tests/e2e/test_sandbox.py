"""The pushed repository's code runs in the step sandbox and gets none of cistate's keys.

Everything is real: `cistate serve` as its own process (the worker whose environment holds
a fake value for every credential it knows), RabbitMQ, PostgreSQL, the git server, npm,
bubblewrap, buildah and the registry. The repo's code probes what a hostile push would try;
its findings are printed hex-encoded where a leak is looked for, so that masking cannot
hide one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import handlers
from cistate.adapters.postgres.store import RunQuery, Store
from cistate.config import Settings
from handlers.base import StepFailed
from tests.conftest import wait_until
from tests.e2e.conftest import Env, GitRepo, Requests, log_text
from tests.integration.processes import ServeProcess

pytestmark = pytest.mark.e2e

# what a worker may hold; each value must never reach the pushed code or leave the worker
FAKE_CREDENTIALS = {
    "CISTATE_REGISTRY_PASSWORD": "fake-registry-password-1a2b",
    "CISTATE_REGISTRY_USERNAME": "fake-registry-user-3c4d",
    "CISTATE_CHART_REPO_PASSWORD": "fake-chart-repo-password-5e6f",
    "CISTATE_ARGOCD_TOKEN": "fake-argocd-token-7a8b",
    "CISTATE_API_TOKEN": "ops:fake-api-token-9c0d",
    "CISTATE_WEBHOOK_SECRET": "fake-webhook-secret-1e2f",
    "CISTATE_BUS_KEY": "fake-bus-key-3a4b5c6d",
    "CISTATE_SECRET_DEPLOY_KEY": "fake-undeclared-secret-7e8f",
}
DATABASE_PASSWORD = "fake-database-password-9a0b"  # trust auth here: any password connects

PROBE = r"""#!/bin/sh
# What a hostile push tries. Findings that could carry a credential are hex-encoded.
echo "uid=$(id -u)"
echo "env-hex=$(env | od -An -tx1 | tr -d ' \n')"
for f in /proc/[0-9]*/environ; do
  echo "proc-environ-hex $f=$(od -An -tx1 "$f" 2>/dev/null | tr -d ' \n')"
done
echo "processes=$(ls -d /proc/[0-9]* | wc -l)"
if touch /etc/cistate-probe 2>/dev/null; then echo "etc-write=ok"; else echo "etc-write=refused"; fi
if echo pwned > "$PROBE_OUTSIDE" 2>/dev/null; then echo "outside-write=ok"; else echo "outside-write=refused"; fi
if od -An -tx1 "$PROBE_ROOT_ONLY" 2>/dev/null; then echo "root-only-read=ok"; else echo "root-only-read=refused"; fi
echo "workdir-listing-hex=$(ls -R "$PROBE_WORKDIR" 2>/dev/null | od -An -tx1 | tr -d ' \n')"
"""

PIPELINE = """\
name: probes
steps:
  - name: probe-script
    uses: script
    env: &probe {{PROBE_OUTSIDE: "{outside}", PROBE_ROOT_ONLY: "{root_only}", PROBE_WORKDIR: "{workdir}"}}
    run: |
{probe}
  - name: test
    uses: test
    env: *probe
"""


@pytest.fixture
def root_only_file() -> Iterator[Path]:
    """A file only root may read, in a folder everyone may enter (outside /tmp, which every
    sandbox has its own of): the step must fail to read it by its uid alone."""
    folder = Path("/var/lib") / f"cistate-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o755)
    secret = folder / "root-only"
    secret.write_text("ROOT-ONLY-MARKER-5d41402abc4b2a76")
    secret.chmod(0o600)
    try:
        yield secret
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def probe_app(tmp_path: Path) -> Path:
    app = tmp_path / "probe-app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({
        "name": "probe", "version": "1.0.0", "private": True,
        "scripts": {"test": "sh probe.sh"}}))
    (app / "probe.sh").write_text(PROBE)
    return app


def leaks(text: str) -> list[str]:
    """Each fake credential found in `text`, as is or hex-encoded."""
    found = []
    for value in [*FAKE_CREDENTIALS.values(), DATABASE_PASSWORD]:
        for form in (value, value.encode().hex()):
            if form in text:
                found.append(value)
    return found


def findings(log: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in log.splitlines()
                if "=" in line and line.split("=", 1)[0] in {
                    "uid", "etc-write", "outside-write", "root-only-read", "processes"})


async def test_the_pushed_code_gets_no_credential_no_root_and_no_host_writes(
    make_repo: Any, make_settings: Any, store: Store, tmp_path: Path, root_only_file: Path,
) -> None:
    repo: GitRepo = make_repo(app=probe_app(tmp_path))
    settings: Settings = make_settings()
    workdir = settings.workdir
    workdir.mkdir(parents=True)
    outside = workdir / "outside-the-attempt"
    pipeline = tmp_path / "probes.yaml"
    pipeline.write_text(PIPELINE.format(
        outside=outside, root_only=root_only_file, workdir=workdir,
        probe="\n".join("      " + line for line in PROBE.splitlines())))
    url = settings.database_url.replace("postgresql://postgres@",
                                        f"postgresql://postgres:{DATABASE_PASSWORD}@")
    settings = settings.model_copy(update={"pipeline": pipeline, "database_url": url})
    server = await ServeProcess(settings, ("orchestrator", "worker"), tmp_path / "serve.log",
                                extra_env=FAKE_CREDENTIALS).start()
    try:
        subprocess.run(
            [sys.executable, "-m", "cistate", "push", "--repo", repo.url,
             "--ref", "refs/heads/main", "--commit", repo.initial],
            env={**os.environ, "CISTATE_DATABASE_URL": url,
                 "CISTATE_RABBITMQ_URL": settings.rabbitmq_url,
                 "CISTATE_BUS_PREFIX": settings.bus_prefix},
            check=True, capture_output=True, timeout=60)

        async def ended() -> Any:
            runs = await store.list_runs(RunQuery(repo=repo.url))
            return runs[0] if runs and runs[0].status in ("succeeded", "failed") else None

        run = await wait_until(ended, 120, 0.2, "the probe run to end")
        logs = {step: (await store.step_log(run.id, step))[0][1]
                for step in ("probe-script", "test")}
        assert run.status == "succeeded", (run.steps, logs)

        for step, log in logs.items():
            found = findings(log)
            assert found["uid"] == "65534", f"{step} runs as the sandbox user, not root"
            assert found["etc-write"] == "refused" and found["outside-write"] == "refused"
            assert found["root-only-read"] == "refused", f"{step} read a root-only file"
            assert int(found["processes"]) < 10, "the step sees only its own processes"
            assert b"ROOT-ONLY-MARKER".hex() not in log
            assert leaks(log) == [], f"{step} saw the worker's credentials"
        assert not Path("/etc/cistate-probe").exists()
        assert not outside.exists(), "the step wrote into the worker's workdir"

        events = await store.events(run.id)
        assert leaks(json.dumps([e.data for e in events], default=str)) == []
        async with aiohttp.ClientSession() as http:
            base = f"http://{server.settings.listen}/api/v1"
            answers = []
            for path in (f"/runs/{run.id}", f"/runs/{run.id}/events",
                         f"/runs/{run.id}/steps/probe-script/log",
                         f"/runs/{run.id}/steps/test/log"):
                async with http.get(base + path) as resp:
                    assert resp.status == 200, path
                    answers.append(await resp.text())
        assert leaks("\n".join(answers)) == [], "an API answer carries a credential"
        assert leaks(server.log()) == [], "the service's own log carries a credential"
    finally:
        server.stop()


ESCAPE_C = r"""
/* A Dockerfile RUN that climbs out of buildah's chroot: chroot into a subdirectory while
   the working directory stays outside it, walk up, and chroot to where it lands. */
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    mkdir("/climb", 0755);
    if (chroot("/climb") != 0) perror("chroot");
    for (int i = 0; i < 64; i++) (void)chdir("..");
    if (chroot(".") != 0) perror("chroot .");
    FILE *in = fopen(argv[1], "r");
    if (in) { char buf[256]; size_t n = fread(buf, 1, sizeof buf - 1, in); buf[n] = 0;
              printf("ESCAPE-READ %s\n", buf); fclose(in); }
    else perror(argv[1]);
    FILE *out = fopen(argv[2], "w");
    if (out) { fputs("written from a RUN line\n", out); fclose(out); printf("ESCAPE-WROTE\n"); }
    else perror(argv[2]);
    return 0;
}
"""


@pytest.fixture(scope="session")
def escape_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("escape")
    (folder / "escape.c").write_text(ESCAPE_C)
    done = subprocess.run(["gcc", "-static", "-O2", "-o", str(folder / "escape"),
                           str(folder / "escape.c")], capture_output=True, text=True)
    assert done.returncode == 0, f"cannot build the escape program: {done.stderr}"
    return (folder / "escape").read_bytes()


async def escape_build(make_repo: Any, make_request: Requests, handler_env: Env,
                       escape: bytes, root_only: Path, host_file: Path
                       ) -> tuple[StepFailed | dict[str, Any], str]:
    repo: GitRepo = make_repo()
    (repo.work / "escape").write_bytes(escape)
    (repo.work / "escape").chmod(0o755)
    sha = repo.commit({"Dockerfile": (
        "FROM scratch\nCOPY escape /escape\n"
        f'RUN ["/escape", "{root_only}", "{host_file}"]\n')}, "a hostile Dockerfile")
    setup = await handlers.load("setup")(make_request(repo, sha, "setup"))
    request = make_request(repo, sha, "build", inputs={"setup": setup})
    try:
        outcome: StepFailed | dict[str, Any] = await handlers.load("build")(request)
    except StepFailed as failed:
        outcome = failed
    return outcome, log_text(request)


async def test_a_dockerfile_run_that_escapes_its_chroot_reaches_nothing_of_the_host(
    make_repo: Any, make_request: Requests, handler_env: Env, escape_binary: bytes,
    root_only_file: Path, tmp_path: Path,
) -> None:
    host_file = root_only_file.parent / "written-by-a-build"
    outcome, log = await escape_build(make_repo, make_request, handler_env, escape_binary,
                                      root_only_file, host_file)
    assert "ESCAPE-READ" not in log and "ROOT-ONLY-MARKER" not in log
    assert "ESCAPE-WROTE" not in log
    assert not host_file.exists(), "a RUN line wrote a host file"
    assert isinstance(outcome, dict), f"the build itself still works: {outcome}"


async def test_the_same_escape_without_the_sandbox_reads_and_writes_the_host(
    make_repo: Any, make_request: Requests, handler_env: Env, escape_binary: bytes,
    root_only_file: Path,
) -> None:
    """The control: what the sandbox stops is real (CISTATE_SANDBOX=none runs buildah as
    root, as cistate did before)."""
    handler_env.set(sandbox="none")
    host_file = root_only_file.parent / "written-by-a-build"
    _, log = await escape_build(make_repo, make_request, handler_env, escape_binary,
                                root_only_file, host_file)
    assert "ESCAPE-READ ROOT-ONLY-MARKER" in log
    assert host_file.read_text() == "written from a RUN line\n"
