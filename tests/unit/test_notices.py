"""What a run tells the outside (cistate.domain.notices and the run's decisions): a commit
status when it starts and when it ends (and per step when asked), a notification when it
ends or an approval waits; each host's documented request; nothing at all when the
deployment configured no host and no receiver."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cistate.domain import notices as nt
from cistate.domain import pipeline as p
from cistate.domain import run as r
from cistate.domain.messages import Notice, NoticeResult, Push, StepCommand

from ._support import REPO, Harness, push

pytestmark = pytest.mark.unit

PIPELINE = """
name: shop
steps:
  - {name: build, uses: noop}
  - {name: test, uses: noop}
"""
GATED = """
name: shop
steps:
  - {name: build, uses: noop}
  - {name: gate, uses: approval, with: {approvers: [alice]}}
"""


def harness(text: str = PIPELINE, **policy: bool) -> Harness:
    pipeline = p.parse(text, "shop.yaml", {"noop", "approval"})
    return Harness(r.Decider(pipeline, notices=nt.NoticePolicy(**policy)))


def notices(decision: r.Decision) -> list[Notice]:
    return [o.body for o in decision.outgoing if isinstance(o.body, Notice)]


def test_a_run_sends_pending_when_it_starts_and_its_outcome_when_it_ends() -> None:
    h = harness(statuses=True)
    [pending] = notices(h.send(push(provider="github")))
    assert (pending.kind, pending.context, pending.state, pending.description) == (
        "status", "cistate/shop", "pending", "running")
    assert (pending.repo, pending.provider) == (REPO, "github")
    assert notices(h.send(h.ok("build"))) == []  # still pending: nothing new to tell
    [done] = notices(h.send(h.ok("test")))
    assert (done.state, done.description) == ("success", "succeeded")
    assert done.seq > pending.seq and done.order_at == pending.order_at
    assert h.state.notices["cistate/shop"]["state"] == "success"
    assert h.state.notices["cistate/shop"]["delivery"] == "sent"


def test_a_failed_run_names_the_step_and_the_first_line_of_its_error() -> None:
    h = harness(statuses=True)
    h.send(push())
    h.send(h.ok("build"))
    [failed] = notices(h.send(h.fail("test", "3 tests failed\nat foo.js:3", retryable=False)))
    assert (failed.state, failed.description) == ("failure", "test failed: 3 tests failed")
    # a retry starts it again: pending once more
    [again] = notices(h.send(h.control("retry")))
    assert again.state == "pending"


def test_a_cancelled_run_is_an_error_status() -> None:
    h = harness(statuses=True)
    h.send(push())
    [cancelled] = notices(h.send(h.control("cancel"), actor="api:alice"))
    assert (cancelled.state, cancelled.description) == ("error", "cancelled at build")


def test_per_step_statuses_follow_each_step() -> None:
    h = harness(statuses=True, per_step=True)
    sent = notices(h.send(push()))
    assert [(n.context, n.state) for n in sent] == [("cistate/shop", "pending"),
                                                    ("cistate/shop/build", "pending")]
    sent = notices(h.send(h.ok("build")))
    assert [(n.context, n.state) for n in sent] == [("cistate/shop/build", "success"),
                                                    ("cistate/shop/test", "pending")]


def test_receivers_hear_of_the_end_and_of_an_approval_waiting() -> None:
    h = harness(GATED, webhooks=True)
    assert notices(h.send(push())) == []
    [waiting] = notices(h.send(h.ok("build")))
    assert (waiting.kind, waiting.step, waiting.approvers) == ("approval.requested", "gate",
                                                              ["alice"])
    [ended] = notices(h.send(h.control("approve", "gate"), actor="api:alice"))
    assert (ended.kind, ended.run_state) == ("run.ended", "succeeded")


def test_without_hosts_or_receivers_a_run_tells_nobody_and_records_nothing() -> None:
    h = harness()
    decisions = [h.send(push()), h.send(h.ok("build")), h.send(h.ok("test"))]
    assert all(notices(d) == [] for d in decisions)
    assert not any(t.startswith("notice.") for t, _, _ in h.log)
    assert h.state.notices == {}


def test_the_notifiers_reports_are_events_and_show_the_latest_delivery() -> None:
    h = harness(statuses=True)
    [pending] = notices(h.send(push()))
    notice_id = uuid.UUID(h.state.notices["cistate/shop"]["notice"])
    assert pending.seq == h.state.version  # notice.sent was its decision's last event
    report = NoticeResult(run_id=h.run_id, notice=notice_id, kind="status", target="github",
                          outcome="failed", retrying=True, attempt=1, http_status=502,
                          reason="HTTP 502: bad gateway")
    decision = h.send(report)
    assert [str(e.type) for e in decision.events] == ["notice.failed"]
    assert h.state.notices["cistate/shop"]["delivery"] == "retrying"
    h.send(report.model_copy(update={"outcome": "delivered", "retrying": False,
                                     "attempt": 2, "http_status": 201, "reason": None}))
    assert h.state.notices["cistate/shop"]["delivery"] == "delivered"
    # only cistate's notifier reports
    with pytest.raises(r.Rejected, match="notifier"):
        h.decide(report, actor="api:mallory")
    # the run refolds to the same
    assert r.fold(h.run_id, h.log).notices == h.state.notices


@pytest.mark.parametrize(("provider", "url", "state"), [
    ("github", "http://h/repos/acme/shop/statuses/" + "c" * 40, "failure"),
    ("gitea", "http://h/api/v1/repos/acme/shop/statuses/" + "c" * 40, "failure"),
    ("gitlab", "http://h/api/v4/projects/acme%2Fshop/statuses/" + "c" * 40, "failed"),
])
def test_each_host_is_asked_on_its_documented_path_with_its_state_names(
        provider: str, url: str, state: str) -> None:
    request = nt.status_request(provider, "http://h/", "https://x.example/acme/shop.git",
                                "c" * 40, "failure", "cistate/shop", "test failed", None)
    assert request is not None and request.url == url
    assert request.json["state"] == state
    assert request.json["name" if provider == "gitlab" else "context"] == "cistate/shop"
    assert "target_url" not in request.json
    assert nt.status_request(provider, "http://h", "/srv/git/shop", "c" * 40, "success",
                             "c", "d", None) is None  # a local path names no repository
    scp = nt.status_request(provider, "http://h/", "git@x.example:acme/shop.git", "c" * 40,
                            "failure", "cistate/shop", "test failed", None)
    assert scp is not None and scp.url == url


def test_the_host_comes_from_the_push_or_the_repository_url() -> None:
    hosts = {"github": "https://api.github.com", "gitlab": "https://gitlab.example.com"}
    assert nt.provider_of("https://github.com/a/b.git", None, hosts) == "github"
    assert nt.provider_of("https://gitlab.example.com/a/b.git", None, hosts) == "gitlab"
    assert nt.provider_of("https://elsewhere.example/a/b.git", None, hosts) is None
    assert nt.provider_of("git@github.com:a/b.git", None, hosts) == "github"
    assert nt.provider_of("https://elsewhere.example/a/b.git", "gitea", hosts) == "gitea"
    assert nt.repo_path("https://gitlab.example.com/g/sub/app.git") == "g/sub/app"
    assert nt.status_request("github", "http://h", "https://github.com/g/sub/app.git",
                             "c" * 40, "success", "c", "d", None) is None
    assert nt.describe("failure", "test", "x" * 300, None).endswith("…")
    assert len(nt.describe("failure", "test", "x" * 300, None)) == nt.DESCRIPTION_CHARS


PR_PIPELINE = """
name: shop
steps:
  - {name: build, uses: noop, secrets: [NPM_TOKEN]}
  - {name: preview, uses: noop, when: {branches: [main], pull_request: true}}
  - {name: release, uses: noop, when: {branches: [main]}}
