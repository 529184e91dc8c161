"""`uses: build`: build the app, build its image, push it, record url and digest.

Like the Cloud-Native Toolkit's `build` task: when package.json has a `build` script, install
the dependencies (`npm ci` / `npm install`) and run `npm run build --if-present`; then build
the image from the repo's `Dockerfile` (else `Containerfile`; `with: dockerfile` names
another) with the builder (`builder: buildah`, its executable `builder_command`), push it to
setup's `image_url` and read its manifest digest back from the registry.

The build context is the repo's: a symbolic link in it that leads out of the checkout
(committed, or made by the build script) fails the step, naming it, before buildah runs.

Idempotent: when the registry already has `image_url` built from this commit (the image's
`org.opencontainers.image.revision` label), it is reused, not rebuilt (`with: rebuild: true`
forces a build). The registry is checked first, so a registry that is down fails the step
(retryable, after the client's backoff) before any build work.

Outputs: `image_url` (from setup), `image_digest` (`sha256:...`, as the registry has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from handlers import buildah, git, npm
from handlers.base import StepFailed, StepRequest
from handlers.buildah import Buildah, registry_auths
from handlers.helm import refuse_links_out
from handlers.registry import ImageRef, RegistryClient
from handlers.sandbox import SandboxSettings
from handlers.settings import HandlerSettings, for_request

REVISION_LABEL = "org.opencontainers.image.revision"
SOURCE_LABEL = "org.opencontainers.image.source"
CONTAINERFILES = ("Dockerfile", "Containerfile")


async def run(request: StepRequest) -> dict[str, Any]:
    git.validate_request(request)
    settings = for_request(request)
    commit = git.validate_commit(request.commit)
    image_url = str(request.output_of("setup", "image_url"))
    image = ImageRef.parse(image_url)
    if image.tag is None:
        raise StepFailed(f"setup's image_url {image_url!r} has no tag", retryable=False)

    async with RegistryClient.for_host(settings, image.host, request.log) as registry:
        if not settings.rebuild:
            digest = await _built_from(registry, image, commit)
            if digest is not None:
                request.log.line(f"{image_url} is already built from {commit} ({digest}); reused")
                return {"image_url": image_url, "image_digest": digest}

        source = await git.checkout(request)
        sha = await git.head_sha(source)
        await git.standalone(request, source)  # the builder cannot see the worker's mirror
        builder = Buildah(settings, request)
        auths = registry_auths(settings, {image.host})
        async with builder.layer_cache():
            try:
                # The bases the Dockerfile names as pushed come down while the app builds
                # (the pull sees no checkout, the build script no image store); a build
                # script that changes the FROM lines gets its new bases pulled after it.
                early = await _bases_as_pushed(builder, settings, source)  # no repo code ran
                async with _beside(asyncio.create_task(builder.pull(early, auths))):
                    await _build_app(request, settings, source)
                containerfile = _containerfile(settings, source)
                context = _inside(source, settings.build_context, "build_context")
                # after the repo's build script, which may have made links of its own
                await asyncio.to_thread(refuse_links_out, source.resolve(), context,
                                        f"the build context {settings.build_context!r}")
                bases = await builder.bases(containerfile)
                await builder.pull([base for base in bases if base not in early], auths)
                await builder.build(
                    context=context,
                    containerfile=containerfile,
                    image=image_url,
                    labels={REVISION_LABEL: sha, SOURCE_LABEL: git.redact(request.repo)},
                    build_args=settings.build_args,
                )
                pushed = await builder.push(image=image_url, auths=auths)
            finally:
                await builder.remove(image_url)

        digest = await registry.manifest_digest(image.repository, image.tag)
        if digest is None:
            raise StepFailed(
                f"buildah pushed {image_url} but registry {image.host} does not have it",
                retryable=True,
            )
        if digest != pushed:
            request.log.line(f"note: buildah reported {pushed}, the registry has {digest}")
        request.log.line(f"pushed {image_url} ({digest})")
        return {"image_url": image_url, "image_digest": digest}


async def _bases_as_pushed(builder: Buildah, settings: HandlerSettings,
                           source: Path) -> list[str]:
    """The base images of the Dockerfile as checked out; none if it has none yet. Read
    before any of the repo's code runs: the build script may replace the file, or a folder
    on its path with a link, while it runs."""
    try:
        return await builder.bases(_containerfile(settings, source))
    except StepFailed:
        return []  # perhaps the build script makes one; the step says so after it if not


@contextlib.asynccontextmanager
async def _beside(task: asyncio.Task[Any]) -> AsyncIterator[None]:
    """The body runs while `task` does and waits for it at its end (the task's error is
    raised there); a body that fails cancels it."""
    try:
        yield
    except BaseException:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
    await task


async def warm_up(workdir: Path, sandbox_settings: SandboxSettings) -> None:
    """At the worker's start (handlers.warm_up_of): npm's versions and the storage driver."""
    await npm.warm_up(workdir, sandbox_settings)
    await buildah.warm_up(workdir, sandbox_settings)


async def _built_from(registry: RegistryClient, image: ImageRef, commit: str) -> str | None:
    """The digest of `image` when the registry has it, built from `commit`."""
    manifest = await registry.manifest(image.repository, image.reference)
    if manifest is None or manifest.is_index:
        return None
    config_digest = manifest.document().get("config", {}).get("digest")
    if not config_digest:
        return None
    config = json.loads(await registry.blob_bytes(image.repository, str(config_digest)))
    labels = (config.get("config") or {}).get("Labels") or {}
    revision = str(labels.get(REVISION_LABEL, ""))
    if revision and revision.startswith(commit):
        return manifest.digest
    registry.log.line(
        f"{image} exists but was built from {revision or 'an unknown commit'}; building again"
    )
    return None


async def _build_app(request: StepRequest, settings: HandlerSettings, source: Path) -> None:
    package = npm.package_json(source)
    if package is None:
        request.log.line("no package.json: nothing to build with npm")
        return
    if not npm.has_script(package, "build"):
        request.log.line("package.json has no build script: nothing to build with npm")
        return
    await npm.install(request, source, settings.npm_command)
    try:
        await npm.run(
            request,
            source,
            settings.npm_command,
            ["run", "build", "--if-present"],
            what="npm run build",
            retryable=False,
        )
    except StepFailed as failed:
        raise failed.reworded(
            f"the build script of commit {request.commit[:12]} failed (npm run build exited "
            f"with code {failed.exit_code}); see the output tail"
        ) from None


def _containerfile(settings: HandlerSettings, source: Path) -> Path:
    if settings.dockerfile:
        path = _inside(source, settings.dockerfile, "dockerfile")
        if path.is_file():
            return path
        raise StepFailed(
            f"`with: dockerfile` names {settings.dockerfile}, which the repo does not have",
            retryable=False,
        )
    for name in CONTAINERFILES:
        if (source / name).is_file():
            return source / name
    raise StepFailed(
        "the repo has no Dockerfile or Containerfile at its root, so there is no image to "
        "build; add one, or name it with `dockerfile:` in the build step's `with:`",
        retryable=False,
    )


def _inside(source: Path, relative: str, setting: str) -> Path:
    path = (source / relative).resolve()
    if not path.is_relative_to(source.resolve()):
        raise StepFailed(f"`with: {setting}` {relative!r} points outside the repo", retryable=False)
    return path
