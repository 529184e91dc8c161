"""Declared secrets: where the worker finds them, which repos may use them, and masking them
in output that arrives in pieces."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cistate.domain.messages import SecretRef
from cistate.domain.pipeline import PipelineError, parse
from handlers.base import StepFailed, StepLog
from handlers.masking import MASK, Masker
from handlers.secrets import SecretSource, load_scopes, worker_credentials

pytestmark = pytest.mark.unit

SECRET = "hunter2-but-longer"


@given(prefix=st.text(max_size=40), suffix=st.text(max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=6))
def test_a_secret_cut_into_any_pieces_never_reaches_the_log(
        prefix: str, suffix: str, cuts: list[int]) -> None:
    text = prefix + SECRET + suffix
    points = sorted({min(cut, len(text)) for cut in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    log = StepLog(masker=Masker([SECRET]))
    for piece in pieces:
        log.write(piece)
    kept = log.text()
    assert SECRET not in kept
    assert kept == Masker([SECRET]).mask(text), "pieces are masked as the whole would be"


def test_every_printed_form_of_a_secret_is_masked() -> None:
    value = 'p@ss/w"rd+1=\\x'
    masker = Masker([value])
    for form in (value, base64.b64encode(value.encode()).decode(),
                 base64.b64encode((value + "\n").encode()).decode(),
                 quote(value, safe=""), json.dumps(value)[1:-1]):
        assert MASK in masker.mask(f"before {form} after")
        assert value not in masker.mask(form)
    assert masker.mask_data({"out": [value, {"k": value}], value: 1}) == {
        "out": [MASK, {"k": MASK}], MASK: 1}


def test_short_values_mask_nothing_and_no_secrets_cost_nothing() -> None:
    assert Masker(["abc"]).mask("abc abc") == "abc abc"
    assert not Masker([])
    stream = Masker([]).stream()
    assert stream.feed("plain text") == "plain text"


def test_secrets_come_from_the_directory_first_then_the_environment(tmp_path: Path) -> None:
    (tmp_path / "NPM_TOKEN").write_text("from-the-file-1234\n")
    source = SecretSource(tmp_path, {"CISTATE_SECRET_NPM_TOKEN": "from-env-1234",
                                     "CISTATE_SECRET_OTHER": "other-value-1234"}, None)
    found = source.resolve([SecretRef(name="NPM_TOKEN"), SecretRef(name="OTHER", as_="file")],
                           step="test", repo="https://git.example.com/a/b.git")
    assert [(s.name, s.value, s.variable) for s in found] == [
        ("NPM_TOKEN", "from-the-file-1234", "NPM_TOKEN"),
        ("OTHER", "other-value-1234", "OTHER_FILE")]


def test_missing_and_short_secrets_are_refused_naming_them(tmp_path: Path) -> None:
    source = SecretSource(tmp_path, {"CISTATE_SECRET_SHORT": "abc"}, None)
    with pytest.raises(StepFailed, match=r"NOPE.*CISTATE_SECRET_NOPE") as missing:
        source.resolve([SecretRef(name="NOPE")], step="test", repo="r")
    assert not missing.value.retryable and str(tmp_path) in missing.value.message
    with pytest.raises(StepFailed, match="shorter than 4"):
        source.resolve([SecretRef(name="SHORT")], step="test", repo="r")


def test_scopes_match_repo_urls_without_their_credentials() -> None:
    scopes = load_scopes('{"DEPLOY": ["https://git.example.com/acme/*"]}', None)
    source = SecretSource(None, {"CISTATE_SECRET_DEPLOY": "deploy-key-1234",
                                 "CISTATE_SECRET_UNSCOPED": "unscoped-1234"}, scopes)
    ok = source.resolve([SecretRef(name="DEPLOY")], step="s",
                        repo="https://bot:pw@git.example.com/acme/shop.git")
    assert ok[0].value == "deploy-key-1234"
    with pytest.raises(StepFailed, match="may not use") as other:
        source.resolve([SecretRef(name="DEPLOY")], step="s",
                       repo="https://git.example.com/evil/shop.git")
    assert "pw" not in other.value.message
    with pytest.raises(StepFailed, match="no repository may use"):
        source.resolve([SecretRef(name="UNSCOPED")], step="s",
                       repo="https://git.example.com/acme/shop.git")


def test_scopes_file_must_map_names_to_lists(tmp_path: Path) -> None:
    good = tmp_path / "scopes.yaml"
    good.write_text("NPM_TOKEN: ['https://git.example.com/*']\n")
    assert load_scopes(None, good) == {"NPM_TOKEN": ["https://git.example.com/*"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("NPM_TOKEN: https://git.example.com/*\n")
    with pytest.raises(ValueError, match="lists of repo URL globs"):
        load_scopes(None, bad)
    assert load_scopes(None, None) is None


def test_the_workers_own_credentials_are_found_but_not_its_paths() -> None:
    found = worker_credentials({
        "CISTATE_REGISTRY_PASSWORD": "reg-pass-1234",
        "CISTATE_API_TOKEN": "alice:tok-alice-1,grafana:tok-grafana-2:read",
        "CISTATE_DATABASE_URL": "postgresql://u:db-pass-5678@host/db",
        "CISTATE_SECRETS_DIR": "/var/run/secrets/cistate",
        "CISTATE_BUS_KEY_FILE": "/etc/cistate/bus.key",
        "PATH": "/usr/bin",
    })
    assert {"reg-pass-1234", "tok-alice-1", "tok-grafana-2", "db-pass-5678"} <= set(found)
    assert "/var/run/secrets/cistate" not in found and "/etc/cistate/bus.key" not in found


STEP = """
name: p
steps:
  - name: s
    uses: script
    run: "true"
"""


def test_pipelines_declare_secrets_env_and_network() -> None:
    pipeline = parse(STEP + "    secrets: [A_TOKEN, {name: KEY, as: file}]\n"
                     "    env: {MODE: ci}\n    network: none\n", "p.yaml", ["script"])
    step = pipeline.steps[0]
    assert [(s.name, s.as_) for s in step.secrets] == [("A_TOKEN", "env"), ("KEY", "file")]
    assert step.env == {"MODE": "ci"} and step.network == "none"


@pytest.mark.parametrize(("extra", "problem"), [
    ("    secrets: [lower]\n", "secrets"),
    ("    secrets: [A_TOKEN, A_TOKEN]\n", "named twice"),
    ("    env: {CISTATE_REPO: x}\n", "CISTATE_"),
    ("    env: {KEY_FILE: x}\n    secrets: [{name: KEY, as: file}]\n", "KEY_FILE"),
    ("    network: host\n", "network"),
    ("    env: {'BAD NAME': x}\n", "env"),
])
def test_bad_secrets_env_or_network_stop_the_load_naming_the_step(
        extra: str, problem: str) -> None:
    with pytest.raises(PipelineError, match=problem) as refused:
        parse(STEP + extra, "p.yaml", ["script"])
    assert "p.yaml: step 's'" in str(refused.value)
