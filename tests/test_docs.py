"""The README and docs/: every relative link resolves (file and, for Markdown targets, the
anchor), the README stays short, and the parameter table of docs/node.md is the one
lisa_ros.settings renders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
TABLE = re.compile(
    r"<!-- settings table: python -m lisa_ros.settings markdown -->\n(.*?)"
    r"<!-- end of settings table -->",
    re.S,
)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        title = re.sub(r"[^\w\- ]", "", title)
        found.add(title.replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [a or b for a, b in LINK.findall(text)]


def test_there_are_docs_pages() -> None:
    names = {p.name for p in PAGES}
    for name in ("node.md", "install.md", "replay.md", "training.md", "performance.md"):
        assert name in names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue  # external
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: {broken}"


def test_readme_is_short() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_the_parameter_table_is_the_settings() -> None:
    from lisa_ros.settings import render_markdown_table

    (table,) = TABLE.findall((REPO / "docs" / "node.md").read_text())
    assert table == render_markdown_table(), (
        "docs/node.md's parameter table is rendered from lisa_ros/settings.py: "
        "python -m lisa_ros.settings markdown"
    )
