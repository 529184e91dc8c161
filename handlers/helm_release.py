"""`uses: helm-release`: package the app's chart at the release version and publish it.

Like the Cloud-Native Toolkit's helm-release task: the repo's one chart (`chart_dir`) is
copied, named after the app, its values set to the released image (`image.repository` =
img-release's repository, `image.tag` = the version, name overrides = the app name), linted
and packaged with `helm package --version <tag> --app-version <tag>`. It is then published to
`chart_repo`:
- `oci://host[:port]/path`: `helm push` (plain http with `chart_repo_insecure`);
- `http(s)://...`: an Artifactory-style HTTP chart repository (`handlers.chartrepo`): the
  `.tgz` is uploaded and `index.yaml` merged with optimistic concurrency.
A version already published with the same content is success; with other content the step
fails (a released version is never replaced).

Inputs: setup's `app_name`, tag-release's `tag`, img-release's `release_image_url` (when
img-release runs beside this step: setup's `release_image_repo` at the tag, the image it
releases).
Credentials: CISTATE_CHART_REPO_USERNAME / CISTATE_CHART_REPO_PASSWORD (environment only).

Outputs:
- `chart_name`, `chart_version`
- `chart_url`: the package's URL (`https://.../<name>-<version>.tgz`) or OCI reference
  (`oci://host/path/<name>:<version>`)
- `chart_repo`: the repository to name in a requirements.yaml (gitops uses it)
- not released (tag-release skipped): the four are null, with `skipped_reason`
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from handlers import git
from handlers.base import StepFailed, StepRequest
from handlers.cd_settings import DeliverySettings, for_request
from handlers.chartrepo import ChartRepo, chart_files, packaged_metadata
from handlers.helm import Helm, find_chart, prepare_chart
from handlers.registry import ImageRef


async def run(request: StepRequest) -> dict[str, Any]:
    git.validate_request(request)
    settings = for_request(request)
    tag = request.output_of("tag-release", "tag")
    # img-release may run beside this step (both need only tag-release): the image it
    # releases is setup's release_image_repo at the tag, known before it is copied
    release_image = request.outputs_from("img-release").get("release_image_url") or (
        tag and _release_image(request, str(tag)))
    if not tag or not release_image:
        reason = (
            request.outputs_from("tag-release").get("skipped_reason")
            or "no release tag or release image"
        )
        request.log.line(f"not releasing the chart: {reason}")
        return {
            "chart_name": None,
            "chart_version": None,
            "chart_url": None,
            "chart_repo": None,
            "skipped_reason": reason,
        }
    version = str(tag)
    if git.parse_version(version) is None:
        raise StepFailed(f"tag-release's tag {version!r} is not X.Y.Z", retryable=False)
    image = ImageRef.parse(str(release_image))
    if not settings.chart_repo:
        raise StepFailed(
            "no chart repository is configured: set CISTATE_CHART_REPO on the worker "
            "(oci://host/path or https://host/path) or `chart_repo:` in `with:`",
            retryable=False,
        )
    app = str(request.output_of("setup", "app_name"))

    source = await git.checkout(request)
    chart = find_chart(source, settings.chart_dir)
    shown = str(chart.relative_to(source))
    prepared = prepare_chart(
        chart,
        request.workdir / "chart",
        name=app,
        version=version,
        values={
            "nameOverride": app,
            "fullnameOverride": app,
            "image.repository": f"{image.host}/{image.repository}",
            "image.tag": version,
        },
    )
    helm = Helm(settings.helm, request)
    await helm.lint(prepared, shown)
    tgz = await helm.package(
        prepared, version=version, app_version=version, dest=request.workdir / "package"
    )
    if settings.chart_repo.startswith("oci://"):
        url = await _push_oci(request, settings, helm, tgz, app, version)
    elif settings.chart_repo.startswith(("http://", "https://")):
        repo = ChartRepo(
            settings.chart_repo,
            username=settings.chart_repo_username,
            password=settings.chart_repo_password.get_secret_value(),
            attempts=settings.chart_repo_attempts,
            timeout=settings.chart_repo_timeout,
            log=request.log,
        )
        data = await asyncio.to_thread(tgz.read_bytes)
        url = await repo.publish(data, tgz.name, packaged_metadata(data))
    else:
        raise StepFailed(
            f"chart_repo {settings.chart_repo!r} is neither oci://... nor http(s)://...",
            retryable=False,
        )
    return {
        "chart_name": app,
        "chart_version": version,
        "chart_url": url,
        "chart_repo": settings.chart_repo,
    }


async def _push_oci(
    request: StepRequest,
    settings: DeliverySettings,
    helm: Helm,
    tgz: Path,
    app: str,
    version: str,
) -> str:
    ref = f"{settings.chart_repo}/{app}"
    plain = settings.chart_repo_insecure
    scratch = request.workdir / "published"
    host = settings.chart_repo.removeprefix("oci://").split("/", 1)[0]
    auths = {}
    if settings.chart_repo_username:
        auths[host] = (
            settings.chart_repo_username,
            settings.chart_repo_password.get_secret_value(),
        )
    existing = await helm.pull(ref, version=version, plain_http=plain, dest=scratch, auths=auths)
    try:
        if existing is not None:
            ours, theirs = await asyncio.to_thread(
                lambda: (chart_files(tgz.read_bytes()), chart_files(existing.read_bytes()))
            )
            if ours != theirs:
                raise StepFailed(
                    f"chart {app} version {version} is already in {settings.chart_repo} with "
                    "other content; a released version is never replaced: release another "
                    "version",
                    retryable=False,
                )
            request.log.line(f"{ref}:{version} is already published with this content")
            return f"{ref}:{version}"
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)
    await helm.push(tgz, settings.chart_repo, plain_http=plain, auths=auths)
    return f"{ref}:{version}"


def _release_image(request: StepRequest, tag: str) -> str | None:
    repo = request.outputs_from("setup").get("release_image_repo")
    return f"{repo}:{tag}" if repo else None
