"""The plain parts of the configuration (no pydantic, so that they load fast): the roles, the
errors, API tokens, URL checks and redaction; and `urls()`, a quick look at the
environment for the commands that only read the database (`cistate runs list`, `runs show`,
...), which must start without pydantic-settings (about half the start-up of a command).

`urls()` answers only when every CISTATE_* variable that `cistate.config.Settings`
reads is one it would surely accept (checked by the same functions where there is one);
anything else, even what Settings might accept, makes it answer None, and then the caller
validates the environment with Settings as before: a bad setting is reported the same way
whichever path found it (tests/unit/test_environment.py holds the two together).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

ROLES = ("api", "orchestrator", "worker")  # what `cistate serve --role` can run
SCOPES = ("read", "operate", "admin")  # each includes the ones before it
PREFIX = "CISTATE_"


class ConfigError(ValueError):
    """Configuration a person must fix before cistate starts; one problem per line."""


@dataclass(frozen=True)
class ApiToken:
    name: str
    scope: str = "operate"

    def allows(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


def parse_api_tokens(text: str) -> dict[str, ApiToken]:
    tokens: dict[str, ApiToken] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) == 1:
            tokens[parts[0]] = ApiToken("api")
            continue
        if len(parts) > 3 or not parts[0] or not parts[1]:
            raise ValueError(f"API token entry {parts[0]!r}... is not NAME:TOKEN[:SCOPE]")
        scope = parts[2] if len(parts) == 3 else "operate"
        if scope not in SCOPES:
            raise ValueError(f"API token {parts[0]!r} has scope {scope!r}; use one of "
                             f"{', '.join(SCOPES)}")
        tokens[parts[1]] = ApiToken(parts[0], scope)
    return tokens


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def is_postgres_url(value: str) -> bool:
    return urlsplit(value).scheme in ("postgres", "postgresql")


def is_amqp_url(value: str) -> bool:
    return urlsplit(value).scheme in ("amqp", "amqps")


def is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


# -- the quick look


def _tokens(value: str) -> bool:
    try:
        parse_api_tokens(value)
    except ValueError:
        return False
    return True


def _anything(value: str) -> bool:
    return True


def _path(value: str) -> bool:
    return value != ""


def _pattern(regex: str) -> Callable[[str], bool]:
    compiled = re.compile(regex)
    return lambda value: compiled.fullmatch(value) is not None


# Settings' fields, each with a test that passes only values Settings surely takes from the
# environment (a stricter test is fine: it only sends the command to Settings).
SURELY_VALID: dict[str, Callable[[str], bool]] = {
    "database_url": is_postgres_url,
    "rabbitmq_url": is_amqp_url,
    "pipeline": _path,
    "pipelines": _path,
    "repo_pipelines": _anything,  # comma-separated, never decoded as JSON
    "workdir": _path,
    "listen": is_host_port,
    "bus_prefix": _pattern(r"[a-zA-Z0-9_.-]{1,100}"),
    "worker_concurrency": lambda value: re.fullmatch(r"[1-9][0-9]{0,2}", value) is not None
    and int(value) <= 256,
    "log_format": _pattern(r"console|json"),
    "log_level": _pattern(r"debug|info|warning|error"),
    "api_token": _tokens,
    "api_read_auth": lambda value: value.lower() in (
        "0", "1", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n"),
    "webhook_secret": _anything,
    "trusted_users": _anything,
    "bus_key": _anything,
    "bus_key_file": _path,
}
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/cistate"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class Urls:
    """What the commands that read need of the settings (and say when they fail)."""

    database_url: str = DEFAULT_DATABASE_URL
    rabbitmq_url: str = DEFAULT_RABBITMQ_URL


def urls(environ: Mapping[str, str] | None = None) -> Urls | None:
    """CISTATE_DATABASE_URL and CISTATE_RABBITMQ_URL as Settings reads them (names in any
    case, the defaults when unset), if every setting of Settings in the environment is
    surely valid; else None."""
    seen: dict[str, str] = {}
    for key, value in (os.environ if environ is None else environ).items():
        lowered = key.lower()
        if not lowered.startswith("cistate_"):
            continue
        field = lowered[len(PREFIX):]
        check = SURELY_VALID.get(field)
        if check is None:
            continue  # not one of Settings' (another settings class's, or none): ignored
        if field in seen or not check(value):
            return None  # the same name twice in two cases, or a value to validate fully
        seen[field] = value
    return Urls(seen.get("database_url", DEFAULT_DATABASE_URL),
                seen.get("rabbitmq_url", DEFAULT_RABBITMQ_URL))
