"""Bus message contracts: the committed JSON Schemas match the models, and the models refuse
bodies a producer must not send."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cistate.adapters.cli.main import message_schemas
from cistate.domain.messages import ZERO_SHA, Control, Push, StepCommand, StepResult

pytestmark = pytest.mark.unit

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"
GOOD = {"repo": "https://git.example.com/acme/shop.git", "ref": "refs/heads/main",
        "commit": "0123456789abcdef0123456789abcdef01234567"}


def test_committed_schemas_equal_the_generated_ones() -> None:
    generated = message_schemas()
    assert set(generated) == {"push", "step-command", "step-result", "control", "claim",
                              "notice", "step-log", "cancel-step"}
    committed = {p.name.removesuffix(".schema.json") for p in SCHEMA_DIR.glob("*.schema.json")}
    assert committed == set(generated), "a schema file is missing or stale"
    for name, text in generated.items():
        on_disk = (SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")
        assert on_disk == text, (
            f"schema/{name}.schema.json is out of date: run `cistate schema export`")


def test_push_schema_states_the_contract() -> None:
    schema = json.loads(message_schemas()["push"])
    assert set(schema["required"]) == {"repo", "ref", "commit"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["commit"]["pattern"] == "^[0-9a-f]{7,64}$"
    command = json.loads(message_schemas()["step-command"])
    assert "with" in command["properties"] and "run" in command["properties"]


def test_valid_push() -> None:
    push = Push.model_validate({**GOOD, "before": "abcdef1", "pusher": "dev",
                                "provider": "gitea"})
    assert push.branch == "main"
    assert not push.is_deletion
    assert Push.model_validate({**GOOD, "ref": "feature/x"}).branch == "feature/x"
    assert Push.model_validate({**GOOD, "ref": "refs/tags/v1.0.0"}).branch is None
    assert Push.model_validate({**GOOD, "commit": ZERO_SHA}).is_deletion


@pytest.mark.parametrize(
    "body",
    [
        {**GOOD, "commit": "not-a-sha"},
        {**GOOD, "commit": "0123456789abcdefg"},
        {**GOOD, "commit": "abc12"},  # too short
        {**GOOD, "commit": ""},
        {**GOOD, "before": "xyz"},
        {k: v for k, v in GOOD.items() if k != "repo"},
        {k: v for k, v in GOOD.items() if k != "commit"},
        {**GOOD, "repo": ""},
        {**GOOD, "branch": "main"},  # extra field
        {**GOOD, "token": "s3cret"},  # extra field
    ],
)
def test_push_validation_rejects(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Push.model_validate(body)


def test_messages_are_frozen() -> None:
    push = Push.model_validate(GOOD)
    with pytest.raises(ValidationError):
        push.commit = "abcdef1"  # type: ignore[misc]


def test_step_command_uses_the_schema_aliases() -> None:
    run_id = uuid.uuid4()
    body = {"run_id": str(run_id), "step": "lint", "attempt": 1, "uses": "script",
            "with": {"x": 1}, "run": "npm run lint", "repo": GOOD["repo"], "ref": "main",
            "commit": GOOD["commit"]}
    command = StepCommand.model_validate(body)
    assert command.settings == {"x": 1} and command.script == "npm run lint"
    dumped = command.model_dump(mode="json", by_alias=True)
    assert dumped["with"] == {"x": 1} and dumped["run"] == "npm run lint"
    assert StepCommand.model_validate(dumped) == command
    with pytest.raises(ValidationError):
        StepCommand.model_validate({**body, "attempt": 0})
    with pytest.raises(ValidationError):
        StepCommand.model_validate({**body, "step": "Lint Step"})


def test_result_and_control_validation() -> None:
    run_id = str(uuid.uuid4())
    with pytest.raises(ValidationError):
        StepResult.model_validate({"run_id": run_id, "step": "a", "attempt": 1,
                                   "status": "paused"})
    with pytest.raises(ValidationError):
        StepResult.model_validate({"run_id": "not-a-uuid", "step": "a", "attempt": 1,
                                   "status": "failed"})
    with pytest.raises(ValidationError):
        Control.model_validate({"run_id": run_id, "action": "pause"})
    # who acted is the signed sender of the message, never a field anyone can set
    with pytest.raises(ValidationError, match="actor"):
        Control.model_validate({"run_id": run_id, "action": "cancel", "actor": "api:alice"})
