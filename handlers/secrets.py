"""Secrets a step declares (`secrets: [NPM_TOKEN, {name: KEY, as: file}]`): where the worker
finds their values, which repositories may use them, and masking them in everything a step's
result carries off the worker.

Values come from the worker alone: a directory (`CISTATE_SECRETS_DIR`, one file per secret,
as a Kubernetes Secret volume lays them out), else `CISTATE_SECRET_<NAME>` variables. Only a
secret's name travels in pipelines, commands and events.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from cistate.domain.messages import SecretRef
from handlers.base import StepFailed
from handlers.masking import MIN_SECRET_LENGTH

ENV_PREFIX = "CISTATE_SECRET_"
# the worker's own credentials, masked as well should a tool ever print one
_CREDENTIAL_NAME = re.compile(r"^CISTATE_\w*(PASSWORD|TOKEN|SECRET|_KEY)$")


@dataclass(frozen=True)
class Secret:
    name: str
    value: str = field(repr=False)
    as_file: bool = False

    @property
    def variable(self) -> str:
        """The environment variable the step reads: the value, or the file's path."""
        return f"{self.name}_FILE" if self.as_file else self.name


class SecretSource:
    """The worker's secrets and the repositories each may serve.

    `scopes` maps a secret's name to repo URL globs; None (no scopes configured) lets every
    repository this deployment runs use every secret, which suits a pipeline owned by the
    deployment. Once scopes are configured, a secret not named in them serves no repository.
    """

    def __init__(
        self,
        directory: Path | None,
        environ: Mapping[str, str],
        scopes: Mapping[str, Sequence[str]] | None,
    ) -> None:
        self.directory = directory
        self.environ = environ
        self.scopes = scopes

    def resolve(self, refs: Iterable[SecretRef], *, step: str, repo: str,
                repo_pipeline: bool = False) -> list[Secret]:
        """The declared secrets' values, or a StepFailed naming the first that cannot be had.
        A step of a repository's own pipeline (`repo_pipeline`) was written by whoever
        pushed: it gets a secret only where the scopes name the repo, never by default."""
        refs = list(refs)
        if repo_pipeline and refs and self.scopes is None:
            names = ", ".join(ref.name for ref in refs)
            raise StepFailed(
                f"step {step!r} of the repository's own pipeline declares {names}; a "
                "repository's pipeline gets secrets only through their scopes, and "
                "CISTATE_SECRET_SCOPES names none: scope each secret to the repos that may "
                "use it", retryable=False)
        found = []
        for ref in refs:
            self._check_scope(ref.name, step=step, repo=repo)
            value = self._value(ref.name, step=step)
            if len(value) < MIN_SECRET_LENGTH:
                raise StepFailed(
                    f"secret {ref.name} (declared by step {step!r}) is shorter than "
                    f"{MIN_SECRET_LENGTH} characters; masking it would blot out the log, so "
                    "it is refused: use a longer value",
                    retryable=False,
                )
            found.append(Secret(ref.name, value, as_file=ref.as_ == "file"))
        return found

    def _check_scope(self, name: str, *, step: str, repo: str) -> None:
        if self.scopes is None:
            return
        patterns = self.scopes.get(name)
        shown = _without_credentials(repo)
        if not patterns:
            raise StepFailed(
                f"step {step!r} declares secret {name}, which no repository may use: the "
                f"secret scopes (CISTATE_SECRET_SCOPES) do not name it; add {name} with a "
                f"pattern matching {shown}",
                retryable=False,
            )
        if not any(fnmatch.fnmatchcase(shown, pattern) for pattern in patterns):
            raise StepFailed(
                f"step {step!r} declares secret {name}, which repo {shown} may not use (its "
                f"scope is {', '.join(patterns)}); widen the scope in CISTATE_SECRET_SCOPES "
                "or drop the secret from the step",
                retryable=False,
            )

    def value(self, name: str) -> str:
        """The secret's value on this worker; LookupError saying where to put it if none."""
        if self.directory is not None:
            path = self.directory / name
            if path.is_file():
                # a file written with `echo` ends in a newline that is not part of the value
                return path.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        value = self.environ.get(ENV_PREFIX + name)
        if value is not None:
            return value
        where = f"a file {name} in CISTATE_SECRETS_DIR ({self.directory}) or " if (
            self.directory is not None) else "CISTATE_SECRETS_DIR with a file of that name or "
        raise LookupError(f"secret {name} is not on this worker: provide {where}the variable "
                          f"{ENV_PREFIX}{name}")

    def _value(self, name: str, *, step: str) -> str:
        try:
            return self.value(name)
        except LookupError as exc:
            raise StepFailed(f"step {step!r} declares secret {name}, which this worker does "
                             f"not have: {str(exc).split(': ', 1)[1]}; nothing was run",
                             retryable=False) from None


def load_scopes(text: str | None, file: Path | None) -> dict[str, list[str]] | None:
    """Scopes from CISTATE_SECRET_SCOPES (JSON: {"NAME": ["https://git.example.com/org/*"]})
    or the YAML/JSON file CISTATE_SECRET_SCOPES_FILE names; None when neither is set."""
    if file is not None:
        raw: Any = yaml.safe_load(file.read_text(encoding="utf-8"))
        where = f"CISTATE_SECRET_SCOPES_FILE ({file})"
    elif text:
        raw = json.loads(text)
        where = "CISTATE_SECRET_SCOPES"
    else:
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(key, str) and isinstance(value, list)
        and all(isinstance(item, str) for item in value)
        for key, value in raw.items()
    ):
        raise ValueError(f"{where} must map secret names to lists of repo URL globs")
    return {key: list(value) for key, value in raw.items()}


def worker_credentials(environ: Mapping[str, str]) -> list[str]:
    """Values of the worker's own credentials (CISTATE_*PASSWORD/TOKEN/SECRET/KEY, passwords
    inside CISTATE_*_URL): a second line of defence, masked like declared secrets."""
    values = []
    for name, value in environ.items():
        if not name.startswith("CISTATE_"):
            continue
        if _CREDENTIAL_NAME.match(name) or name.startswith(ENV_PREFIX):
            values.append(value)
            # named tokens: "alice:tok1,grafana:tok2:read" -> tok1, tok2
            for item in value.split(","):
                parts = item.strip().split(":")
                if len(parts) >= 2:
                    values.append(parts[1])
        elif name.endswith("_URL"):
            password = urlsplit(value).password
            if password:
                values.append(password)
    return [value for value in values if len(value) >= MIN_SECRET_LENGTH]


def _without_credentials(url: str) -> str:
    return re.sub(r"(?<=://)[^/@]+@", "", url)
