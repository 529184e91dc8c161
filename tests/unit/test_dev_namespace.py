"""The dev namespace of a run: a template such as `dev-${branch}`, rendered into one valid
Kubernetes namespace name per branch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers.base import StepFailed, StepLog, StepRequest
from handlers.cd_settings import for_request, render_namespace
from handlers.health import deployed_namespace
from handlers.sandbox import Sandbox, SandboxSettings

pytestmark = pytest.mark.unit

RFC_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
HASHED = re.compile(r"-[0-9a-f]{8}")


def branch(name: str) -> str:
    return render_namespace("dev-${branch}", {"branch": name})


def is_label(name: str) -> bool:
    return bool(RFC_1123_LABEL.fullmatch(name)) and len(name) <= 63


def test_a_branch_that_is_already_a_name_is_used_as_it_is() -> None:
    assert branch("main") == "dev-main"
    assert branch("release-1-2") == "dev-release-1-2"
    assert render_namespace("dev", {}) == "dev"


def test_a_branch_made_dns_safe_keeps_its_words_and_gets_a_hash_of_the_full_name() -> None:
    rendered = branch("feature/Login_Page")
    assert rendered.startswith("dev-feature-login-page-") and is_label(rendered)
    assert HASHED.fullmatch(rendered.removeprefix("dev-feature-login-page"))
    # the branches that would read the same once made safe still get namespaces of their own
    look_alikes = ["feature/Login_Page", "feature/login-page", "feature-login-page",
                   "Feature/Login/Page", "feature--login--page", "feature/login-page/"]
    assert len({branch(name) for name in look_alikes}) == len(look_alikes)
    assert branch("feature/Login_Page") == rendered, "the same branch, the same namespace"


def test_a_name_that_looks_hashed_is_hashed_so_that_no_branch_can_take_anothers() -> None:
    taken = branch("feature/x")
    assert branch(taken.removeprefix("dev-")) != taken


def test_a_long_name_is_cut_to_63_characters_and_stays_unique() -> None:
    common = "feature/" + "very-long-branch-name-" * 5
    first, second = branch(common + "one"), branch(common + "two")
    assert first != second
    for rendered in (first, second):
        assert is_label(rendered) and len(rendered) == 63
        assert rendered.startswith("dev-feature-very-long-branch-name-")
    assert is_label(branch("a" * 70)) and branch("a" * 70) != branch("a" * 71)


def test_a_branch_with_nothing_dns_safe_in_it_still_gets_a_name() -> None:
    for name in ("日本語", "___", "-", "Ä"):
        assert is_label(branch(name)), name
    assert is_label(render_namespace("${branch}", {"branch": "日本語"}))
    assert branch("日本語") != branch("中文")


def test_app_and_short_sha_can_be_part_of_the_name() -> None:
    values = {"app": "hello-app", "branch": "main", "short_sha": "3f0c2a1"}
    assert render_namespace("${app}-${branch}", values) == "hello-app-main"
    assert render_namespace("pr-${short_sha}", values) == "pr-3f0c2a1"


@given(st.text(max_size=300))
def test_any_branch_gives_a_valid_rfc_1123_label(name: str) -> None:
    assert is_label(branch(name))
    assert is_label(render_namespace("${branch}", {"branch": name}))


@given(st.text(max_size=120), st.text(max_size=120))
def test_different_branches_give_different_names(first: str, second: str) -> None:
    assert (branch(first) == branch(second)) == (first == second)


def test_similar_branches_give_different_names() -> None:
    names = ["main", "Main", "MAIN", "main/", "main-", "-main", "ma_in", "ma-in", "ma/in",
             "feature/x", "feature-x", "feature_x", "feature/X", "feature//x"]
    assert len({branch(name) for name in names}) == len(names)


def request_with(tmp_path: Path, settings: dict[str, object], *, step: str = "deploy",
                 ref: str = "refs/heads/main",
                 inputs: dict[str, dict[str, Any]] | None = None) -> StepRequest:
    sandbox = Sandbox(settings=SandboxSettings(), attempt=tmp_path / "attempt", identity={})
    return StepRequest(
        run_id="r", repo="https://git.example.com/app.git", ref=ref,
        commit="3f0c2a1" + "0" * 33, step=step, attempt=1, settings=settings, script=None,
        inputs=inputs or {}, workdir=tmp_path, log=StepLog(), sandbox=sandbox,
    )


def test_the_template_is_rendered_from_the_runs_branch_app_and_short_sha(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = {"setup": {"app_name": "shop", "branch": "feature/x", "short_sha": "abcdef1"}}
    request = request_with(tmp_path, {"namespace": "${app}-${branch}"}, inputs=setup)
    rendered = for_request(request).namespace_for(request)
    assert HASHED.fullmatch(rendered.removeprefix("shop-feature-x")), rendered
    # without setup's outputs: the branch of the pushed ref, the commit's first 7 characters
    request = request_with(tmp_path, {"namespace": "dev-${branch}-${short_sha}"},
                           ref="refs/heads/next")
    assert for_request(request).namespace_for(request) == "dev-next-3f0c2a1"
    monkeypatch.setenv("CISTATE_DEV_NAMESPACE", "dev-${branch}")
    request = request_with(tmp_path, {}, ref="refs/heads/main")
    assert for_request(request).namespace_for(request) == "dev-main"
    assert for_request(request_with(tmp_path, {"namespace": "qa"})).namespace_for(
        request) == "qa"


@pytest.mark.parametrize(("template", "problem"), [
    ("dev-${user}", "${user}, which is not a variable of a namespace template"),
    ("Dev-${branch}", "outside ${...} it may hold only a-z, 0-9 and -"),
    ("dev_${branch}", "outside ${...} it may hold only a-z, 0-9 and -"),
    ("dev-$branch", "outside ${...} it may hold only a-z, 0-9 and -"),
    ("dev-${branch", "outside ${...} it may hold only a-z, 0-9 and -"),
    ("Dev", "is not a Kubernetes namespace name"),
    ("-dev", "is not a Kubernetes namespace name"),
    ("", "is not a Kubernetes namespace name"),
])
def test_a_bad_template_is_refused_with_what_to_change(
    tmp_path: Path, template: str, problem: str
) -> None:
    with pytest.raises(StepFailed) as info:
        for_request(request_with(tmp_path, {"namespace": template}))
    assert problem in info.value.message and info.value.retryable is False


def test_health_looks_where_deploy_deployed_else_renders_the_same_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CISTATE_DEV_NAMESPACE", "dev-${branch}")
    setup = {"app_name": "shop", "branch": "feature/x"}
    request = request_with(tmp_path, {}, step="health", ref="refs/heads/feature/x",
                           inputs={"setup": setup, "deploy": {"namespace": "elsewhere"}})
    assert deployed_namespace(request, for_request(request)) == "elsewhere"
    request = request_with(tmp_path, {}, step="health", ref="refs/heads/feature/x",
                           inputs={"setup": setup})
    assert deployed_namespace(request, for_request(request)) == branch("feature/x")
