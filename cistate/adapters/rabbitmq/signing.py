"""Signed messages between cistate's roles.

Commands, results, control messages and cancels carry an HMAC-SHA256 made with a key the
roles share (`CISTATE_BUS_KEY`, or the file `CISTATE_BUS_KEY_FILE`; without either,
`cistate serve` makes `<workdir>/bus.key` on first start). The MAC covers the routing key,
the message id, the sender and the body, so a message cannot be moved to another queue, given
another id, credited to another sender or changed. Pushes stay unsigned: producers are
outside, and a push can only open a run of the pipeline the deployment chose.

The sender a signature vouches for is who acted (`system`, `handler:<worker>`, `api:<token
name>`, `cli:<user>`): never a field of the body, which anyone who can publish could set.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cistate.config import ConfigError

SENDER_HEADER = "x-cistate-sender"
SIGNATURE_HEADER = "x-cistate-signature"
UNSIGNED_KEYS = frozenset({"push"})  # what producers outside cistate publish
KEY_FILE_NAME = "bus.key"
MIN_KEY_BYTES = 16


class BadSignature(Exception):
    """A message whose signature is missing or does not match: it changes nothing."""


@dataclass(frozen=True)
class Signer:
    key: bytes
    # HMAC-SHA256 (RFC 2104) with the key's inner and outer pads hashed once: each MAC then
    # costs two copies of a hash state and the hashing of the message itself, which is
    # cheaper here than hmac.new or hmac.digest setting the key up for every message
    _inner: Any = field(init=False, repr=False, compare=False)
    _outer: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) < MIN_KEY_BYTES:
            raise ValueError(f"the bus key must have at least {MIN_KEY_BYTES} bytes")
        block = hashlib.sha256().block_size
        key = hashlib.sha256(self.key).digest() if len(self.key) > block else self.key
        key = key.ljust(block, b"\0")
        object.__setattr__(self, "_inner", hashlib.sha256(bytes(b ^ 0x36 for b in key)))
        object.__setattr__(self, "_outer", hashlib.sha256(bytes(b ^ 0x5C for b in key)))

    def mac(self, message: bytes) -> bytes:
        """HMAC-SHA256 of `message` with the key (what hmac.digest gives)."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        digest: bytes = outer.digest()
        return digest

    def sign(self, routing_key: str, message_id: str, sender: str, body: bytes) -> str:
        # length-prefixed, so that no two different messages share a byte string
        signed = bytearray()
        for part in (b"cistate-bus-v1", routing_key.encode(), message_id.encode(),
                     sender.encode()):
            signed += len(part).to_bytes(4, "big")
            signed += part
        signed += body
        return self.mac(bytes(signed)).hex()

    def verify(self, routing_key: str, message_id: str | None, sender: object,
               signature: object, body: bytes) -> str:
        """The sender the signature vouches for; BadSignature saying why when it does not."""
        if not isinstance(signature, str | bytes) or not signature:
            raise BadSignature(f"a {routing_key} message must be signed by a cistate role "
                               f"(no {SIGNATURE_HEADER} header); it was refused unread")
        if not isinstance(sender, str | bytes) or not sender:
            raise BadSignature(f"a signed message must name its sender ({SENDER_HEADER})")
        sender_text = sender.decode() if isinstance(sender, bytes) else sender
        given = signature.decode() if isinstance(signature, bytes) else signature
        expected = self.sign(routing_key, message_id or "", sender_text, body)
        # bytes: a header with non-ASCII text is a mismatch, never a TypeError
        if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
            raise BadSignature(f"the {routing_key} message's signature does not match (its "
                               "routing key, id, sender or body was changed, or it was made "
                               "with another key); it was refused unread")
        return sender_text

    def attempt_token(self, run_id: uuid.UUID, step: str, attempt: int) -> str:
        """The token of one attempt: its command carries it, and its result must bring it
        back. Derived with the key, so it is deterministic (a decision made twice makes the
        same command) and cannot be guessed without the key."""
        return self.mac(f"attempt:{run_id}:{step}:{attempt}".encode()).hex()[:32]


def load_key(key: str | None, key_file: Path | None, workdir: Path | None,
             create: bool = False) -> tuple[bytes, str]:
    """The bus key and where it came from: CISTATE_BUS_KEY, else CISTATE_BUS_KEY_FILE, else
    `<workdir>/bus.key`, made (random, mode 0600) when `create` and it is not there yet."""
    if key:
        return key.encode(), "CISTATE_BUS_KEY"
    if key_file is not None:
        try:
            return key_file.read_bytes().strip(), f"CISTATE_BUS_KEY_FILE ({key_file})"
        except OSError as exc:
            raise ConfigError(f"cannot read CISTATE_BUS_KEY_FILE {key_file}: "
                             f"{exc.strerror}") from None
    if workdir is None:
        raise ConfigError("no bus key: set CISTATE_BUS_KEY or CISTATE_BUS_KEY_FILE")
    path = workdir / KEY_FILE_NAME
    if path.is_file():
        return path.read_bytes().strip(), f"{path}"
    if not create:
        raise ConfigError(f"no bus key: set CISTATE_BUS_KEY or CISTATE_BUS_KEY_FILE (or start "
                         f"`cistate serve` once, which makes {path})")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process on this machine made it a moment ago
        for _ in range(50):
            found = path.read_bytes().strip()
            if found:
                return found, f"{path}"
            time.sleep(0.02)
        raise ConfigError(f"{path} stays empty; remove it and start again") from None
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path.read_bytes().strip(), f"{path} (made now)"
