"""cistate: CI/CD pipelines as event-sourced state machines.

The package goes in three layers: `domain` (pure: the pipeline spec and its graph, the step
and run machines, events, fold and decide), `service` (the orchestrator, the worker, the
relay: what a role does with a message) and `adapters` (PostgreSQL, RabbitMQ, HTTP, the
command line). `bootstrap` wires them from the settings, and nothing imports it back.
"""

from pathlib import Path

__version__ = "0.1.0"

# The checkout cistate runs from: its schema/ (migrations, JSON Schemas) and scripts/.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
