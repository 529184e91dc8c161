"""The step sandbox: how a process that runs the pushed repository's code is started.

Whoever can push writes the repo's scripts, npm lifecycle hooks, Dockerfile `RUN` lines and
chart, so every such process goes through `Sandbox.command` (called by
`handlers.process.run_sandboxed`, the one launcher). Two profiles:

- `STEP` (scripts, npm, helm on the repo's chart): bubblewrap, started as root, builds new
  PID, IPC, UTS and mount namespaces (and a network namespace for `network: none`) with the
  host read-only, a private /tmp, and only the attempt's workspace and HOME writable; the
  worker's own folders, the secrets directory and whatever `CISTATE_SANDBOX_HIDE` names are
  covered by empty tmpfs, except `read_only_binds` (the repo mirror's objects a checkout
  borrows), bound back read-only. `setpriv` then drops to the sandbox uid/gid with no
  capabilities before the command runs. (No user namespace: bwrap's `--unshare-user --uid
  N`, started by root, would map the step onto outside root.)
- `BUILDER` (buildah): the builder needs to be root to unpack layers and chroot into them,
  so it is root of its own user namespace whose ids map onto the worker user's subordinate
  ids (/etc/subuid, /etc/subgid); a `RUN` that climbs out of its chroot lands in the same
  read-only, private view and owns nothing of the host.

The environment is built from nothing (PATH, HOME, LANG, CI, the run's identity, the step's
`env:` and declared secrets) and the launcher itself starts with it, so bwrap's PID 1 holds
nothing more (its /proc/1/environ is readable inside).

`CISTATE_SANDBOX=none` runs the same commands directly, as the worker's user, for a trusted
single-user setup; the environment is still built from nothing.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from handlers.base import StepFailed
from handlers.secrets import Secret

# The PATH a sandboxed process gets when CISTATE_SANDBOX_PATH is not set: the system's. The
# worker's own may lead into its user's home (pyenv shims and the like) that the sandbox
# user cannot use; cistate's own tools (helm, buildah) are started by their full path.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_LANG = "C.UTF-8"
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108 - mount points, not files
# the builder's own container state (signatures of pulled images, ...), never the host's
BUILDER_PRIVATE = (Path("/var/lib/containers"), Path("/run/containers"))


class Profile(StrEnum):
    STEP = "step"
    BUILDER = "builder"


class SandboxSettings(BaseSettings):
    """Worker-wide sandbox settings (the environment only: a pipeline cannot loosen them)."""

    model_config = SettingsConfigDict(env_prefix="CISTATE_", extra="ignore",
                                      use_attribute_docstrings=True)

    sandbox: Literal["bwrap", "none"] = "bwrap"
    """bwrap: steps run in the step sandbox; none: unsandboxed (a trusted single-user setup only)"""
    sandbox_uid: int = Field(default=65534, ge=1, le=2**31)
    """The unprivileged uid a step's processes run as"""
    sandbox_gid: int = Field(default=65534, ge=1, le=2**31)
    """The unprivileged gid a step's processes run as"""
    sandbox_bwrap: str = "bwrap"  # the bubblewrap executable
    """The bubblewrap executable"""
    sandbox_path: str = DEFAULT_PATH  # PATH inside
    """PATH inside the sandbox (where npm and node are found)"""
    # more host paths no step may see (folders get an empty tmpfs, files /dev/null)
    sandbox_hide: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """More host paths (`:`-separated) no step may see; the workdir and the secrets directory
    always are hidden
    """
    secrets_dir: Path | None = None
    """A folder with one file per secret (a mounted Kubernetes Secret); else CISTATE_SECRET_<NAME>
    variables
    """
    secret_scopes: str | None = None  # JSON; see handlers.secrets.load_scopes
    """Which repos may use which secret, as JSON: {"NPM_TOKEN": ["https://git.example.com/acme/*"]}
    """
    secret_scopes_file: Path | None = None
    """The same scopes in a YAML or JSON file"""

    @field_validator("sandbox_hide", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [Path(part) for part in value.split(":") if part.strip()]
        return value

    @field_validator("secrets_dir", "secret_scopes_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def enabled(self) -> bool:
        return self.sandbox != "none"


@dataclass(frozen=True)
class Command:
    """What to start: argv, its environment and the directory to start it in."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    sandboxed: bool = False


@dataclass(frozen=True)
class Sandbox:
    """One attempt's sandbox. `attempt` is the attempt's own folder, removed after it:
    `work/` (the step's workdir), `home/` (HOME), `secrets/` (secrets declared as files) and
    `build/` (the image builder's storage and HOME, which no STEP process can see)."""

    settings: SandboxSettings
    attempt: Path
    identity: Mapping[str, str]  # CISTATE_RUN_ID, CISTATE_REPO, ... of the attempt
    step_env: Mapping[str, str] = field(default_factory=dict)
    secrets: Sequence[Secret] = ()
    network: bool = True
    hidden: Sequence[Path] = ()  # the worker's folders: its workdir root, ...
    # host folders a STEP process may read and never write, at the same path, even below a
    # hidden one (the repo mirror's objects, which the checkout borrows); never chowned, and
    # left out while they do not exist
    read_only_binds: Sequence[Path] = ()

    @property
    def work(self) -> Path:
        return self.attempt / "work"

    @property
    def home(self) -> Path:
        return self.attempt / "home"

    @property
    def secrets_dir(self) -> Path:
        return self.attempt / "secrets"

    @property
    def build_dir(self) -> Path:
        return self.attempt / "build"

    def prepare(self) -> None:
        """Make the attempt's folders and write the secrets declared as files."""
        for folder in (self.work, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        files = [secret for secret in self.secrets if secret.as_file]
        if files:
            self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
            for secret in files:
                path = self.secrets_dir / secret.name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(secret.value)

    def environment(self, profile: Profile, extra: Mapping[str, str] | None = None
                    ) -> dict[str, str]:
        """The whole environment of a sandboxed process, built from nothing."""
        home = self.build_dir / "home" if profile is Profile.BUILDER else self.home
        env = {
            "PATH": self.settings.sandbox_path,
            "HOME": str(home),
            "LANG": DEFAULT_LANG,
            "CI": "true",
            **self.identity,
        }
        if profile is Profile.BUILDER:
            # the builder runs no repo code of its own: no step env, no secrets
            env["TMPDIR"] = str(self.build_dir / "tmp")
            return {**env, **(extra or {})}
        env.update(self.step_env)
        for secret in self.secrets:
            env[secret.variable] = (
                str(self.secrets_dir / secret.name) if secret.as_file else secret.value)
        return {**env, **(extra or {})}

    def command(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        profile: Profile = Profile.STEP,
        env: Mapping[str, str] | None = None,
        network: bool | None = None,
        status_fd: int | None = None,
        shared: Sequence[Path] = (),
        with_work: bool = True,
    ) -> Command:
        """argv wrapped in the launcher, with the environment it must be started with.

        Without `with_work` a BUILDER process does not see the step's workdir (the checkout)
        at all: pulls and pushes need only the image store, and their launch then neither
        walks the checkout nor changes its owner, so they may run beside a STEP process.

        `network` overrides the step's setting (the builder pulls and pushes images). The
        bwrap that starts the command itself reports on `status_fd` once it does: a sandbox
        that could not start is told apart from a command that failed. `shared` are cache
        folders of the worker (handlers.cache) bound writable too; only the folder itself is
        given to the sandbox's owner, never what is in it (an image store holds files of
        many ids, and walking a big cache at every command would cost its size).
        """
        environment = self.environment(profile, env)
        if profile is Profile.BUILDER:
            (self.build_dir / "tmp").mkdir(parents=True, exist_ok=True)  # its TMPDIR
        if not self.settings.enabled:
            return Command(list(argv), environment, cwd)
        owner = self._owner(profile)
        writable = self._writable(profile)
        if profile is Profile.BUILDER and not with_work:
            writable.remove(self.work)
        read_only = []
        if profile is not Profile.BUILDER and any(s.as_file for s in self.secrets):
            read_only.append(self.secrets_dir)
        for path in [*writable, *read_only]:
            path.mkdir(parents=True, exist_ok=True)
            _own_tree(path, *owner)
        if profile is Profile.STEP:
            read_only += [path for path in self.read_only_binds if path.is_dir()]
        for path in shared:
            path.mkdir(parents=True, exist_ok=True)
            _own(str(path), *owner)
        view = self._view([*writable, *shared], read_only,
                          network=self.network if network is None else network,
                          scratch=PRIVATE_TMP + (
                              BUILDER_PRIVATE if profile is Profile.BUILDER else ()))
        status = ["--json-status-fd", str(status_fd)] if status_fd is not None else []
        if profile is Profile.STEP:
            uid, gid = owner
            wrapped = [self.settings.sandbox_bwrap, *view, *status, "--chdir", str(cwd), "--",
                       "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                       "--inh-caps=-all", "--bounding-set=-all"]
        else:
            # The outer bwrap (root) makes the view and may map ids; `unshare` enters the
            # builder's user namespace; the inner bwrap gives it a /dev of its own, which
            # buildah must be able to remount.
            uid_base, gid_base, count = subordinate_ids()
            wrapped = [self.settings.sandbox_bwrap, *view, "--cap-add", "ALL",
                       "--hostname", "cistate-build", "--",
                       "unshare", "--user", f"--map-users={uid_base},0,{count}",
                       f"--map-groups={gid_base},0,{count}", "--setgroups", "allow",
                       "--setuid", "0", "--setgid", "0", "--",
                       self.settings.sandbox_bwrap, "--bind", "/", "/", "--dev", "/dev",
                       "--die-with-parent", *status, "--chdir", str(cwd)]
        return Command([*wrapped, "--", *argv], environment, Path("/"), sandboxed=True)

    def _owner(self, profile: Profile) -> tuple[int, int]:
        if profile is Profile.STEP:
            return self.settings.sandbox_uid, self.settings.sandbox_gid
        uid_base, gid_base, _ = subordinate_ids()
        return uid_base, gid_base

    def _writable(self, profile: Profile) -> list[Path]:
        if profile is Profile.BUILDER:
            return [self.work, self.build_dir]
        return [self.work, self.home]

    def _view(self, writable: Sequence[Path], read_only: Sequence[Path], *,
              network: bool, scratch: Sequence[Path]) -> list[str]:
        """bwrap's arguments for what the sandbox sees and which namespaces it gets."""
        args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        made: set[Path] = set()
        for folder in scratch:  # the sandbox's own, empty, never the host's
            if not folder.is_dir():
                continue  # the host has none to hide; the read-only root cannot make one
            args += ["--perms", "1777", "--tmpfs", str(folder)]
            made.add(folder)
        for hidden in [*self.hidden, *self.settings.sandbox_hide,
                       *([self.settings.secrets_dir] if self.settings.secrets_dir else [])]:
            args += _hide(hidden, made)
        for path, flag in [*((p, "--bind") for p in writable),
                           *((p, "--ro-bind") for p in read_only)]:
            closed = _first_closed_parent(path)
            if closed is not None and not any(closed.is_relative_to(m) for m in made):
                args += ["--perms", "0755", "--tmpfs", str(closed)]
                made.add(closed)
            args += _parents(path, made)
            args += [flag, str(path), str(path)]
            made.add(path)
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        if not network:
            args.append("--unshare-net")
        args += ["--die-with-parent", "--new-session"]
        return args


def _hide(path: Path, made: set[Path]) -> list[str]:
    """Cover `path` (and, if the sandbox user could not walk into one of its parents, that
    parent instead: nothing below it is the step's business) with something empty."""
    if not path.exists():
        return []
    target = _first_closed_parent(path) or path
    if target.is_dir():
        made.add(target)
        return ["--perms", "0755", "--tmpfs", str(target)]
    return ["--ro-bind", "/dev/null", str(target)]


def _first_closed_parent(path: Path) -> Path | None:
    """The highest folder on the way to `path` that other users may not enter."""
    for parent in reversed(path.parents):
        if parent == Path("/"):
            continue
        try:
            mode = parent.stat().st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return parent
    return None


def _parents(path: Path, made: set[Path]) -> list[str]:
    """`--dir` for each folder between a tmpfs made earlier and `path`, so that the sandbox
    user can walk to it (bwrap would make them root-only)."""
    chain = []
    for parent in path.parents:
        if parent in made:
            break
        chain.append(parent)
    else:
        return []  # not below anything the sandbox made: the host's folders are the way
    args = []
    for parent in reversed(chain):
        args += ["--perms", "0755", "--dir", str(parent)]
        made.add(parent)
    return args


def _own_tree(root: Path, uid: int, gid: int) -> None:
    """Give `root` and everything below it to uid:gid (links themselves, never followed)."""
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            _own(os.path.join(folder, name), uid, gid)
    _own(str(root), uid, gid)


def _own(path: str, uid: int, gid: int) -> None:
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1:
        # a hard link: node_modules restored from the worker's cache (handlers.node_modules),
        # read-only files the cache shares; given to the step, the step could write the cache
        return
    if info.st_uid != uid or info.st_gid != gid:
        os.lchown(path, uid, gid)


def subordinate_ids() -> tuple[int, int, int]:
    """(first uid, first gid, count) of the worker user's subordinate ids: the image
    builder's user namespace maps its root and every other id onto them."""
    user = pwd.getpwuid(os.getuid()).pw_name
    ranges = [_subid_range(path, user, os.getuid()) for path in SUBID_FILES]
    if ranges[0] is None or ranges[1] is None:
        raise StepFailed(
            f"image builds run in a user namespace mapped onto the subordinate ids of the "
            f"worker's user ({user}), and /etc/subuid or /etc/subgid has no range for it: add "
            f"a line `{user}:100000:65536` to both (scripts/setup.sh does this), or set "
            "CISTATE_SANDBOX=none on a trusted single-user worker",
            retryable=False,
        )
    (uid_base, uid_count), (gid_base, gid_count) = ranges[0], ranges[1]
    return uid_base, gid_base, min(uid_count, gid_count)


def _subid_range(path: Path, user: str, uid: int) -> tuple[int, int] | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)) and all(
                p.isdigit() for p in parts[1:]):
            return int(parts[1]), int(parts[2])
    return None
