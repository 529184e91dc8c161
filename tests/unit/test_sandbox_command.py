"""What the launcher starts: the command line and environment of a sandboxed process (the
processes themselves run in tests/integration/test_step_secrets.py and tests/e2e)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from handlers.sandbox import Profile, Sandbox, SandboxSettings, subordinate_ids
from handlers.secrets import Secret

pytestmark = pytest.mark.unit

IDENTITY = {"CISTATE_RUN_ID": "r", "CISTATE_STEP": "s"}


def sandbox(tmp_path: Path, **settings: object) -> Sandbox:
    workdir = tmp_path / "worker"
    box = Sandbox(SandboxSettings(**settings), workdir / "runs" / "r" / "s-1",  # type: ignore[arg-type]
                  identity=IDENTITY, step_env={"MODE": "ci"},
                  secrets=[Secret("TOKEN", "token-value-1"), Secret("KEY", "key-1234", True)],
                  hidden=(workdir,))
    box.prepare()
    return box


def test_the_environment_is_built_from_nothing(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISTATE_DATABASE_URL", "postgresql://u:p@h/d")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-worker")
    box = sandbox(tmp_path, sandbox_uid=4242, sandbox_gid=4243)
    command = box.command(["npm", "test"], cwd=box.work)
    assert set(command.env) == {"PATH", "HOME", "LANG", "CI", *IDENTITY, "MODE", "TOKEN",
                                "KEY_FILE"}
    assert command.env["HOME"] == str(box.home) and command.env["CI"] == "true"
    assert command.env["KEY_FILE"] == str(box.secrets_dir / "KEY")
    assert (box.secrets_dir / "KEY").read_text() == "key-1234"
    assert (box.secrets_dir / "KEY").stat().st_mode & 0o077 == 0


def test_steps_drop_to_the_sandbox_user_with_no_capabilities_and_no_user_namespace(
        tmp_path: Path) -> None:
    box = sandbox(tmp_path, sandbox_uid=4242, sandbox_gid=4243)
    argv = box.command(["npm", "test"], cwd=box.work).argv
    assert argv[0] == "bwrap" and argv[-3:] == ["--", "npm", "test"]
    assert "--unshare-user" not in argv and "--unshare-all" not in argv
    setpriv = argv[argv.index("setpriv"):]
    assert setpriv[:6] == ["setpriv", "--reuid=4242", "--regid=4243", "--clear-groups",
                           "--inh-caps=-all", "--bounding-set=-all"]
    view = " ".join(argv[:argv.index("setpriv")])
    assert "--ro-bind / /" in view and "--tmpfs /tmp" in view and "--unshare-pid" in view
    assert f"--bind {box.work} {box.work}" in view and f"--bind {box.home} {box.home}" in view
    assert f"--ro-bind {box.secrets_dir} {box.secrets_dir}" in view
    covers = [Path(argv[i + 1]) for i, word in enumerate(argv) if word == "--tmpfs"]
    assert any((tmp_path / "worker").is_relative_to(c) and c != Path("/tmp") for c in covers), (
        "the worker's workdir (other attempts) is covered by an empty tmpfs")
    assert str(box.build_dir) not in view, "the builder's folder is not the step's"
    assert "--unshare-net" not in view
    assert box.work.stat().st_uid == 4242, "the workspace belongs to the sandbox user"


def test_network_none_unshares_the_network(tmp_path: Path) -> None:
    box = sandbox(tmp_path)
    offline = Sandbox(box.settings, box.attempt, identity=IDENTITY, network=False)
    assert "--unshare-net" in offline.command(["true"], cwd=offline.work).argv


def test_the_builder_is_root_of_a_user_namespace_on_subordinate_ids(tmp_path: Path) -> None:
    box = sandbox(tmp_path)
    command = box.command(["buildah", "bud", "."], cwd=box.work, profile=Profile.BUILDER)
    argv = command.argv
    uid, gid, count = subordinate_ids()
    unshare = argv[argv.index("unshare"):]
    assert unshare[:9] == ["unshare", "--user", f"--map-users={uid},0,{count}",
                           f"--map-groups={gid},0,{count}", "--setgroups", "allow",
                           "--setuid", "0", "--setgid"]
    assert "setpriv" not in argv
    assert "TOKEN" not in command.env and "MODE" not in command.env, (
        "the builder gets no step env and no secrets")
    assert box.build_dir.stat().st_uid == uid


def test_a_builder_without_the_workdir_neither_sees_nor_takes_the_checkout(
        tmp_path: Path) -> None:
    box = sandbox(tmp_path, sandbox_uid=4242, sandbox_gid=4243)
    (box.work / "source").mkdir()
    (box.work / "source" / "app.js").write_text("x")
    box.command(["npm", "run", "build"], cwd=box.work)  # the step's own
    argv = box.command(["buildah", "pull", "busybox"], cwd=box.build_dir,
                       profile=Profile.BUILDER, with_work=False).argv
    view = " ".join(argv)
    assert str(box.work) not in view, "a pull or push does not see the checkout"
    assert f"--bind {box.build_dir} {box.build_dir}" in view
    # a STEP process may go on running in it meanwhile: it stays the step user's
    assert (box.work / "source" / "app.js").stat().st_uid == 4242
    assert box.build_dir.stat().st_uid == subordinate_ids()[0]


def test_unsandboxed_mode_runs_the_command_itself_with_the_same_environment(
        tmp_path: Path) -> None:
    box = sandbox(tmp_path, sandbox="none")
    command = box.command(["npm", "test"], cwd=box.work)
    assert command.argv == ["npm", "test"] and not command.sandboxed
    assert "TOKEN" in command.env and "CISTATE_DATABASE_URL" not in command.env


def test_read_only_binds_reach_a_step_below_the_hidden_workdir_and_stay_the_workers(
        tmp_path: Path) -> None:
    box = sandbox(tmp_path, sandbox_uid=4242, sandbox_gid=4243)
    objects = tmp_path / "worker" / "mirrors" / "m.git" / "objects"
    missing = tmp_path / "worker" / "mirrors" / "none.git" / "objects"
    bound = Sandbox(box.settings, box.attempt, identity=IDENTITY, hidden=box.hidden,
                    read_only_binds=(objects, missing))
    objects.mkdir(parents=True)
    (objects / "pack").mkdir()
    argv = bound.command(["git", "log"], cwd=bound.work).argv
    view = argv[:argv.index("setpriv")]
    text = " ".join(view)
    assert f"--ro-bind {objects} {objects}" in text
    assert str(missing) not in text, "a mirror not made yet is left out"
    cover = next(i for i, word in enumerate(view[:-1]) if word == "--tmpfs"
                 and (tmp_path / "worker").is_relative_to(view[i + 1])
                 and view[i + 1] != "/tmp")
    assert cover < view.index(str(objects)), "bound after the workdir is covered"
    assert f"--bind {objects}" not in text
    assert (objects / "pack").stat().st_uid != 4242, "the mirror is never given to the step"
    builder = bound.command(["buildah", "bud", "."], cwd=bound.work, profile=Profile.BUILDER)
    assert str(objects) not in " ".join(builder.argv), "the builder sees no mirror"


def test_a_shared_cache_folder_is_bound_writable_and_only_the_folder_is_given_over(
        tmp_path: Path) -> None:
    box = sandbox(tmp_path, sandbox_uid=4242, sandbox_gid=4243)
    shared = tmp_path / "worker" / "cache" / "npm" / "abc" / "data"
    (shared / "_cacache").mkdir(parents=True)
    (shared / "_cacache" / "index").write_text("{}")
    before = (shared / "_cacache" / "index").stat().st_uid
    argv = box.command(["npm", "ci"], cwd=box.work, shared=[shared]).argv
    view = " ".join(argv[:argv.index("setpriv")])
    assert f"--bind {shared} {shared}" in view
    bind = next(i for i, word in enumerate(argv)
                if word == "--bind" and argv[i + 1] == str(shared))
    hides = [i for i, word in enumerate(argv) if word == "--tmpfs"
             and (tmp_path / "worker").is_relative_to(argv[i + 1])]
    assert hides and bind > max(hides), "bound after the tmpfs that hides the workdir"
    assert shared.stat().st_uid == 4242
    assert (shared / "_cacache" / "index").stat().st_uid == before, "its contents not walked"
    assert str(shared) not in " ".join(box.command(["npm", "test"], cwd=box.work).argv)


def test_a_hard_link_in_the_workspace_is_never_given_to_the_sandbox_user(
        tmp_path: Path) -> None:
    box = sandbox(tmp_path, sandbox_uid=4242, sandbox_gid=4243)
    cached = tmp_path / "cached.js"  # a file of node_modules in the worker's cache
    cached.write_text("module.exports = 1\n")
    cached.chmod(0o444)
    (box.work / "node_modules").mkdir()
    os.link(cached, box.work / "node_modules" / "index.js")
    (box.work / "own.js").write_text("")
    box.command(["npm", "test"], cwd=box.work)
    assert cached.stat().st_uid == os.getuid(), "the cache's file stays the worker's"
    assert (box.work / "node_modules").stat().st_uid == 4242
    assert (box.work / "own.js").stat().st_uid == 4242
