"""Image builds without a daemon: buildah `bud`, `push` and `rmi` through `handlers.process`.

Registry credentials reach buildah in an auth file written to a private temporary directory
(mode 0600, removed afterwards), never on its command line.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from handlers import process
from handlers.base import StepFailed, StepRequest
from handlers.settings import HandlerSettings, docker_auth, private_docker_config


class Buildah:
    def __init__(self, settings: HandlerSettings, request: StepRequest) -> None:
        self.settings = settings
        self.request = request

    def _base(self) -> list[str]:
        argv = shlex.split(self.settings.builder_command)
        if self.settings.builder_root:
            argv += ["--root", self.settings.builder_root]
        if self.settings.builder_runroot:
            argv += ["--runroot", self.settings.builder_runroot]
        if self.settings.builder_storage_driver:
            argv += ["--storage-driver", self.settings.builder_storage_driver]
        return argv

    def _tls(self) -> list[str]:
        return ["--tls-verify=false"] if self.settings.registry_insecure else []

    async def build(
        self,
        *,
        context: Path,
        containerfile: Path,
        image: str,
        labels: Mapping[str, str],
        build_args: Mapping[str, str],
        authfile: Path | None,
    ) -> None:
        argv = [
            *self._base(),
            "bud",
            "--isolation",
            self.settings.builder_isolation,
            "--format",
            self.settings.image_format,
            *self._tls(),
            *(["--authfile", str(authfile)] if authfile else []),
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
        await process.run(
            argv,
            cwd=context,
            log=self.request.log,
            what=f"the image build ({containerfile.name})",
            retryable=False,
        )

    async def push(self, *, image: str, authfile: Path | None, digestfile: Path) -> str:
        """Push `image` to docker://image; the digest buildah wrote."""
        argv = [
            *self._base(),
            "push",
            *self._tls(),
            *(["--authfile", str(authfile)] if authfile else []),
            "--retry",
            str(max(self.settings.registry_retries - 1, 0)),
            "--retry-delay",
            f"{max(self.settings.registry_backoff, 0.1)}s",
            "--digestfile",
            str(digestfile),
            image,
            f"docker://{image}",
        ]
        await process.run(
            argv,
            cwd=digestfile.parent,
            log=self.request.log,
            what=f"pushing {image}",
            retryable=True,
        )
        text = await asyncio.to_thread(digestfile.read_text, encoding="utf-8")
        return text.strip()

    async def remove(self, image: str) -> None:
        """Drop the local copy (the registry has it); a failure here is not the step's."""
        await process.run(
            [*self._base(), "rmi", "-f", image],
            cwd=self.request.workdir,
            log=self.request.log,
            check=False,
        )


@contextmanager
def private_authfile(settings: HandlerSettings, hosts: Iterable[str]) -> Iterator[Path | None]:
    """A docker config.json for buildah with the credentials of `hosts`, readable by us alone.

    Entries of CISTATE_REGISTRY_AUTH_FILE for other hosts (base image registries) are kept.
    None when there are no credentials at all.
    """
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
    with private_docker_config(auths) as path:
        yield path
