"""`uses: img-release`: copy the built image to the release repository under its version.

Like the Cloud-Native Toolkit's `img-release` task, but without skopeo or a daemon: the
OCI distribution API through `handlers.registry`. The image `build` pushed (by its digest)
goes to `<release_image_repo>:<tag>`: blobs the destination lacks are mounted from the build's
repository when both are on the same registry, else copied; then the manifest bytes are put
unchanged, so the release digest equals the build digest.

Inputs: setup's `release_image_repo` (or `with: release_registry` + setup's `app_name`),
build's `image_url` and `image_digest`, tag-release's `tag`.

Idempotent: when the release tag already points at the build digest, nothing is copied.
A release tag that points at another digest is never overwritten: the step fails.

Outputs:
- released: `release_image_url` (`<release_image_repo>:<tag>`), `release_image_digest`
- tag-release skipped: both `null`, and `skipped_reason`
"""

from __future__ import annotations

import shutil
from contextlib import AsyncExitStack
from typing import Any

from handlers import git
from handlers.base import StepFailed, StepRequest
from handlers.registry import ImageRef, RegistryClient, copy_image
from handlers.settings import for_request


async def run(request: StepRequest) -> dict[str, Any]:
    git.validate_request(request)
    settings = for_request(request)
    tag = request.output_of("tag-release", "tag")
    if not tag:
        reason = request.outputs_from("tag-release").get("skipped_reason") or "no release tag"
        request.log.line(f"not releasing the image: {reason}")
        return {"release_image_url": None, "release_image_digest": None, "skipped_reason": reason}
    if git.parse_version(str(tag)) is None:
        raise StepFailed(f"tag-release's tag {tag!r} is not X.Y.Z", retryable=False)

    built = ImageRef.parse(str(request.output_of("build", "image_url")))
    build_digest = str(request.output_of("build", "image_digest"))
    src = ImageRef(built.host, built.repository, built.tag, build_digest)
    if not src.valid():
        raise StepFailed(
            f"build's image_digest {build_digest!r} is not a sha256 digest", retryable=False
        )
    if "release_registry" in {key.replace("-", "_") for key in request.settings}:
        repo = f"{settings.effective_release_registry}/{request.output_of('setup', 'app_name')}"
    else:
        repo = str(request.output_of("setup", "release_image_repo"))
    dst = ImageRef.parse(f"{repo}:{tag}")

    async with AsyncExitStack() as stack:
        source = await stack.enter_async_context(
            RegistryClient.for_host(settings, src.host, request.log)
        )
        dest = source
        if dst.host != src.host:
            dest = await stack.enter_async_context(
                RegistryClient.for_host(settings, dst.host, request.log)
            )
        existing = await dest.manifest_digest(dst.repository, str(tag))
        if existing == build_digest:
            request.log.line(f"{dst} is already released ({existing})")
            return {"release_image_url": str(dst), "release_image_digest": existing}
        if existing is not None:
            raise StepFailed(
                f"{dst} already exists with digest {existing}, not the build's {build_digest}; "
                "release tags are never overwritten: delete it or release another version",
                retryable=False,
            )
        scratch = request.workdir / "blobs"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            digest, report = await copy_image(source, src, dest, dst, scratch=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    request.log.line(
        f"released {src} as {dst} ({digest}): {report.mounted} blobs mounted, "
        f"{report.copied} copied, {report.present} already there"
    )
    return {"release_image_url": str(dst), "release_image_digest": digest}
