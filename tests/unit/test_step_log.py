"""A step's output is kept whole up to the limit, else head and tail with what was cut."""

from __future__ import annotations

from pathlib import Path

import pytest

from handlers.base import TAIL_LINES, StepLog

pytestmark = pytest.mark.unit


def test_short_output_is_kept_whole_and_tail_has_the_last_lines() -> None:
    log = StepLog()
    for i in range(1, 81):
        log.line(f"line {i}")
    assert log.text() == "".join(f"line {i}\n" for i in range(1, 81))
    tail = log.tail().splitlines()
    assert len(tail) == TAIL_LINES and tail[-1] == "line 80" and tail[0] == "line 31"


def test_long_output_keeps_head_and_tail_and_says_how_much_was_cut() -> None:
    log = StepLog(limit=1000)
    log.write("H" * 400)
    for _ in range(100):
        log.write("m" * 100)
    log.write("T" * 300)
    text = log.text()
    assert text.startswith("H" * 400 + "m" * 100)  # the first 500 characters
    assert text.endswith("m" * 200 + "T" * 300)  # the last 500
    total = 400 + 100 * 100 + 300
    kept = text.replace(text[text.index("\n... ["):text.index("] ...\n") + 6], "")
    cut = int(text.split("... [")[1].split(" characters")[0])
    assert len(kept) + cut == total, "nothing is lost without being counted"
    assert len(kept) == 1000


def test_with_a_path_the_whole_output_also_goes_to_the_file(tmp_path: Path) -> None:
    log = StepLog(tmp_path / "out" / "step.log", limit=10)
    log.write("x" * 50)
    log.close()
    assert (tmp_path / "out" / "step.log").read_text() == "x" * 50
    assert "characters cut" in log.text()
