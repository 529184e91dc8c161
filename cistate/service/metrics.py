"""Prometheus metrics: what this process did, and the state of the store at scrape time.

The hot paths count with plain integers (`Counts`); prometheus-client only renders them,
with a fresh registry per scrape, next to gauges read from PostgreSQL when scraped. Counts
are per process (a replica counts its own work; sum them in PromQL); the store gauges are
the same from every replica.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cistate.domain.status import RUN_STATES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Counts:
    """What this process has done since it started."""

    messages: Counter[str] = field(default_factory=Counter)  # orchestrator: by outcome
    step_attempts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (step, status)
    ack_frames: int = 0  # ack/nack frames sent to RabbitMQ
    deliveries_finished: int = 0  # deliveries handed over to be acked or nacked


@dataclass(frozen=True)
class StoreState:
    """Read from PostgreSQL at scrape time."""

    runs: dict[str, int]  # by state
    outbox_due: int  # due and not yet published
    outbox_oldest_due_seconds: float  # 0 when none is due
    # concurrency groups and locks that are held or waited for: name -> (held, waiting)
    resources: dict[str, tuple[int, int]] = field(default_factory=dict)


class _Snapshot(Collector):
    def __init__(self, counts: Counts, store: StoreState) -> None:
        self.counts = counts
        self.store = store

    def collect(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        messages = CounterMetricFamily(
            "cistate_messages", "Messages this orchestrator handled, by outcome "
            "(recorded, duplicate, ignored, rejected, dead_lettered, requeued)",
            labels=["outcome"])
        for outcome, n in sorted(self.counts.messages.items()):
            messages.add_metric([outcome], n)
        attempts = CounterMetricFamily(
            "cistate_step_attempts", "Step attempts this worker finished, by step and status",
            labels=["step", "status"])
        for (step, status), n in sorted(self.counts.step_attempts.items()):
            attempts.add_metric([step, status], n)
        runs = GaugeMetricFamily("cistate_runs", "Runs in the store, by state",
                                 labels=["state"])
        for state in RUN_STATES:
            runs.add_metric([state], self.store.runs.get(state, 0))
        held = GaugeMetricFamily("cistate_resource_held", "Whether a run holds the "
                                 "concurrency group or lock (1) or not (0)",
                                 labels=["kind", "name"])
        waiting = GaugeMetricFamily("cistate_resource_waiting", "Runs waiting for the "
                                    "concurrency group or lock", labels=["kind", "name"])
        for resource, (holders, waiters) in sorted(self.store.resources.items()):
            kind, _, name = resource.partition(":")
            held.add_metric([kind, name], holders)
            waiting.add_metric([kind, name], waiters)
        return [
            messages, attempts, held, waiting,
            CounterMetricFamily("cistate_ack_frames", "Ack and nack frames sent to RabbitMQ",
                                value=self.counts.ack_frames),
            CounterMetricFamily("cistate_deliveries_finished",
                                "Deliveries handed over to be acked or nacked (batched into "
                                "the frames above)", value=self.counts.deliveries_finished),
            runs,
            GaugeMetricFamily("cistate_outbox_due_messages",
                              "Outbox messages due and not yet published (relay lag)",
                              value=self.store.outbox_due),
            GaugeMetricFamily("cistate_outbox_oldest_due_seconds",
                              "How long the oldest due, unpublished outbox message has waited",
                              value=self.store.outbox_oldest_due_seconds),
        ]


def exposition(counts: Counts, store: StoreState) -> bytes:
    """The Prometheus text format of the counts and the store's state."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(counts, store))
    return generate_latest(registry)
