"""The quick look at the environment (cistate.environment.urls) and Settings agree:
whatever the quick look accepts, Settings accepts too, with the same URLs; what it
cannot vouch for goes to Settings, which reports it as before."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cistate.config import Settings
from cistate.environment import DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, SURELY_VALID, urls

pytestmark = pytest.mark.unit

# values each field could be given, good and bad
SAMPLES: dict[str, list[str]] = {
    "database_url": ["postgresql://u:p@db:5432/ci", "postgres://db/ci", "mysql://x", "",
                     "POSTGRESQL://db/ci", " postgresql://db/ci", "db:5432"],
    "rabbitmq_url": ["amqp://guest:guest@mq:5672/", "amqps://mq/", "http://mq", ""],
    "pipeline": ["/etc/cistate/pipeline.yaml", "p.yaml", "", " "],
    "pipelines": ["/etc/cistate/pipelines", ""],
    "repo_pipelines": ["https://git.example.com/*", "a, b,c", "[]", ""],
    "workdir": ["/var/lib/cistate", "", "~"],
    "listen": ["127.0.0.1:8080", "nonsense", ":80", "h:0", "h:65536", "h:65535", "[::1]:80",
               "h:٣"],
    "bus_prefix": ["cistate", "a.b-c_d", "", "x" * 100, "x" * 101, "bad prefix", "é"],
    "worker_concurrency": ["1", "4", "256", "257", "0", "zero", "007", " 4", "+4", "4.0", ""],
    "log_format": ["console", "json", "JSON", "text", ""],
    "log_level": ["debug", "info", "warning", "error", "INFO", "trace"],
    "api_token": ["t0k", "ci:t0k", "ci:t0k:read", "ci:t0k:root", "a:b:c:d", ":x", ""],
    "api_read_auth": ["0", "1", "true", "True", "FALSE", "yes", "maybe", "", " 1"],
    "webhook_secret": ["s3cret", ""],
    "trusted_users": ["alice,bob", ""],
    "bus_key": ["k" * 32, ""],
    "bus_key_file": ["/run/secrets/bus.key", ""],
}


# what an environment variable can hold
ENV_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                   max_size=12)


def quick(environ: dict[str, str]) -> tuple[str, str] | None:
    """The quick look's URLs."""
    found = urls(environ)
    return (found.database_url, found.rabbitmq_url) if found is not None else None


def by_settings(environ: dict[str, str]) -> tuple[str, str] | None:
    """Settings' database and RabbitMQ URLs in this environment, or None if Settings
    refuses it."""
    kept = {k: v for k, v in os.environ.items() if not k.upper().startswith("CISTATE_")}
    with mock.patch.dict(os.environ, {**kept, **environ}, clear=True):
        try:
            found = Settings()
        except ValidationError:
            return None
    return found.database_url, found.rabbitmq_url


def test_every_setting_has_its_quick_check() -> None:
    assert set(SURELY_VALID) == set(Settings.model_fields), \
        "a field of Settings without a check in cistate.environment.SURELY_VALID, or the reverse"
    assert set(SAMPLES) == set(Settings.model_fields)
    assert Settings.model_fields["database_url"].default == DEFAULT_DATABASE_URL
    assert Settings.model_fields["rabbitmq_url"].default == DEFAULT_RABBITMQ_URL


@pytest.mark.parametrize(("field", "value"),
                         [(f, v) for f, values in SAMPLES.items() for v in values])
def test_what_the_quick_look_accepts_settings_accepts_alike(field: str, value: str) -> None:
    environ = {f"CISTATE_{field.upper()}": value}
    found = quick(environ)
    if found is not None:
        assert by_settings(environ) == found


@given(st.sets(st.sampled_from(sorted(SAMPLES)), max_size=5), st.data())
@settings(max_examples=150, deadline=None)
def test_mixed_environments_agree(fields: set[str], data: st.DataObject) -> None:
    environ = {
        (f"CISTATE_{field.upper()}" if data.draw(st.booleans()) else f"cistate_{field}"):
            data.draw(st.sampled_from(SAMPLES[field]) | ENV_TEXT)
        for field in fields}
    found = quick(environ)
    if found is not None:
        assert by_settings(environ) == found


def test_the_usual_environments_take_the_quick_way() -> None:
    defaults = (DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL)
    assert quick({}) == defaults == by_settings({})
    assert quick({"PATH": "/bin", "CISTATE_GITHUB_TOKEN": "x"}) == defaults
    environ = {"CISTATE_DATABASE_URL": "postgresql://ci@db/ci", "CISTATE_API_READ_AUTH": "True",
               "CISTATE_RABBITMQ_URL": "amqp://mq/", "CISTATE_WORKER_CONCURRENCY": "8",
               "cistate_listen": "0.0.0.0:8080", "CISTATE_TRUSTED_USERS": "[]"}
    assert quick(environ) == ("postgresql://ci@db/ci", "amqp://mq/") \
        == by_settings(environ)


def test_a_bad_or_doubtful_setting_goes_to_settings() -> None:
    assert quick({"CISTATE_LISTEN": "nonsense"}) is None
    assert quick({"CISTATE_DATABASE_URL": "mysql://x"}) is None
    assert quick({"CISTATE_WORKER_CONCURRENCY": "zero"}) is None
    assert quick({"CISTATE_WORKER_CONCURRENCY": "007"}) is None  # Settings takes it
    # one name in two cases: which one Settings reads is its own business
    assert quick({"CISTATE_LOG_LEVEL": "info", "cistate_log_level": "debug"}) is None
