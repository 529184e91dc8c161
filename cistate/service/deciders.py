"""Which Decider decides a run: the one of the pipeline the run pinned.

A push is decided with the pipeline the deployment's Catalog chooses for its repository; the
run records that pipeline's spec and hash (cistate.domain.pipeline.Pipeline.pinned). Every
later message of the run is decided with the pinned spec, whatever the deployment's files
say by then: its Decider (machines and graph, ~2 ms to build) is kept by hash for the
runs that come after, and built again from the pinning event when this process has not
seen that hash yet (after a restart, or when another replica pinned it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol

from cistate.domain import pipeline as p
from cistate.domain.notices import QUIET, NoticePolicy
from cistate.domain.run import AttemptTokens, Decider, RunState

CACHE_SIZE = 256  # pipelines; a deployment has a few, repositories' own add one per version


class PinnedPipelines(Protocol):
    """Where a run's pinned spec is found (the event store)."""

    async def pinned_pipeline(self, run_id: Any, sha256: str) -> dict[str, Any] | None: ...


class PinnedPipelineMissing(Exception):
    """A run names a pinned pipeline its events do not hold (a damaged store)."""


class Deciders:
    def __init__(self, catalog: p.Catalog, tokens: AttemptTokens | None = None,
                 known_handlers: Iterable[str] | p.HandlerInputs = (),
                 notices: NoticePolicy = QUIET) -> None:
        self.catalog = catalog
        self.tokens = tokens
        self.notices = notices
        self.known_handlers = p.declared_inputs(known_handlers)
        self._by_hash: OrderedDict[str, Decider] = OrderedDict()
        # deployment pipeline's hash -> the decider of it with the step reading the repo's
        self._reading: dict[str, Decider] = {}

    @classmethod
    def of(cls, decider: Decider) -> Deciders:
        """One pipeline for every repository, with this decider for it."""
        deciders = cls(p.Catalog(decider.pipeline), decider.tokens, decider.known_handlers,
                       decider.notices)
        deciders.remember(decider.pipeline.sha256, decider)
        return deciders

    @property
    def default(self) -> Decider:
        return self._decider(self.catalog.default)

    def for_push(self, repo: str) -> Decider:
        """The decider of the pipeline a push of `repo` opens its run with."""
        deployment = self.catalog.choose_deployment(repo)
        if not self.catalog.reads_repo_file(repo):
            return self._decider(deployment)
        reading = self._reading.get(deployment.sha256)
        if reading is None:
            reading = self._decider(deployment.reading_repo_file())
            self._reading[deployment.sha256] = reading
        return reading

    async def for_run(self, state: RunState, store: PinnedPipelines) -> Decider:
        """The decider of the pipeline the run pinned; for a run from before pinning, of the
        deployment's pipeline for its repository, as such runs were decided then."""
        sha = state.pipeline_sha256
        if sha is None:
            return self._decider(self.catalog.choose_deployment(state.repo))
        cached = self._by_hash.get(sha)
        if cached is not None:
            self._by_hash.move_to_end(sha)
            return cached
        data = await store.pinned_pipeline(state.id, sha)
        if data is None or not isinstance(data.get("pipeline_spec"), dict):
            raise PinnedPipelineMissing(
                f"run {state.id} pinned pipeline {sha[:12]}, and none of its events holds it; "
                "`cistate audit verify` checks the run's events")
        spec = data["pipeline_spec"]
        if p.spec_sha256(spec) != sha:
            raise PinnedPipelineMissing(
                f"run {state.id}: the pinned pipeline's spec does not hash to {sha[:12]} "
                "(its event was edited); `cistate audit verify` checks the run's events")
        origin: p.Origin = "repo" if data.get("pipeline_origin") == "repo" else "deployment"
        pipeline = p.from_spec(spec, str(data.get("pipeline_source") or "<pinned>"), origin)
        decider = Decider(pipeline, self.tokens, self.known_handlers, self.catalog.served,
                          self.notices)
        self.remember(sha, decider)
        return decider

    def remember(self, sha256: str, decider: Decider) -> None:
        self._by_hash[sha256] = decider
        self._by_hash.move_to_end(sha256)
        while len(self._by_hash) > CACHE_SIZE:
            self._by_hash.popitem(last=False)

    def _decider(self, pipeline: p.Pipeline) -> Decider:
        cached = self._by_hash.get(pipeline.sha256)
        if cached is not None:
            return cached
        decider = Decider(pipeline, self.tokens, self.known_handlers, self.catalog.served,
                          self.notices)
        self.remember(pipeline.sha256, decider)
        return decider
