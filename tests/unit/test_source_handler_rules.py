"""The pure rules of the source handlers: names, refs, versions, image references, settings."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from handlers.base import StepFailed, StepLog, StepRequest
from handlers.git import (
    branch_of,
    parse_version,
    redact,
    repo_basename,
    validate_commit,
    validate_ref,
    validate_repo_url,
)
from handlers.registry import ImageRef, split_registry
from handlers.sandbox import Sandbox, SandboxSettings
from handlers.settings import Credentials, HandlerSettings, for_request
from handlers.setup import normalise_app_name
from handlers.tag_release import next_version

pytestmark = pytest.mark.unit

DNS_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("hello_app", "hello-app"),
        ("Hello_App", "hello-app"),
        ("@acme/My_Cool.App", "my-cool-app"),
        ("9lives", "app-9lives"),
        ("__x__", "x"),
        ("a" * 80, "a" * 63),
        ("über app", "ber-app"),
        ("hello__app", "hello--app"),
        ("!!!", ""),
    ],
)
def test_app_names_are_valid_image_and_kubernetes_names(raw: str, name: str) -> None:
    import re

    assert normalise_app_name(raw) == name
    if name:
        assert re.fullmatch(DNS_LABEL, name) and len(name) <= 63
        assert ImageRef.parse(f"127.0.0.1:5000/ns/{name}:abc1234").repository == f"ns/{name}"


@pytest.mark.parametrize(
    "ref",
    ["refs/heads/main", "main", "feature/x", "refs/heads/a$(b)`c`;d&&e|f>g", "release/1.x"],
)
def test_valid_refs(ref: str) -> None:
    assert validate_ref(ref) == ref


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "-main",
        "main; rm -rf /",
        "a..b",
        "a@{1}",
        "a//b",
        "a/",
        "a.",
        "@",
        ".hidden/x",
        "x/y.lock",
        "a\nb",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[",
        "a\\b",
    ],
)
def test_invalid_refs_are_refused_without_retry(ref: str) -> None:
    with pytest.raises(StepFailed) as info:
        validate_ref(ref)
    assert not info.value.retryable and "not a valid git ref name" in info.value.message


def test_branches() -> None:
    assert branch_of("refs/heads/feature/x") == "feature/x"
    assert branch_of("main") == "main"
    with pytest.raises(StepFailed):
        branch_of("refs/tags/1.0.0")


def test_commits() -> None:
    assert validate_commit("ABCDEF1") == "abcdef1"
    for bad in ("", "xyz", "abc", "abcdef1; ls", "$(id)", "a" * 65):
        with pytest.raises(StepFailed):
            validate_commit(bad)


def test_repo_urls() -> None:
    assert validate_repo_url("https://example.com/org/app.git")
    for bad in ("-uhack", "ext::sh -c id", "fd::3", "a\nb", ""):
        with pytest.raises(StepFailed):
            validate_repo_url(bad)
    assert repo_basename("https://host/org/My_Repo.git/") == "My_Repo"
    assert repo_basename("git@host:org/app.git") == "app"
    assert redact("https://user:tok@host/org/app.git") == "https://host/org/app.git"


def test_versions() -> None:
    assert next_version([]) == "0.0.1"
    assert next_version([(0, 9, 0), (0, 10, 0)]) == "0.10.1"
    assert next_version([(1, 2, 3), (1, 10, 0), (0, 99, 99)]) == "1.10.1"
    assert parse_version("1.2.3") == (1, 2, 3)
    for tag in ("v1.2.3", "1.2", "1.2.3-rc.1", "01.2.3", "1.2.3.4", "release"):
        assert parse_version(tag) is None


def test_image_refs() -> None:
    ref = ImageRef.parse("127.0.0.1:5000/dev/hello-app:abc1234")
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (
        "127.0.0.1:5000",
        "dev/hello-app",
        "abc1234",
        None,
    )
    digest = "sha256:" + "a" * 64
    pinned = ImageRef.parse(f"registry.example.com/app@{digest}")
    assert pinned.reference == digest and str(pinned) == f"registry.example.com/app@{digest}"
    for bad in ("app", "host/UPPER:1", "host/app:bad tag", "host/app@sha256:zz", "host//app"):
        with pytest.raises(StepFailed):
            ImageRef.parse(bad)
    assert split_registry("127.0.0.1:5000/team/dev") == ("127.0.0.1:5000", "team/dev")
    assert split_registry("quay.io") == ("quay.io", "")
    with pytest.raises(StepFailed):
        split_registry("quay.io/Team")


def request_with(tmp_path: Path, settings: dict[str, object]) -> StepRequest:
    return StepRequest(
        run_id="r",
        repo="https://example.com/app.git",
        ref="refs/heads/main",
        commit="a" * 40,
        step="build",
        attempt=1,
        settings=settings,
        script=None,
        inputs={},
        workdir=tmp_path,
        log=StepLog(tmp_path / "log"),
        sandbox=Sandbox(SandboxSettings(), tmp_path, identity={}),
    )


def test_settings_come_from_env_then_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISTATE_REGISTRY", "reg.example.com:5000/dev")
    monkeypatch.setenv("CISTATE_RELEASE_BRANCHES", "main, release/*")
    settings = for_request(request_with(tmp_path, {"registry-retries": 2, "unknown": 1}))
    assert settings.registry == "reg.example.com:5000/dev"
    assert settings.effective_release_registry == "reg.example.com:5000/dev"
    assert settings.registry_retries == 2
    assert settings.is_release_branch("release/1.x") and not settings.is_release_branch("dev")
    assert "`with: unknown` is not a setting" in (tmp_path / "log").read_text()


def test_credentials_are_refused_in_with(tmp_path: Path) -> None:
    with pytest.raises(StepFailed) as info:
        for_request(request_with(tmp_path, {"registry_password": "hunter2"}))
    assert "hunter2" not in info.value.message and not info.value.retryable


def test_invalid_settings_say_which(tmp_path: Path) -> None:
    with pytest.raises(StepFailed) as info:
        for_request(request_with(tmp_path, {"registry_retries": "many"}))
    assert "registry_retries" in info.value.message


def test_credentials_from_auth_file_then_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = tmp_path / "config.json"
    pair = base64.b64encode(b"bob:s3cret").decode()
    auth.write_text(json.dumps({"auths": {"https://reg.example.com/v1/": {"auth": pair}}}))
    monkeypatch.setenv("CISTATE_REGISTRY_AUTH_FILE", str(auth))
    monkeypatch.setenv("CISTATE_REGISTRY_USERNAME", "env-user")
    monkeypatch.setenv("CISTATE_REGISTRY_PASSWORD", "env-pass")
    settings = HandlerSettings()
    assert settings.credentials_for("reg.example.com") == Credentials("bob", "s3cret")
    assert settings.credentials_for("other:5000") == Credentials("env-user", "env-pass")
    assert "s3cret" not in repr(settings.credentials_for("reg.example.com"))
    assert "env-pass" not in repr(settings)
