"""Webhooks from GitHub, GitLab and Gitea: signatures, delivery ids, events, and the Push they
map onto, on the payload examples the hosts publish (tests/fixtures/webhooks/README.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from cistate.adapters.http import webhooks as wh
from cistate.domain.messages import ZERO_SHA, Push

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks"
SECRET = "s3cr3t-for-tests"

# Delivery ids as the hosts' documentation shows them.
GITHUB_DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
GITLAB_IDEMPOTENCY_KEY = "f5e5f430-f57b-4e6e-9fac-d9128cd7232f"
GITLAB_EVENT_UUID = "13792a34-cac6-4fda-95a8-c58e00a3954e"
GITLAB_WEBHOOK_UUID = "02affd2d-2cba-4033-917d-ec22d5dc4b38"
GITEA_DELIVERY = "f6266f16-1bf3-46a5-9ea4-602e06ead473"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def derived(name: str, **changes: Any) -> bytes:
    """A published payload with some fields changed (for cases the hosts publish no example of)."""
    payload = json.loads(fixture(name))
    payload.update(changes)
    return json.dumps(payload).encode()


def hmac_hex(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_headers(body: bytes, event: str = "push", secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/044aadd",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": GITHUB_DELIVERY,
        "X-GitHub-Hook-ID": "292430182",
        "X-Hub-Signature-256": "sha256=" + hmac_hex(body, secret),
    }


def gitlab_headers(event: str = "Push Hook", token: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/17.4.0",
        "X-Gitlab-Event": event,
        "X-Gitlab-Token": token,
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": GITLAB_WEBHOOK_UUID,
        "X-Gitlab-Event-UUID": GITLAB_EVENT_UUID,
        "Idempotency-Key": GITLAB_IDEMPOTENCY_KEY,
    }


def gitea_headers(body: bytes, event: str = "push", secret: str = SECRET) -> dict[str, str]:
    signature = hmac_hex(body, secret)
    return {
        "Content-Type": "application/json",
        "X-Gitea-Delivery": GITEA_DELIVERY,
        "X-Gitea-Event": event,
        "X-Gitea-Event-Type": event,
        "X-Gitea-Signature": signature,
        # Gitea also sends GitHub's and Gogs' headers; the gitea route reads its own.
        "X-GitHub-Delivery": GITEA_DELIVERY,
        "X-GitHub-Event": event,
        "X-Hub-Signature-256": "sha256=" + signature,
    }


def refused(provider: str, headers: Any, body: bytes, secret: str | None = SECRET
            ) -> wh.WebhookError:
    with pytest.raises(wh.WebhookError) as caught:
        wh.handle(provider, headers, body, secret)
    return caught.value


def without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


# --- a push opens a run -----------------------------------------------------------------------


def test_github_push_maps_onto_a_push() -> None:
    body = fixture("github/push.json")
    outcome = wh.handle("github", github_headers(body), body, SECRET)
    assert outcome == wh.WebhookOutcome(
        push=Push(
            repo="https://github.com/Codertocat/Hello-World.git",
            ref="refs/heads/master",
            commit="6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            before=ZERO_SHA,
            pusher="Codertocat",
            provider="github",
        ),
        delivery_id=GITHUB_DELIVERY,
        ignored=None,
        provider="github",
        event="push",
    )
    assert outcome.push is not None and outcome.push.branch == "master"


def test_gitlab_push_maps_onto_a_push() -> None:
    body = fixture("gitlab/push.json")
    outcome = wh.handle("gitlab", gitlab_headers(), body, SECRET)
    assert outcome.ignored is None
    assert outcome.delivery_id == GITLAB_IDEMPOTENCY_KEY
    assert outcome.push == Push(
        repo="http://example.com/mike/diaspora.git",
        ref="refs/heads/master",
        commit="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        before="95790bf891e76fee5e1747ab589903a6a1f80f22",
        pusher="jsmith",
        provider="gitlab",
    )


def test_gitea_push_maps_onto_a_push() -> None:
    body = fixture("gitea/push.json")
    outcome = wh.handle("gitea", gitea_headers(body), body, SECRET)
    assert outcome.ignored is None
    assert outcome.delivery_id == GITEA_DELIVERY
    assert outcome.push == Push(
        repo="http://localhost:3000/gitea/webhooks.git",
        ref="refs/heads/develop",
        commit="bffeb74224043ba2feb48d137756c8a9331c449a",
        before="28e1879d029cb852e4844d9c718537df08844e03",
        pusher="gitea",
        provider="gitea",
    )


def test_header_names_are_case_insensitive() -> None:
    body = fixture("github/push.json")
    lower = {k.lower(): v for k, v in github_headers(body).items()}
    upper = {k.upper(): v for k, v in github_headers(body).items()}
    expected = wh.handle("github", github_headers(body), body, SECRET)
    assert wh.handle("github", lower, body, SECRET) == expected
    assert wh.handle("github", upper, body, SECRET) == expected
    assert wh.handle("github", CIMultiDict(github_headers(body)), body, SECRET) == expected


def test_gitlab_falls_back_to_the_repository_url_and_after() -> None:
    payload = json.loads(fixture("gitlab/push.json"))
    del payload["project"]
    payload["checkout_sha"] = None
    body = json.dumps(payload).encode()
    outcome = wh.handle("gitlab", gitlab_headers(), body, SECRET)
    assert outcome.push is not None
    assert outcome.push.repo == "http://example.com/mike/diaspora.git"
    assert outcome.push.commit == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"


def test_a_push_without_before_or_pusher_still_opens_a_run() -> None:
    payload = json.loads(fixture("github/push.json"))
    del payload["before"], payload["pusher"]
    body = json.dumps(payload).encode()
    outcome = wh.handle("github", github_headers(body), body, SECRET)
    assert outcome.push is not None
    assert (outcome.push.before, outcome.push.pusher) == (None, None)


# --- redelivery -------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", wh.PROVIDERS)
def test_a_redelivery_carries_the_same_delivery_id(provider: str) -> None:
    body = fixture(f"{provider}/push.json")
    headers = {
        "github": github_headers(body),
        "gitlab": gitlab_headers(),
        "gitea": gitea_headers(body),
    }[provider]
    first = wh.handle(provider, headers, body, SECRET)
    again = wh.handle(provider, dict(headers), body, SECRET)
    assert first.delivery_id == again.delivery_id
    assert first == again


def test_gitlab_delivery_id_prefers_the_idempotency_key_then_the_event_uuid() -> None:
    body = fixture("gitlab/push.json")
    headers = gitlab_headers()
    assert wh.handle("gitlab", headers, body, SECRET).delivery_id == GITLAB_IDEMPOTENCY_KEY
    older = without(headers, "Idempotency-Key")  # GitLab before 17.4
    assert wh.handle("gitlab", older, body, SECRET).delivery_id == GITLAB_EVENT_UUID
    oldest = without(older, "X-Gitlab-Event-UUID")
    assert wh.handle("gitlab", oldest, body, SECRET).delivery_id == GITLAB_WEBHOOK_UUID


@pytest.mark.parametrize(("provider", "header"), [
    ("github", "X-GitHub-Delivery"), ("gitea", "X-Gitea-Delivery")])
def test_a_missing_delivery_id_is_400(provider: str, header: str) -> None:
    body = fixture(f"{provider}/push.json")
    headers = github_headers(body) if provider == "github" else gitea_headers(body)
    error = refused(provider, without(headers, header), body)
    assert error.status == 400 and header in error.reason


def test_gitlab_without_any_delivery_header_is_400() -> None:
    headers = gitlab_headers()
    for name in ("Idempotency-Key", "X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID"):
        headers = without(headers, name)
    error = refused("gitlab", headers, fixture("gitlab/push.json"))
    assert error.status == 400 and "Idempotency-Key" in error.reason


def test_an_unusable_delivery_id_is_400() -> None:
    body = fixture("github/push.json")
    headers = github_headers(body) | {"X-GitHub-Delivery": "has spaces\tand tabs"}
    assert refused("github", headers, body).status == 400
    headers = github_headers(body) | {"X-GitHub-Delivery": "x" * 256}
    assert refused("github", headers, body).status == 400


# --- signatures -------------------------------------------------------------------------------


def test_github_signature_matches_githubs_published_test_vector() -> None:
    # "Validating webhook deliveries": this secret and payload give exactly this signature.
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": GITHUB_DELIVERY,
        "X-Hub-Signature-256":
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
    }
    # Accepted as signed: what stops it is the body, which is no JSON, not the signature.
    error = refused("github", headers, b"Hello, World!", "It's a Secret to Everybody")
    assert error.status == 400 and "JSON" in error.reason
    assert refused("github", headers, b"Hello, World?", "It's a Secret to Everybody"
                   ).status == 401


def test_gitea_signature_is_the_bare_hex_hmac() -> None:
    headers = {
        "X-Gitea-Event": "push",
        "X-Gitea-Delivery": GITEA_DELIVERY,
        "X-Gitea-Signature": "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
    }
    error = refused("gitea", headers, b"Hello, World!", "It's a Secret to Everybody")
    assert error.status == 400  # signed; not JSON
    prefixed = headers | {"X-Gitea-Signature": "sha256=" + headers["X-Gitea-Signature"]}
    assert refused("gitea", prefixed, b"Hello, World!", "It's a Secret to Everybody"
                   ).status == 401


def test_signatures_accept_uppercase_hex() -> None:
    body = fixture("github/push.json")
    headers = github_headers(body)
    headers["X-Hub-Signature-256"] = "sha256=" + hmac_hex(body).upper()
    assert wh.handle("github", headers, body, SECRET).push is not None


@pytest.mark.parametrize("provider", wh.PROVIDERS)
def test_a_wrong_secret_is_401(provider: str) -> None:
    body = fixture(f"{provider}/push.json")
    headers = {
        "github": github_headers(body, secret="not-the-secret"),
        "gitlab": gitlab_headers(token="not-the-secret"),
        "gitea": gitea_headers(body, secret="not-the-secret"),
    }[provider]
    error = refused(provider, headers, body)
    assert error.status == 401
    assert "CISTATE_WEBHOOK_SECRET" in error.reason


@pytest.mark.parametrize(("provider", "header"), [
    ("github", "X-Hub-Signature-256"),
    ("gitlab", "X-Gitlab-Token"),
    ("gitea", "X-Gitea-Signature"),
])
def test_a_missing_signature_is_401(provider: str, header: str) -> None:
    body = fixture(f"{provider}/push.json")
    headers = {
        "github": github_headers(body),
        "gitlab": gitlab_headers(),
        "gitea": gitea_headers(body),
    }[provider]
    error = refused(provider, without(headers, header), body)
    assert error.status == 401 and header in error.reason


@pytest.mark.parametrize(("provider", "header"), [
    ("github", "X-Hub-Signature-256"),
    ("gitea", "X-Gitea-Signature"),
])
def test_a_tampered_body_with_the_original_signature_is_401(provider: str, header: str) -> None:
    body = fixture(f"{provider}/push.json")
    headers = github_headers(body) if provider == "github" else gitea_headers(body)
    tampered = body.replace(b"refs/heads/", b"refs/heads/evil-")
    assert tampered != body
    error = refused(provider, headers, tampered)
    assert error.status == 401 and header in error.reason


@pytest.mark.parametrize("value", [
    "", "sha1=" + "0" * 40, "sha256=", "sha256=not-hex", "757107ea0eb2509f",
])
def test_a_malformed_github_signature_is_401(value: str) -> None:
    body = fixture("github/push.json")
    headers = github_headers(body) | {"X-Hub-Signature-256": value}
    assert refused("github", headers, body).status == 401


def test_a_gitea_hook_without_a_secret_sends_an_empty_signature_which_is_401() -> None:
    body = fixture("gitea/push.json")
    headers = gitea_headers(body) | {"X-Gitea-Signature": ""}
    error = refused("gitea", headers, body)
    assert error.status == 401 and "empty" in error.reason


def test_a_non_ascii_token_or_signature_is_401_not_a_crash() -> None:
    body = fixture("gitlab/push.json")
    assert refused("gitlab", gitlab_headers(token="sécret\udcff"), body).status == 401
    body = fixture("github/push.json")
    headers = github_headers(body) | {"X-Hub-Signature-256": "sha256=é" + "0" * 63}
    assert refused("github", headers, body).status == 401


@pytest.mark.parametrize("secret", [None, ""])
@pytest.mark.parametrize("provider", wh.PROVIDERS)
def test_no_secret_configured_refuses_every_webhook(provider: str, secret: str | None) -> None:
    body = fixture(f"{provider}/push.json")
    # Even a delivery signed with an empty key, or a GitLab hook without a token.
    headers = {
        "github": github_headers(body, secret=""),
        "gitlab": without(gitlab_headers(), "X-Gitlab-Token"),
        "gitea": gitea_headers(body, secret="") | {"X-Gitea-Signature": ""},
    }[provider]
    error = refused(provider, headers, body, secret)
    assert error.status == 503
    assert error.reason == "webhooks are disabled: CISTATE_WEBHOOK_SECRET is not set"


def test_signature_is_checked_before_anything_in_the_body_is_trusted() -> None:
    # An unsigned request learns 401 and nothing else, whatever it sends.
    body = b"{not json"
    headers = github_headers(body, event="no-such-event", secret="wrong")
    assert refused("github", headers, body).status == 401


# --- events that open no run ------------------------------------------------------------------


def test_github_ping_is_acknowledged() -> None:
    body = fixture("github/ping.json")
    outcome = wh.handle("github", github_headers(body, event="ping"), body, SECRET)
    assert outcome.push is None
    assert outcome.delivery_id == GITHUB_DELIVERY
    assert outcome.ignored is not None and "ping" in outcome.ignored


def test_a_github_tag_push_is_ignored_as_a_tag() -> None:
    body = fixture("github/push-tag-deleted.json")
    outcome = wh.handle("github", github_headers(body), body, SECRET)
    assert outcome.push is None
    assert outcome.ignored is not None and "tag" in outcome.ignored


def test_a_github_tag_created_is_ignored_as_a_tag() -> None:
    body = derived("github/push.json", ref="refs/tags/v1.2.3", base_ref="refs/heads/master")
    outcome = wh.handle("github", github_headers(body), body, SECRET)
    assert outcome.push is None
    assert outcome.ignored is not None and "tag" in outcome.ignored


def test_a_gitlab_tag_push_hook_is_ignored_as_a_tag() -> None:
    body = fixture("gitlab/tag-push.json")
    outcome = wh.handle("gitlab", gitlab_headers(event="Tag Push Hook"), body, SECRET)
    assert outcome.push is None
    assert outcome.ignored is not None and "tag" in outcome.ignored


def test_a_gitea_tag_push_is_ignored_as_a_tag() -> None:
    body = derived("gitea/push.json", ref="refs/tags/v1.0.0")
    outcome = wh.handle("gitea", gitea_headers(body), body, SECRET)
    assert outcome.push is None
    assert outcome.ignored is not None and "tag" in outcome.ignored


def test_a_github_branch_deletion_is_ignored() -> None:
    # GitHub publishes no example of a deleted branch: the push example, deleted.
    body = derived("github/push.json", deleted=True, created=False, after=ZERO_SHA,
                   before="6113728f27ae82c7b1a177c8d03f9e96e0adf246", commits=[],
                   head_commit=None)
    outcome = wh.handle("github", github_headers(body), body, SECRET)
    assert outcome.push is None
    assert outcome.ignored is not None and "deletion" in outcome.ignored


def test_a_github_deleted_flag_alone_is_a_deletion() -> None:
    body = derived("github/push.json", deleted=True)
    assert wh.handle("github", github_headers(body), body, SECRET).push is None


def test_a_gitlab_branch_deletion_is_ignored() -> None:
    body = derived("gitlab/push.json", after=ZERO_SHA, checkout_sha=None, commits=[],
                   total_commits_count=0)
    outcome = wh.handle("gitlab", gitlab_headers(), body, SECRET)
    assert outcome.push is None
    assert outcome.ignored is not None and "deletion" in outcome.ignored


def test_a_gitea_push_with_after_all_zeros_is_a_deletion() -> None:
    body = derived("gitea/push.json", after=ZERO_SHA, commits=[])
    outcome = wh.handle("gitea", gitea_headers(body), body, SECRET)
    assert outcome.push is None
    assert outcome.ignored is not None and "deletion" in outcome.ignored


@pytest.mark.parametrize(("provider", "event"), [
    ("github", "create"), ("github", "delete"), ("gitea", "create"), ("gitea", "delete"),
])
def test_ref_lifecycle_events_are_acknowledged(provider: str, event: str) -> None:
    body = b'{"ref": "feature", "ref_type": "branch"}'
    headers = (github_headers(body, event=event) if provider == "github"
               else gitea_headers(body, event=event))
    outcome = wh.handle(provider, headers, body, SECRET)
    assert outcome.push is None and outcome.ignored is not None
    assert outcome.event == event


def test_a_ref_that_is_no_branch_is_ignored() -> None:
    body = derived("github/push.json", ref="refs/notes/commits")
    outcome = wh.handle("github", github_headers(body), body, SECRET)
    assert outcome.push is None
    assert outcome.ignored is not None and "not a branch" in outcome.ignored


# --- bad requests -----------------------------------------------------------------------------


def test_an_unknown_provider_is_404() -> None:
    body = fixture("github/push.json")
    error = refused("bitbucket", github_headers(body), body)
    assert error.status == 404 and "github, gitlab, gitea" in error.reason
    assert refused("GitHub", github_headers(body), body).status == 404


def refused_event(provider: str, event: str) -> wh.WebhookError:
    """How a correctly signed delivery of `event` with a bare body is refused."""
    body = b'{"action": "opened"}'
    headers = {
        "github": github_headers(body, event=event),
        "gitlab": gitlab_headers(event=event),
        "gitea": gitea_headers(body, event=event),
    }[provider]
    return refused(provider, headers, body)


@pytest.mark.parametrize(("provider", "event"), [
    ("github", "pull_request"), ("gitlab", "Merge Request Hook"), ("gitea", "pull_request"),
])
def test_a_pull_request_event_without_its_fields_is_422(provider: str, event: str) -> None:
    error = refused_event(provider, event)
    assert error.status == 422 and "missing field" in error.reason


@pytest.mark.parametrize(("provider", "event"), [
    ("github", "issues"), ("gitlab", "System Hook"), ("gitea", "issues"),
])
def test_an_unknown_event_is_400(provider: str, event: str) -> None:
    error = refused_event(provider, event)
    assert error.status == 400
    assert event in error.reason and "push, pull request and comment events" in error.reason


def test_a_missing_event_header_is_400() -> None:
    body = fixture("github/push.json")
    error = refused("github", without(github_headers(body), "X-GitHub-Event"), body)
    assert error.status == 400 and "X-GitHub-Event" in error.reason


@pytest.mark.parametrize("body", [
    b"", b"{not json", b'{"ref": "refs/heads/main"', b"\xff\xfe\xfa",
    b"[" * 100_000 + b"]" * 100_000, b'{"n": ' + b"9" * 5000 + b"}",
])
def test_malformed_json_is_400(body: bytes) -> None:
    error = refused("github", github_headers(body), body)
    assert error.status == 400 and "JSON" in error.reason


@pytest.mark.parametrize("body", [b"[]", b'"push"', b"null", b"42"])
def test_a_body_that_is_no_json_object_is_400(body: bytes) -> None:
    error = refused("github", github_headers(body), body)
    assert error.status == 400 and "object" in error.reason


def test_a_form_encoded_body_is_400_with_a_hint() -> None:
    body = b"payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%7D"
    error = refused("github", github_headers(body), body)
    assert error.status == 400 and "application/json" in error.reason


@pytest.mark.parametrize("provider", wh.PROVIDERS)
def test_a_missing_ref_is_422_naming_it(provider: str) -> None:
    payload = json.loads(fixture(f"{provider}/push.json"))
    del payload["ref"]
    body = json.dumps(payload).encode()
    headers = {
        "github": github_headers(body),
        "gitlab": gitlab_headers(),
        "gitea": gitea_headers(body),
    }[provider]
    error = refused(provider, headers, body)
    assert error.status == 422 and "'ref'" in error.reason


@pytest.mark.parametrize(("provider", "remove", "named"), [
    ("github", ("repository",), "repository.clone_url"),
    ("github", ("after",), "after"),
    ("gitlab", ("project", "repository"), "project.git_http_url"),
    ("gitlab", ("checkout_sha", "after"), "checkout_sha"),
    ("gitea", ("repository",), "repository.clone_url"),
])
def test_a_missing_field_is_422_naming_it(provider: str, remove: tuple[str, ...],
                                          named: str) -> None:
    payload = json.loads(fixture(f"{provider}/push.json"))
    for key in remove:
        del payload[key]
    body = json.dumps(payload).encode()
    headers = {
        "github": github_headers(body),
        "gitlab": gitlab_headers(),
        "gitea": gitea_headers(body),
    }[provider]
    error = refused(provider, headers, body)
    assert error.status == 422 and repr(named) in error.reason


def test_a_field_of_the_wrong_type_is_422() -> None:
    body = derived("github/push.json", ref=["refs/heads/master"])
    error = refused("github", github_headers(body), body)
    assert error.status == 422 and "'ref'" in error.reason and "string" in error.reason


def test_a_push_validation_error_is_422_naming_the_payload_field() -> None:
    body = derived("github/push.json", after="not-a-sha")
    error = refused("github", github_headers(body), body)
    assert error.status == 422
    assert "'after' (commit)" in error.reason
    body = derived("gitlab/push.json", user_username="u" * 300)
    error = refused("gitlab", gitlab_headers(), body)
    assert error.status == 422 and "'user_username' (pusher)" in error.reason


# --- size ---------------------------------------------------------------------------------------


def test_the_size_limit_is_one_mib() -> None:
    assert wh.MAX_BODY_BYTES == 1024 * 1024


def test_a_body_over_the_limit_is_413_before_its_signature_is_checked() -> None:
    body = b'{"ref": "refs/heads/main", "pad": "' + b"x" * wh.MAX_BODY_BYTES + b'"}'
    error = refused("github", github_headers(body), body)
    assert error.status == 413 and str(wh.MAX_BODY_BYTES) in error.reason
    assert refused("github", {}, body).status == 413  # unsigned: still 413, no HMAC work


def test_a_body_at_the_limit_is_read() -> None:
    payload = json.loads(fixture("github/push.json"))
    payload["pad"] = ""
    size = len(json.dumps(payload).encode())
    payload["pad"] = "x" * (wh.MAX_BODY_BYTES - size)
    body = json.dumps(payload).encode()
    assert len(body) == wh.MAX_BODY_BYTES
    assert wh.handle("github", github_headers(body), body, SECRET).push is not None


def test_check_size_on_content_length() -> None:
    wh.check_size(None)
    wh.check_size(0)
    wh.check_size(wh.MAX_BODY_BYTES)
    with pytest.raises(wh.WebhookError) as caught:
        wh.check_size(wh.MAX_BODY_BYTES + 1)
    assert caught.value.status == 413


def test_webhook_error_carries_status_and_reason() -> None:
    error = wh.WebhookError(401, "nope")
    assert (error.status, error.reason, str(error)) == (401, "nope", "nope")


def test_an_empty_ref_is_422_not_ignored() -> None:
    body = derived("github/push.json", ref="")
    error = refused("github", github_headers(body), body)
    assert error.status == 422 and "'ref'" in error.reason


# --- pull requests and comment commands -------------------------------------------------------
# GitLab's and Gitea's payloads are built from their documented fields (GitLab "Merge request
# events" and "Comment events"; Gitea's pull_request and issue_comment payloads follow
# GitHub's shape); GitHub's is the published example in tests/fixtures/webhooks.

GITLAB_MR = {
    "object_kind": "merge_request", "event_type": "merge_request",
    "user": {"username": "root"},
    "project": {"id": 1, "git_http_url": "https://gitlab.example.com/gitlabhq/gitlab-test.git"},
    "object_attributes": {
        "iid": 1, "action": "open", "target_branch": "master", "source_branch": "ms-viewport",
        "source_project_id": 14, "target_project_id": 14,
        "last_commit": {"id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"},
        "source": {"git_http_url": "https://gitlab.example.com/awesome_space/awesome.git"},
        "target": {"git_http_url": "https://gitlab.example.com/gitlabhq/gitlab-test.git"},
    },
}


def test_a_github_pull_request_opens_a_run_on_its_head() -> None:
    body = fixture("github/pull_request-opened.json")
    outcome = wh.handle("github", github_headers(body, "pull_request"), body, SECRET)
    assert outcome.push is not None
    assert (outcome.push.ref, outcome.push.commit) == (
        "refs/pull/2/head", "ec26c3e57ca3a959ca5aad62de7213c562f8c821")
    assert outcome.push.pr is not None
    assert (outcome.push.pr.number, outcome.push.pr.base, outcome.push.pr.fork) == (
        2, "master", False)
    assert outcome.push.target_branch == "master"


def test_a_gitlab_merge_request_opens_runs_and_closing_it_cancels_them() -> None:
    body = json.dumps(GITLAB_MR).encode()
    outcome = wh.handle("gitlab", gitlab_headers("Merge Request Hook"), body, SECRET)
    assert outcome.push is not None and outcome.push.pr is not None
    assert outcome.push.ref == "refs/merge-requests/1/head"
    assert outcome.push.commit == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    assert outcome.push.pr.fork is False  # same project: its head is not a fork's
    forked = json.loads(body)
    forked["object_attributes"]["source_project_id"] = 99
    outcome = wh.handle("gitlab", gitlab_headers("Merge Request Hook"),
                        json.dumps(forked).encode(), SECRET)
    assert outcome.push is not None and outcome.push.pr is not None and outcome.push.pr.fork
    for action in ("close", "merge"):
        closed = json.loads(body)
        closed["object_attributes"]["action"] = action
        outcome = wh.handle("gitlab", gitlab_headers("Merge Request Hook"),
                            json.dumps(closed).encode(), SECRET)
        assert outcome.push is None and outcome.closed == wh.PullRequestRef(
            "https://gitlab.example.com/gitlabhq/gitlab-test.git", 1,
            "refs/merge-requests/1/head")


def test_comment_commands_on_each_host() -> None:
    note = json.dumps({
        "object_kind": "note", "user": {"username": "root"},
        "project": {"git_http_url": "https://gitlab.example.com/gitlabhq/gitlab-test.git"},
        "object_attributes": {"note": "/retest unit-tests\nthanks",
                              "noteable_type": "MergeRequest"},
        "merge_request": {"iid": 1}}).encode()
    outcome = wh.handle("gitlab", gitlab_headers("Note Hook"), note, SECRET)
    assert outcome.command == wh.Command(wh.PullRequestRef(
        "https://gitlab.example.com/gitlabhq/gitlab-test.git", 1, "refs/merge-requests/1/head"),
        "root", "retest", "unit-tests")
    gitea = json.dumps({
        "action": "created", "is_pull": True, "issue": {"number": 3},
        "comment": {"body": "/cancel", "user": {"login": "gitea-admin"}},
        "repository": {"clone_url": "http://localhost:3000/gitea/webhooks.git"},
        "sender": {"login": "gitea-admin"}}).encode()
    outcome = wh.handle("gitea", gitea_headers(gitea, "issue_comment"), gitea, SECRET)
    assert outcome.command is not None
    assert (outcome.command.name, outcome.command.user, outcome.command.pull_request.ref) == (
        "cancel", "gitea-admin", "refs/pull/3/head")
    # an issue that is not a pull request, an edit, a sentence, a step on /cancel: nothing
    for changed in ({"is_pull": False}, {"action": "edited"},
                    {"comment": {"body": "I will /retest later", "user": {"login": "a"}}},
                    {"comment": {"body": "/cancel build", "user": {"login": "a"}}}):
        payload = {**json.loads(gitea), **changed}
        body = json.dumps(payload).encode()
        outcome = wh.handle("gitea", gitea_headers(body, "issue_comment"), body, SECRET)
        assert outcome.command is None and outcome.ignored, changed
