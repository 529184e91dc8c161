"""Signatures of bus messages and attempt tokens, pure."""

from __future__ import annotations

import hmac
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cistate.adapters.rabbitmq.signing import BadSignature, Signer, load_key
from cistate.domain.messages import Push, StepResult
from cistate.domain.pipeline import parse
from cistate.domain.run import Decider, Rejected, RunState, apply

pytestmark = pytest.mark.unit

SIGNER = Signer(b"unit-test-bus-key-0123456789abcdef")
PARTS = ("step.test.result", "0d6c5f0e-5d4a-4b4f-9f1e-0c1d2e3f4a5b", "handler:w1",
         b'{"run_id": "r", "status": "succeeded", "outputs": {"digest": "sha256:00"}}')


@given(part=st.integers(min_value=0, max_value=4), position=st.integers(min_value=0),
       flip=st.integers(min_value=1, max_value=255))
def test_flipping_any_byte_of_a_signed_message_gets_it_refused(
        part: int, position: int, flip: int) -> None:
    routing_key, message_id, sender, body = PARTS
    signature = SIGNER.sign(routing_key, message_id, sender, body)
    fields: list[bytes] = [routing_key.encode(), message_id.encode(), sender.encode(), body,
                           signature.encode()]
    data = bytearray(fields[part])
    data[position % len(data)] ^= flip
    fields[part] = bytes(data)
    try:
        changed = [fields[0].decode(), fields[1].decode(), fields[2].decode()]
    except UnicodeDecodeError:
        return  # not a header value RabbitMQ would carry: refused before any check
    with pytest.raises(BadSignature):
        SIGNER.verify(changed[0], changed[1], changed[2], fields[4].decode("latin-1"),
                      fields[3])


def test_an_untouched_message_verifies_and_names_its_sender() -> None:
    routing_key, message_id, sender, body = PARTS
    signature = SIGNER.sign(routing_key, message_id, sender, body)
    assert SIGNER.verify(routing_key, message_id, sender, signature, body) == sender
    with pytest.raises(BadSignature, match="must be signed"):
        SIGNER.verify(routing_key, message_id, sender, None, body)
    with pytest.raises(BadSignature, match="another key"):
        Signer(b"another-key-0123456789").verify(routing_key, message_id, sender,
                                                 signature, body)


def test_keys_come_from_the_setting_the_file_or_one_made_once(tmp_path: Path) -> None:
    assert load_key("k" * 20, None, tmp_path)[1] == "CISTATE_BUS_KEY"
    (tmp_path / "given").write_text("filekey-0123456789abcdef\n")
    assert load_key(None, tmp_path / "given", None)[0] == b"filekey-0123456789abcdef"
    with pytest.raises(ValueError, match="no bus key"):
        load_key(None, None, tmp_path / "empty")
    made, source = load_key(None, None, tmp_path / "work", create=True)
    assert source.endswith("(made now)") and (tmp_path / "work" / "bus.key").stat(
        ).st_mode & 0o777 == 0o600
    assert load_key(None, None, tmp_path / "work", create=True)[0] == made
    with pytest.raises(ValueError, match="at least 16"):
        Signer(b"short")


PIPELINE = parse("name: p\nsteps:\n  - {name: test, uses: noop}\n", "p.yaml", ["noop"])


def test_a_result_must_bring_back_its_attempts_token() -> None:
    decider = Decider(PIPELINE, SIGNER.attempt_token)
    now = datetime.now(UTC)
    state = RunState(id=uuid.uuid4())
    decision = decider.decide(state, Push(repo="https://g/a.git", ref="main",
                                          commit="ab" * 20), uuid.uuid4(), now)
    for event in decision.events:
        apply(state, event.type, event.data, now)
    [command] = [out.body for out in decision.outgoing if out.routing_key == "step.test.run"]
    token = SIGNER.attempt_token(state.id, "test", 1)
    assert command.token == token  # type: ignore[attr-defined]
    started = [e for e in decision.events if e.type == "step.started"]
    assert started[0].data["token"] == token, "step.started records it"

    def result(token: str | None) -> StepResult:
        return StepResult(run_id=state.id, step="test", attempt=1, status="succeeded",
                          token=token)

    for wrong in (None, "", "0" * 32, SIGNER.attempt_token(state.id, "test", 2)):
        with pytest.raises(Rejected, match="token"):
            decider.decide(state, result(wrong), uuid.uuid4(), now)
    assert decider.decide(state, result(token), uuid.uuid4(), now).events


@given(st.binary(min_size=16, max_size=200), st.binary(max_size=600))
def test_the_signers_mac_is_hmac_sha256_for_keys_of_any_length(key: bytes,
                                                              message: bytes) -> None:
    assert Signer(key).mac(message) == hmac.digest(key, message, "sha256")


def test_signatures_are_those_made_before_the_pads_were_kept() -> None:
    """The MAC of the first signed messages, as hmac.new gave it: keys shared with processes
    of an older release keep working."""
    signer = Signer(b"k" * 32)
    assert signer.sign("step.s1.run", "abc", "system", b'{"x":1}') == (
        "5b99f0be290c0de0709e4ff479318f1748e696c4f5a83db0ab930fd20fe730bf")
    assert signer.attempt_token(uuid.UUID(int=5), "s1", 2) == "628a96a51b7ef06ddf2130ca9a6c3a1e"
