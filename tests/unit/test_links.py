"""Symbolic links of a checkout: which lead out of it, and how a copied chart keeps the rest.
(On a scratch folder: links are a filesystem's, there is nothing pure to test them on.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from handlers.base import StepFailed
from handlers.helm import find_chart, links_out, prepare_chart, refuse_links_out

pytestmark = pytest.mark.unit


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "work" / "source"
    (root / "chart" / "app" / "templates").mkdir(parents=True)
    (root / "chart" / "app" / "Chart.yaml").write_text("apiVersion: v2\nname: app\n"
                                                        "version: 0.1.0\n")
    (root / "README.md").write_text("readme\n")
    (tmp_path / "work" / "beside.txt").write_text("not the repo's\n")
    return root


def link(path: Path, points_to: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(points_to, path)


def test_links_that_stay_inside_are_fine(checkout: Path) -> None:
    link(checkout / "chart/app/templates/readme", "../../../README.md")
    link(checkout / "chart/app/files/up", "../templates")
    link(checkout / "chart/app/files/chained", "../templates/readme")
    link(checkout / "chart/app/files/dangling", "nothing-here")
    link(checkout / "chart/app/files/loop", "loop")
    assert links_out(checkout, checkout / "chart/app") == []


@pytest.mark.parametrize("points_to", [
    "/etc/shadow",  # absolute
    "/proc/self/environ",
    "../../../../beside.txt",  # climbing out of the checkout
    "../../../../work/source/../beside.txt",  # climbing out and back past it
    "..//../../.././/beside.txt",
])
def test_a_link_out_of_the_checkout_is_named_with_where_it_points(
    checkout: Path, points_to: str
) -> None:
    link(checkout / "chart/app/files/x", points_to)
    assert links_out(checkout, checkout / "chart/app") == [("chart/app/files/x", points_to)]
    with pytest.raises(StepFailed) as info:
        refuse_links_out(checkout, checkout / "chart/app", "the chart chart/app")
    assert f"chart/app/files/x (a link to {points_to!r})" in info.value.message
    assert "outside the checkout" in info.value.message
    assert info.value.retryable is False


def test_a_link_to_a_link_that_leads_out_is_caught_at_both(checkout: Path) -> None:
    link(checkout / "chart/app/files/first", "second")
    link(checkout / "chart/app/files/second", "/etc")
    assert sorted(links_out(checkout, checkout / "chart/app")) == [
        ("chart/app/files/first", "second"), ("chart/app/files/second", "/etc")]


def test_what_a_link_to_a_folder_elsewhere_in_the_checkout_leads_to_is_checked(
    checkout: Path
) -> None:
    link(checkout / "elsewhere/secret", "/etc/passwd")
    link(checkout / "chart/app/templates/more", "../../../elsewhere")
    link(checkout / "chart/app/templates/again", "../../../elsewhere")
    assert links_out(checkout, checkout / "chart/app") == [("elsewhere/secret", "/etc/passwd")]


def test_a_link_on_the_way_to_the_folder_counts(checkout: Path, tmp_path: Path) -> None:
    (tmp_path / "host-charts").mkdir()
    link(checkout / "charts", str(tmp_path / "host-charts"))
    assert links_out(checkout, checkout / "charts" / "app") == [
        ("charts", str(tmp_path / "host-charts"))]


def test_find_chart_refuses_a_chart_with_a_link_out(checkout: Path) -> None:
    link(checkout / "chart/app/templates/shadow.yaml", "/etc/shadow")
    with pytest.raises(StepFailed) as info:
        find_chart(checkout, "chart")
    assert "chart/app/templates/shadow.yaml (a link to '/etc/shadow')" in info.value.message


def test_a_copied_chart_keeps_its_links_and_they_lead_to_the_same_files(
    checkout: Path, tmp_path: Path
) -> None:
    (checkout / "chart/app/notes.txt").write_text("notes\n")
    (checkout / "chart/app/values.yaml").write_text("a: 1\n")
    link(checkout / "chart/app/files/readme", "../../../README.md")
    link(checkout / "chart/app/files/notes", "../notes.txt")
    link(checkout / "chart/app/files/chained", "../../app/files/readme")
    link(checkout / "chart/app/Chart.yaml.orig", "Chart.yaml")
    (checkout / "shared-values.yaml").write_text("b: 2\n")
    (checkout / "chart/app/values.yaml").unlink()
    link(checkout / "chart/app/values.yaml", "../../shared-values.yaml")

    copy = prepare_chart(find_chart(checkout, "chart"), tmp_path / "out", name="renamed",
                         version="1.0.0", values={"image.tag": "abc"})

    files = copy / "files"
    assert all(p.is_symlink() for p in files.iterdir())
    assert os.readlink(files / "readme") == str((checkout / "README.md").resolve())
    assert os.readlink(files / "notes") == "../notes.txt"
    assert (files / "notes").read_text() == "notes\n"
    assert (files / "chained").read_text() == "readme\n"
    # the files cistate writes are its own; what the repo's links point at is left alone
    assert not (copy / "values.yaml").is_symlink()
    assert (copy / "values.yaml").read_text() == "b: 2\nimage:\n  tag: abc\n"
    assert (checkout / "shared-values.yaml").read_text() == "b: 2\n"
    # a link within the chart leads to the copy's own file
    assert "name: renamed\n" in (copy / "Chart.yaml.orig").read_text()
