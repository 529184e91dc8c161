"""Configuration from the environment (CISTATE_*), validated once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cistate.domain.notices import NoticePolicy
from cistate.domain.repos import RepoPolicy

# the parts without pydantic live in cistate.environment (the command line's quick start)
from cistate.environment import (
    DEFAULT_DATABASE_URL,
    DEFAULT_RABBITMQ_URL,
    is_amqp_url,
    is_host_port,
    is_postgres_url,
)
from cistate.environment import ROLES as ROLES
from cistate.environment import SCOPES as SCOPES
from cistate.environment import ApiToken as ApiToken
from cistate.environment import ConfigError as ConfigError
from cistate.environment import parse_api_tokens as parse_api_tokens
from cistate.environment import redact as redact


def split_commas(value: Any) -> Any:
    """`a, b,c` from the environment -> ["a", "b", "c"]; a list is left as it is."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# a setting given as comma-separated values (not JSON, as pydantic-settings reads lists)
CommaList = Annotated[list[str], NoDecode, BeforeValidator(split_commas)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CISTATE_", extra="ignore")

    # Each field has its quick check in cistate.environment.SURELY_VALID.
    database_url: str = DEFAULT_DATABASE_URL
    rabbitmq_url: str = DEFAULT_RABBITMQ_URL
    pipeline: Path | None = None  # None: the packaged nodejs pipeline
    # A directory of pipeline files (*.yaml, *.yml), each with an optional `repos:` list of
    # URL globs: a push runs the first, by file name, whose globs match its repo; a push
    # that none match runs CISTATE_PIPELINE (or the packaged one).
    pipelines: Path | None = None
    # URL globs (comma-separated) of the repositories whose own .cistate/pipeline.yaml, at
    # the pushed commit, is the pipeline of their runs; default none.
    repo_pipelines: CommaList = Field(default_factory=list)
    workdir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "cistate")
    listen: str = "127.0.0.1:8080"
    bus_prefix: str = Field(default="cistate", pattern=r"^[a-zA-Z0-9_.-]{1,100}$")
    worker_concurrency: int = Field(default=4, ge=1, le=256)
    log_format: str = Field(default="console", pattern=r"^(console|json)$")
    log_level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")
    # Bearer tokens of the HTTP API: "TOKEN" or "NAME:TOKEN[:SCOPE],..." with SCOPE one of
    # read, operate (the default) and admin; the name becomes the actor of what a call does.
    api_token: str | None = Field(default=None, repr=False)
    # Reads (runs, events, logs, metrics) need a `read` token too; 0 opens them for a local,
    # single-user setup (scripts/run.sh). No exception for loopback clients: a sandboxed
    # step shares the host's loopback.
    api_read_auth: bool = True
    webhook_secret: str | None = Field(default=None, repr=False)
    # git host user names whose pull request comments (/retest, /cancel, /ok-to-test) act
    trusted_users: CommaList = Field(default_factory=list)
    # The key cistate's roles sign their messages with (adapters.rabbitmq.signing); without either,
    # `cistate serve` makes <workdir>/bus.key on first start.
    bus_key: str | None = Field(default=None, repr=False)
    bus_key_file: Path | None = None

    @property
    def api_tokens(self) -> dict[str, ApiToken]:
        """token -> who holds it and what it may do"""
        return parse_api_tokens(self.api_token or "")

    @field_validator("api_token")
    @classmethod
    def _tokens(cls, value: str | None) -> str | None:
        parse_api_tokens(value or "")  # refuse a bad scope at start, not at the first call
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres(cls, value: str) -> str:
        if not is_postgres_url(value):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp(cls, value: str) -> str:
        if not is_amqp_url(value):
            raise ValueError("must be an amqp:// or amqps:// URL")
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not is_host_port(value):
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
        return value

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class RepoSettings(BaseSettings):
    """CISTATE_ALLOW_LOCAL_REPOS and CISTATE_REPO_ALLOW (comma-separated URL globs)."""

    model_config = SettingsConfigDict(env_prefix="CISTATE_", extra="ignore")

    allow_local_repos: bool = False
    repo_allow: CommaList = Field(default_factory=list)

    @property
    def policy(self) -> RepoPolicy:
        return RepoPolicy(self.allow_local_repos, tuple(self.repo_allow))


class NotifySettings(BaseSettings):
    """What cistate tells git hosts and webhook receivers about runs (cistate.service.notifier).
    Commit statuses go out when a host's token is set; notifications when receivers are."""

    model_config = SettingsConfigDict(env_prefix="CISTATE_", extra="ignore")

    github_api_url: str = "https://api.github.com"
    github_token: str | None = Field(default=None, repr=False)
    gitlab_url: str | None = None  # https://gitlab.example.com (the API is <url>/api/v4)
    gitlab_token: str | None = Field(default=None, repr=False)
    gitea_url: str | None = None  # https://gitea.example.com (the API is <url>/api/v1)
    gitea_token: str | None = Field(default=None, repr=False)
    # where a status's link points: <public_url>/api/v1/runs/<id>
    public_url: str | None = None
    status_per_step: bool = False  # a status per step too (context cistate/<pipeline>/<step>)
    notify_urls: CommaList = Field(default_factory=list, repr=False)
    notify_secret: str | None = Field(default=None, repr=False)
    # a token may also come from the secret source: <secrets_dir>/GITHUB_TOKEN, ...
    secrets_dir: Path | None = None
    # first pause between two tries of a delivery (doubling, at most 5 minutes)
    notify_backoff: float = Field(default=2.0, gt=0, le=300)
    notify_attempts: int = Field(default=8, ge=1, le=100)

    @field_validator("github_api_url", "gitlab_url", "gitea_url", "public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("notify_urls")
    @classmethod
    def _receivers(cls, value: list[str]) -> list[str]:
        for url in value:
            if urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"{urlsplit(url).scheme or 'a URL without scheme'}: a "
                                 "receiver must be an http:// or https:// URL")
        return value

    def token(self, provider: str) -> str | None:
        """The host's API token: CISTATE_<HOST>_TOKEN, else the secret source's file."""
        value: str | None = getattr(self, f"{provider}_token", None)
        if value:
            return value
        if self.secrets_dir is not None:
            path = self.secrets_dir / f"{provider.upper()}_TOKEN"
            if path.is_file():
                return path.read_text(encoding="utf-8").strip() or None
        return None

    def api_url(self, provider: str) -> str | None:
        """Where the host's API is (GitHub's API URL; GitLab's and Gitea's own URL)."""
        url: str | None = self.github_api_url if provider == "github" else getattr(
            self, f"{provider}_url", None)
        return url

    def hosts(self) -> dict[str, str]:
        """provider -> URL, for the hosts cistate has a token for."""
        found: dict[str, str] = {}
        for provider in ("github", "gitlab", "gitea"):
            url = self.api_url(provider)
            if url and self.token(provider):
                found[provider] = url
        return found

    @property
    def policy(self) -> NoticePolicy:
        return NoticePolicy(statuses=bool(self.hosts()), per_step=self.status_per_step,
                            webhooks=bool(self.notify_urls))