"""


def pr_push(fork: bool) -> Push:
    return push(ref="refs/pull/7/head", pr={"number": 7, "base": "main", "author": "dev",
                                          "head_repo": "https://git.example.com/x/shop.git",
                                          "fork": fork})


def test_a_pull_request_runs_when_steps_only_when_they_say_pull_request() -> None:
    h = harness(PR_PIPELINE)
    h.send(pr_push(fork=False))
    h.send(h.ok("build"))
    assert h.state.steps["preview"].state == "running"
    assert h.state.steps["release"].state == "skipped"
    [command] = [o.body for o in h.send(h.ok("preview")).outgoing
                 if isinstance(o.body, StepCommand)] or [None]
    assert command is None  # release skipped: nothing more to start
    assert h.state.status == "succeeded"


def test_a_forks_pull_request_waits_for_ok_to_test_gets_no_secrets_and_writes_no_cache(
) -> None:
    h = harness(PR_PIPELINE)
    opened = h.send(pr_push(fork=True))
    assert h.state.status == "waiting"
    assert not [o for o in opened.outgoing if isinstance(o.body, StepCommand)]
    decision = h.send(h.control("ok_to_test"), actor="github:octocat")
    [command] = [o.body for o in decision.outgoing if isinstance(o.body, StepCommand)]
    assert command.step == "build" and command.secrets == []
    assert command.untrusted  # reads the worker's caches, never writes them
    with pytest.raises(r.Rejected, match="does not wait for /ok-to-test"):
        h.decide(h.control("ok_to_test"), actor="github:octocat")
    same_repo = harness(PR_PIPELINE)
    [own] = [o.body for o in same_repo.send(pr_push(fork=False)).outgoing
             if isinstance(o.body, StepCommand)]
    assert [s.name for s in own.secrets] == ["NPM_TOKEN"]
    assert not own.untrusted


def test_a_hosts_token_comes_from_the_environment_or_the_secret_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cistate.config import NotifySettings
    secrets = tmp_path
    (secrets / "GITLAB_TOKEN").write_text("glpat-from-a-file\n")
    monkeypatch.setenv("CISTATE_GITHUB_TOKEN", "ghp-from-env")
    monkeypatch.setenv("CISTATE_GITLAB_URL", "https://gitlab.example.com")
    monkeypatch.setenv("CISTATE_SECRETS_DIR", str(secrets))
    settings = NotifySettings()
    assert settings.token("github") == "ghp-from-env"
    assert settings.token("gitlab") == "glpat-from-a-file"
    assert settings.token("gitea") is None
    assert settings.hosts() == {"github": "https://api.github.com",
                                "gitlab": "https://gitlab.example.com"}
    assert settings.policy.statuses and not settings.policy.webhooks
    assert "ghp-from-env" not in repr(settings)
