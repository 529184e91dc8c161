"""Masking secret values in what leaves the worker: step logs, output tails, error messages
and step outputs."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask half of every log


class Masker:
    """Replaces every secret value by `***`, in the forms a program is likely to print it:
    as is, base64 (of the value, and of the value with a newline, as `echo | base64` gives),
    URL-encoded and JSON-escaped."""

    def __init__(self, values: Iterable[str]) -> None:
        forms: set[str] = set()
        for value in values:
            if len(value) < MIN_SECRET_LENGTH:
                continue
            forms.update(_forms(value))
        self.forms = tuple(sorted((f for f in forms if len(f) >= MIN_SECRET_LENGTH),
                                  key=len, reverse=True))
        self._pattern = re.compile("|".join(map(re.escape, self.forms))) if self.forms else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def mask(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern is not None else text

    def mask_data(self, data: Any) -> Any:
        """`mask` applied to every string of a JSON-like value, keys included."""
        if self._pattern is None:
            return data
        if isinstance(data, str):
            return self.mask(data)
        if isinstance(data, dict):
            return {self.mask_data(k): self.mask_data(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return [self.mask_data(item) for item in data]
        return data

    def stream(self) -> MaskingStream:
        return MaskingStream(self)

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` could be the start of a secret."""
        longest = 0
        for form in self.forms:
            for size in range(min(len(form) - 1, len(text)), longest, -1):
                if text.endswith(form[:size]):
                    longest = size
                    break
        return longest


class MaskingStream:
    """Masks output that arrives in pieces: a value split across two writes is still found,
    because the end of each piece that could begin a secret waits for the next one."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self._pending = ""

    def feed(self, text: str) -> str:
        if not self.masker:
            return text
        masked = self.masker.mask(self._pending + text)
        hold = self.masker.held_back(masked)
        if hold:
            self._pending = masked[-hold:]
            return masked[:-hold]
        self._pending = ""
        return masked

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


def _forms(value: str) -> set[str]:
    raw = value.encode("utf-8")
    forms = {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}
    for data in (raw, raw + b"\n"):
        for encoded in (base64.b64encode(data), base64.urlsafe_b64encode(data)):
            forms.add(encoded.decode("ascii").rstrip("="))
    return forms
