"""Image builds without a daemon: buildah `pull`, `bud` and `push` in the builder sandbox.

A Dockerfile's `RUN` lines are the repo's code. buildah runs as root of a user namespace of
its own (`handlers.sandbox`, profile BUILDER), so a `RUN` that climbs out of its chroot finds
a read-only host it owns nothing of. Each build has its own image store in the attempt's
folder (a store shared between builds would let one repo's build plant layers in another's).

Registry credentials never meet the Dockerfile: the base images are pulled first (their
names read from the `FROM` lines), with an auth file that exists only for that pull; the
build then runs with no credentials at all; the push gets the auth file again. The file is
written into the builder's private folder (mode 0600), never on a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from handlers import cache, process
from handlers.base import StepFailed, StepLog, StepRequest
from handlers.git import redact
from handlers.sandbox import Profile, Sandbox, SandboxSettings
from handlers.settings import HandlerSettings, docker_auth

AUTO_DRIVER = "auto"
PREFERRED_DRIVER = "overlay"  # what `auto` tries: layers are mounts, not copies
FALLBACK_DRIVER = "vfs"  # works on any kernel and filesystem
WARM_UP = f"warm-up-{os.getpid()}"  # the attempt folder of a worker's warm-up
# what `auto` found, per builder executable, sandbox and filesystem: a worker tries once
_drivers: dict[tuple[str, ...], str] = {}


class Buildah:
    def __init__(self, settings: HandlerSettings, request: StepRequest) -> None:
        self.settings = settings
        self.request = request
        self.sandbox = request.sandbox
        self.store = self.sandbox.build_dir / "storage"
        # the storage driver the builds use (`resolve_driver`); `auto` until resolved
        self.driver = settings.builder_storage_driver
        # the repo's own store in the worker's caches, kept between builds (`--layers`)
        self.cached: cache.Entry | None = None

    async def resolve_driver(self) -> str:
        """The storage driver: CISTATE_BUILDER_STORAGE_DRIVER, or what `auto` finds
        (`find_driver`)."""
        if self.driver == AUTO_DRIVER:
            self.driver = await find_driver(self.settings, self.sandbox,
                                            self.request.cache_root, self.request.log)
        return self.driver

    @contextlib.asynccontextmanager
    async def layer_cache(self) -> AsyncIterator[None]:
        """Build in the repo's image store of the worker's caches (held against eviction
        meanwhile), so that `bud --layers` reuses the layers of earlier builds; evict after.
        A fork's pull request builds in a store of its own (it would write the layers of its
        `RUN` lines into the store the next trusted build reuses), as does a trusted worker
        that names a store (CISTATE_BUILDER_ROOT with CISTATE_SANDBOX=none)."""
        await self.resolve_driver()
        root = self.request.cache_root
        own_store = not self.sandbox.settings.enabled and self.settings.builder_root
        if root is None or self.request.untrusted or own_store:
            yield
            return
        # a store of another storage driver or buildah is not this one's to open
        tool = await asyncio.to_thread(
            cache.executables, shlex.split(self.settings.builder_command)[:1],
            self.sandbox.settings.sandbox_path)
        key = cache.digest("buildah", self.driver, *(tool or ()))
        entry = await asyncio.to_thread(
            cache.ensure, root, "buildah", cache.digest(key, self.request.repo),
            {"key": key, "repo": redact(self.request.repo), "branch": ""})
        with cache.using(entry) as present:
            if present:
                self.cached, self.store = entry, entry.data
            try:
                yield
            finally:
                self.cached, self.store = None, self.sandbox.build_dir / "storage"
        await asyncio.to_thread(cache.evict, root, cache.CacheSettings().cache_max)

    def _base(self) -> list[str]:
        argv = shlex.split(self.settings.builder_command)
        if self.sandbox.settings.enabled or self.cached is not None:
            root, runroot = str(self.store / "root"), str(self.store / "run")
        else:  # a trusted worker may keep one store for every build
            root = self.settings.builder_root or str(self.store / "root")
            runroot = self.settings.builder_runroot or str(self.store / "run")
        argv += ["--root", root, "--runroot", runroot]
        assert self.driver != AUTO_DRIVER, "resolve_driver() before the first command"
        if self.driver:
            argv += ["--storage-driver", self.driver]
        return argv

    def _tls(self) -> list[str]:
        return ["--tls-verify=false"] if self.settings.registry_insecure else []

    def _retries(self) -> list[str]:
        return ["--retry", str(max(self.settings.registry_retries - 1, 0)),
                "--retry-delay", f"{max(self.settings.registry_backoff, 0.1)}s"]

    async def _run(self, args: list[str], *, cwd: Path, what: str, retryable: bool,
                   network: bool | None = None, with_work: bool = True) -> process.Completed:
        return await process.run_sandboxed(
            [*self._base(), *args], sandbox=self.sandbox, profile=Profile.BUILDER,
            cwd=cwd, log=self.request.log, what=what, retryable=retryable, network=network,
            shared=[self.store] if self.cached is not None else [], with_work=with_work)

    async def bases(self, containerfile: Path) -> list[str]:
        """The base images the `FROM` lines name."""
        text = await asyncio.to_thread(_read_no_links, containerfile)
        return base_images(text, self.settings.build_args)

    async def pull(self, images: Iterable[str], auths: Mapping[str, Any]) -> None:
        """Pull base images, with credentials, before the build."""
        for image in images:
            with self._authfile(auths) as authfile:
                await self._run(
                    ["pull", "--quiet", *self._tls(), *self._retries(),
                     *(["--authfile", str(authfile)] if authfile else []), image],
                    cwd=self.sandbox.build_dir, what=f"pulling the base image {image}",
                    retryable=True, network=True, with_work=False)

    async def build(
        self,
        *,
        context: Path,
        containerfile: Path,
        image: str,
        labels: Mapping[str, str],
        build_args: Mapping[str, str],
    ) -> None:
        """`buildah bud`, with no credentials: the base images are in the store already
        (or pulled anonymously when a `FROM` line is built from ARGs)."""
        argv = [
            "bud",
            "--isolation",
            self.settings.builder_isolation,
            "--format",
            self.settings.image_format,
            "--pull=false",
            *(["--layers"] if self.cached is not None else []),
            *self._tls(),
            "-f",
            str(containerfile),
            "-t",
            image,
        ]
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        argv.append(str(context))
        await self._run(argv, cwd=context, what=f"the image build ({containerfile.name})",
                        retryable=False)

    async def push(self, *, image: str, auths: Mapping[str, Any]) -> str:
        """Push `image` to docker://image; the digest buildah wrote."""
        digestfile = self.sandbox.build_dir / "digest"
        with self._authfile(auths) as authfile:
            await self._run(
                ["push", *self._tls(), *(["--authfile", str(authfile)] if authfile else []),
                 *self._retries(), "--digestfile", str(digestfile), image, f"docker://{image}"],
                cwd=self.sandbox.build_dir, what=f"pushing {image}", retryable=True,
                network=True, with_work=False)
        text = await asyncio.to_thread(digestfile.read_text, encoding="utf-8")
        return text.strip()

    async def remove(self, image: str) -> None:
        """Drop the local copy from a shared store (a build's own store goes with its
        attempt); a failure here is not the step's."""
        if self.cached is not None:
            return  # the layers are the cache; CISTATE_CACHE_MAX bounds the store
        if self.sandbox.settings.enabled or not self.settings.builder_root:
            return
        await process.run(
            [*self._base(), "rmi", "-f", image],
            cwd=self.request.workdir,
            log=self.request.log,
            check=False,
        )

    @contextlib.contextmanager
    def _authfile(self, auths: Mapping[str, Any]) -> Iterator[Path | None]:
        """A docker config.json with `auths`, in the builder's private folder, for the one
        command that needs it; None without credentials."""
        if not auths:
            yield None
            return
        folder = self.sandbox.build_dir / "auth"
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        path = folder / "config.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"auths": dict(auths)}, out)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


