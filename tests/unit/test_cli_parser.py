"""The command line's parser: each command gets the options it declares, by name, and a
mistake in them is exit status 2 with the command's usage (as typer had it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from cistate.adapters.cli import main as cli

pytestmark = pytest.mark.unit


def parsed(*argv: str) -> tuple[str, dict[str, Any]]:
    """What the command line `argv` runs, with what; the same whether every command's
    parser is built or only those named on the line (as `main` builds them)."""
    found = []
    for words in (None, set(argv)):
        args, extra = cli.parser(words).parse_known_args(argv)
        if extra:
            args.extra = extra
        found.append((args._command.__name__,
                      {name: getattr(args, name) for name in args._names}))
    assert found[0] == found[1]
    return found[0]


def test_each_command_gets_its_options_by_name() -> None:
    assert parsed("runs", "list", "--state", "failed", "--since", "2026-12-01",
                  "--limit", "7", "--json") == ("runs_list", {
        "state": "failed", "repo": None, "ref": None, "commit": None, "step": None,
        "since": datetime(2026, 12, 1), "until": None, "limit": 7, "as_json": True})
    assert parsed("runs", "show", "R", "--at", "3") == (
        "runs_show", {"run": "R", "at": 3, "as_json": False})
    assert parsed("runs", "retry", "R", "--from", "test") == (
        "runs_retry", {"run": "R", "from_step": "test", "reason": None, "as_json": False})
    assert parsed("runs", "logs", "R", "build", "-f") == (
        "runs_logs", {"run": "R", "step": "build", "follow_": True})
    assert parsed("serve", "--role", "api", "--role", "worker") == (
        "serve", {"role": ["api", "worker"], "step": None})
    assert parsed("push", "--repo", "r", "--ref", "main", "--commit", "c",
                  "--delivery-id", "d") == ("push", {
        "repo": "r", "ref": "main", "commit": "c", "delivery_id": "d", "pusher": None,
        "as_json": False})


def test_audit_is_a_command_and_a_group() -> None:
    name, options = parsed("audit", "--type", "run.retried")
    assert (name, options["type_"], options["limit"]) == ("audit", "run.retried", 100)
    assert parsed("audit", "verify", "R", "--json") == (
        "audit_verify", {"run": "R", "as_json": True})
    assert parsed("audit", "verify") == ("audit_verify", {"run": None, "as_json": False})


def test_quickstart_passes_on_what_it_does_not_know() -> None:
    assert parsed("quickstart", "--dir", "/tmp/q", "--without-kube") == (
        "quickstart", {"extra": ["--dir", "/tmp/q", "--without-kube"]})
    assert parsed("quickstart") == ("quickstart", {"extra": []})


@pytest.mark.parametrize("argv", [
    (), ("runs",), ("bogus",), ("runs", "show"), ("runs", "list", "--limit", "0"),
    ("runs", "list", "--limit", "1001"), ("runs", "list", "--since", "yesterday"),
    ("runs", "list", "--bogus"), ("runs", "watch", "R", "--interval", "0.01"),
    ("runs", "show", "R", "--at", "0"), ("push", "--repo", "r"), ("runs", "list", "--lim", "5"),
])
def test_a_mistake_is_exit_status_2(argv: tuple[str, ...],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    assert exited.value.code == 2
    printed = capsys.readouterr()
    assert "usage: cistate" in printed.out + printed.err


@pytest.mark.parametrize("argv", [("--help",), ("runs", "--help"), ("runs", "list", "--help"),
                                  ("audit", "--help"), ("audit", "verify", "--help")])
def test_help_is_exit_status_0_and_lists_every_command(
        argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    helps = []
    for words in (None, set(argv)):
        with pytest.raises(SystemExit) as exited:
            cli.parser(words).parse_known_args(argv)
        assert exited.value.code == 0
        helps.append(capsys.readouterr().out)
    assert helps[0] == helps[1]
    assert "usage: cistate" in helps[0]


def test_an_unknown_command_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["runs", "sohw"])
    error = capsys.readouterr().err
    assert "invalid choice: 'sohw'" in error
    assert all(f"'{name}'" in error for name in ("list", "show", "watch", "rerun"))
