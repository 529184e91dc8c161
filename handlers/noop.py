"""`uses: noop`: does nothing and succeeds, so benchmarks measure orchestration alone."""

from __future__ import annotations

from typing import Any

from handlers.base import StepRequest


async def run(request: StepRequest) -> dict[str, Any]:
    return {}
