"""What the commands print, tables and lines in rich's markup (`[green]succeeded[/]`).

On a terminal rich prints them (colours, folded to the terminal's width). On a pipe, where
rich prints them without colours at PIPE_WIDTH columns, they are drawn here to the same
characters without loading rich: importing rich and laying out 50 rows took ~80 ms, half of
what `cistate runs list` may take (bench/cli.py). What this drawing would not match rich
for (wider than PIPE_WIDTH, not printable ASCII, a backslash that may escape markup, a
title) still goes to rich. tests/unit/test_cli_output.py holds the two to the same text.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table as RichTable

PIPE_WIDTH = 200  # piped output (grep, logs) gets wide tables rather than cells folded to 80
# rich's markup tags (rich.markup.RE_TAGS, without its backslash escapes: text with a
# backslash goes to rich)
_TAG = re.compile(r"\[[a-z#/@][^[]*?]")

_console: Console | None = None


def console() -> Console:
    """stdout's rich console, made when a command first needs it."""
    global _console  # one per process, made on first use
    if _console is None:
        from rich.console import Console

        _console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    return _console


def _drawn_here() -> bool:
    """Whether stdout gets rich's plain text drawn here: a pipe or file that takes UTF-8
    (to another encoding rich draws its boxes in ASCII), and no FORCE_COLOR (with it rich
    prints colours to a pipe too)."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower()
    return (not sys.stdout.isatty() and encoding.startswith("utf")
            and not os.environ.get("FORCE_COLOR"))


def _plain(markup: str) -> str | None:
    """The text rich prints for `markup` without colours; None if this cannot tell."""
    if "\\" in markup or not (markup.isascii() and markup.isprintable()):
        return None
    return _TAG.sub("", markup)


class Table:
    """A table as rich draws it by default (`rich.table.Table(*headers)`: heavy head,
    a space of padding, each column as wide as its widest cell)."""

    def __init__(self, *headers: str, title: str | None = None) -> None:
        self.headers = headers
        self.title = title
        self.rows: list[tuple[str, ...]] = []

    def add_row(self, *cells: str) -> None:
        self.rows.append(cells)

    def rich(self) -> RichTable:
        from rich.table import Table as RichTable

        table = RichTable(*self.headers, title=self.title)
        for row in self.rows:
            table.add_row(*row)
        return table

    def plain(self) -> str | None:
        """The table as rich prints it at PIPE_WIDTH without colours; None where this
        drawing would differ from rich's."""
        if self.title is not None:
            return None
        rows: list[list[str]] = []
        for cells in (self.headers, *self.rows):
            row = [_plain(cell) for cell in cells]
            if None in row:
                return None
            rows.append([cell or "" for cell in row])
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.headers))]
        if sum(widths) + 3 * len(widths) + 1 > PIPE_WIDTH:
            return None  # rich would fold some cells

        def rule(left: str, line: str, cross: str, right: str) -> str:
            return left + cross.join(line * (width + 2) for width in widths) + right

        def boxed(row: list[str], edge: str) -> str:
            return edge + edge.join(f" {cell.ljust(width)} "
                                    for cell, width in zip(row, widths, strict=True)) + edge

        return "\n".join([rule("┏", "━", "┳", "┓"), boxed(rows[0], "┃"),
                          rule("┡", "━", "╇", "┩"), *(boxed(row, "│") for row in rows[1:]),
                          rule("└", "─", "┴", "┘")])


def show(table: Table) -> None:
    drawn = table.plain() if _drawn_here() else None
    if drawn is None:
        console().print(table.rich())
    else:
        _write(drawn)


def line(markup: str, highlight: bool = True) -> None:
    """One line of markup (rich's `highlight` colours numbers and such on a terminal)."""
    plain = _plain(markup) if _drawn_here() else None
    if plain is None or len(plain) > PIPE_WIDTH:  # rich would fold it
        console().print(markup, highlight=highlight)
    else:
        _write(plain)


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
