"""Settings of the source handlers (setup, test, build, tag-release, img-release).

Each value comes from the step's `with:` in the pipeline when given there, else from the
worker's environment (`CISTATE_<NAME>`), else from the default below. `with:` keys may be
spelled with `-` or `_` (`release-branches` = `release_branches`).

Registry credentials are read from the environment (or the mounted file it names) only: a
`with:` block is pipeline data that ends up in events, so a credential there is refused.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cistate.config import CommaList
from handlers.base import StepFailed, StepRequest

SECRET_KEYS = frozenset({"registry_username", "registry_password", "registry_auth_file"})
AnySettings = TypeVar("AnySettings", bound=BaseSettings)


class HandlerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CISTATE_", extra="forbid",
                                      use_attribute_docstrings=True)

    # `host[:port]/namespace` images are pushed to; the namespace may be empty
    registry: str = ""
    """Where images are pushed: `host[:port]/namespace` (required by setup, build, img-release)"""
    # where released images go; empty = the same as `registry`
    release_registry: str = ""
    """Where released images go; empty: the same as the registry"""
    # talk plain http to the registries (a local or in-cluster registry)
    registry_insecure: bool = False
    """Talk plain http to the registries (a local or in-cluster registry)"""
    # branches whose pushes are released (tag-release, img-release); fnmatch patterns
    release_branches: CommaList = Field(
        default_factory=lambda: ["main", "master"]
    )
    """Branches whose pushes are released by tag-release and img-release (comma-separated fnmatch
    patterns)
    """

    # registry client: attempts for connection errors and 5xx, first delay, delay cap
    registry_retries: int = Field(default=4, ge=1, le=20)
    """Attempts of the registry client on connection errors and 5xx answers"""
    registry_backoff: float = Field(default=0.5, ge=0)
    """Seconds before the registry client's second attempt (doubling after)"""
    registry_backoff_max: float = Field(default=8.0, ge=0)
    """The longest wait between two attempts of the registry client, in seconds"""
    registry_timeout: float = Field(default=60.0, gt=0)
    """Seconds one registry request may take"""

    # credentials (environment only)
    registry_username: str = ""
    """Registry user (environment only, never `with:`)"""
    registry_password: SecretStr = SecretStr("")
    """Registry password (environment only, never `with:`)"""
    registry_auth_file: Path | None = None
    """A docker config.json with registry credentials (environment only)"""

    # setup
    app_name: str = ""  # overrides the name derived from package.json / the repo
    """The app's name; empty: derived from package.json, else the repo's name"""
    short_sha_length: int = Field(default=7, ge=4, le=40)
    """Digits of the commit sha in the image tag"""

    # build
    builder: Literal["buildah"] = "buildah"
    """The image builder (buildah)"""
    builder_command: str = "buildah"  # the executable (a path, or a name on PATH)
    """The builder's executable: a path, or a name on PATH"""
    builder_storage_driver: str = "auto"
    """buildah's storage driver: `auto` is `overlay` where it works in the builder sandbox (a
    kernel that mounts overlay in a user namespace, a worker folder not itself on overlayfs),
    else `vfs`
    """
    builder_isolation: str = "chroot"
    """buildah's isolation for RUN lines (inside the step sandbox)"""
    builder_root: str = ""  # buildah --root; empty = buildah's default store
    """One buildah store shared by every build (only with CISTATE_SANDBOX=none; sandboxed builds
    use their repo's store in the worker's caches)
    """
    builder_runroot: str = ""
    """buildah's run root for that shared store (only with CISTATE_SANDBOX=none)"""
    image_format: Literal["oci", "docker"] = "oci"
    """The image's manifest format: oci or docker"""
    dockerfile: str = ""  # path in the repo; empty = Dockerfile, else Containerfile
    """The Dockerfile's path in the repo; empty: Dockerfile, else Containerfile"""
    build_context: str = "."
    """The build context's path in the repo"""
    build_args: dict[str, str] = Field(default_factory=dict)
    """Build arguments as a JSON object (`with: build_args` in a pipeline)"""
    rebuild: bool = False  # build even when the image for this commit is in the registry
    """Build even when the registry has the image built from this commit"""

    # npm
    npm_command: str = "npm"
    """The npm executable (a name on the sandbox's PATH, or a path)"""

    # tag-release
    git_user_name: str = "cistate"
    """Author name of the release tags"""
    git_user_email: str = "cistate@localhost"
    """Author email of the release tags"""
    tag_attempts: int = Field(default=10, ge=1, le=100)
    """Tries of tag-release when another run pushes a tag at the same time"""

    @field_validator("registry_auth_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("registry", "release_registry")
    @classmethod
    def _registry_form(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if "://" in value:
            raise ValueError(
                "give the registry as host[:port]/namespace, without a scheme "
                "(set registry_insecure for plain http)"
            )
        return value

    @property
    def push_registry(self) -> str:
        if not self.registry:
            raise StepFailed(
                "no image registry is configured: set CISTATE_REGISTRY on the worker "
                "(host[:port]/namespace) or `registry:` in the step's `with:`",
                retryable=False,
            )
        return self.registry

    @property
    def effective_release_registry(self) -> str:
        return self.release_registry or self.push_registry

    def is_release_branch(self, branch: str) -> bool:
        return any(fnmatch.fnmatchcase(branch, pattern) for pattern in self.release_branches)

    def credentials_for(self, host: str) -> Credentials | None:
        """Credentials for a registry host: the auth file's entry for it, else the env pair."""
        if self.registry_auth_file is not None:
            found = _from_auth_file(self.registry_auth_file, host)
            if found is not None:
                return found
        if self.registry_username:
            return Credentials(self.registry_username, self.registry_password.get_secret_value())
        return None


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of tracebacks and logs
        return f"Credentials(username={self.username!r}, password=***)"


def for_request(request: StepRequest) -> HandlerSettings:
    """The environment's settings overridden by the step's `with:`."""
    return overridden(request, HandlerSettings, SECRET_KEYS)


def overridden(
    request: StepRequest,
    model: type[AnySettings],
    secret_keys: frozenset[str],
    aliases: Mapping[str, str] | None = None,
) -> AnySettings:
    """`model` read from the CISTATE_* environment, overridden by the step's `with:`.

    Credentials in `with:` are refused (pipeline files end up in the event log); unknown
    keys are noted in the step log and ignored; invalid values fail the step clearly.
    """
    overrides: dict[str, Any] = {}
    for key, value in request.settings.items():
        name = key.replace("-", "_")
        overrides[(aliases or {}).get(name, name)] = value
    refused = sorted(secret_keys & overrides.keys())
    if refused:
        raise StepFailed(
            f"step {request.step!r} sets {', '.join(refused)} in `with:`; pipeline files end "
            "up in the event log, so credentials must come from the worker's environment "
            f"({', '.join('CISTATE_' + key.upper() for key in refused)})",
            retryable=False,
        )
    for key in sorted(overrides.keys() - model.model_fields.keys()):
        request.log.line(f"note: `with: {key}` is not a setting of this handler; ignored")
        del overrides[key]
    try:
        return model(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise StepFailed(
            f"step {request.step!r} has invalid settings ({problems}); fix the step's `with:` "
            "or the worker's CISTATE_* environment",
            retryable=False,
        ) from None


def _from_auth_file(path: Path, host: str) -> Credentials | None:
    """Read a docker `config.json` (`{"auths": {host: {"auth": b64(user:pass)}}}`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StepFailed(
            f"cannot read the registry auth file {path} ({type(exc).__name__}); "
            "CISTATE_REGISTRY_AUTH_FILE must name a docker config.json",
            retryable=False,
        ) from None
    auths = data.get("auths", {}) if isinstance(data, dict) else {}
    if not isinstance(auths, Mapping):
        return None
    for key, entry in auths.items():
        if _auth_key_host(str(key)) != host or not isinstance(entry, Mapping):
            continue
        if entry.get("auth"):
            try:
                user, _, password = (
                    base64.b64decode(str(entry["auth"])).decode("utf-8").partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                raise StepFailed(
                    f"the registry auth file {path} has an entry for {host} whose `auth` is "
                    "not base64 of user:password",
                    retryable=False,
                ) from None
            return Credentials(user, password)
        if entry.get("username"):
            return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


def _auth_key_host(key: str) -> str:
    """`https://host:port/v1/` and `host:port` both name host:port."""
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0]


def docker_auth(username: str, password: str) -> dict[str, str]:
    """One `auths` entry of a docker config.json."""
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode("ascii")}


@contextmanager
def private_docker_config(auths: Mapping[str, Any]) -> Iterator[Path | None]:
    """A docker config.json holding `auths` (host -> entry), readable by this user alone and
    removed afterwards: credentials go to buildah and helm as a file, never on a command
    line. None when there are no credentials."""
    if not auths:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="cistate-auth-") as tmp:
        os.chmod(tmp, 0o700)
        path = Path(tmp) / "config.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"auths": dict(auths)}, out)
        yield path
