"""On a pipe the command line draws its tables and lines itself, without rich: the text is
the very text rich prints there (no colours, PIPE_WIDTH columns), and what it cannot draw
the same goes to rich."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from cistate.adapters.cli import output

pytestmark = pytest.mark.unit

RUN = "7d2b0c8e-51a6-5a8e-9d0e-3f1c2b4a5e6f"
TABLES = [
    (("id", "state", "step", "repo", "ref", "commit", "created"), [
        (RUN, "[green]succeeded[/]", "deploy", "https://git.example.com/acme/shop.git",
         "refs/heads/main", "0123456789ab", "2026-12-03 09:00:00"),
        (RUN, "[cyan]running[/]", "", "git@host:a/b.git", "refs/pull/7/head", "ab", ""),
        (RUN, "queued", "a-much-longer-step-name", "r", "main", "", "2026-12-03 09:00:01")]),
    (("step", "state", "attempts", "outputs / error", "started", "finished",
      "waiting / queued / running"), [
        ("build", "[green]succeeded[/]", "1", "image=registry/shop:1, digest=sha256:abab",
         "2026-12-03 09:00:00", "2026-12-03 09:00:02", "- / 0.01s / 2.00s"),
        ("test", "[red]failed[/]", "3", "exit status 2: npm test (see the log) [x]", "", "",
         "")]),
    (("seq", "type"), []),  # no rows: the head and the bottom rule
    (("a", "b"), [("", "")]),
    # what goes to rich: wider than the pipe, not ASCII, a line break, an escape
    (("step", "detail"), [("s", "x" * 250)]),
    (("step", "detail"), [("s", "ünïcode ✓ 漢字")]),
    (("step", "detail"), [("s", "two\nlines")]),
    (("step", "detail"), [("s", r"not \[bold] markup")]),
]
LINES = [
    f"run [bold]{RUN}[/]  [green]succeeded[/]  https://git.example.com/a.git refs/heads/main "
    "0123456789ab  (version 7)",
    "pipeline default (pinned 0123456789ab)",
    "waits for lock 'deploy-qa': held by run nobody (its turn is on the way)",
    "more: --before 12345",
    "y" * 230,
    "“quoted” — dashes",
]


def rich_text(*renderables: object, highlight: bool = True) -> str:
    buffer = io.StringIO()
    Console(width=output.PIPE_WIDTH, file=buffer).print(*renderables, highlight=highlight)
    return buffer.getvalue()


def printed(capsys: pytest.CaptureFixture[str], print_it: object) -> str:
    assert callable(print_it)
    print_it()
    return capsys.readouterr().out


@pytest.mark.parametrize(("headers", "rows"), TABLES)
def test_a_table_on_a_pipe_is_the_text_rich_prints(
        headers: tuple[str, ...], rows: list[tuple[str, ...]],
        capsys: pytest.CaptureFixture[str]) -> None:
    table = output.Table(*headers)
    for row in rows:
        table.add_row(*row)
    assert printed(capsys, lambda: output.show(table)) == rich_text(table.rich())


@pytest.mark.parametrize("markup", LINES)
def test_a_line_on_a_pipe_is_the_text_rich_prints(
        markup: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert printed(capsys, lambda: output.line(markup)) == rich_text(markup)


def test_the_usual_tables_and_lines_are_drawn_without_rich() -> None:
    for headers, rows in TABLES[:4]:
        table = output.Table(*headers)
        for row in rows:
            table.add_row(*row)
        assert table.plain() is not None, headers
    for headers, rows in TABLES[4:]:
        table = output.Table(*headers)
        for row in rows:
            table.add_row(*row)
        assert table.plain() is None, rows


def test_to_an_encoding_other_than_utf8_rich_draws_it(monkeypatch: pytest.MonkeyPatch) -> None:
    table = output.Table(*TABLES[0][0])
    for row in TABLES[0][1]:
        table.add_row(*row)
    latin1 = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    monkeypatch.setattr(sys, "stdout", latin1)
    output.show(table)
    latin1.flush()
    printed = latin1.buffer.getvalue().decode("latin-1")  # type: ignore[attr-defined]
    assert printed.startswith("+-"), printed[:200]  # rich's ASCII box
