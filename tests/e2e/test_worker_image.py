"""End to end: cistate's own image (the repo's Containerfile, the one compose.yaml and
chart/cistate run) holds every tool the default pipeline calls, and the worker's own sandbox
starts in it.

The image is built for real by tests/infra/worker-image.sh: `buildah bud` of the Containerfile
FROM a Debian bookworm minbase made by debootstrap (no public registry is reachable here; the
Containerfile's default base is debian:bookworm-slim). The first build on a machine takes about
4 minutes (debootstrap ~1.5, the image's apt and pip installs ~2.5), a rebuild seconds when
nothing changed and about 1 minute when cistate's sources did (bench/worker_image.py measures
them). Deselect with `-m "not worker_image"`.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import INFRA, infra

pytestmark = [pytest.mark.e2e, pytest.mark.worker_image]

SCRIPT = INFRA / "worker-image.sh"


def buildah(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """buildah on the image store of tests/infra/worker-image.sh."""
    return subprocess.run(["bash", str(SCRIPT), "buildah", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    """A working container of the freshly built image."""
    image = infra("worker-image.sh", "build", timeout=1800)
    made = buildah("from", "--pull=never", image)
    if made.returncode != 0:
        pytest.fail(f"buildah from {image} failed: {made.stderr}", pytrace=False)
    name = made.stdout.strip().splitlines()[-1]
    try:
        yield name
    finally:
        buildah("rm", name)


def run_in(container: str, *argv: str) -> str:
    """`argv` in the image as its own user and environment (stdout and stderr)."""
    done = buildah("run", "--isolation", "chroot", container, "--", *argv)
    assert done.returncode == 0, f"{' '.join(argv)} failed in the image: {done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.parametrize(("argv", "answer"), [
    (["node", "--version"], r"^v18\.20\.\d+$"),  # test, build: npm ci, npm test, npm run build
    (["npm", "--version"], r"^9\.2\.\d+$"),
    (["git", "--version"], r"^git version 2\.39\."),  # setup, tag-release, gitops
    (["buildah", "--version"], r"^buildah version 1\.28\."),  # build
    (["bwrap", "--version"], r"^bubblewrap 0\.8\."),  # the step sandbox
    (["setpriv", "--version"], r"util-linux"),
    (["unshare", "--version"], r"util-linux"),
    (["sh", "-c", "command -v newuidmap && command -v newgidmap"], r"^/usr/bin/newgidmap$"),
    (["helm", "version"], r'Version:"v4\.1\.'),  # deploy, helm-release
    (["cistate", "--help"], r"usage: cistate"),
])
def test_every_tool_of_the_default_pipeline_answers_in_the_image(
    container: str, argv: list[str], answer: str
) -> None:
    assert re.search(answer, run_in(container, *argv).strip(), re.MULTILINE)


def test_the_image_runs_cistate_from_its_sources_as_its_own_user(container: str) -> None:
    assert run_in(container, "id", "-un").strip() == "cistate"
    found = run_in(container, "python3", "-c",
                   "import cistate, handlers; from cistate.adapters.cli.main import SCHEMA_DIR; "
                   "print(cistate.__file__, handlers.__file__, SCHEMA_DIR.is_dir())")
    assert found.split() == ["/app/cistate/__init__.py", "/app/handlers/__init__.py", "True"]
    subids = run_in(container, "cat", "/etc/subuid", "/etc/subgid").split()
    assert subids.count("root:100000:65536") == 2


SANDBOXED = """
import json, os, subprocess, tempfile
from pathlib import Path
from handlers.sandbox import Profile, Sandbox, SandboxSettings

attempt = Path(tempfile.mkdtemp(prefix="attempt-", dir="/var/tmp"))
os.chmod(attempt, 0o755)
box = Sandbox(settings=SandboxSettings(), attempt=attempt, identity={})
box.prepare()
(box.work / "hello.txt").write_text("hello")
(box.work / "Containerfile").write_text("FROM scratch\\nCOPY hello.txt /hello.txt\\n")
store = " ".join(["--root", str(box.build_dir / "root"), "--runroot",
                  str(box.build_dir / "run"), "--storage-driver", "vfs"])
steps = {
    "step": (Profile.STEP, "id -u && node --version && npm --version"),
    "builder": (Profile.BUILDER,
                f"id -u && buildah {store} bud --isolation chroot -q -t hello -f Containerfile "
                f". >/dev/null && buildah {store} images --format '{{{{.Name}}}}'"),
}
results = {}
for name, (profile, script) in steps.items():
    cmd = box.command(["sh", "-c", script], cwd=box.work, profile=profile)
    done = subprocess.run(cmd.argv, env=cmd.env, cwd=cmd.cwd, capture_output=True, text=True)
    results[name] = {"rc": done.returncode, "out": done.stdout.split(), "err": done.stderr[-800:]}
print(json.dumps(results))
"""


def test_the_workers_sandbox_starts_steps_and_image_builds_in_the_image(
    container: str, tmp_path: Path
) -> None:
    """handlers.sandbox inside the image, as a worker runs it (root, in a container that may
    make namespaces: bwrap here plays the container runtime): npm as the sandbox user, and a
    real `buildah bud` as root of a user namespace mapped onto root's subordinate ids."""
    script = tmp_path / "sandboxed.py"
    script.write_text(SANDBOXED)
    mounted = buildah("mount", container)
    assert mounted.returncode == 0, mounted.stderr
    rootfs = mounted.stdout.strip().splitlines()[-1]
    try:
        done = subprocess.run(
            ["bwrap", "--bind", rootfs, "/", "--dev", "/dev", "--proc", "/proc",
             "--tmpfs", "/tmp", "--ro-bind", str(script), "/tmp/sandboxed.py",
             "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
             "--cap-add", "ALL", "--uid", "0", "--gid", "0", "--chdir", "/app",
             "--", "/opt/cistate/bin/python3", "/tmp/sandboxed.py"],
            env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    finally:
        buildah("umount", container)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["step"]["rc"] == 0, results["step"]["err"]
    assert results["step"]["out"][0] == "65534", "steps run as the sandbox user"
    assert results["step"]["out"][1].startswith("v18.")
    assert results["builder"]["rc"] == 0, results["builder"]["err"]
    assert results["builder"]["out"] == ["0", "localhost/hello"]