async def find_driver(settings: HandlerSettings, sandbox: Sandbox, cache_root: Path | None,
                      log: StepLog) -> str:
    """What `auto` builds on: overlay when it mounts in this worker's builder sandbox (a
    kernel that allows overlay in a user namespace, stores not on overlayfs), else vfs,
    which copies every layer in full. Tried once per worker, builder and filesystem."""
    command = shlex.split(settings.builder_command)[:1]
    stamp = await asyncio.to_thread(cache.executables, command, sandbox.settings.sandbox_path)
    # the filesystems the stores are on: overlay refuses one on overlayfs
    devices = [_device(path) for path in (sandbox.build_dir, cache_root) if path]
    key = (*(stamp or command), f"sandboxed={sandbox.settings.enabled}", *map(str, devices))
    found = _drivers.get(key)
    if found is None:
        found = await _probe(settings, sandbox, log)
        if stamp is not None:  # a builder not found now may be installed later
            _drivers[key] = found
    if found == PREFERRED_DRIVER:
        log.line(f"image store: {PREFERRED_DRIVER} (CISTATE_BUILDER_STORAGE_DRIVER=auto; it "
                 "mounts in the builder sandbox)")
    else:
        log.line(f"image store: {FALLBACK_DRIVER}, slower: {PREFERRED_DRIVER} does not work "
                 f"in the builder sandbox here; set CISTATE_BUILDER_STORAGE_DRIVER="
                 f"{FALLBACK_DRIVER} to skip this check")
    return found


