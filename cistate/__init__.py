"""cistate: CI/CD pipelines as event-sourced state machines."""

__version__ = "0.1.0"
