"""The `cistate` command line (typer)."""