async def _probe(settings: HandlerSettings, sandbox: Sandbox, log: StepLog) -> str:
    store = sandbox.build_dir / "driver-probe"
    argv = [*shlex.split(settings.builder_command),
            "--root", str(store / "root"), "--runroot", str(store / "run"),
            "--storage-driver", PREFERRED_DRIVER, "info",
            "--format", "{{println .store.GraphDriverName}}"]
    try:
        done = await process.run_sandboxed(
            argv, sandbox=sandbox, profile=Profile.BUILDER, cwd=sandbox.build_dir, log=log,
            what=f"checking whether {PREFERRED_DRIVER} works here", check=False,
            network=False, with_work=False)
    finally:
        await asyncio.to_thread(shutil.rmtree, store, ignore_errors=True)
    works = done.exit_code == 0 and done.tail.strip().endswith(PREFERRED_DRIVER)
    return PREFERRED_DRIVER if works else FALLBACK_DRIVER


async def warm_up(workdir: Path, sandbox_settings: SandboxSettings) -> None:
    """At a worker's start: find the storage driver, so that its first build does not."""
    settings = HandlerSettings()
    if settings.builder_storage_driver != AUTO_DRIVER:
        return
    sandbox = Sandbox(settings=sandbox_settings, attempt=workdir / "runs" / WARM_UP,
                      identity={}, hidden=(workdir,))
    try:
        sandbox.prepare()
        await find_driver(settings, sandbox, workdir / "cache", StepLog())
    finally:
        await asyncio.to_thread(shutil.rmtree, sandbox.attempt, ignore_errors=True)


def _device(path: Path) -> int:
    """The filesystem `path` is on, or will be on when made."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def base_images(containerfile: str, build_args: Mapping[str, str] | None = None) -> list[str]:
    """The images `FROM` lines build on, in order; not `scratch`, not earlier stages. ARGs
    declared before the first FROM are filled in (build args over their defaults); a name
    that still holds a `$` is left to buildah."""
    images: list[str] = []
    stages: set[str] = set()
    args: dict[str, str] = {}
    seen_from = False
    for line in _instructions(containerfile):
        words = line.split()
        if not words:
            continue
        keyword = words[0].upper()
        if keyword == "ARG" and not seen_from and len(words) >= 2:
            name, _, default = words[1].partition("=")
            args[name] = (build_args or {}).get(name, default.strip("\"'"))
            continue
        if keyword != "FROM":
            continue
        seen_from = True
        operands = [word for word in words[1:] if not word.startswith("--")]
        if not operands:
            continue
        image = _ARG_REFERENCE.sub(lambda m: args.get(m.group(1) or m.group(2), m.group(0)),
                                   operands[0])
        if len(operands) >= 3 and operands[1].upper() == "AS":
            stages.add(operands[2].lower())
        if image.lower() == "scratch" or image.lower() in stages or "$" in image:
            continue
        if image not in images:
            images.append(image)
    return images


_ARG_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _read_no_links(path: Path) -> str:
    """The Containerfile's text; a link (the repo's code may have made one) is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StepFailed(f"cannot read {path.name} ({exc.strerror}); it must be a plain file "
                         "in the repo, not a link", retryable=False) from None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _instructions(text: str) -> Iterator[str]:
    """Dockerfile lines with continuations joined and comments dropped."""
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        yield current + line
        current = ""
    if current:
        yield current


def registry_auths(settings: HandlerSettings, hosts: Iterable[str]) -> dict[str, Any]:
    """`auths` of a docker config.json: the entries of CISTATE_REGISTRY_AUTH_FILE (base
    image registries) and the credentials of `hosts`."""
    auths: dict[str, Any] = {}
    if settings.registry_auth_file is not None:
        try:
            loaded = json.loads(settings.registry_auth_file.read_text(encoding="utf-8"))
            auths.update(loaded.get("auths", {}) if isinstance(loaded, dict) else {})
        except (OSError, ValueError):
            raise StepFailed(
                f"cannot read the registry auth file {settings.registry_auth_file}; "
                "CISTATE_REGISTRY_AUTH_FILE must name a docker config.json",
                retryable=False,
            ) from None
    for host in hosts:
        credentials = settings.credentials_for(host)
        if credentials is not None:
            auths[host] = docker_auth(credentials.username, credentials.password)
    return auths
