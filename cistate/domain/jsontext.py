"""cistate's JSON text: fast (orjson), and never failing on a value a handler may return.

Its own module, so that what only reads JSON (the command line's reads of runs) loads it
without the events' types and hash chain.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """JSON text, fast (orjson); values orjson refuses (integers beyond 64 bits) go through
    the standard library rather than fail the message that carries them."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def loads(text: str | bytes) -> Any:
    """Parse JSON text (raises a ValueError subclass when it is not JSON)."""
    return orjson.loads(text)
